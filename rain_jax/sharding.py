"""Device mesh, partition rules and shardings for the model, its cache and its inputs.

Mesh axes are ('data', 'fsdp', 'tensor'):

- 'data' and 'fsdp' both split batch rows (inputs, activations, the KV cache). 'fsdp'
  additionally splits one dimension of every weight matrix, so XLA gathers a layer's
  weights when it runs it (FSDP); 'data' keeps whole weights.
- 'tensor' splits attention heads, the MLP hidden dimension and the vocabulary
  (Megatron style): column-parallel wq/wk/wv/w_gate/w_up, row-parallel wo/w_down.

Parameter rules, per parameter path (docs/engine.md §1 names joined with '/'); a
stacked parameter (`scan_layers=True`) has one more leading axis, the layer axis [L],
which is never sharded:

| parameter | shape | spec |
| --- | --- | --- |
| embed/embedding | [V, H] | ('tensor', 'fsdp') |
| attn/wq, wk, wv kernel | [H, heads*D] | ('fsdp', 'tensor') |
| attn/wo kernel | [NH*D, H] | ('tensor', 'fsdp') |
| mlp/w_gate, w_up kernel | [H, F] | ('fsdp', 'tensor') |
| mlp/w_down kernel | [F, H] | ('tensor', 'fsdp') |
| lm_head (engine.md: lm_head/kernel) | [H, V] | ('fsdp', 'tensor') |
| attn_norm, mlp_norm, final_norm scale | [H] | replicated |
| LoRA `<proj>_lora/a` [in, r], `b` [r, out] (models/lora.py) | | in / out split as the kernel's, r whole |

KV cache `k, v: [L, B, KVH, S, D]`: (None, ('data', 'fsdp'), 'tensor', None, None), so
each device holds the cache of the rows and heads it computes, matching the activations
(batch over ('data', 'fsdp')) and the head split of wk/wv; no resharding per step.

Divisibility: a heads*D dimension is split by whole heads only (heads % tensor == 0),
never inside a head, as splitting a head would make every attention all-gather. When a
dimension does not divide by the size of its mesh axes, it is replicated for that array
(a batch dimension over ('data', 'fsdp') first drops 'fsdp', then 'data'), and one
warning names the array, the axis and the sizes; with `strict=True` the same is a
ValueError instead.
"""

import logging
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

logger = logging.getLogger(__name__)


class PartitionRule(NamedTuple):
  """How to shard the parameters whose path matches `pattern` (re.search).

  spec: one entry per dimension of the unstacked parameter: a mesh axis name or None.
  head_dims: indices into `spec` of dimensions laid out as heads*D, split by whole
    heads only.
  """
  pattern: str
  spec: tuple
  head_dims: tuple = ()


PARTITION_RULES = (
    PartitionRule(r'(^|/)embed/embedding$', ('tensor', 'fsdp')),
    PartitionRule(r'(^|/)attn/w[qkv]/kernel$', ('fsdp', 'tensor'), head_dims=(1,)),
    PartitionRule(r'(^|/)attn/wo/kernel$', ('tensor', 'fsdp'), head_dims=(0,)),
    PartitionRule(r'(^|/)mlp/w_(gate|up)/kernel$', ('fsdp', 'tensor')),
    PartitionRule(r'(^|/)mlp/w_down/kernel$', ('tensor', 'fsdp')),
    PartitionRule(r'(^|/)lm_head(/kernel)?$', ('fsdp', 'tensor')),
    PartitionRule(r'(^|/)(attn_norm|mlp_norm|final_norm)/scale$', (None,)),
    # LoRA updates (models/lora.py): a [in, r] splits its input dimension like the
    # kernel, b [r, out] its output dimension; the rank is never split.
    PartitionRule(r'(^|/)attn/w[qkv]_lora/a$', ('fsdp', None)),
    PartitionRule(r'(^|/)attn/w[qkv]_lora/b$', (None, 'tensor'), head_dims=(1,)),
    PartitionRule(r'(^|/)attn/wo_lora/a$', ('tensor', None), head_dims=(0,)),
    PartitionRule(r'(^|/)attn/wo_lora/b$', (None, 'fsdp')),
    PartitionRule(r'(^|/)mlp/w_(gate|up)_lora/a$', ('fsdp', None)),
    PartitionRule(r'(^|/)mlp/w_(gate|up)_lora/b$', (None, 'tensor')),
    PartitionRule(r'(^|/)mlp/w_down_lora/a$', ('tensor', None)),
    PartitionRule(r'(^|/)mlp/w_down_lora/b$', (None, 'fsdp')),
)


def parse_mesh_shape(spec: str | Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """Sizes of the ('data', 'fsdp', 'tensor') axes from a spec like "2,-1,4".

  One entry may be -1, meaning all devices the other two leave. The product must equal
  `num_devices`.
  """
  if isinstance(spec, str):
    entries = [entry.strip() for entry in spec.split(',')]
  else:
    entries = list(spec)
  if len(entries) != len(MESH_AXES):
    raise ValueError(
        f'mesh spec {spec!r} must have {len(MESH_AXES)} entries {MESH_AXES}, '
        f'got {len(entries)}')
  sizes = []
  for entry in entries:
    if isinstance(entry, (bool, np.bool_)) or not isinstance(entry, (str, int, np.integer)):
      raise ValueError(f'mesh spec {spec!r}: entry {entry!r} is not an integer')
    try:
      size = int(entry)
    except ValueError:
      raise ValueError(f'mesh spec {spec!r}: entry {entry!r} is not an integer') from None
    if size != -1 and size < 1:
      raise ValueError(f'mesh spec {spec!r}: entry {size} must be positive or -1')
    sizes.append(size)
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh spec {spec!r}: at most one entry may be -1')
  known = int(np.prod([size for size in sizes if size != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f'mesh spec {spec!r}: the fixed entries multiply to {known}, which does not '
          f'divide the device count {num_devices}')
    sizes[sizes.index(-1)] = num_devices // known
  elif known != num_devices:
    raise ValueError(
        f'mesh spec {spec!r} has {known} devices in all (product of {sizes}), but there '
        f'are {num_devices} devices')
  return tuple(sizes)


def make_mesh(spec: str | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with axes ('data', 'fsdp', 'tensor') over `devices` (default: all)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = parse_mesh_shape(spec, len(devices))
  return Mesh(np.array(devices, dtype=object).reshape(shape), MESH_AXES)


def _axis_names(axes: str | tuple | None) -> tuple:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _fit_dimension(name: str, dim: int, size: int, axes: str | tuple | None,
                   axis_sizes: Mapping[str, int], head_dim: int,
                   notes: list) -> str | tuple | None:
  """The longest prefix of `axes` that splits dimension `dim` evenly (None: replicate).

  size: the dimension's length; head_dim > 1 means it is heads*head_dim and may only
  be split by whole heads. Appends a note to `notes` when axes had to be dropped.
  """
  names = _axis_names(axes)
  for axis in names:
    if axis not in axis_sizes:
      raise ValueError(f'{name}: mesh has no axis {axis!r} (axes: {tuple(axis_sizes)})')
  if size % head_dim:
    raise ValueError(
        f'{name}: dimension {dim} of size {size} is not a whole number of heads of '
        f'size {head_dim}')
  units = size // head_dim
  keep = len(names)
  while keep and units % int(np.prod([axis_sizes[axis] for axis in names[:keep]])):
    keep -= 1
  if keep < len(names):
    total = int(np.prod([axis_sizes[axis] for axis in names]))
    what = f'{units} heads of {head_dim}' if head_dim > 1 else f'size {size}'
    fallback = f'split over {names[:keep]}' if keep else 'replicated'
    notes.append(
        f'{name}: dimension {dim} ({what}) is not divisible by mesh axis '
        f'{names if len(names) > 1 else names[0]!r} of size {total}; {fallback} instead')
  if keep == 0:
    return None
  return names[0] if keep == 1 else names[:keep]


def _resolve_spec(name: str, shape: Sequence[int], spec: Sequence,
                  axis_sizes: Mapping[str, int], head_dims: Mapping[int, int],
                  notes: list) -> PartitionSpec:
  """Fits `spec` (one entry per dim of `shape`) to the mesh, dimension by dimension.

  head_dims: dimension index -> head size, for dimensions laid out as heads*D.
  """
  return PartitionSpec(*(
      _fit_dimension(name, dim, size, axes, axis_sizes, head_dims.get(dim, 1), notes)
      for dim, (size, axes) in enumerate(zip(shape, spec))))


def _report(notes: list, strict: bool) -> None:
  if strict and notes:
    raise ValueError('cannot shard evenly (strict=True):\n' + '\n'.join(notes))
  for note in dict.fromkeys(notes):
    logger.warning('%s', note)


def path_name(path: Sequence[Any]) -> str:
  """'/'-joined names of a pytree key path, e.g. 'params/layers/attn/wq/kernel'."""
  parts = []
  for key in path:
    for attribute in ('key', 'name', 'idx'):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _param_spec(name: str, shape: Sequence[int], axis_sizes: Mapping[str, int],
                head_dim: int, rules: Sequence[PartitionRule], notes: list) -> PartitionSpec:
  for rule in rules:
    if re.search(rule.pattern, name):
      break
  else:
    raise ValueError(f'no partition rule matches parameter {name!r} of shape {tuple(shape)}')
  extra = len(shape) - len(rule.spec)
  if extra not in (0, 1):
    raise ValueError(
        f'parameter {name!r} has shape {tuple(shape)}; its rule {rule.pattern!r} expects '
        f'{len(rule.spec)} dimensions, or one more leading layer axis')
  spec = (None,) * extra + tuple(rule.spec)
  head_dims = {dim + extra: head_dim for dim in rule.head_dims}
  return _resolve_spec(name, shape, spec, axis_sizes, head_dims, notes)


def param_specs(params_shapes: Any, axis_sizes: Mapping[str, int], strict: bool = False, *,
                head_dim: int, rules: Sequence[PartitionRule] = PARTITION_RULES) -> Any:
  """PartitionSpecs for a parameter pytree, by the rules, fitted to the mesh sizes.

  params_shapes: pytree of arrays or jax.ShapeDtypeStruct (anything with .shape).
  axis_sizes: mesh axis name -> size (Mesh.shape).
  head_dim: D, the size of one attention head (q/k/v/o kernels are split by whole heads).
  """
  if head_dim < 1:
    raise ValueError(f'head_dim must be positive, got {head_dim}')
  notes = []
  specs = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _param_spec(path_name(path), leaf.shape, axis_sizes, head_dim,
                                     rules, notes),
      params_shapes)
  _report(notes, strict)
  return specs


def param_shardings(params_shapes: Any, mesh: Mesh, strict: bool = False, *,
                    head_dim: int) -> Any:
  """NamedShardings for a parameter pytree (same structure as `params_shapes`).

  head_dim: D, the size of one attention head. See the module docstring for the rules
  and the fallback when a dimension does not divide.
  """
  specs = param_specs(params_shapes, mesh.shape, strict, head_dim=head_dim)
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs,
                                is_leaf=lambda node: isinstance(node, PartitionSpec))


def cache_spec(axis_sizes: Mapping[str, int], cache_shape: Sequence[int],
               strict: bool = False) -> PartitionSpec:
  """PartitionSpec of one KV cache array k or v: [L, B, KVH, S, D].

  Rows over ('data', 'fsdp'), KV heads over 'tensor', layers/slots/head dim whole.
  axis_sizes: mesh axis name -> size (Mesh.shape).
  """
  if len(cache_shape) != 5:
    raise ValueError(f'KV cache shape must be [L, B, KVH, S, D], got {tuple(cache_shape)}')
  notes = []
  spec = _resolve_spec('kv cache', cache_shape, (None, BATCH_AXES, 'tensor', None, None),
                       axis_sizes, {}, notes)
  _report(notes, strict)
  return spec


def cache_sharding(mesh: Mesh, cache_shape: Sequence[int], strict: bool = False) -> NamedSharding:
  """Sharding of one KV cache array k or v: [L, B, KVH, S, D] (see `cache_spec`).

  A single NamedSharding is also a valid jit in/out sharding for the whole
  KVCache(k, v) pytree (a pytree prefix).
  """
  return NamedSharding(mesh, cache_spec(mesh.shape, cache_shape, strict))


def batch_spec(axis_sizes: Mapping[str, int], ndim: int, batch_size: int,
               strict: bool = False) -> PartitionSpec:
  """PartitionSpec of a [B, ...] array of `ndim` dims: rows over ('data', 'fsdp').

  batch_size: B, needed to fall back when it does not divide by the mesh axes.
  """
  if ndim < 1:
    raise ValueError(f'a batch array needs a leading batch axis, got ndim={ndim}')
  notes = []
  rows = _fit_dimension(f'batch of {batch_size} rows', 0, batch_size, BATCH_AXES,
                        axis_sizes, 1, notes)
  _report(notes, strict)
  return PartitionSpec(rows, *(None,) * (ndim - 1))


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int,
                   strict: bool = False) -> NamedSharding:
  """Sharding of a [B, ...] input or output (tokens, positions, masks, logits)."""
  return NamedSharding(mesh, batch_spec(mesh.shape, ndim, batch_size, strict))


def constrain_rows(tree: Any, mesh: Mesh | None) -> Any:
  """`tree` with every array constrained to rows over ('data', 'fsdp') (see
  `batch_spec`; scalars replicated). Inside a jitted program this pins arrays that XLA's
  propagation would otherwise place as it likes (the search tree, its commit records)."""
  if mesh is None:
    return tree

  def constrain(x):
    spec = batch_spec(mesh.shape, x.ndim, x.shape[0]) if x.ndim else PartitionSpec()
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(constrain, tree)


# XLA's CPU runtime with several host devices (XLA_FLAGS=
# --xla_force_host_platform_device_count=N, the simulated meshes tests and CPU runs use):
# under its concurrency-optimised scheduler RAIN with a judge model deadlocked in the
# collectives on 8 devices (meshes 4,1,2 and 2,2,2: devices waiting at different
# all-gathers); with this flag every mesh tested gives the one-device answers
# (docs/engine.md §5).
SERIAL_CPU_SCHEDULER = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def prefer_serial_cpu_scheduler(environ=None) -> bool:
  """Adds SERIAL_CPU_SCHEDULER to XLA_FLAGS in `environ` (default os.environ) when they
  force several host devices and do not choose the scheduler themselves; call it before
  JAX starts its backends. Returns whether it added the flag."""
  environ = os.environ if environ is None else environ
  flags_now = environ.get('XLA_FLAGS', '')
  forced = re.search(r'--xla_force_host_platform_device_count=(\d+)', flags_now)
  if (not forced or int(forced.group(1)) < 2
      or 'xla_cpu_enable_concurrency_optimized_scheduler' in flags_now):
    return False
  environ['XLA_FLAGS'] = f'{flags_now} {SERIAL_CPU_SCHEDULER}'.strip()
  return True
