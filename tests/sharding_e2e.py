"""Runs a tiny model on 8 virtual CPU devices under several meshes; prints one JSON line.

Started by tests/test_sharding.py in its own process, so that the XLA flag below takes
effect before JAX initialises (other test modules import JAX first). It measures and
reports; the assertions live in the test.

Usage: python -m tests.sharding_e2e RUN [RUN ...], each RUN "preset/mesh/batch", e.g.
  python -m tests.sharding_e2e tiny-gqa/2,2,2/8 tiny-gqa/4,2,1/4 tiny-mha/1,1,8/8
Runs of one preset share its one-device baseline (8 rows; a run with B < 8 rows uses the
first B). Report: {"mesh": ..., preset: {"greedy", "max_abs_logit", "meshes": {...}}}.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import functools
import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from models import llama
from models.presets import get_preset
from rain_jax import generate, sharding, stopping

NUM_DECODE_STEPS = 4
CACHE_SLOTS = 16
PROMPT_LEN = 6


def jit_forward(forward_fn, mesh, params_shardings, cache_shape, strict=False):
  """jax.jit of a model forward pass with its inputs and outputs placed on the mesh.

  forward_fn(params, tokens[B,T], positions[B,T], cache, write_index[B],
  attn_mask[B,T,S]) -> (logits[B,T,V], hidden[B,T,H], cache), as docs/engine.md §1
  (e.g. functools.partial(models.llama.forward, config)). cache_shape: [L, B, KVH, S, D].
  The cache argument is donated: the caller must use the returned cache instead.
  """
  cache = sharding.cache_sharding(mesh, cache_shape, strict)
  row_axes = cache.spec[1]
  rows = lambda ndim: NamedSharding(mesh, PartitionSpec(row_axes, *(None,) * (ndim - 1)))
  return jax.jit(
      forward_fn,
      in_shardings=(params_shardings, rows(2), rows(2), cache, rows(1), rows(3)),
      out_shardings=(rows(3), rows(3), cache),
      donate_argnums=(3,))


def make_prompts(vocab_size, batch_size):
  """tokens [B, PROMPT_LEN] int32 and per-row prompt lengths [B] int32 (3..PROMPT_LEN)."""
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, vocab_size, (batch_size, PROMPT_LEN), dtype=np.int32)
  lengths = (3 + np.arange(batch_size) % (PROMPT_LEN - 2)).astype(np.int32)
  return tokens, lengths


def greedy_decode(step, params, cache, tokens, lengths):
  """Prefill, then NUM_DECODE_STEPS greedy steps, each row continuing its own prompt.

  Returns (logits of every pass as numpy [B, T, V] float32, greedy tokens
  [B, NUM_DECODE_STEPS + 1], the final cache).
  """
  batch, steps = tokens.shape
  slots = np.arange(CACHE_SLOTS)
  positions = np.broadcast_to(np.arange(steps, dtype=np.int32), (batch, steps))
  mask = np.broadcast_to(slots[None, :] <= np.arange(steps)[:, None],
                         (batch, steps, CACHE_SLOTS))
  logits, _, cache = step(params, tokens, positions, cache,
                          np.zeros(batch, np.int32), mask)
  passes = [np.asarray(logits)]
  token = np.argmax(passes[0][np.arange(batch), lengths - 1], axis=-1).astype(np.int32)
  greedy = [token]
  for n in range(NUM_DECODE_STEPS):
    index = (lengths + n).astype(np.int32)
    mask = slots[None, None, :] <= index[:, None, None]
    logits, _, cache = step(params, token[:, None], index[:, None], cache, index, mask)
    passes.append(np.asarray(logits))
    token = np.argmax(passes[-1][:, 0], axis=-1).astype(np.int32)
    greedy.append(token)
  return passes, np.stack(greedy, axis=1), cache


def generate_greedy(config, params, tokens, lengths, mesh=None):
  """Greedy tokens [B, NUM_DECODE_STEPS + 1] from rain_jax.generate (no stop).

  With a mesh, prompts go in split by rows and the cache is sharded by the rules.
  """
  batch = tokens.shape[0]
  cache_sharding = None
  if mesh is not None:
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2, batch))
    lengths = jax.device_put(lengths, sharding.batch_sharding(mesh, 1, batch))
    cache_sharding = sharding.cache_sharding(
        mesh, llama.cache_shape(config, batch, CACHE_SLOTS))
  result = generate.generate(
      config, params, tokens, lengths, np.zeros(batch, np.uint32),
      stopping.right_align([]), np.int32(-1),
      settings=generate.DecodeSettings(max_new_tokens=NUM_DECODE_STEPS + 1,
                                       cache_len=CACHE_SLOTS, cache_sharding=cache_sharding))
  return np.asarray(result.tokens)


def shard_report(tree):
  """path -> spec (as a list), global shape, shape of the first addressable shard."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
      sharding.path_name(path): {
          'spec': [list(entry) if isinstance(entry, tuple) else entry
                   for entry in leaf.sharding.spec],
          'shape': list(leaf.shape),
          'shard_shape': list(leaf.addressable_shards[0].data.shape),
      }
      for path, leaf in leaves
  }


def random_params(config, seed):
  """Random parameters as numpy arrays, drawn directly (no model init to compile).

  Embeddings ~ N(0, 0.1), kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1): logits
  of order 1, spread enough that greedy tokens are not near ties.
  """
  rng = np.random.default_rng(seed)

  def draw(path, shape_dtype):
    shape = shape_dtype.shape
    name = sharding.path_name(path)
    if name.endswith('scale'):
      values = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith('embedding'):
      values = 0.1 * rng.standard_normal(shape)
    else:
      values = rng.standard_normal(shape) / np.sqrt(shape[-2])
    return values.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, llama.param_shapes(config))


def compare_meshes(preset, mesh_specs, batch_sizes):
  """Runs the preset on one device, then on each mesh; returns the differences.

  mesh_specs, batch_sizes: parallel sequences; a run with B < 8 rows takes the first
  B prompts, whose one-device results are the first B rows of the 8-row baseline.
  """
  config = get_preset(preset)
  params = random_params(config, seed=3)
  tokens, lengths = make_prompts(config.vocab_size, 8)
  forward = functools.partial(llama.forward, config)

  single = jax.jit(forward, donate_argnums=(3,))
  base_logits, base_greedy, _ = greedy_decode(
      single, params, llama.init_cache(config, 8, CACHE_SLOTS), tokens, lengths)
  base_generated = generate_greedy(config, params, tokens, lengths)

  results = {}
  for mesh_spec, batch_size in zip(mesh_specs, batch_sizes):
    cache_shape = llama.cache_shape(config, batch_size, CACHE_SLOTS)
    mesh = sharding.make_mesh(mesh_spec)
    shardings = sharding.param_shardings(llama.param_shapes(config), mesh,
                                         head_dim=config.head_dim)
    placed = jax.device_put(params, shardings)
    step = jit_forward(forward, mesh, shardings, cache_shape)
    cache = jax.device_put(llama.init_cache(config, batch_size, CACHE_SLOTS),
                           sharding.cache_sharding(mesh, cache_shape))
    logits, greedy, cache = greedy_decode(step, placed, cache, tokens[:batch_size],
                                          lengths[:batch_size])
    results[f'{mesh_spec} B={batch_size}'] = {
        'max_abs_diff': max(float(np.max(np.abs(a - b[:batch_size])))
                            for a, b in zip(logits, base_logits)),
        'greedy_equal': bool(np.array_equal(greedy, base_greedy[:batch_size])),
        'generate_equal': bool(np.array_equal(
            generate_greedy(config, placed, tokens[:batch_size], lengths[:batch_size], mesh),
            base_generated[:batch_size])),
        'params': shard_report(placed),
        'cache': shard_report({'k': cache.k, 'v': cache.v}),
    }
  return {'greedy': base_greedy.tolist(), 'generate': base_generated.tolist(),
          'meshes': results,
          'max_abs_logit': max(float(np.max(np.abs(a))) for a in base_logits)}


def mesh_facts():
  """What make_mesh builds on the 8 devices, and its error for a mismatched spec."""
  mesh = sharding.make_mesh('2,-1,2')
  try:
    sharding.make_mesh('3,1,1')
    error = None
  except ValueError as exc:
    error = str(exc)
  return {
      'device_count': jax.device_count(),
      'axis_names': list(mesh.axis_names),
      'shape': dict(mesh.shape),
      'device_ids': np.vectorize(lambda device: device.id)(mesh.devices).tolist(),
      'mismatch_error': error,
  }


def parse_runs(args):
  """{preset: ([mesh spec, ...], [batch size, ...])} from "preset/mesh/batch" strings."""
  runs = {}
  for arg in args:
    parts = arg.split('/')
    if len(parts) != 3 or not parts[2].isdigit() or not 1 <= int(parts[2]) <= 8:
      raise ValueError(f'run {arg!r} must look like preset/mesh/batch with batch in 1..8')
    meshes, batches = runs.setdefault(parts[0], ([], []))
    meshes.append(parts[1])
    batches.append(int(parts[2]))
  return runs


def main(args):
  report = {'mesh': mesh_facts()}
  for preset, (meshes, batches) in parse_runs(args).items():
    report[preset] = compare_meshes(preset, meshes, batches)
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1:])
