"""One tiny `python -m rain_jax.run` (vanilla and RAIN, --dump_tree) on a random-weight
LLaMA over the LLaMA vocabulary, shared by the tests of its outputs (the summary, the
tree pictures): the run is made once per pytest session, the first time a test asks.

The checkpoint is conftest's `tiny_llama_32k_dir`; the task is `custom` with two
prompts and A/B judge prompts, as in tests/test_cli_rain.py.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
PROMPTS = [{'id': 'bread', 'prompt': 'How do I bake bread?'},
           {'id': 'sky', 'prompt': 'Why is the sky blue?'}]
JUDGE_PROMPTS = {'f2.txt': 'Rate the answer.', 'r1.txt': 'Is it (A) harmless or (B) harmful?',
                 'r2.txt': 'Is it (A) harmful or (B) harmless?'}
MAX_T = 4
_RUNS = {}


def run_cli(root, model_dir, *extra_flags, output=None):
  """Runs rain_jax.run on PROMPTS (files written under `root`, a pathlib.Path) with the
  checkpoint in `model_dir` into `output` (default root/out.jsonl); returns (the results
  file, the finished process). Fails the test on a non-zero exit."""
  (root / 'judge').mkdir(exist_ok=True)
  for name, text in JUDGE_PROMPTS.items():
    (root / 'judge' / name).write_text(text)
  (root / 'prompts.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in PROMPTS))
  output = output or root / 'out.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'rain_jax.run', f'--hf_dir={model_dir}',
       f'--tokenizer={LLAMA_TOKENIZER}', '--task=custom',
       f'--prompt_file={root / "prompts.jsonl"}', f'--judge_prompts={root / "judge"}',
       '--turn_marker=Human:', '--method=both', '--dump_tree', '--similarity=mean_hidden',
       f'--max_T={MAX_T}', '--max_new_tokens=6', '--max_rollout=8', '--max_depth=3',
       '--num_nodes=256', '--batch_size=2', '--num_examples=-1', '--seed=2',
       f'--output={output}', '--compilation_cache=', *extra_flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return output, proc


def shared_run(tmp_path_factory, model_dir):
  """(results file, process) of the session's one default tiny run (made on first use)."""
  if 'default' not in _RUNS:
    _RUNS['default'] = run_cli(tmp_path_factory.mktemp('tiny_run'), model_dir)
  return _RUNS['default']


def read_records(output):
  return [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
