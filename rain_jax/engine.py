"""Runners: turn a batch of examples into result records with one compiled call.

`VanillaRunner` decodes greedily or by sampling (rain_jax/generate.py); `RainRunner`
answers with the RAIN search (rain_jax/search.py), building the task's judge
(rain_jax/judge.py) and the cache layouts (rain_jax/kvcache.py) it needs. Both place
their inputs on the mesh with batch shardings. Prompt lengths are bucketed (multiples of
64, or the few widths `plan_batches` chooses for a whole run) and short batches padded to
the batch size, so a run compiles once per width. Programs compile from abstract
arguments (rain_jax/programs.py), so they exist, with their memory use, before any
weight is loaded; compile time is measured apart from run time.
"""
import collections
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from models import llama, registry
from models.tokenizer import encode_continuation, encode_stop_sequences, token_tables
from rain_jax import (evaluator, generate, judge, kvcache, noise, programs, search, sharding,
                      similarity, stopping)

LENGTH_BUCKET = 64


def bucket(length: int, size: int = LENGTH_BUCKET) -> int:
  return -(-length // size) * size


def to_host(tree):
  """Numpy copies of (possibly sharded) arrays; across hosts, gathered from all of them."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def encode_prompts(tokenizer, config, examples):
  """Token ids of each example's prompt (BOS as the tokenizer adds it by default).

  Raises ValueError naming the example when a prompt leaves no room for one new token
  in the model's context.
  """
  encoded = []
  for ex in examples:
    ids = tokenizer.encode(ex.prompt, add_bos=tokenizer.adds_bos)
    if len(ids) + 1 > config.max_seq_len:
      raise ValueError(f'prompt {ex.id!r} has {len(ids)} tokens, longer than the model '
                       f"context of {config.max_seq_len} tokens (minus one to answer)")
    encoded.append(ids)
  return encoded


@dataclasses.dataclass(frozen=True)
class BatchRun:
  """How a batch was answered: method ('vanilla' or 'rain'), seconds (the whole batch,
  compile excluded), size (examples in it), compile_seconds (0 when cached), seed."""
  method: str
  seconds: float
  size: int
  compile_seconds: float
  seed: int


def answer_record(task, tokenizer, example, prompt_ids, new_ids, stop_reason,
                  run: BatchRun):
  """The fields every result record has (rain_jax.run adds 'model').

  The response text is the task's cut (before a turn marker) of the new tokens decoded
  up to the first EOS; response_ids keep every generated token."""
  text_ids = new_ids[:new_ids.index(tokenizer.eos_id)] if tokenizer.eos_id in new_ids \
      else new_ids
  text = tokenizer.decode(text_ids, skip_special_tokens=True)
  return {
      'id': example.id, 'task': task.name, 'method': run.method, 'prompt': example.prompt,
      'question': example.question, 'meta': example.meta, 'response': task.answer(text),
      'response_ids': new_ids, 'num_new_tokens': len(new_ids),
      'prompt_tokens': len(prompt_ids), 'stop_reason': stop_reason,
      'seconds': run.seconds / run.size, 'batch_seconds': run.seconds,
      'batch_size': run.size, 'compile_seconds': run.compile_seconds, 'seed': run.seed,
  }


def pad_batch(rows, batch_size, width):
  """Right-pads token lists into [batch_size, width] int32 (missing rows repeat row 0)."""
  tokens = np.zeros((batch_size, width), np.int32)
  lengths = np.zeros((batch_size,), np.int32)
  for i in range(batch_size):
    row = rows[i] if i < len(rows) else rows[0]
    tokens[i, :len(row)] = row
    lengths[i] = len(row)
  return tokens, lengths


def param_placement(config, mesh) -> programs.ParamPlacement:
  """The parameters' shardings on `mesh` (None: no mesh, default placement)."""
  if mesh is None:
    return programs.ParamPlacement(shardings=None)
  return programs.ParamPlacement(sharding.param_shardings(
      llama.param_shapes(config), mesh, head_dim=config.head_dim))


def abstract_params(config, placement: programs.ParamPlacement):
  """The parameter tree as ShapeDtypeStructs on their shardings (no memory)."""
  shapes = llama.param_shapes(config)
  if placement.shardings is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, placement.shardings)


def row_sharding(mesh, ndim, batch_size):
  """Sharding of a [B, ...] input: rows over the mesh's batch axes; None (the default
  device) without a mesh or on one device, where a one-device NamedSharding on the
  inputs made the CPU search program ~7% slower (SmolLM2, 3 prompts, min of 3 runs:
  79.3 s vs 73.5 s)."""
  if mesh is None or mesh.size == 1:
    return None
  return sharding.batch_sharding(mesh, ndim, batch_size)


def place_rows(x, mesh, batch_size):
  """A host [B, ...] array on the device(s) as `row_sharding` says."""
  where = row_sharding(mesh, x.ndim, batch_size)
  return jnp.asarray(x) if where is None else jax.device_put(x, where)


@dataclasses.dataclass(eq=False)
class VanillaRunner:
  """Vanilla decoding of a task's prompts on a mesh (model: loading.LoadedModel)."""
  model: Any
  mesh: Any
  task: Any
  _: dataclasses.KW_ONLY
  max_new_tokens: int
  sampling: generate.SamplingParams = generate.SamplingParams()
  seed: int = 0

  placement: programs.ParamPlacement | None = None

  def __post_init__(self):
    self.stop_sequences = task_stop_sequences(self.model.tokenizer, self.task)
    if self.placement is None:
      self.placement = param_placement(self.model.config, self.mesh)
    self._programs = {}

  def encode(self, examples):
    return encode_prompts(self.model.tokenizer, self.model.config, examples)

  def longest(self, batch):
    """(longest prompt, 0): the lengths a batch's program must hold."""
    return max(len(ids) for _, ids in batch), 0

  def widths(self, batch):
    """(prompt width, 0) of the default buckets for `batch`."""
    return min(bucket(self.longest(batch)[0]), self.model.config.max_seq_len - 1), 0

  def program(self, batch_size, prompt_width, judge_width=0) -> programs.Program:
    """The compiled generate for [batch_size, prompt_width] prompts (compiled once)."""
    key = (batch_size, prompt_width)
    if key not in self._programs:
      config = self.model.config
      cache_len = min(prompt_width + self.max_new_tokens, config.max_seq_len)
      settings = generate.DecodeSettings(
          max_new_tokens=self.max_new_tokens, cache_len=cache_len, sampling=self.sampling,
          cache_sharding=(sharding.cache_sharding(
              self.mesh, llama.cache_shape(config, batch_size, cache_len))
              if self.mesh else None))
      rows = lambda ndim: row_sharding(self.mesh, ndim, batch_size)
      build = lambda param_spec: jax.jit(
          lambda *a: generate.generate_fn(config, *a, settings=settings),
          in_shardings=(param_spec, rows(2), rows(1), rows(1), None, None))
      args = (abstract_params(config, self.placement),
              jax.ShapeDtypeStruct((batch_size, prompt_width), jnp.int32, sharding=rows(2)),
              jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=rows(1)),
              jax.ShapeDtypeStruct((batch_size,), jnp.uint32, sharding=rows(1)),
              *abstract_like((self.stop_sequences, jnp.int32(self.model.tokenizer.eos_id)),
                             self.mesh))
      self._programs[key] = programs.compile_program('vanilla', batch_size, prompt_width, 0,
                                                     build, args, self.placement)
    return self._programs[key]

  def run_batch(self, batch, batch_size, widths=None):
    """batch: list of (Example, prompt ids); widths: (prompt width, 0) from a plan
    (default: `self.widths(batch)`). Returns one record per example."""
    examples = [ex for ex, _ in batch]
    width, _ = widths or self.widths(batch)
    fresh = (batch_size, width) not in self._programs
    program = self.program(batch_size, width)
    tokens, lengths = pad_batch([ids for _, ids in batch], batch_size, width)
    seeds = np.array([noise.row_seed(self.seed, ex.index) for ex in examples]
                     + [0] * (batch_size - len(examples)), np.uint32)
    put = lambda x: place_rows(x, self.mesh, batch_size)
    params = self.placement.place(self.model.params)
    t0 = time.time()
    out = program.compiled(params, put(tokens), put(lengths), put(seeds),
                           self.stop_sequences, jnp.int32(self.model.tokenizer.eos_id))
    out = to_host(out)
    seconds = time.time() - t0
    run = BatchRun('vanilla', seconds, len(batch),
                   program.compile_seconds if fresh else 0.0, self.seed)
    records = []
    sampling = {'temperature': self.sampling.temperature, 'top_k': self.sampling.top_k,
                'top_p': self.sampling.top_p}
    for i, (ex, ids) in enumerate(batch):
      new_ids = [int(t) for t in out.tokens[i, :int(out.num_tokens[i])]]
      reason = stopping.STOP_REASONS[int(out.stop_reason[i])]
      record = answer_record(self.task, self.model.tokenizer, ex, ids, new_ids, reason, run)
      records.append({**record, 'sampling': sampling})
    return records


def llama_model_fns(config, mesh=None):
  """kvcache.ModelFns for a LLaMA config (the cache sharded over the mesh when given)."""

  def init_cache(batch, slots):
    cache = llama.init_cache(config, batch, slots)
    if mesh is not None:
      cache = jax.lax.with_sharding_constraint(
          cache, sharding.cache_sharding(mesh, llama.cache_shape(config, batch, slots)))
    return cache

  def forward(params, tokens, positions, cache, write_index, mask, logits_index=None):
    return llama.forward(config, params, tokens, positions, cache, write_index, mask,
                         logits_index)

  def forward_many(params, feeds):
    return llama.forward_many(config, params, feeds)

  return kvcache.ModelFns(forward=forward, init_cache=init_cache,
                          vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                          forward_many=forward_many)


def judge_prompt_ids(tok, task, example) -> list[int]:
  """Ids of the judge prompt up to the answer (f2 + "\\n\\n" + conversation start), with
  BOS where the tokenizer adds one (the original tokenises the judge string with it)."""
  return tok.encode(task.judge_prefix(example), add_bos=tok.adds_bos)


def judge_suffix_ids(tok, task) -> tuple:
  """Ids of each judge suffix ("\\n" + r1, "\\n" + r2, or truth's question) as they
  continue the judged text in the original's one-string tokenisation."""
  return tuple(tuple(encode_continuation(tok, s)) for s in task.judge_suffixes())


def load_embedder(similarity_kind, policy_tokenizer):
  """(embedder, encoder params on the host) for `RainConfig.similarity`:
  all-MiniLM-L6-v2 (fetched by the registry) for 'minilm'; (None, None) otherwise."""
  if similarity_kind != 'minilm':
    return None, None
  return similarity.MiniLMEmbedder.load(policy_tokenizer, registry.minilm_files())


def abstract_like(tree, mesh):
  """ShapeDtypeStructs of a pytree of small arrays, replicated over `mesh` (if any)."""
  where = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=where),
                      tree)


def replicate(tree, mesh):
  """A pytree of small arrays on every device of `mesh` (default device without one)."""
  if mesh is None:
    return jax.tree.map(jnp.asarray, tree)
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


class RainRunner:
  """RAIN (reference mode) on a task's prompts: one compiled call per batch."""

  def __init__(self, model, mesh, task, rain_config, dump_tree=False, placement=None,
               judge_model=None):
    """placement: the parameters' programs.ParamPlacement, shared with the run's other
    runners (default: this runner's own, from the mesh). judge_model: a second
    loading.LoadedModel that reads the self-evaluation prompt (sharing the policy's
    tokenizer; loading.describe_judge_model), placed by `judge_placement`; None: the
    policy judges itself (the reference). With one, the programs take the parameters as
    (policy, judge) (`program_placement`, `program_params`)."""
    if task.judge_kind not in ('ab', 'yes_no'):
      raise ValueError(f'task {task.name!r} asks for an unknown judge {task.judge_kind!r}')
    self.model = model
    self.mesh = mesh
    self.task = task
    self.cfg = rain_config
    self.dump_tree = dump_tree
    tok = model.tokenizer
    try:
      self.token_tables = token_tables(tok)
    except ValueError as e:
      raise ValueError(f'the tokenizer cannot serve the {task.name} judge: {e}') from None
    self.tables = search_tables(tok, task, self.token_tables, model.config.vocab_size)
    self.suffixes = judge_suffix_ids(tok, task)
    # Truth's judge cuts after the last period: one vocabulary pass, shared by all buckets.
    self.judge_model = judge_model
    judge_config = (judge_model or model).config
    self.period = (judge.period_table(tok, judge_config.vocab_size)
                   if task.judge_kind == 'yes_no' else None)
    self.fns = llama_model_fns(model.config, mesh)
    self.judge_fns = self.fns if judge_model is None else llama_model_fns(judge_config, mesh)
    self.embedder, self.encoder = load_embedder(rain_config.similarity, tok)
    self._on_mesh = None  # (tables, encoder) on the mesh, placed at the first batch
    self.placement = placement or param_placement(model.config, mesh)
    self.judge_placement = None if judge_model is None else param_placement(judge_config,
                                                                            mesh)
    # Where the programs' parameter argument lives: the policy's placement, or a
    # JointPlacement of (policy, judge).
    self.program_placement = (self.placement if judge_model is None else
                              programs.JointPlacement(self.placement, self.judge_placement))
    self._programs = {}
    self._streams = {}    # (batch, widths) -> StreamPrograms
    self._searchers = {}  # widths -> search.Searcher

  def encode(self, examples):
    return encode_prompts(self.model.tokenizer, self.model.config, examples)

  def judge_for(self, policy_layout, judge_width):
    """The self-evaluation the task asks for (task.judge_kind): ABJudge or YesNoJudge,
    its cache sized from the search's (kvcache.judge_layout)."""
    kind = judge.YesNoJudge if self.task.judge_kind == 'yes_no' else judge.ABJudge
    suffix_slots = kind.suffix_slots(self.suffixes[0] if kind is judge.YesNoJudge
                                     else self.suffixes)
    common = dict(model=self.judge_fns, chunk=self.cfg.feed_chunk,
                  layout=kvcache.judge_layout(self.cfg, policy_layout, prefix_width=judge_width,
                                              suffix_slots=suffix_slots),
                  stop_sequences=np.asarray(self.tables.stop_sequences))
    if kind is judge.YesNoJudge:
      return judge.YesNoJudge(
          suffix=self.suffixes[0], yes_ids=tuple(int(i) for i in self.token_tables.yes_ids),
          no_ids=tuple(int(i) for i in self.token_tables.no_ids),
          period=self.period,
          **common)
    return judge.ABJudge(suffixes=self.suffixes, label_a=self.token_tables.label_a,
                         label_b=self.token_tables.label_b, **common)

  def longest(self, batch):
    """(longest prompt, longest judge prompt) of a batch, in tokens."""
    tok = self.model.tokenizer
    return (max(len(ids) for _, ids in batch),
            max(len(judge_prompt_ids(tok, self.task, ex)) for ex, _ in batch))

  def widths(self, batch):
    """(prompt width, judge width) of the default buckets for `batch`."""
    prompt, judge_len = self.longest(batch)
    return min(bucket(prompt), self.model.config.max_seq_len - 1), bucket(judge_len)

  def program(self, batch_size, prompt_width, judge_width) -> programs.Program:
    """The compiled search for [batch_size, prompt_width] prompts and judge prompts of
    judge_width tokens (compiled once)."""
    key = (batch_size, prompt_width, judge_width)
    if key not in self._programs:
      searcher = self._searcher(prompt_width, judge_width)
      rows = lambda ndim: row_sharding(self.mesh, ndim, batch_size)
      build = lambda param_spec: jax.jit(searcher.generate_fn, in_shardings=(
          param_spec, None, *_prompt_shardings(rows), None))
      args = (self.abstract_program_params(),
              abstract_like(self.tables, self.mesh),
              *_abstract_prompts(batch_size, prompt_width, judge_width, rows),
              abstract_like(self.encoder, self.mesh))
      self._programs[key] = programs.compile_program('rain', batch_size, prompt_width,
                                                     judge_width, build, args,
                                                     self.program_placement)
    return self._programs[key]

  def _searcher(self, prompt_width, judge_width) -> search.Searcher:
    """The search for prompts of prompt_width and judge prompts of judge_width tokens
    (built once; shared by the batch and stream programs of those widths)."""
    key = (prompt_width, judge_width)
    if key not in self._searchers:
      task_judge = self.judge_for(kvcache.policy_layout(self.cfg, prompt_width), judge_width)
      self._searchers[key] = search.Searcher(self.fns, task_judge, self.cfg, prompt_width,
                                             self.embedder, mesh=self.mesh,
                                             separate_judge=self.judge_model is not None)
    return self._searchers[key]

  def stream_programs(self, batch_size, prompt_width, judge_width) -> 'StreamPrograms':
    """The compiled programs of continuous batching (`run_stream`) for batch_size rows of
    prompt_width-token prompts and judge_width-token judge prompts (compiled once):

      start(params, tokens [B, W], lens [B], seeds [B], judge {'tokens': [B, Wj],
            'lens': [B]}, filled [B] bool) -> state
      refill(params, state, tree int32, tokens [1, W], lens [1], seeds [1],
             judge {'tokens': [1, Wj], 'lens': [1]}) -> state        (state donated)
      advance(params, tables, state, encoder) -> (state, outputs)    (state donated)

    The state stays on the devices between calls; refill and advance take it in the
    shardings start gives it and give it back in the same ones. outputs: the [B, ...]
    results of `search.Searcher._outputs`, `done` included."""
    key = (batch_size, prompt_width, judge_width)
    if key not in self._streams:
      searcher = self._searcher(prompt_width, judge_width)
      rows = lambda ndim: row_sharding(self.mesh, ndim, batch_size)
      one = _one_sharding(self.mesh)
      params = self.abstract_program_params()
      batch_inputs = _abstract_prompts(batch_size, prompt_width, judge_width, rows)
      filled = jax.ShapeDtypeStruct((batch_size,), bool, sharding=rows(1))
      compile_one = lambda name, build, args: programs.compile_program(
          name, batch_size, prompt_width, judge_width, build, args, self.program_placement)
      start = compile_one('rain_start', lambda param_spec: jax.jit(
          searcher.start_fn, in_shardings=(param_spec, *_prompt_shardings(rows), rows(1))),
                          (params, *batch_inputs, filled))
      state_spec = (start.compiled.output_shardings if one is not None
                    and start.compiled is not None else None)
      state = _placed_shapes(jax.eval_shape(searcher.start_fn, params, *batch_inputs, filled),
                             state_spec)
      keep_state = {} if state_spec is None else {'out_shardings': state_spec}
      refill = compile_one('rain_refill', lambda param_spec: jax.jit(
          searcher.refill_fn, in_shardings=(param_spec, state_spec, one,
                                            *_prompt_shardings(lambda ndim: one)),
          donate_argnums=1, **keep_state),
                           (params, state, jax.ShapeDtypeStruct((), jnp.int32, sharding=one),
                            *_abstract_prompts(1, prompt_width, judge_width,
                                               lambda ndim: one)))
      keep_state = {} if state_spec is None else {'out_shardings': (state_spec, None)}
      advance = compile_one('rain_advance', lambda param_spec: jax.jit(
          searcher.advance_fn, in_shardings=(param_spec, None, state_spec, None),
          donate_argnums=2, **keep_state),
                            (params, abstract_like(self.tables, self.mesh), state,
                             abstract_like(self.encoder, self.mesh)))
      self._streams[key] = StreamPrograms(start, refill, advance)
    return self._streams[key]

  def tree_shapes(self, batch_size):
    """The search tree state of a batch, as ShapeDtypeStructs (what a program holds
    besides its caches; independent of the prompt widths)."""
    embed_dim = evaluator.node_embed_dim(self.cfg, self.fns.hidden_size, self.embedder)
    return jax.eval_shape(lambda: search.init_trees(self.cfg, embed_dim, batch_size))

  def _host_inputs(self, batch, batch_size, prompt_width, judge_width):
    """(tokens [B, W], lens [B], seeds [B] uint32, {'tokens': [B, Wj], 'lens': [B]}) of
    `batch` (list of (Example, prompt ids)) as numpy, B = batch_size (missing rows repeat
    the first example's prompts, seed 0). ValueError when a prompt is longer than its
    width."""
    examples = [ex for ex, _ in batch]
    tok = self.model.tokenizer
    judge_rows = [judge_prompt_ids(tok, self.task, ex) for ex in examples]
    for (ex, ids), judge_ids in zip(batch, judge_rows):
      if len(ids) > prompt_width or len(judge_ids) > judge_width:
        raise ValueError(f'example {ex.id!r} has {len(ids)} prompt and {len(judge_ids)} '
                         f'judge prompt tokens; the program holds {prompt_width} and '
                         f'{judge_width}')
    tokens, lengths = pad_batch([ids for _, ids in batch], batch_size, prompt_width)
    judge_tokens, judge_lens = pad_batch(judge_rows, batch_size, judge_width)
    seeds = np.array([noise.row_seed(self.cfg.seed, ex.index) for ex in examples]
                     + [0] * (batch_size - len(examples)), np.uint32)
    return tokens, lengths, seeds, {'tokens': judge_tokens, 'lens': judge_lens}

  def _shared(self):
    """(parameters, tables, encoder) as the programs take them (placed once)."""
    if self._on_mesh is None:
      self._on_mesh = replicate((self.tables, self.encoder), self.mesh)
    tables, encoder = self._on_mesh
    return self.program_placement.place(self.program_params()), tables, encoder

  def program_params(self):
    """The programs' parameter argument: the policy's parameters, or (policy, judge)."""
    if self.judge_model is None:
      return self.model.params
    return (self.model.params, self.judge_model.params)

  def abstract_program_params(self):
    """`program_params` as ShapeDtypeStructs on their shardings."""
    policy = abstract_params(self.model.config, self.placement)
    if self.judge_model is None:
      return policy
    return (policy, abstract_params(self.judge_model.config, self.judge_placement))

  def _inputs(self, batch, batch_size, prompt_width, judge_width):
    """The search's arguments for `batch`, placed on the mesh."""
    place = lambda x: place_rows(x, self.mesh, batch_size)
    inputs = jax.tree.map(place, self._host_inputs(batch, batch_size, prompt_width,
                                                   judge_width))
    params, tables, encoder = self._shared()
    return (params, tables, *inputs, encoder)

  def run_batch(self, batch, batch_size, widths=None):
    """batch: list of (Example, prompt ids); widths: (prompt width, judge width) from a
    plan (default: `self.widths(batch)`). Returns one record per example."""
    prompt_width, judge_width = widths or self.widths(batch)
    fresh = (batch_size, prompt_width, judge_width) not in self._programs
    program = self.program(batch_size, prompt_width, judge_width)
    compile_seconds = program.compile_seconds if fresh else 0.0
    args = self._inputs(batch, batch_size, prompt_width, judge_width)
    t0 = time.time()
    out = to_host(program.compiled(*args))
    seconds = time.time() - t0
    run = BatchRun('rain', seconds, len(batch), compile_seconds, self.cfg.seed)
    return [self._record(ex, ids, out, i, run) for i, (ex, ids) in enumerate(batch)]

  def _record(self, ex, ids, out, row, run: BatchRun):
    """The record of example `ex` (prompt ids `ids`) from row `row` of the search's
    outputs `out` (on the host)."""
    new_ids = [int(t) for t in out['answer'][row, :int(out['answer_len'][row])]]
    reason = stopping.STOP_REASONS[int(out['stop_reason'][row])]
    stats = {k: int(v[row]) for k, v in out['stats'].items()}
    record = {
        **answer_record(self.task, self.model.tokenizer, ex, ids, new_ids, reason, run),
        'search': {**stats, 'capacity_overflows': int(out['overflow'][row]),
                   'widenings': int(out['widenings'][row]),
                   'shared_updates': int(out['shared_updates'][row])},
        'rain_config': dataclasses.asdict(self.cfg),
        'commits': commit_summaries(self.model.tokenizer, out, row, stats['committed_sets']),
    }
    if self.dump_tree:
      record['tree_dump'] = tree_dump(self.model.tokenizer, out, row, stats['committed_sets'])
    return record

  def run_stream(self, items, batch_size, widths=None):
    """Continuous batching: answers `items` (list of (Example, prompt ids), every one
    fitting `widths`, default `self.widths(items)`) on batch_size rows, a finished row
    taking the next example while the others keep searching. Yields each example's
    record as soon as it is read out, in finish order (rows finishing in the same tick:
    in row order).

    A record equals the one `run_batch` gives the example except for its timing fields:
    `seconds` is the example's share of the stream's wall time (its refill, and of each
    advance an equal share among the examples searching during it; the start call is
    shared among the examples it fills), so the records' seconds add up to the stream's
    time as run_batch's do; `batch_seconds` is its latency, from the call that filled
    its row to its read-out; `batch_size` is the number of rows; `compile_seconds` the
    stream programs' compile time on the examples of the first fill when they were
    compiled by this call (else 0).

    Every decision (which rows finished) is taken from gathered outputs (`to_host`), so
    all processes of a multi-host run take the same ones."""
    if not items:
      return
    prompt_width, judge_width = widths or self.widths(items)
    fresh = (batch_size, prompt_width, judge_width) not in self._streams
    progs = self.stream_programs(batch_size, prompt_width, judge_width)
    compile_seconds = sum(p.compile_seconds for p in progs.all()) if fresh else 0.0
    params, tables, encoder = self._shared()
    one = _one_sharding(self.mesh)
    place_one = lambda x: jnp.asarray(x) if one is None else jax.device_put(x, one)
    # occupants[row]: the index in `items` of the example the row searches, or None.
    occupants = [i if i < len(items) else None for i in range(batch_size)]
    following = iter(range(batch_size, len(items)))
    inputs = jax.tree.map(lambda x: place_rows(x, self.mesh, batch_size), self._host_inputs(
        items[:batch_size], batch_size, prompt_width, judge_width))
    filled = place_rows(np.array([i is not None for i in occupants]), self.mesh, batch_size)
    clock = _StreamClock(time.time())
    state = jax.block_until_ready(progs.start.compiled(params, *inputs, filled))
    clock.charge(occupants, time.time())
    while any(i is not None for i in occupants):
      state, out = progs.advance.compiled(params, tables, state, encoder)
      out = to_host(out)
      clock.charge(occupants, time.time())
      finished = [row for row, i in enumerate(occupants)
                  if i is not None and bool(out['done'][row])]
      if not finished:
        raise RuntimeError('a stream advance finished no row while rows were searching')
      for row in finished:
        i, occupants[row] = occupants[row], None
        seconds, latency = clock.finish(i, time.time())
        run = BatchRun('rain', latency, 1, compile_seconds if i < batch_size else 0.0,
                       self.cfg.seed)
        record = self._record(*items[i], out, row, run)
        record.update(seconds=seconds, batch_seconds=latency, batch_size=batch_size)
        yield record
        clock.skip(time.time())  # the caller's time is no example's
        i = next(following, None)
        if i is not None:
          host = self._host_inputs([items[i]], 1, prompt_width, judge_width)
          state = jax.block_until_ready(progs.refill.compiled(
              params, state, place_one(np.int32(row)), *jax.tree.map(place_one, host)))
          occupants[row] = i
          clock.charge([i], time.time())


@dataclasses.dataclass(frozen=True)
class StreamPrograms:
  """The compiled programs of continuous batching at one (batch size, widths); see
  `RainRunner.stream_programs`."""
  start: programs.Program
  refill: programs.Program
  advance: programs.Program

  def all(self) -> tuple:
    return (self.start, self.refill, self.advance)


class _StreamClock:
  """Wall time of a stream, charged to the examples it served (see run_stream).

  Examples are keys (their index in the stream). `charge(keys, now)` splits the time
  since the last charge or skip equally among `keys` (None entries ignored: empty rows);
  `skip(now)` charges the time since then to no one; `finish(key, now)` returns (the
  key's charged seconds, its latency: now minus the start of its first charged span)."""

  def __init__(self, now):
    self.last = now
    self.seconds = {}
    self.started = {}

  def charge(self, keys, now):
    live = [key for key in keys if key is not None]
    for key in live:
      self.started.setdefault(key, self.last)
      self.seconds[key] = self.seconds.get(key, 0.0) + (now - self.last) / len(live)
    self.last = now

  def skip(self, now):
    self.last = now

  def finish(self, key, now):
    return self.seconds.pop(key), now - self.started.pop(key)


def _one_sharding(mesh):
  """Where a stream's one-prompt refill inputs live: replicated over a mesh of several
  devices, else the default device (None)."""
  return NamedSharding(mesh, PartitionSpec()) if mesh is not None and mesh.size > 1 else None


def _abstract_prompts(batch_size, prompt_width, judge_width, where):
  """ShapeDtypeStructs of the search's prompt inputs (tokens, lens, seeds, judge) for
  batch_size rows; where(ndim) -> sharding (or None)."""
  abstract = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=where(len(shape)))
  return (abstract((batch_size, prompt_width), jnp.int32), abstract((batch_size,), jnp.int32),
          abstract((batch_size,), jnp.uint32),
          {'tokens': abstract((batch_size, judge_width), jnp.int32),
           'lens': abstract((batch_size,), jnp.int32)})


def _prompt_shardings(where):
  """in_shardings entries of the prompt inputs (tokens, lens, seeds, judge)."""
  return (where(2), where(1), where(1), {'tokens': where(2), 'lens': where(1)})


def _placed_shapes(shapes, shardings):
  """ShapeDtypeStructs `shapes` on `shardings` (a like pytree, or None: unplaced)."""
  if shardings is None:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
  return jax.tree.map(lambda s, where: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                      shapes, shardings)


def make_runners(model, mesh, task, method, *, max_new_tokens, sampling, seed, rain_config,
                 dump_tree=False, judge_model=None) -> dict:
  """{'vanilla': VanillaRunner, 'rain': RainRunner} as `method` ('vanilla', 'rain' or
  'both') asks, sharing one parameter placement (so they take the same layouts).
  judge_model: RAIN's judge model (see RainRunner); None: the policy judges itself."""
  placement = param_placement(model.config, mesh)
  runners = {}
  if method in ('vanilla', 'both'):
    runners['vanilla'] = VanillaRunner(model, mesh, task, max_new_tokens=max_new_tokens,
                                       sampling=sampling, seed=seed, placement=placement)
  if method in ('rain', 'both'):
    runners['rain'] = RainRunner(model, mesh, task, rain_config, dump_tree=dump_tree,
                                 placement=placement, judge_model=judge_model)
  return runners


def program_budget(methods, max_programs) -> dict:
  """{method: how many widths it may compile} for a run of `methods` that compiles at most
  `max_programs` programs: all to one method; with both, one to vanilla (a decode loop,
  cheap to compile, its speed set by the weights rather than the padding) and the rest to
  RAIN."""
  methods = list(methods)
  if max_programs < len(methods):
    raise ValueError(f'--max_programs={max_programs} cannot cover the methods {methods}')
  if len(methods) == 1:
    return {methods[0]: max_programs}
  return {method: 1 if method == 'vanilla' else max_programs - 1 for method in methods}


def plan_batches(runner, todo, batch_size, max_programs):
  """[(batch, widths)]: `todo` (list of (Example, prompt ids)) cut into batches of
  `batch_size` in order, each with the padded widths its program takes: at most
  `max_programs` prompt widths (programs.choose_widths), and for RAIN one judge width
  per prompt width (the longest judge prompt of the batches that share it)."""
  batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
  if not batches:
    return []
  longest = [runner.longest(batch) for batch in batches]
  cap = runner.model.config.max_seq_len - 1
  widths = [min(w, cap) for w in programs.choose_widths(
      [p for p, _ in longest], max_programs, LENGTH_BUCKET)]
  prompt = [programs.padded_width(p, widths) for p, _ in longest]
  judge = {}
  for width, (_, judge_len) in zip(prompt, longest):
    judge[width] = max(judge.get(width, 0), bucket(judge_len) if judge_len else 0)
  return [(batch, (width, judge[width])) for batch, width in zip(batches, prompt)]


def plan_streams(runner, todo, batch_size, max_programs):
  """[(items, widths)]: `todo` (list of (Example, prompt ids)) as continuous-batching
  streams (`RainRunner.run_stream`), one per width pair `plan_batches` chooses (so a
  stream pads as the batches would), each holding, in order, the examples of the
  batches planned at those widths."""
  streams = {}
  for batch, widths in plan_batches(runner, todo, batch_size, max_programs):
    streams.setdefault(widths, []).extend(batch)
  return [(items, widths) for widths, items in streams.items()]


def task_stop_sequences(tok, task):
  """[M, W] int32: the task's turn marker as token sequences (stopping.right_align; a
  row of -1 when the task has none)."""
  marker = task.turn_marker
  return stopping.right_align(encode_stop_sequences(tok, marker) if marker else [])


def search_tables(tok, task, tables, vocab_size) -> stopping.SearchTables:
  """The token facts the search stops on, for `task`'s turn marker on a model of
  `vocab_size` ids; tables: `models.tokenizer.token_tables(tok)` (clause ends past the
  tokenizer's ids are False)."""
  clause_end = np.zeros((vocab_size,), bool)
  clause_end[:tables.clause_end.shape[0]] = tables.clause_end
  return stopping.SearchTables(clause_end=jnp.asarray(clause_end),
                               stop_sequences=task_stop_sequences(tok, task),
                               eos_id=jnp.int32(tok.eos_id))


def _dumped_node(tok, ids_row, stats_row):
  """{'tokens', 'text', 'n', 'fn', 'q', 'p'} of one recorded node (ids_row [L], -1
  padded; stats_row [4]), or None for an empty column."""
  ids = [int(t) for t in ids_row if t >= 0]
  if not ids:
    return None
  n, fn, q, p = (float(x) for x in stats_row)
  return {'tokens': ids, 'text': tok.decode(ids), 'n': n, 'fn': int(fn), 'q': q, 'p': p}


def _root_children(tok, out, row, c):
  """[(column, node dict)] of the root's children at commit c of `row`."""
  nodes = [_dumped_node(tok, ids, st) for ids, st in zip(out['dump_tokens'][row, c],
                                                        out['dump_stats'][row, c])]
  return [(j, node) for j, node in enumerate(nodes) if node is not None]


def tree_dump(tok, out, row, commits):
  """Root children statistics at every commit of `row` (like the original's per-step
  dump): [{'simulations', 'early', 'committed', 'children': [{'tokens', 'text', 'n',
  'fn', 'q', 'p', 'children'}]}]. 'early': the step ended by the early-stop rule;
  'committed': the index in 'children' of the committed set; a child's 'children': its
  most visited children (search.GRANDCHILDREN_RECORDED at most, descending n) with the
  same fields but no 'children'."""
  steps = []
  for c in range(commits):
    kids = _root_children(tok, out, row, c)
    children = []
    for j, node in kids:
      grand = [_dumped_node(tok, ids, st) for ids, st in zip(
          out['dump_grand_tokens'][row, c, j], out['dump_grand_stats'][row, c, j])]
      children.append({**node, 'children': [g for g in grand if g is not None]})
    chosen = int(out['dump_chosen'][row, c])
    steps.append({'simulations': int(out['dump_sims'][row, c]),
                  'early': bool(out['dump_early'][row, c]),
                  'committed': next(i for i, (j, _) in enumerate(kids) if j == chosen),
                  'children': children})
  return steps


def commit_summaries(tok, out, row, commits):
  """Every RAIN record's compact account of its committed sets, one entry per commit of
  `row`: {'tokens', 'text', 'n', 'fn', 'q', 'p'} of the committed root child,
  'simulations' of the outer step, 'early' (it ended by the early-stop rule) and
  'alternative': {'text', 'n', 'q'} of the sibling the commit rule ranks next (most
  visits n, ties to the larger q, then the first), or None when it had no sibling."""
  summaries = []
  for c in range(commits):
    chosen = int(out['dump_chosen'][row, c])
    kids = _root_children(tok, out, row, c)
    node = next(node for j, node in kids if j == chosen)
    others = [other for j, other in kids if j != chosen]
    best = max(others, key=lambda o: (o['n'], o['q']), default=None)
    summaries.append({**node, 'simulations': int(out['dump_sims'][row, c]),
                      'early': bool(out['dump_early'][row, c]),
                      'alternative': None if best is None else
                      {'text': best['text'], 'n': best['n'], 'q': best['q']}})
  return summaries
