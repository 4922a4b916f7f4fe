"""Compiled programs: parameter placement, ahead-of-time compiles, memory and fit.

A run compiles one program per (method, batch size, padded widths) from abstract
arguments (`jax.ShapeDtypeStruct`s with shardings), before any weight is loaded, so
`rain_jax.run` can refuse a program that cannot fit the devices and `rain_jax.plan` can
compile the same programs for a TPU slice it does not have.

Parameter layouts: programs compile with `Layout.AUTO` for the parameters, so XLA stores
each weight the way its matmuls read it, and the parameters are placed once in the
layouts the first program chose. With the default layouts a scanned LLaMA-7B RAIN
program on TPU v4 copied wq/wk/wv/w_gate/w_up into the layout it wanted inside the
program: 2.1 GiB of temporaries per chip at 7B on 4 chips; the same stacks are 10.5 GiB
per chip at 65B on 8 (docs/measurements.md). Handing a later program those same layouts
as concrete formats brought the copies back (TPU v4, jax 0.10.2), so every program
compiles with AUTO, and only a program that chooses other layouts than the first is
compiled again with the first's (and then copies what it must).
"""
import dataclasses
import logging
import re
import time
from typing import Any, Optional, Sequence

import jax
from jax.experimental.layout import Format, Layout

GIB = 2 ** 30
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ParamPlacement:
  """Where the parameters live: shardings, then the layouts the first program chose.

  shardings: pytree of NamedSharding, like the parameters. formats: None until a program
  is compiled; then the pytree of `Format`s every program takes the parameters in.
  auto: whether programs compile with Layout.AUTO parameters.
  """
  shardings: Any
  formats: Any = None
  auto: bool = True  # False once a backend refused to choose the layouts
  _source: Any = dataclasses.field(default=None, repr=False)  # what `place` was given
  _placed: Any = dataclasses.field(default=None, repr=False)  # and what it returned

  def auto_spec(self):
    """The parameters' entry in a jit's in_shardings: their shardings, layouts AUTO."""
    if self.shardings is None or not self.auto:
      return self.shardings
    return jax.tree.map(lambda s: Format(Layout.AUTO, s), self.shardings)

  def agrees(self, compiled) -> bool:
    """Whether `compiled` (first argument: the parameters) takes them in the layouts
    placed so far; the first program compiled sets them."""
    return self.agrees_with(compiled.input_formats[0][0])

  def agrees_with(self, chosen) -> bool:
    """Whether the formats a program chose for these parameters are those placed so far
    (the first program's choice sets them)."""
    if self.shardings is None:
      return True
    if self.formats is None:
      self.formats = chosen
    return _layouts(chosen) == _layouts(self.formats)

  def place(self, params, donate=False):
    """params laid out as the programs take them (a copy only where they differ), placed
    once for all the runners that share this placement: a second copy of 65B weights
    would not fit. donate: give up each source array as its copy is made (then use only
    the result), so a relayout holds at most one extra array at a time."""
    if self.formats is None:
      return params
    if params is not self._source and params is not self._placed:
      self._source, self._placed = params, jax.device_put(params, self.formats,
                                                          donate=donate)
    return self._placed


class JointPlacement:
  """Two parameter trees one program takes as one argument, (policy, judge): RAIN with
  a judge model (--judge_model). Each part keeps its own ParamPlacement, so the
  policy's is the one the run's other programs share (its weights placed once); the
  interface is ParamPlacement's, over the pair."""

  def __init__(self, policy: ParamPlacement, judge: ParamPlacement):
    self.parts = (policy, judge)

  @property
  def shardings(self):
    return tuple(p.shardings for p in self.parts)

  @property
  def formats(self):
    formats = tuple(p.formats for p in self.parts)
    return None if any(f is None and p.shardings is not None
                       for f, p in zip(formats, self.parts)) else formats

  @property
  def auto(self) -> bool:
    return all(p.auto for p in self.parts)

  @auto.setter
  def auto(self, value: bool):
    for p in self.parts:
      p.auto = value

  def auto_spec(self):
    return tuple(p.auto_spec() for p in self.parts)

  def agrees(self, compiled) -> bool:
    chosen = compiled.input_formats[0][0]
    return all([p.agrees_with(c) for p, c in zip(self.parts, chosen)])

  def place(self, params, donate=False):
    return tuple(p.place(x, donate=donate) for p, x in zip(self.parts, params))


def _layouts(formats):
  return [str(f.layout) for f in jax.tree.leaves(formats)]


@dataclasses.dataclass(frozen=True)
class MemoryUse:
  """Per-device bytes of one compiled program (XLA's memory_analysis).

  arguments: inputs (parameters, prompts); outputs; aliased: outputs that reuse input
  buffers; temporaries: everything the program allocates inside (caches, tree,
  activations); code: the executable. peak = arguments + outputs - aliased +
  temporaries + code, the most the program holds at once on one device.
  """
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @classmethod
  def of(cls, compiled) -> 'MemoryUse':
    stats = compiled.memory_analysis()
    if stats is None:
      raise ValueError('this backend reports no memory analysis for compiled programs')
    return cls(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
               aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
               code=stats.generated_code_size_in_bytes)

  def as_gib(self) -> dict:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {f'{name}_gib': round(value / GIB, 3) for name, value in
            {**fields, 'peak': self.peak}.items()}


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program: method ('rain' or 'vanilla'), batch_size, prompt_width,
  judge_width (0 for vanilla), the executable, its compile seconds and memory.

  A program XLA refused to compile for lack of device memory (TPU compiles check HBM)
  has compiled None, the refusal in `out_of_memory`, and in `memory` what XLA said the
  temporaries need (the other fields 0)."""
  method: str
  batch_size: int
  prompt_width: int
  judge_width: int
  compiled: Any
  compile_seconds: float
  memory: MemoryUse
  out_of_memory: str = ''
  trace_seconds: float = 0.0  # the part of compile_seconds spent tracing and lowering

  def describe(self) -> str:
    widths = f'prompt {self.prompt_width}'
    if self.judge_width:
      widths += f', judge {self.judge_width}'
    return f'{self.method} program (batch {self.batch_size}, {widths} tokens)'


def _out_of_memory(error) -> bool:
  return 'RESOURCE_EXHAUSTED' in str(error)


def compile_program(method, batch_size, prompt_width, judge_width, build, args,
                    placement: ParamPlacement) -> Program:
  """Compiles `build(parameter in_shardings entry)` (a jitted function whose first
  argument is the parameters) for abstract `args`, parameter layouts AUTO; compiles
  again with the placed layouts when it chose others (see the module docstring). A
  backend that cannot choose layouts gets the default ones from then on."""
  t0 = time.time()
  lowered = build(placement.auto_spec()).lower(*args)
  trace_seconds = time.time() - t0
  try:
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if _out_of_memory(e) or not placement.auto:
        raise
      logger.warning('compiling with XLA-chosen parameter layouts failed (%s); using the '
                     'default layouts', str(e).splitlines()[0])
      placement.auto = False
      compiled = build(placement.auto_spec()).lower(*args).compile()
    if not placement.agrees(compiled):
      compiled = build(placement.formats).lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if not _out_of_memory(e):
      raise
    message = str(e).strip().splitlines()[0]
    need = re.search(r'HLO temporaries \(([\d.]+)G\)', message)
    temporaries = int(float(need.group(1)) * GIB) if need else 0
    return Program(method, batch_size, prompt_width, judge_width, None, time.time() - t0,
                   MemoryUse(0, 0, 0, temporaries, 0), out_of_memory=message,
                   trace_seconds=trace_seconds)
  return Program(method, batch_size, prompt_width, judge_width, compiled, time.time() - t0,
                 MemoryUse.of(compiled), trace_seconds=trace_seconds)


def device_memory_bytes(devices: Sequence[Any]) -> Optional[int]:
  """The smallest memory limit the runtime reports for `devices` (None on CPU, which
  reports none)."""
  limits = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if not stats or 'bytes_limit' not in stats:
      return None
    limits.append(int(stats['bytes_limit']))
  return min(limits) if limits else None


def fit_error(program: Program, limit_bytes: Optional[int]) -> Optional[str]:
  """A one-line reason why `program` cannot run in `limit_bytes` per device (None if
  it fits or no limit is known)."""
  if program.out_of_memory:
    return (f'the {program.describe()} does not fit the devices: {program.out_of_memory}; '
            f'use more devices (--mesh), a smaller --batch_size, or plan one with '
            f'python -m rain_jax.plan')
  if limit_bytes is None or program.memory.peak <= limit_bytes:
    return None
  m = program.memory
  return (f'the {program.describe()} needs {m.peak / GIB:.2f} GiB per device '
          f'(arguments {m.arguments / GIB:.2f}, temporaries {m.temporaries / GIB:.2f}) but a '
          f'device holds {limit_bytes / GIB:.2f} GiB; use more devices (--mesh), a smaller '
          f'--batch_size, or plan one with python -m rain_jax.plan')


def choose_widths(maxima: Sequence[int], max_programs: int, granularity: int) -> list[int]:
  """At most `max_programs` padded widths covering every batch, with the least padding.

  maxima: each batch's longest row (tokens). Every batch is then padded to the smallest
  chosen width that holds it; the choice minimises the sum of padded widths (a proxy of
  the work) by dynamic programming over the multiples of `granularity` that batches need.
  Returns the chosen widths, ascending.
  """
  if max_programs < 1:
    raise ValueError(f'max_programs must be >= 1, got {max_programs}')
  needed = sorted({-(-m // granularity) * granularity for m in maxima})
  if len(needed) <= max_programs:
    return needed
  counts = [sum(1 for m in maxima if -(-m // granularity) * granularity == w) for w in needed]
  n = len(needed)
  # cost[i][k]: least padded work for the batches of needed[:i+1] with k widths, the
  # largest being needed[i]; the largest need is always a chosen width.
  inf = float('inf')
  cost = [[inf] * (max_programs + 1) for _ in range(n)]
  back = [[None] * (max_programs + 1) for _ in range(n)]
  for i in range(n):
    cost[i][1] = needed[i] * sum(counts[:i + 1])
    for k in range(2, max_programs + 1):
      for j in range(i):
        c = cost[j][k - 1] + needed[i] * sum(counts[j + 1:i + 1])
        if c < cost[i][k]:
          cost[i][k], back[i][k] = c, j
  k = min(range(1, max_programs + 1), key=lambda k: cost[n - 1][k])
  chosen, i = [], n - 1
  while i is not None:
    chosen.append(needed[i])
    i, k = back[i][k], k - 1
  return sorted(chosen)


def padded_width(longest: int, widths: Sequence[int]) -> int:
  """The smallest of `widths` (ascending) that holds `longest` tokens."""
  for width in widths:
    if width >= longest:
      return width
  raise ValueError(f'no planned width holds {longest} tokens (widths {list(widths)})')
