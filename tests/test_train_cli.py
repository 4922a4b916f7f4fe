"""`python -m rain_jax.train` end to end in subprocesses, on a tiny random HF LLaMA and
hand-made result files: one-line errors for bad data, kill -9 and resume (the loss
curve continues from the last checkpoint and equals an uninterrupted run's), and the
exported model scores the held-out answers as the trained one did."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from models.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
TOPICS = ['bread', 'the sky', 'rivers', 'owls', 'tea', 'chess', 'rain', 'maps']


def env():
  out = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  out.pop('XLA_FLAGS', None)
  return out


def results_file(path, count=40, task='custom', seed=0):
  """RAIN and vanilla records of `count` custom prompts (random answers), as
  rain_jax.run writes them."""
  tok = load_tokenizer(LLAMA_TOKENIZER)
  rng = np.random.default_rng(seed)
  with open(path, 'w') as f:
    for i in range(count):
      prompt = f'Human: tell me about {TOPICS[i % len(TOPICS)]}, part {i}.\nAssistant:'
      for method in ('rain', 'vanilla'):
        ids = [int(t) for t in rng.integers(100, 3000, rng.integers(2, 8))]
        if method == 'rain' and i % 3 == 0:
          ids.append(tok.eos_id)
        f.write(json.dumps({
            'id': f'p{i}', 'task': task, 'method': method, 'prompt': prompt,
            'question': prompt, 'meta': {}, 'response': tok.decode(ids),
            'response_ids': ids, 'num_new_tokens': len(ids),
            'prompt_tokens': len(tok.encode(prompt, add_bos=tok.adds_bos)),
            'stop_reason': 'max_new_tokens', 'seconds': 1.0}) + '\n')
  return str(path)


def train_command(model_dir, data, output, *extra):
  return [sys.executable, '-m', 'rain_jax.train', f'--hf_dir={model_dir}',
          f'--tokenizer={LLAMA_TOKENIZER}', f'--data={data}', f'--output={output}',
          '--batch_size=4', '--learning_rate=3e-3', '--warmup_steps=5', *extra]


def metric_rows(output, split='train'):
  path = os.path.join(output, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.endswith('\n')]
  return [r for r in rows if r['split'] == split]


# One case runs by default (each is a JAX process start); the messages themselves are
# checked in process by tests/test_train_data.py.
@pytest.mark.parametrize('case, message', [
    ('not_results', 'not a rain_jax.run results file'),
    pytest.param('other_task', "holds prompts of task 'custom', not of --task=hh",
                 marks=pytest.mark.slow),
    pytest.param('no_pairs', 'none of the 3 prompts with both answers makes a pair',
                 marks=pytest.mark.slow),
])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, tiny_llama_32k_dir, case, message):
  data = tmp_path / 'data.jsonl'
  extra = []
  if case == 'not_results':
    data.write_text(json.dumps({'id': 'a', 'task': 'hh', 'method': 'rain',
                                'response': 'hi'}) + '\n')
  elif case == 'other_task':
    results_file(data, count=3)
    extra = ['--task=hh']
  else:
    results_file(data, count=3)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:  # vanilla answers equal to the RAIN ones: no preference pair
      row['response_ids'] = [101, 102]
    data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    extra = ['--objective=dpo']
  output = tmp_path / 'out'
  proc = subprocess.run(train_command(tiny_llama_32k_dir, data, output, *extra), cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('rain_jax.train: error: ') and message in last, proc.stderr[-2000:]
  assert not output.exists()


@pytest.mark.slow  # three training runs (~1 min on this machine's 2 cores)
def test_kill_9_resumes_the_curve_and_exports_the_trained_model(tmp_path, tiny_llama_32k_dir):
  data = results_file(tmp_path / 'data.jsonl')
  flags = ['--steps=150', '--save_every=10', '--eval_every=100', '--seed=4']
  reference = tmp_path / 'reference'
  proc = subprocess.run(train_command(tiny_llama_32k_dir, data, reference, *flags), cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])

  killed = tmp_path / 'killed'
  run = subprocess.Popen(train_command(tiny_llama_32k_dir, data, killed, *flags), cwd=REPO,
                         env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and run.poll() is None:
    if len(metric_rows(killed)) >= 25:
      break
    time.sleep(0.01)
  os.kill(run.pid, signal.SIGKILL)
  run.wait()
  reached = len(metric_rows(killed))
  assert 25 <= reached < 150, reached
  saved = sorted(int(s) for s in os.listdir(killed / 'checkpoints') if s.isdigit())
  assert saved and saved[-1] <= reached

  proc = subprocess.run(train_command(tiny_llama_32k_dir, data, killed, *flags), cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = json.loads(proc.stdout.strip().splitlines()[-1])
  assert resumed['resumed_from'] == saved[-1]
  curve, expected = metric_rows(killed), metric_rows(reference)
  assert [r['step'] for r in curve] == list(range(1, 151))
  np.testing.assert_allclose([r['loss'] for r in curve], [r['loss'] for r in expected],
                             rtol=1e-6, atol=1e-7)
  assert curve[-1]['loss'] < 0.5 * curve[0]['loss']
  assert resumed['heldout_after'] == pytest.approx(summary['heldout_after'], rel=1e-6)
  assert resumed['heldout_before'] == pytest.approx(summary['heldout_before'], rel=1e-6)

  # The exported model is the trained one: its held-out NLL is the run's final one.
  from rain_jax import loading, train_data, training
  model = loading.load_model(checkpoint=str(killed / 'model'), tokenizer=LLAMA_TOKENIZER)
  records = train_data.read_records([data])
  examples = train_data.build_examples(records, 'sft', model.tokenizer,
                                       model.config.vocab_size)
  _, heldout = train_data.split(examples, 0.1)
  width, answer_width = train_data.widths(examples, 'sft')
  rows = train_data.encode_examples(heldout, 'sft', width, answer_width)
  settings = training.Settings(objective='sft', learning_rate=1.0, total_steps=1)
  terms = training.batch_terms(model.config, settings, model.params, rows)
  nll = float(terms['nll']) / float(terms['tokens'])
  assert nll == pytest.approx(resumed['heldout_after']['nll_per_token'], rel=1e-5)
  assert nll != pytest.approx(resumed['heldout_before']['nll_per_token'], rel=1e-3)

  # A restart with other settings is refused, naming the difference.
  proc = subprocess.run(train_command(tiny_llama_32k_dir, data, killed, *flags,
                                      '--learning_rate=1e-4'), cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert '--learning_rate: 0.003 -> 0.0001' in proc.stderr.strip().splitlines()[-1]
  # So is a restart whose --data files now hold other answers.
  results_file(data, seed=1)
  proc = subprocess.run(train_command(tiny_llama_32k_dir, data, killed, *flags), cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert 'the --data files now make other examples' in proc.stderr.strip().splitlines()[-1]
