"""RAIN through the production runner on 8 virtual CPU devices under several meshes;
prints one JSON line.

Started by tests/test_rain_llama.py in its own process, so that the XLA flag below
takes effect before JAX initialises. `rain_jax.engine.RainRunner` (the path
`python -m rain_jax.run --method=rain` takes: the custom task's ABJudge, the cache
layouts, inputs placed with batch shardings, caches sharded over the mesh) answers 8
short prompts with a tiny random LLaMA over the LLaMA vocabulary, once on one device and
once per mesh, with the parameters placed by `rain_jax.sharding.param_shardings`. It
measures and reports; the assertions live in the test.

With --judge_model first, RAIN's judge is a second model (tiny-mha, its own random
weights, sharded by the same rules as the policy: RainRunner's judge_model).

Usage: python -m tests.rain_mesh_e2e [--judge_model] MESH [MESH ...], e.g. 8,1,1 2,2,2.
Report: {"device_count", "baseline": {"answers", "stats"}, "meshes": {spec: {
"answers_equal", "stats_equal", "stop_reasons_equal", "mismatches": [{"row",
"first_diff", "baseline", "mesh"}], "max_abs_logit_diff"}}}; the baseline also gives
"min_top2_gap", the smallest top-2 logit gap over the prompts (how near a tie is).
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
from rain_jax import sharding  # noqa: E402  (after the device count, before JAX starts)

sharding.prefer_serial_cpu_scheduler()   # what rain_jax.run does (docs/engine.md §5)

import json
import sys
import tempfile
import types

import jax
import numpy as np

from models import llama
from models.presets import get_preset
from models.tokenizer import load_tokenizer
from rain_jax import engine, tasks
from rain_jax.config import RainConfig
from tests import llama_recompute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
MODEL = get_preset('tiny-gqa').replace(vocab_size=32000)
JUDGE_MODEL = get_preset('tiny-mha').replace(vocab_size=32000)
BATCH = 8
PROMPTS = ['Tell me a story', 'How do I bake bread?', 'Name a colour', 'Why is the sky blue?',
           'Hello', 'What is two plus two?', 'Write a short poem about rain', 'Say yes']
JUDGE_PROMPTS = {'f2.txt': 'Rate the answer.', 'r1.txt': 'Is it (A) harmless or (B) harmful?',
                 'r2.txt': 'Is it (A) harmful or (B) harmless?'}
CFG = RainConfig(max_T=4, min_T=2, max_new_tokens=8, num_nodes=256, max_depth=4,
                 max_rollout=8, feed_chunk=8, num_candidates=4, sample_top=8,
                 max_children=8, similarity='mean_hidden', seed=3)


def make_task(folder):
  """The custom task over PROMPTS with the short judge prompts, files under `folder`."""
  prompt_file = os.path.join(folder, 'prompts.jsonl')
  with open(prompt_file, 'w', encoding='utf-8') as f:
    for i, prompt in enumerate(PROMPTS):
      f.write(json.dumps({'id': f'p{i}', 'prompt': prompt}) + '\n')
  judge_folder = os.path.join(folder, 'judge')
  os.makedirs(judge_folder)
  for name, text in JUDGE_PROMPTS.items():
    with open(os.path.join(judge_folder, name), 'w', encoding='utf-8') as f:
      f.write(text)
  return tasks.get_task('custom', prompt_file=prompt_file, judge_prompts=judge_folder,
                        turn_marker='Human:')


def placed_model(name, config, params, mesh):
  """A loading.LoadedModel-like model with `params` on the mesh's parameter shardings."""
  shardings = sharding.param_shardings(llama.param_shapes(config), mesh,
                                       head_dim=config.head_dim)
  return types.SimpleNamespace(name=name, config=config, tokenizer=load_tokenizer(
      LLAMA_TOKENIZER), params=jax.device_put(params, shardings))


def run(params, task, mesh, judge_params=None):
  """The runner's records for all prompts in one batch, parameters placed on `mesh`
  (and a judge model's, when judge_params are given)."""
  model = placed_model('tiny', MODEL, params, mesh)
  judge = (None if judge_params is None
           else placed_model('tiny-judge', JUDGE_MODEL, judge_params, mesh))
  runner = engine.RainRunner(model, mesh, task, CFG, judge_model=judge)
  examples = task.load_examples(0, -1)
  records = runner.run_batch(list(zip(examples, runner.encode(examples))), BATCH)
  return records, model.params, runner.encode(examples)


def prompt_logits(params, prompts, mesh):
  """Logits [B, W, V] of a from-scratch forward pass over the prompts, split by rows
  over the mesh: the numerical noise level between one device and the mesh."""
  tokens = llama_recompute.pad_rows(prompts, max(len(p) for p in prompts))
  placed = jax.device_put(tokens, sharding.batch_sharding(mesh, 2, BATCH))
  return np.asarray(llama_recompute.full_forward(MODEL, params, placed)[0])


def answers(records):
  return [r['response_ids'] for r in records]


def stats(records):
  return [r['search'] for r in records]


def compare(base, base_logits, params, task, spec, judge_params):
  mesh = sharding.make_mesh(spec)
  records, placed, prompts = run(params, task, mesh, judge_params)
  mismatches = []
  for b, (x, y) in enumerate(zip(answers(base), answers(records))):
    if x != y:
      first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
      mismatches.append({'row': b, 'first_diff': first, 'baseline': x, 'mesh': y})
  logits = prompt_logits(placed, prompts, mesh)
  return {'answers_equal': not mismatches, 'stats_equal': stats(base) == stats(records),
          'stop_reasons_equal': ([r['stop_reason'] for r in base]
                                 == [r['stop_reason'] for r in records]),
          'mismatches': mismatches,
          'max_abs_logit_diff': float(np.max(np.abs(logits - base_logits)))}


def min_top2_gap(logits, lengths):
  """Smallest gap between the two largest logits over the real prompt positions."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  gaps = top2[..., 1] - top2[..., 0]
  real = np.arange(logits.shape[1])[None, :] < np.asarray(lengths)[:, None]
  return float(np.min(gaps[real]))


def main(specs):
  judge_params = None
  if specs and specs[0] == '--judge_model':
    specs = specs[1:]
    judge_params = jax.tree.map(np.asarray, llama_recompute.scaled_params(
        JUDGE_MODEL, seed=3, embed_scale=8.0))
  params = jax.tree.map(np.asarray,
                        llama_recompute.scaled_params(MODEL, seed=5, embed_scale=8.0))
  with tempfile.TemporaryDirectory() as folder:
    task = make_task(folder)
    one_device = sharding.make_mesh('1,1,1', devices=jax.devices()[:1])
    base, placed, prompts = run(params, task, one_device, judge_params)
    base_logits = prompt_logits(placed, prompts, one_device)
    report = {'device_count': jax.device_count(),
              'baseline': {'answers': answers(base), 'stats': stats(base),
                           'min_top2_gap': min_top2_gap(base_logits,
                                                        [len(p) for p in prompts])},
              'meshes': {spec: compare(base, base_logits, params, task, spec, judge_params)
                         for spec in specs}}
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1:])
