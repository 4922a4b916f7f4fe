"""`python -m rain_jax.run --method=rain --dump_tree` end to end, in a subprocess, on a
tiny random HF LLaMA checkpoint (the production RAIN path: flags -> RainRunner ->
Searcher -> records).

The tree dump is checked against what the tree decided: at every commit the committed
token set is the dumped root child the commit rule picks (most visits n, ties to the
larger q, then the first), so the dumped sets, concatenated, are the answer; the dumped
simulations add up to the search's count; every child's text decodes its tokens; n is
never below fn (similarity sharing only adds visits).
"""
import json
import os
import subprocess
import sys

import pytest

from models.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
PROMPTS = [{'id': 'bread', 'prompt': 'How do I bake bread?'},
           {'id': 'sky', 'prompt': 'Why is the sky blue?'}]
JUDGE_PROMPTS = {'f2.txt': 'Rate the answer.', 'r1.txt': 'Is it (A) harmless or (B) harmful?',
                 'r2.txt': 'Is it (A) harmful or (B) harmless?'}
MAX_T = 4


@pytest.fixture(scope='module')
def rain_run(tmp_path_factory, tiny_llama_32k_dir):
  """The records of one RAIN run with --dump_tree on two custom prompts."""
  root = tmp_path_factory.mktemp('cli_rain')
  (root / 'judge').mkdir()
  for name, text in JUDGE_PROMPTS.items():
    (root / 'judge' / name).write_text(text)
  (root / 'prompts.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in PROMPTS))
  output = root / 'out.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'rain_jax.run', f'--hf_dir={tiny_llama_32k_dir}',
       f'--tokenizer={LLAMA_TOKENIZER}', '--task=custom',
       f'--prompt_file={root / "prompts.jsonl"}', f'--judge_prompts={root / "judge"}',
       '--turn_marker=Human:', '--method=rain', '--dump_tree', '--similarity=mean_hidden',
       f'--max_T={MAX_T}', '--max_new_tokens=6', '--max_rollout=8', '--max_depth=3',
       '--num_nodes=256', '--batch_size=2', '--num_examples=-1', '--seed=2',
       f'--output={output}', '--compilation_cache='],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in output.read_text().splitlines()]


def committed_child(children):
  """The child the commit rule picks: most visits n, ties to larger q, then the first."""
  best = None
  for child in children:
    if best is None or (child['n'], child['q']) > (best['n'], best['q']):
      best = child
  return best


def test_tree_dump_matches_the_committed_answer(rain_run):
  tok = load_tokenizer(LLAMA_TOKENIZER)
  assert sorted(r['id'] for r in rain_run) == ['bread', 'sky']
  for record in rain_run:
    assert record['method'] == 'rain' and record['stop_reason'] != 'no_children'
    dump, search = record['tree_dump'], record['search']
    assert len(dump) == search['committed_sets'] >= 1
    answer = []
    for step in dump:
      assert step['children'], 'a commit needs at least one root child'
      for child in step['children']:
        assert child['text'] == tok.decode(child['tokens'])
        assert child['n'] >= child['fn'] >= 0
      answer += committed_child(step['children'])['tokens']
    assert answer == record['response_ids']
    assert sum(step['simulations'] for step in dump) == search['simulations']
    # Each outer step runs at least max(max_T, 15) - carried visits unless it stops
    # early; the first step carries none.
    assert dump[0]['simulations'] >= max(MAX_T, 15) or search['early_stops'] > 0
