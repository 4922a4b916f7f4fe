"""Result files that survive: torn tails, short writes, locks, shards, config sidecar,
progress metrics, and `python -m rain_jax.run` killed with SIGKILL (slow).

Oracles: bytes written by hand, hand-counted shard sets, a file-size rlimit that makes
the kernel cut a write short, a real second process, a git repository made in the test,
and for the CLI, the prompt file itself (every id answered exactly once per method).
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from rain_jax import progress, results
from tests import test_cli

REPO = test_cli.REPO


def _record(i, method='vanilla', **extra):
  return {'id': f'p{i}', 'method': method, 'response': 'é' * i, **extra}


def _write_raw(path, records, tail=b''):
  with open(path, 'wb') as f:
    for record in records:
      f.write((json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8'))
    f.write(tail)


def test_torn_tail_at_every_byte_is_skipped_then_cut_before_appending(tmp_path):
  path = str(tmp_path / 'r.jsonl')
  whole = [_record(1), _record(2)]
  torn_line = (json.dumps(_record(3), ensure_ascii=False) + '\n').encode('utf-8')
  for cut in range(1, len(torn_line)):  # every proper prefix of the third line
    _write_raw(path, whole, torn_line[:cut])
    assert results.read_records(path) == whole
    assert results.done_keys(path) == {('p1', 'vanilla'), ('p2', 'vanilla')}
    with results.ResultWriter(path) as writer:
      writer.write(_record(4))
    lines = open(path, 'rb').read().split(b'\n')
    assert lines[-1] == b''
    assert [json.loads(line) for line in lines[:-1]] == whole + [_record(4)]


def test_complete_line_that_is_not_json_is_an_error_naming_the_line(tmp_path):
  path = tmp_path / 'r.jsonl'
  path.write_bytes(b'{"id": 1, "method": "rain"}\n{"id": 2, "meth\n{"id": 3}\n')
  with pytest.raises(ValueError, match=r'r\.jsonl:2: not a JSON record'):
    results.read_records(str(path))


def test_missing_file_has_no_records(tmp_path):
  assert results.read_records(str(tmp_path / 'absent.jsonl')) == []
  assert results.done_keys(str(tmp_path / 'absent.jsonl')) == set()


SHORT_WRITE_SCRIPT = textwrap.dedent('''
    import json, resource, signal, sys
    from rain_jax import results
    path, limit = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit returns EFBIG
    writer = results.ResultWriter(path)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    written = 0
    try:
      for i in range(100):
        writer.write({'id': i, 'method': 'vanilla', 'response': 'x' * 50})
        written += 1
    except OSError as e:
      print(json.dumps({'written': written, 'errno': e.errno}))
''')


def test_write_cut_short_by_the_kernel_leaves_no_torn_line(tmp_path):
  """A file-size limit in the middle of the 4th line: the kernel writes part of it."""
  path = str(tmp_path / 'r.jsonl')
  line_length = len(json.dumps({'id': 0, 'method': 'vanilla', 'response': 'x' * 50})) + 1
  limit = 3 * line_length + 10
  out = subprocess.run([sys.executable, '-c', SHORT_WRITE_SCRIPT, path, str(limit)],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
  report = json.loads(out.stdout)
  assert report['written'] == 3 and report['errno'] == 27  # EFBIG
  data = open(path, 'rb').read()
  assert len(data) == 3 * line_length and data.endswith(b'\n')
  assert [r['id'] for r in results.read_records(path)] == [0, 1, 2]


def test_second_writer_on_the_same_file_is_refused_until_the_first_closes(tmp_path):
  path = str(tmp_path / 'r.jsonl')
  first = results.ResultWriter(path)
  with pytest.raises(ValueError, match='being written by another run'):
    results.ResultWriter(path)
  first.close()
  with results.ResultWriter(path) as second:
    second.write(_record(1))
  assert results.read_records(path) == [_record(1)]


def test_lock_of_a_killed_writer_is_released(tmp_path):
  path = str(tmp_path / 'r.jsonl')
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from rain_jax import results; '
       'w = results.ResultWriter(sys.argv[1]); print("locked", flush=True); time.sleep(60)',
       path], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(ValueError, match='another run'):
      results.ResultWriter(path)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  results.ResultWriter(path).close()


def _examples(indices):
  return [types.SimpleNamespace(index=i, id=f'e{i}') for i in indices]


class CountingObject:
  """A local file standing in for a gs:// object (etils.epath.Path's read/write/exists),
  counting whole-object writes."""

  def __init__(self, path):
    self.path = path
    self.writes = 0

  def exists(self):
    return self.path.exists()

  def read_bytes(self):
    return self.path.read_bytes()

  def write_bytes(self, data):
    self.writes += 1
    self.path.write_bytes(data)


def test_object_writer_rewrites_the_whole_object_per_record_and_drops_a_torn_tail(tmp_path):
  target = tmp_path / 'out.jsonl'
  _write_raw(target, [_record(1), _record(2)], tail=b'{"id": "p3", "meth')
  storage = CountingObject(target)
  writer = results.ObjectResultWriter('gs://bucket/out.jsonl', storage=storage)
  assert storage.writes == 1  # the torn tail is cut at once
  assert [r['id'] for r in results.read_records(target)] == ['p1', 'p2']
  writer.write(_record(3))
  writer.write(_record(4, method='rain'))
  assert storage.writes == 3
  assert [(r['id'], r['method']) for r in results.read_records(target)] == [
      ('p1', 'vanilla'), ('p2', 'vanilla'), ('p3', 'vanilla'), ('p4', 'rain')]
  assert target.read_bytes().endswith(b'}\n')


@pytest.fixture
def fake_gcs():
  """gs:// served by an in-memory fsspec filesystem: etils.epath's real gs:// path (its
  fsspec backend) runs, with memory in place of gcsfs and a bucket."""
  fsspec = pytest.importorskip('fsspec')
  from fsspec.implementations import memory

  class FakeGCS(memory.MemoryFileSystem):
    protocol = ('gcs', 'gs')

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del finalize_on_close  # an option of gcsfs that epath passes
      super().__init__(*args, **kwargs)

  import importlib  # pylint: disable=import-outside-toplevel
  # The module (fsspec.registry the attribute is a read-only view of its table).
  registered = importlib.import_module('fsspec.registry')._registry  # pylint: disable=protected-access
  saved = {name: registered.get(name) for name in ('gcs', 'gs')}
  for name in saved:
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  yield FakeGCS
  FakeGCS.store.clear()
  for name, cls in saved.items():
    registered.pop(name, None)
    if cls is not None:
      registered[name] = cls


def test_results_and_sidecar_at_a_gs_url(fake_gcs, tmp_path):
  assert results.is_remote('gs://bucket/run/out.jsonl')
  assert not results.is_remote(str(tmp_path / 'out.jsonl'))
  assert isinstance(results.open_writer(str(tmp_path / 'a.jsonl')), results.ResultWriter)
  url = 'gs://bucket/run/out.jsonl'
  assert results.read_records(url) == [] and results.read_config(url) is None
  writer = results.open_writer(url)
  assert isinstance(writer, results.ObjectResultWriter)
  writer.write(_record(7))
  writer.write(_record(7, method='rain'))
  flags = {'seed': 1, 'output': url}
  results.record_session(url, flags, {'host': 'h'})
  assert results.done_keys(url) == {('p7', 'vanilla'), ('p7', 'rain')}
  assert results.read_config(url)['config'] == {'seed': 1}
  results.check_config(url, flags, allow_change=False)
  with pytest.raises(results.ConfigMismatchError, match='seed: 1 -> 2'):
    results.check_config(url, {'seed': 2, 'output': url}, allow_change=False)
  assert sorted(key.rsplit('/', 1)[-1] for key in fake_gcs.store) == [
      'out.jsonl', 'out.jsonl.config.json']


def test_shards_split_by_dataset_index_modulo():
  chosen = _examples(range(5, 12))  # e.g. --start=5 --num_examples=7
  shards = [[ex.index for ex in results.shard_examples(chosen, i, 3)] for i in range(3)]
  assert shards == [[6, 9], [7, 10], [5, 8, 11]]
  assert [ex.index for ex in results.shard_examples(chosen, 0, 1)] == list(range(5, 12))


@pytest.mark.parametrize('index,count', [(2, 2), (-1, 2), (0, 0)])
def test_bad_shard_flags_raise(index, count):
  with pytest.raises(ValueError, match='--shard_index|--num_shards'):
    results.shard_examples(_examples(range(3)), index, count)


FLAGS_A = {'task': 'hh', 'max_T': 2, 'seed': 0, 'num_examples': 2, 'output': 'x.jsonl',
           'batch_size': 4, 'shard_index': 0, 'num_shards': 1, 'method': 'vanilla'}


def _session(tag):
  return {'started': tag, 'flags': {}}


def test_config_sidecar_accepts_selection_changes_and_refuses_answer_changes(tmp_path):
  output = str(tmp_path / 'r.jsonl')
  results.check_config(output, FLAGS_A, allow_change=False)  # nothing there yet
  results.record_session(output, FLAGS_A, _session('s1'))
  with results.ResultWriter(output) as writer:
    writer.write(_record(1))
  extend = dict(FLAGS_A, num_examples=-1, start=3, batch_size=1, shard_index=1,
                num_shards=2, method='both')
  results.check_config(output, extend, allow_change=False)
  changed = dict(FLAGS_A, max_T=4, seed=1)
  with pytest.raises(results.ConfigMismatchError) as error:
    results.check_config(output, changed, allow_change=False)
  assert 'max_T: 2 -> 4; seed: 0 -> 1' in str(error.value)
  assert '--allow_config_change' in str(error.value)
  results.check_config(output, changed, allow_change=True)
  written = results.record_session(output, changed, _session('s2'))
  on_disk = json.load(open(output + '.config.json'))
  assert on_disk == written
  assert on_disk['config'] == {'max_T': 4, 'seed': 1, 'task': 'hh'}
  assert [s['started'] for s in on_disk['sessions']] == ['s1', 's2']
  assert on_disk['sessions'][1]['previous_config'] == {'max_T': 2, 'seed': 0, 'task': 'hh'}
  assert sorted(os.listdir(tmp_path)) == ['r.jsonl', 'r.jsonl.config.json']  # no temp left


def test_sidecar_of_an_older_run_with_a_removed_flag_lets_the_run_resume(tmp_path):
  output = str(tmp_path / 'r.jsonl')
  results.record_session(output, dict(FLAGS_A, rain_mode='reference'), _session('old'))
  with results.ResultWriter(output) as writer:
    writer.write(_record(1))
  assert results.read_config(output)['config']['rain_mode'] == 'reference'
  results.check_config(output, FLAGS_A, allow_change=False)  # --rain_mode is gone: no error
  content = results.record_session(output, FLAGS_A, _session('new'))
  assert 'previous_config' not in content['sessions'][-1]
  assert content['config'] == {'max_T': 2, 'seed': 0, 'task': 'hh'}


def test_sidecar_without_results_behind_it_starts_afresh(tmp_path):
  output = str(tmp_path / 'r.jsonl')
  results.record_session(output, FLAGS_A, _session('old'))
  results.check_config(output, dict(FLAGS_A, max_T=9), allow_change=False)
  content = results.record_session(output, dict(FLAGS_A, max_T=9), _session('new'))
  assert [s['started'] for s in content['sessions']] == ['new']
  assert content['config']['max_T'] == 9


def test_git_commit_of_a_checkout_and_of_a_plain_folder(tmp_path):
  repo = tmp_path / 'repo'
  repo.mkdir()
  git = lambda *a: subprocess.run(['git', '-C', str(repo), *a], check=True,
                                  capture_output=True, text=True).stdout.strip()
  git('init', '-q')
  (repo / 'f.txt').write_text('one\n')
  git('add', 'f.txt')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-q', '-m', 'one')
  sha = git('rev-parse', 'HEAD')
  assert len(sha) == 40
  assert results.git_commit(str(repo)) == {'commit': sha, 'dirty': False}
  (repo / 'f.txt').write_text('two\n')
  assert results.git_commit(str(repo)) == {'commit': sha, 'dirty': True}
  plain = tmp_path / 'plain'
  plain.mkdir()
  assert results.git_commit(str(plain)) == {'commit': None, 'dirty': None}


def test_running_means_by_hand():
  means = progress.RunningMeans()
  assert means.summary() == {}
  means.add({'seconds': 1.0, 'search': {'simulations': 30, 'committed_sets': 2}})
  means.add({'seconds': 2.5, 'search': {'simulations': 10, 'committed_sets': 3}})
  assert means.summary() == {'s/prompt': '1.75', 'sims/set': '8.0'}  # 40 sims / 5 sets
  vanilla = progress.RunningMeans()
  vanilla.add({'seconds': 0.5})
  assert vanilla.summary() == {'s/prompt': '0.50'}


def test_progress_bar_on_stderr_counts_earlier_answers(capsys):
  with progress.Progress('rain', total=4, already_done=1) as bar:
    bar.add([{'seconds': 2.0, 'search': {'simulations': 12, 'committed_sets': 4}}])
    bar.write('[rain x] answer')
  captured = capsys.readouterr()
  err = captured.err
  assert captured.out == ''
  assert '[rain x] answer' in err
  last = err.replace('\r', '\n').strip().splitlines()[-1]
  assert last.startswith('rain:  50%') and '2/4' in last
  assert 's/prompt=2.00' in last and 'sims/set=3.0' in last


# ----- CLI on a tiny random HF LLaMA (built as tests/test_cli.py builds it) -----


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('results_cli')
  model = test_cli._save_tiny_llama(root / 'tiny-llama')
  prompts = [{'id': f'q{i}', 'prompt': f'Question {i}: how many {w} are there?'}
             for i, w in enumerate(['cats', 'dogs', 'birds', 'fish', 'ants'])]
  prompt_file = test_cli._write_jsonl(root / 'prompts.jsonl', prompts)
  return dict(root=root, hf_dir=str(root / 'tiny-llama'), prompt_file=prompt_file,
              ids=[p['id'] for p in prompts],
              parameters=sum(p.numel() for p in model.parameters()))


def _flags(tiny, output, *extra):
  return [f'--hf_dir={tiny["hf_dir"]}', f'--tokenizer={test_cli.LLAMA_TOKENIZER}',
          '--task=custom', f'--prompt_file={tiny["prompt_file"]}', '--num_examples=-1',
          '--max_new_tokens=3', '--batch_size=2', f'--compilation_cache={tiny["root"]}/xla',
          f'--output={output}', *extra]


def test_two_shards_cover_the_dataset_once_and_config_changes_are_refused(tiny, tmp_path):
  outputs = [tmp_path / f'shard{i}.jsonl' for i in range(2)]
  for i, output in enumerate(outputs):
    run = test_cli._run_cli(*_flags(tiny, output, f'--shard_index={i}', '--num_shards=2'))
    assert run.returncode == 0, run.stderr
  ids = [[r['id'] for r in results.read_records(str(o))] for o in outputs]
  assert ids == [['q0', 'q2', 'q4'], ['q1', 'q3']]
  sidecar = json.load(open(str(outputs[1]) + '.config.json'))
  session = sidecar['sessions'][0]
  assert session['flags']['shard_index'] == 1 and session['model'] == 'tiny-llama'
  assert session['model_parameters'] == tiny['parameters']
  assert {'jax', 'flax'} <= set(session['versions']) and session['git']['commit']

  before = outputs[0].read_bytes()
  refused = test_cli._run_cli(*_flags(tiny, outputs[0], '--max_new_tokens=4'))
  lines = [l for l in refused.stderr.splitlines() if not test_cli.LOG_LINE.match(l)]
  assert refused.returncode == 1 and len(lines) == 1, refused.stderr
  assert lines[0].startswith(test_cli.ERROR_PREFIX)
  assert 'max_new_tokens: 3 -> 4' in lines[0] and '--allow_config_change' in lines[0]
  assert outputs[0].read_bytes() == before


def _answered_once(path, ids, methods):
  records = results.read_records(path)
  keys = sorted((r['id'], r['method']) for r in records)
  return keys == sorted((i, m) for i in ids for m in methods)


def _count_records(path):
  return len(results.read_records(str(path)))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_answers_each_prompt_once(tiny, tmp_path):
  """Start `rain_jax.run --method=both --batch_size=1`, SIGKILL it, restart, repeat.

  Each trial draws (seeded) how many new records to wait for, then an extra delay: 0-12 s
  when it waits for none (kills land in start-up, model load, compilation or the first
  prompt), 0-2 s otherwise (kills land between and during later prompts). After every
  kill: no line is torn, every line parses, no (id, method) repeats.
  At the end one run finishes and each prompt has exactly one answer per method.
  """
  output = tmp_path / 'killed.jsonl'
  search = ['--method=both', '--max_T=2', '--max_rollout=8', '--batch_size=1']
  flags = _flags(tiny, output, *search)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  warm = test_cli._run_cli(*_flags(tiny, tmp_path / 'warm.jsonl', *search))
  assert warm.returncode == 0, warm.stderr  # fills the compilation cache
  total = 2 * len(tiny['ids'])
  rng = random.Random(1234)
  trials = []
  for _ in range(12):
    before = _count_records(output)
    if before == total:
      break
    wait_for = rng.randint(0, min(3, total - before - 1))
    extra = rng.uniform(0.0, 12.0 if wait_for == 0 else 2.0)
    proc = subprocess.Popen([sys.executable, '-m', 'rain_jax.run', *flags], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    while proc.poll() is None and _count_records(output) < before + wait_for:
      time.sleep(0.05)
    time.sleep(extra)
    exited_first = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = output.read_bytes() if output.exists() else b''
    assert not data or data.endswith(b'\n')
    keys = [(r['id'], r['method']) for r in results.read_records(str(output))]
    assert len(keys) == len(set(keys))
    trials.append(dict(after_s=round(time.time() - started, 1), records_before=before,
                       records_after=len(keys), exited_before_kill=exited_first))
  final = test_cli._run_cli(*flags)
  assert final.returncode == 0, final.stderr
  assert _answered_once(str(output), tiny['ids'], ['vanilla', 'rain'])
  sidecar = json.load(open(str(output) + '.config.json'))
  runs_that_wrote = sum(t['records_after'] > t['records_before'] for t in trials)
  assert len(sidecar['sessions']) >= runs_that_wrote + 1
  assert sum(not t['exited_before_kill'] for t in trials) >= 5
  print('kill trials:', json.dumps(trials))
