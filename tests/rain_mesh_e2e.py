"""RAIN generation on 8 virtual CPU devices under several meshes; prints one JSON line.

Started by tests/test_rain_llama.py in its own process, so that the XLA flag below
takes effect before JAX initialises. The search (tiny-gqa with random weights, the
model judge ABJudge) runs once on one device and once per mesh, with the parameters
sharded by `rain_jax.sharding.param_shardings`, the model functions of
`rain_jax.engine.llama_model_fns(config, mesh)` (caches sharded over the mesh) and the
batch of 8 prompts split by rows. It measures and reports; the assertions live in the
test.

Usage: python -m tests.rain_mesh_e2e MESH [MESH ...], e.g. 8,1,1 2,2,2 1,1,8.
Report: {"device_count", "baseline": {"answers", "stats"}, "meshes": {spec: {
"answers_equal", "stats_equal", "stop_reasons_equal", "mismatches": [{"row",
"first_diff", "baseline", "mesh"}], "max_abs_logit_diff"}}}; the baseline also gives
"min_top2_gap", the smallest top-2 logit gap over the prompts (how near a tie is).
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.presets import get_preset
from rain_jax import engine, search, sharding
from rain_jax.config import RainConfig
from rain_jax.generate import right_align_stop_sequences
from rain_jax.judge import ABJudge
from tests import llama_recompute

MODEL = get_preset('tiny-gqa')
BATCH = 8
PROMPT_WIDTH = 8
JUDGE_WIDTH = 16
EOS_ID, TURN_MARKER_ID = 1, 2
CLAUSE_END_IDS = (3, 4, 5, 6, 7, 8)
LABEL_A, LABEL_B = 65, 66
SUFFIXES = ((13, 40, 7, 91, 40), (13, 40, 7, 88, 21, 40, 5))
CFG = RainConfig(max_T=4, min_T=2, max_new_tokens=8, num_nodes=256, max_depth=4,
                 max_rollout=8, feed_chunk=8, num_candidates=4, sample_top=8,
                 max_children=8, similarity='mean_hidden')


def make_inputs():
  """Prompts [B, PROMPT_WIDTH] (lengths 2..8), judge prompts [B, JUDGE_WIDTH] (the
  prompt after a fixed judge header), per-row seeds [B] uint32."""
  rng = np.random.default_rng(17)
  lengths = 2 + np.arange(BATCH) % (PROMPT_WIDTH - 1)
  prompts = [[int(t) for t in rng.integers(9, MODEL.vocab_size, n)] for n in lengths]
  header = [int(t) for t in rng.integers(9, MODEL.vocab_size, JUDGE_WIDTH - PROMPT_WIDTH)]
  tokens = llama_recompute.pad_rows(prompts, PROMPT_WIDTH)
  judge_tokens = llama_recompute.pad_rows([header + p for p in prompts], JUDGE_WIDTH)
  return (tokens, lengths.astype(np.int32), judge_tokens,
          (lengths + len(header)).astype(np.int32), np.arange(100, 100 + BATCH, dtype=np.uint32))


def tables():
  clause_end = np.zeros((MODEL.vocab_size,), bool)
  clause_end[list(CLAUSE_END_IDS)] = True
  return search.SearchTables(clause_end=jnp.asarray(clause_end),
                             stop_sequences=right_align_stop_sequences([[TURN_MARKER_ID]]),
                             eos_id=jnp.int32(EOS_ID))


def make_searcher(mesh):
  fns = engine.llama_model_fns(MODEL, mesh)
  layout = search.Layout(CFG, PROMPT_WIDTH)
  chunk = CFG.feed_chunk
  content_cap = -(-(layout.path_cap + CFG.max_rollout) // chunk) * chunk
  judge = ABJudge(model=fns, suffixes=SUFFIXES, label_a=LABEL_A, label_b=LABEL_B,
                  prefix_width=JUDGE_WIDTH, answer_cap=layout.answer_cap,
                  content_cap=content_cap, chunk=chunk)
  return search.Searcher(fns, judge, CFG, PROMPT_WIDTH)


def generate(params, inputs, mesh=None):
  """RAIN outputs (numpy) for the batch; on a mesh the inputs are split by rows."""
  tokens, lengths, judge_tokens, judge_lengths, seeds = inputs
  args = [tokens, lengths, judge_tokens, judge_lengths, seeds]
  if mesh is not None:
    args = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim, BATCH)) for a in args]
  tokens, lengths, judge_tokens, judge_lengths, seeds = args
  out = make_searcher(mesh).generate(params, tables(), tokens, lengths, seeds,
                                     {'tokens': judge_tokens, 'lens': judge_lengths})
  return jax.device_get(out)


def prompt_logits(params, tokens, mesh=None):
  """Logits [B, W, V] of a from-scratch forward pass over the prompts (sharded on a
  mesh): the numerical noise level between one device and the mesh."""
  if mesh is None:
    return np.asarray(llama_recompute.full_forward(MODEL, params, jnp.asarray(tokens))[0])
  placed = jax.device_put(tokens, sharding.batch_sharding(mesh, 2, BATCH))
  return np.asarray(llama_recompute.full_forward(MODEL, params, placed)[0])


def answers(out):
  return [out['answer'][b, :out['answer_len'][b]].tolist() for b in range(BATCH)]


def stats(out):
  return {k: v.tolist() for k, v in out['stats'].items()}


def compare(base, base_logits, params, inputs, spec):
  mesh = sharding.make_mesh(spec)
  shardings = sharding.param_shardings(llama.param_shapes(MODEL), mesh,
                                       head_dim=MODEL.head_dim)
  placed = sharding.shard_params(params, shardings)
  out = generate(placed, inputs, mesh)
  base_answers, mesh_answers = answers(base), answers(out)
  mismatches = []
  for b, (x, y) in enumerate(zip(base_answers, mesh_answers)):
    if x != y:
      first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
      mismatches.append({'row': b, 'first_diff': first, 'baseline': x, 'mesh': y})
  logits = prompt_logits(placed, inputs[0], mesh)
  return {'answers_equal': not mismatches, 'stats_equal': stats(base) == stats(out),
          'stop_reasons_equal': base['stop_reason'].tolist() == out['stop_reason'].tolist(),
          'mismatches': mismatches,
          'max_abs_logit_diff': float(np.max(np.abs(logits - base_logits)))}


def min_top2_gap(logits, lengths):
  """Smallest gap between the two largest logits over the real prompt positions."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  gaps = top2[..., 1] - top2[..., 0]
  real = np.arange(logits.shape[1])[None, :] < lengths[:, None]
  return float(np.min(gaps[real]))


def main(specs):
  params = jax.tree.map(np.asarray,
                        llama_recompute.scaled_params(MODEL, seed=5, embed_scale=8.0))
  inputs = make_inputs()
  base = generate(params, inputs)
  base_logits = prompt_logits(params, inputs[0])
  report = {'device_count': jax.device_count(),
            'baseline': {'answers': answers(base), 'stats': stats(base),
                         'min_top2_gap': min_top2_gap(base_logits, inputs[1])},
            'meshes': {spec: compare(base, base_logits, params, inputs, spec)
                       for spec in specs}}
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1:])
