"""Multi-process `python -m rain_jax.run`: two processes on localhost form one JAX job.

Each process has one CPU device and the job a 1,2,1 mesh over both (the parameters and
the batch rows split between the processes, gloo collectives). Checked against a single
process holding two devices in the same mesh:
  - kill -9 of process 1 mid-run ends process 0 within 30 s with one line naming the
    process and its host; relaunching both answers every remaining prompt; in the end
    every prompt is answered exactly once (vanilla and RAIN), with the single process's
    answers (which it made in batches, the job with --continuous_batching), in the one
    --output both were given, which process 0 alone wrote (the sidecar names both
    processes of each session);
  - a decision of process 0 (here: refusing an output made with other settings) is the
    decision of both.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.tiny_run import JUDGE_PROMPTS, LLAMA_TOKENIZER, REPO

PROMPTS = [{'id': f'p{i}', 'prompt': text} for i, text in enumerate([
    'How do I bake bread?', 'Why is the sky blue?', 'Name a fast animal.',
    'Tell me about rivers and the sea.'])]
# Fields that measure time rather than answer (they differ run to run).
TIMING_FIELDS = {'seconds', 'compile_seconds', 'batch_seconds'}
PEER_TIMEOUT = 5
ERROR_PREFIX = 'rain_jax.run: error: '


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def job(tmp_path_factory, tiny_llama_32k_dir):
  """(folder, run(output, processes, extra flags) -> list of Popen) for this module."""
  root = tmp_path_factory.mktemp('multiprocess')
  (root / 'judge').mkdir()
  for name, text in JUDGE_PROMPTS.items():
    (root / 'judge' / name).write_text(text)
  (root / 'prompts.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in PROMPTS))
  flags = [f'--hf_dir={tiny_llama_32k_dir}', f'--tokenizer={LLAMA_TOKENIZER}',
           '--task=custom', f'--prompt_file={root / "prompts.jsonl"}',
           f'--judge_prompts={root / "judge"}', '--turn_marker=Human:', '--method=both',
           '--max_T=2', '--max_new_tokens=4', '--max_rollout=6', '--max_depth=3',
           # mean_hidden: the minilm similarity's host callback keeps a program out of the
           # persistent compilation cache, which the restarts here reuse.
           '--similarity=mean_hidden', '--num_nodes=64', '--batch_size=2', '--num_examples=-1', '--seed=3',
           '--mesh=1,2,1', f'--compilation_cache={root / "xla"}',
           f'--peer_timeout_seconds={PEER_TIMEOUT}']

  def start(output, processes, extra=()):
    port = free_port()
    procs = []
    for i in range(processes):
      env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
                 XLA_FLAGS=f'--xla_force_host_platform_device_count={2 // processes}')
      coordinates = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                      f'--process_id={i}'] if processes > 1 else [])
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'rain_jax.run', *flags, *coordinates, f'--output={output}',
           *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True))
    return procs

  return root, start


def finish(procs, timeout=600):
  """[(returncode, stderr)] of each process, waiting at most `timeout` s in all."""
  deadline = time.time() + timeout
  out = []
  for proc in procs:
    try:
      _, err = proc.communicate(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    out.append((proc.returncode, err))
  return out


def records(path):
  return [json.loads(line) for line in open(path, encoding='utf-8')]


def answers(rows):
  """{(id, method): record without its timing fields}."""
  return {(r['id'], r['method']): {k: v for k, v in r.items() if k not in TIMING_FIELDS}
          for r in rows}


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


@pytest.fixture(scope='module')
def single_process_answers(job):
  root, start = job
  output = root / 'single.jsonl'
  [(code, err)] = finish(start(output, 1))
  assert code == 0, err[-3000:]
  return answers(records(output))


# Slow (~70 s with its single-process reference): it made room in the default suite for
# issue 12; run it with `python -m pytest -m slow tests/test_multiprocess.py` whenever
# distributed code or the stream programs change (it caught issue 12's cache problem).
@pytest.mark.slow
def test_kill_one_process_then_resume_answers_as_one_process_exactly_once(
    job, single_process_answers):
  """Both processes are given the same --output; process 0 alone writes it."""
  root, start = job
  folder = root / 'shared'
  output = folder / 'two.jsonl'
  # The 2-process job streams its RAIN prompts (continuous batching), the single process
  # runs them in batches: the answers are the same.
  procs = start(output, 2, ['--continuous_batching'])
  deadline = time.time() + 600
  while not (output.exists() and output.read_text().count('\n') >= 1):
    assert time.time() < deadline, 'no record within 600 s'
    assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
    time.sleep(0.2)
  os.kill(procs[1].pid, signal.SIGKILL)
  killed_at = time.time()
  (code, err), _ = finish(procs, timeout=60)
  ended_after = time.time() - killed_at
  written = len(records(output))
  assert code != 0
  assert ended_after < 30, ended_after
  [line] = error_lines(err)
  assert 'process 1 (host ' in line, line
  assert written < 2 * len(PROMPTS), 'the run finished before the kill; nothing resumed'
  for code, err in finish(start(output, 2, ['--continuous_batching'])):
    assert code == 0, err[-3000:]
  rows = records(output)
  keys = [(r['id'], r['method']) for r in rows]
  assert len(keys) == len(set(keys)) == 2 * len(PROMPTS)
  assert answers(rows) == single_process_answers
  sessions = json.loads((folder / 'two.jsonl.config.json').read_text())['sessions']
  assert len(sessions) == 2 and all(len(s['processes']) == 2 for s in sessions)
  assert sorted(os.listdir(folder)) == ['two.jsonl', 'two.jsonl.config.json']


def test_process_zeros_decision_is_everyones(job, single_process_answers):
  """Process 0 alone reads the output; its refusal (answers made with another seed)
  stops both processes with the same one line, before any compile."""
  del single_process_answers  # wrote single.jsonl
  root, start = job
  t0 = time.time()
  results = finish(start(root / 'single.jsonl', 2, ['--seed=4']), timeout=120)
  lines = []
  for code, err in results:
    assert code == 1, err[-3000:]
    [line] = error_lines(err)
    lines.append(line)
  assert 'holds answers made with other settings (seed: 3 -> 4)' in lines[0], lines
  assert lines[0] == lines[1] or 'process 0 (host ' in lines[1], lines
  assert time.time() - t0 < 120


@pytest.mark.parametrize('flags, message', [
    (['--num_processes=2'], 'go together'),
    (['--coordinator_address=127.0.0.1:1', '--num_processes=2', '--process_id=2'],
     r'--process_id must be in \[0, 2\)'),
    (['--coordinator_address=localhost', '--num_processes=2', '--process_id=0'],
     'must be HOST:PORT'),
])
def test_bad_coordinates_are_one_line_errors(flags, message, tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'rain_jax.run', *flags,
       f'--output={tmp_path / "out.jsonl"}'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 1
  [line] = error_lines(proc.stderr)
  assert re.search(message, line), line
  assert not (tmp_path / 'out.jsonl').exists()


def test_process_zero_decides_alone_in_a_single_process():
  from rain_jax import distributed  # pylint: disable=import-outside-toplevel
  assert distributed.from_process_zero(lambda: {'done': [['a', 'rain']]}) == {
      'done': [['a', 'rain']]}
  with pytest.raises(ValueError, match='refused'):
    distributed.from_process_zero(lambda: (_ for _ in ()).throw(ValueError('refused')))
