"""scripts/sweep.py, scripts/report.py, scripts/tpu_vm_setup.sh and configs/paper/.

Oracles: absl's own flag parser reading the generated flagfiles with rain_jax.run's flag
definitions, shlex reading the printed shell commands, hand-computed means over
hand-written records, matplotlib reading the PNGs back, and git reading the checkout
that tpu_vm_setup.sh makes through a stand-in `gcloud` that copies and runs locally.
"""
import copy
import csv
import glob
import itertools
import json
import os
import shlex
import subprocess
import sys

import pytest

from rain_jax import results, tasks
from rain_jax import run as run_module
from scripts import report, sweep
from tests import test_cli

REPO = test_cli.REPO
PAPER = sorted(glob.glob(os.path.join(REPO, 'configs', 'paper', '*.flags')))


def _absl_parse(flagfile):
  """rain_jax.run's flags after absl reads `flagfile` (on a copy of the flag values)."""
  values = copy.deepcopy(run_module.FLAGS)
  values.unparse_flags()
  values(['rain_jax.run', f'--flagfile={flagfile}'])
  return values


def _grid(tmp_path, **extra):
  spec = {'name': 'demo', 'set': {'num_examples': 2, 'method': 'both', 'scan_layers': False},
          'axes': {'task': ['hh', {'label': 'custom',
                                   'flags': {'task': 'custom', 'prompt_file': 'p.jsonl'}}]}}
  spec.update(extra)
  path = tmp_path / 'grid.json'
  path.write_text(json.dumps(spec))
  return str(path)


def test_grid_expands_into_flagfiles_that_absl_reads_back(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  spec = sweep.load_spec(_grid(tmp_path), ['max_T=2,4'], ['seed=7'])
  runs = sweep.expand(spec, 'sw')
  manifest = sweep.write_sweep(spec, runs, 'sw')
  names = ['task-hh__max_T-2', 'task-hh__max_T-4', 'task-custom__max_T-2',
           'task-custom__max_T-4']
  assert [r['name'] for r in manifest['runs']] == names
  assert manifest['axes'] == {'task': ['hh', 'custom'], 'max_T': ['2', '4']}
  assert json.load(open('sw/manifest.json')) == manifest
  assert open('sw/flags/task-custom__max_T-4.flags').read().splitlines()[1:] == [
      '--num_examples=2', '--method=both', '--noscan_layers', '--seed=7', '--task=custom',
      '--prompt_file=p.jsonl', '--max_T=4', '--nosummary',
      '--output=sw/results/task-custom__max_T-4.jsonl']
  for run, (task, max_t) in zip(manifest['runs'], itertools.product(['hh', 'custom'],
                                                                    [2, 4])):
    parsed = _absl_parse(run['flagfile'])
    assert (parsed.task, parsed.max_T, parsed.seed, parsed.num_examples) == (task, max_t, 7, 2)
    assert parsed.method == 'both' and parsed.scan_layers is False
    assert parsed.summary is False  # sweeps are quiet unless the grid asks
    assert parsed.output == run['output'] == f'sw/results/{run["name"]}.jsonl'
    assert run['settings'] == {'task': task, 'max_T': str(max_t)}


def test_a_sweep_keeps_the_summary_a_run_asks_for(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runs = sweep.expand(sweep.load_spec(None, ['max_T=2'], ['summary=true']), 'sw')
  assert ('summary', 'true') in runs[0]['flags'] and ('summary', False) not in runs[0]['flags']
  sweep.write_sweep(sweep.load_spec(None, ['max_T=2'], ['summary=true']), runs, 'sw')
  assert _absl_parse(runs[0]['flagfile']).summary is True


@pytest.mark.parametrize('bad,words', [
    ({'axes': {'max_T': []}}, 'non-empty list'),
    ({'axes': {'max_T': [2, 2]}}, 'repeated labels'),
    ({'axes': {'task': [{'flags': {'task': 'hh'}}]}}, '"label" and "flags"'),
    ({'colour': 'red'}, 'unknown'),
    ({'flagfiles': ['absent.flags']}, 'absent.flags does not exist'),
])
def test_bad_grid_specs_raise(tmp_path, monkeypatch, bad, words):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(sweep.SpecError, match=words):
    sweep.load_spec(_grid(tmp_path, **bad), [], [])


def test_bad_axis_flag_raises():
  with pytest.raises(sweep.SpecError, match='name=value'):
    sweep.load_spec(None, ['max_T'], [])


@pytest.mark.parametrize('path', PAPER, ids=os.path.basename)
def test_paper_flagfiles_parse_and_name_their_weights(path):
  parsed = _absl_parse(path)
  assert parsed.task in tasks.TASKS
  assert parsed.method == 'both' and parsed.num_examples == -1
  assert not (parsed.hf_dir or parsed.checkpoint or parsed.gguf)
  values, weights = sweep.read_flagfile(path)
  assert values['model'] == parsed.model
  assert weights and os.path.basename(path) == f'{parsed.task}-{weights}.flags'
  assert 'WEIGHTS ARE NOT INCLUDED' in open(path).read()


@pytest.mark.parametrize('path', PAPER, ids=os.path.basename)
def test_paper_flagfiles_never_truncate_a_rollout(path):
  """A rollout ends by maxlen = prompt + max_new_tokens - 1 at the latest (truth rolls
  out to EOS), so max_rollout >= max_new_tokens never cuts one; the default of 64 would
  (issue 7, item 6)."""
  parsed = _absl_parse(path)
  assert parsed.max_rollout is not None and parsed.max_rollout >= parsed.max_new_tokens
  assert parsed.max_depth is not None and parsed.max_depth >= 16
  assert parsed.num_nodes is not None and parsed.num_nodes >= 2048


def test_paper_settings_cover_the_papers_models():
  names = {os.path.basename(p)[:-len('.flags')] for p in PAPER}
  assert names == {
      'hh-llama-7b', 'hh-llama-13b', 'hh-llama-30b', 'hh-llama-65b', 'hh-llama2-7b',
      'hh-llama2-13b', 'hh-llama2-70b', 'adv-vicuna-7b', 'adv-vicuna-13b', 'adv-vicuna-33b',
      'truthfulqa-llama2-13b-chat'}


def test_checkpoint_root_adds_the_weights_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  paper = ['configs/paper/truthfulqa-llama2-13b-chat.flags', 'configs/paper/hh-llama-7b.flags']
  spec = sweep.load_spec(None, ['flagfile=' + ','.join(paper)], [])
  out = str(tmp_path / 'sw')
  orbax = {r['name']: r['flags'][-2] for r in sweep.expand(spec, out, '/ckpt')}
  assert orbax == {'truthfulqa-llama2-13b-chat': ('checkpoint', '/ckpt/llama2-13b-chat'),
                   'hh-llama-7b': ('checkpoint', '/ckpt/llama-7b')}
  hf = sweep.expand(spec, out, '/hf', 'hf')
  assert hf[1]['flags'][-2] == ('hf_dir', '/hf/llama-7b')
  assert hf[1]['settings'] == {'flagfile': 'hh-llama-7b'}
  own = sweep.load_spec(None, ['flagfile=configs/paper/hh-llama-7b.flags'],
                        ['hf_dir=/mine'])
  assert ('checkpoint', '/ckpt/llama-7b') not in sweep.expand(own, out, '/ckpt')[0]['flags']
  smol = sweep.load_spec(None, ['max_T=2'], ['model=smollm2-135m-instruct'])
  assert [n for n, _ in sweep.expand(smol, out, '/ckpt')[0]['flags']] == [
      'model', 'max_T', 'summary', 'output']


# The flags each printed gcloud command may use, from the gcloud reference pages
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/{create,ssh,scp}):
# create TPU --zone --version --accelerator-type; ssh TPU --zone --worker --command;
# scp SRC... DEST --recurse --zone --worker.
GCLOUD_FLAGS = {'create': {'--zone', '--version', '--accelerator-type'},
                'ssh': {'--zone', '--worker', '--command'},
                'scp': {'--recurse', '--zone', '--worker'}}


def _gcloud(line):
  """(verb, positionals, {flag: value}) of a printed gcloud tpu-vm command, or None."""
  words = shlex.split(line)
  if words[:4] != ['gcloud', 'compute', 'tpus', 'tpu-vm']:
    return None
  verb, positionals, named = words[4], [], {}
  for word in words[5:]:
    if word.startswith('--'):
      name, _, value = word.partition('=')
      named[name] = value
    else:
      positionals.append(word)
  assert set(named) <= GCLOUD_FLAGS[verb], (verb, named)
  return verb, positionals, named


def _print_sweep(tmp_path, monkeypatch, tpus, accelerator_type='v4-16', replicas=None,
                 steps=sweep.STEPS):
  """Runs of max_T=2,4 on llama-7b, fitted to the slice; the printed lines."""
  monkeypatch.chdir(tmp_path)
  spec = sweep.load_spec(None, ['max_T=2,4'], ['model=llama-7b', 'mesh=1,1,-1'])
  spec['name'] = 'demo'
  runs = sweep.expand(spec, 'out/sw')
  tpu_slice = sweep.parse_slice(accelerator_type)
  sweep.fit_runs(runs, tpu_slice, replicas)
  sweep.write_sweep(spec, runs, 'out/sw')
  sweep.write_launchers(runs, spec['name'], 'out/sw', tpus, tpu_slice, 'python3')
  return runs, sweep.tpu_commands(runs, 'out/sw', tpus, 'us-central2-b', tpu_slice,
                                  'rain_jax', 'python3', steps)


def _run_commands(launcher):
  """{flag: value} of each `python3 -m rain_jax.run` line of a launcher script."""
  found = []
  for line in open(launcher).read().splitlines():
    if line.startswith('#') or '-m rain_jax.run ' not in line:
      continue
    argv = shlex.split(line)
    if argv[:3] == ['python3', '-m', 'rain_jax.run']:
      found.append(dict(a.lstrip('-').partition('=')[::2] for a in argv[3:]))
  return found


def _steps(lines):
  """{step: [parsed gcloud command]} from printed lines."""
  by_step, step = {}, None
  for line in lines:
    if line.startswith('# ') and line[2:3].isdigit():
      step = line.split('. ', 1)[1].split(':', 1)[0]
    elif _gcloud(line):
      by_step.setdefault(step, []).append(_gcloud(line))
  return by_step


def test_print_gives_each_tpu_vm_one_shard_launched_detached(tmp_path, monkeypatch):
  tpus = ['tpu-a', 'tpu-b']
  runs, lines = _print_sweep(tmp_path, monkeypatch, tpus)
  assert not any(line.rstrip().endswith('&') or line == 'wait' for line in lines)
  assert lines[-1] == 'python3 scripts/report.py --results=out/sw --out=out/sw/report'
  by_step = _steps(lines)
  assert set(by_step) == {'create', 'copy', 'launch', 'status', 'fetch', 'stop'}
  assert all(named['--zone'] == 'us-central2-b'
             for commands in by_step.values() for _, _, named in commands)
  for verb, positionals, named in by_step['create']:
    assert verb == 'create' and named['--accelerator-type'] == 'v4-16'
    assert named['--version'] == 'tpu-ubuntu2204-base'
  for action in ('launch', 'status', 'stop'):
    assert [p[0] for _, p, _ in by_step[action]] == tpus
    for verb, (tpu,), named in by_step[action]:
      assert verb == 'ssh' and named['--worker'] == 'all'
      word = {'launch': 'start'}.get(action, action)
      assert named['--command'] == f'cd rain_jax && bash out/sw/launch/{tpu}.sh {word}'
  for verb, (source, dest), named in by_step['fetch']:
    assert verb == 'scp' and named == {'--recurse': '', '--zone': 'us-central2-b',
                                       '--worker': '0'}
    assert dest == 'out/sw/' and source.endswith(':rain_jax/out/sw/results')
  copies = [c for c in by_step['copy'] if c[0] == 'scp']
  assert [c[1] for c in copies] == [
      ['out/sw/manifest.json', 'out/sw/flags', 'out/sw/launch', f'{t}:rain_jax/out/sw']
      for t in tpus]
  seen = []
  for index, tpu in enumerate(tpus):
    for args in _run_commands(f'out/sw/launch/{tpu}.sh'):
      assert 'distributed' in args and args['num_shards'] == '2'
      assert args['shard_index'] == str(index)
      seen.append((args['flagfile'], args['shard_index'], args['output']))
  assert sorted(seen) == [
      ('out/sw/flags/max_T-2.flags', '0', 'out/sw/results/max_T-2.shard0-of-2.jsonl'),
      ('out/sw/flags/max_T-2.flags', '1', 'out/sw/results/max_T-2.shard1-of-2.jsonl'),
      ('out/sw/flags/max_T-4.flags', '0', 'out/sw/results/max_T-4.shard0-of-2.jsonl'),
      ('out/sw/flags/max_T-4.flags', '1', 'out/sw/results/max_T-4.shard1-of-2.jsonl')]
  assert {report.run_name(o) for _, _, o in seen} == {'max_T-2', 'max_T-4'}
  parsed = _absl_parse('out/sw/flags/max_T-2.flags')
  assert (parsed.mesh, parsed.batch_size) == ('1,1,8', 8)  # v4-16: 8 chips
  one = tmp_path / 'one'
  one.mkdir()
  _print_sweep(one, monkeypatch, ['tpu-a'], 'v4-8')
  assert not any('--distributed' in line for line in open('out/sw/launch/tpu-a.sh'))
  assert _absl_parse('out/sw/flags/max_T-2.flags').mesh == '1,1,4'
  with pytest.raises(sweep.SpecError, match='relative'):
    sweep.tpu_commands(runs, '/abs/sw', ['tpu-a'], 'z', sweep.parse_slice('v4-8'),
                       'rain_jax', 'python3')


def test_print_step_prints_one_step_alone(tmp_path, monkeypatch):
  _, lines = _print_sweep(tmp_path, monkeypatch, ['tpu-a', 'tpu-b'], steps=('status',))
  assert lines[0].startswith('# 4. status:') and len(lines) == 3
  assert all(_gcloud(l)[2]['--command'].endswith('.sh status') for l in lines[1:])


@pytest.mark.parametrize('accelerator_type,hosts,expected', [
    ('v4-8', None, ('v4-8', 4, 1, 'tpu-ubuntu2204-base')),
    ('v4-32', None, ('v4-32', 16, 4, 'tpu-ubuntu2204-base')),
    ('v4-32', 4, ('v4-32', 16, 4, 'tpu-ubuntu2204-base')),
    ('v5p-16', None, ('v5p-16', 8, 2, 'v2-alpha-tpuv5')),
    ('v5e-16', None, ('v5litepod-16', 16, 4, 'v2-alpha-tpuv5-lite')),
    ('v5litepod-16', 2, ('v5litepod-16', 16, 2, 'v2-alpha-tpuv5-lite')),  # 8-chip hosts
    ('v5litepod-8', None, ('v5litepod-8', 8, 1, 'v2-alpha-tpuv5-lite')),
    ('v6e-16', None, ('v6e-16', 16, 4, 'v2-alpha-tpuv6e')),
])
def test_slice_types_give_chips_and_hosts(accelerator_type, hosts, expected):
  got = sweep.parse_slice(accelerator_type, hosts)
  assert (got.accelerator_type, got.chips, got.hosts, got.version) == expected


@pytest.mark.parametrize('accelerator_type,hosts,words', [
    ('v4-32', 2, r'--hosts_per_tpu=2 does not match --accelerator_type=v4-32: a v4-32 '
                 r'slice has 16 chips on 4 host\(s\)'),
    ('v4-8', 2, r'4 chips on 1 host'),
    ('v5e-16', 3, r'16 chips on 4 or 2 host'),
    ('v4-7', None, 'TensorCores, 2 per chip'),
    ('v3-8', None, 'expected v4-N'),
    (None, None, 'needs --accelerator_type'),
])
def test_bad_slice_types_and_hosts_raise(accelerator_type, hosts, words):
  with pytest.raises(sweep.SpecError, match=words):
    sweep.parse_slice(accelerator_type, hosts)


def _runs_with(tmp_path, monkeypatch, **shared):
  """The run of the 65B HH flagfile (included first) with `shared` flags after it."""
  monkeypatch.chdir(REPO)
  spec = {'name': 'hh-llama-65b', 'flagfiles': ['configs/paper/hh-llama-65b.flags'],
          'set': shared, 'axes': {}}
  return sweep.expand(spec, str(tmp_path / 'sw'))


def test_replicas_split_a_slice_and_keep_each_copys_batch(tmp_path, monkeypatch):
  v4_32 = sweep.parse_slice('v4-32')
  runs = _runs_with(tmp_path, monkeypatch)  # the flagfile: --mesh=1,1,-1, batch 8
  assert sweep.fit_runs(runs, v4_32) == {'hh-llama-65b': ((1, 1, 16), 8)}
  runs = _runs_with(tmp_path, monkeypatch)
  assert sweep.fit_runs(runs, v4_32, replicas=2) == {'hh-llama-65b': ((2, 1, 8), 16)}
  sweep.write_sweep({'name': 's', 'axes': {}}, runs, str(tmp_path / 'sw'))
  parsed = _absl_parse(runs[0]['flagfile'])
  assert (parsed.mesh, parsed.batch_size, parsed.model) == ('2,1,8', 16, 'llama-65b')
  assert parsed.output == runs[0]['output']
  runs = _runs_with(tmp_path, monkeypatch, mesh='1,-1,4')
  assert sweep.fit_runs(runs, v4_32, replicas=2)['hh-llama-65b'] == ((2, 2, 4), 16)
  runs = _runs_with(tmp_path, monkeypatch, mesh='1,2,4')  # no -1: tensor shrinks
  assert sweep.fit_runs(runs, v4_32, replicas=4)['hh-llama-65b'] == ((4, 2, 2), 32)


@pytest.mark.parametrize('shared,replicas,words', [
    ({'mesh': '2,2,4', 'batch_size': 6}, None,
     r'--batch_size=6 is not a multiple of data x fsdp = 2 x 2 = 4'),
    ({'mesh': '1,2,-1', 'batch_size': 3}, 2,
     r'--batch_size=6 is not a multiple of data x fsdp = 2 x 2 = 4'),
    ({'mesh': '1,1,8'}, None, r'--mesh=1,1,8 does not fit a v4-32 \(16 chips'),
    ({}, 3, r'--replicas_per_tpu=3 made it 3,1,-1\) does not fit'),
])
def test_meshes_and_batches_that_would_idle_chips_raise(tmp_path, monkeypatch, shared,
                                                        replicas, words):
  runs = _runs_with(tmp_path, monkeypatch, **shared)
  with pytest.raises(sweep.SpecError, match=words):
    sweep.fit_runs(runs, sweep.parse_slice('v4-32'), replicas)


def _sweep_cli(work, *extra):
  return subprocess.run(
      [sys.executable, 'scripts/sweep.py', f'--out={os.path.relpath(work / "sw", REPO)}',
       '--run=print', '--tpu_names=rain-a', '--zone=us-central2-b', *extra],
      cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_sweep_cli_refuses_a_bad_slice_and_prints_a_good_one(tmp_path):
  paper = '--axis=flagfile=configs/paper/hh-llama-65b.flags'
  bad = _sweep_cli(tmp_path, paper, '--accelerator_type=v4-32', '--hosts_per_tpu=2')
  assert bad.returncode == 1 and bad.stdout == ''
  assert bad.stderr.strip().splitlines()[-1].startswith(
      'sweep.py: error: --hosts_per_tpu=2 does not match --accelerator_type=v4-32')
  grid = tmp_path / 'grid.json'  # the flagfile first, then mesh and batch over it
  grid.write_text(json.dumps({'flagfiles': ['configs/paper/hh-llama-65b.flags'],
                              'set': {'mesh': '2,2,-1', 'batch_size': 6}}))
  uneven = _sweep_cli(tmp_path, '--accelerator_type=v4-32', f'--grid={grid}')
  assert uneven.returncode == 1 and 'not a multiple of data x fsdp' in uneven.stderr
  good = _sweep_cli(tmp_path, paper, '--accelerator_type=v4-32', '--replicas_per_tpu=2',
                    '--print_step=launch')
  assert good.returncode == 0, good.stderr
  launch = [_gcloud(l) for l in good.stdout.splitlines() if not l.startswith('#')]
  assert len(launch) == 1 and launch[0][2]['--command'].endswith('/launch/rain-a.sh start')
  run, = _run_commands(str(tmp_path / 'sw' / 'launch' / 'rain-a.sh'))
  assert 'distributed' in run
  assert _absl_parse(os.path.join(REPO, run['flagfile'])).mesh == '2,1,8'


FAKE_RUN = """#!/usr/bin/env bash
# Stand-in for python3: logs its arguments, appends a record to --output, sleeps.
echo "fake python $*"
for arg in "$@"; do
  if [[ $arg == --output=* ]]; then
    mkdir -p "$(dirname "${arg#--output=}")"; echo '{}' >> "${arg#--output=}"
  fi
done
sleep "${FAKE_SLEEP:-0}"
"""


def _launcher(script, action, env):
  return subprocess.run(['bash', script, action], env=env, capture_output=True, text=True,
                        timeout=60, check=False)


def _wait_for(condition):
  for _ in range(200):
    if condition():
      return True
    subprocess.run(['sleep', '0.1'], check=True)
  return False


def test_launcher_detaches_reports_status_and_stops(tmp_path, monkeypatch):
  _print_sweep(tmp_path, monkeypatch, ['tpu-a'])
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  (bin_dir / 'python3').write_text(FAKE_RUN)
  (bin_dir / 'python3').chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', HOME=str(home),
             FAKE_SLEEP='120')
  script = 'out/sw/launch/tpu-a.sh'
  pidfile = home / 'rain_jax_logs' / 'demo.pid'
  started = _launcher(script, 'start', env)
  assert started.returncode == 0 and 'started' in started.stdout
  assert _wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
  pid = int(pidfile.read_text())
  try:
    # Detached: the runs lead their own session (no SIGHUP when the SSH session ends).
    assert os.getsid(pid) == pid != os.getsid(0)
    again = _launcher(script, 'start', env)
    assert again.returncode == 1 and 'already running' in again.stderr
    assert _wait_for(lambda: 'records' in _launcher(script, 'status', env).stdout)
    status = _launcher(script, 'status', env).stdout
    assert 'running (pid' in status and 'run 1 of 2: max_T-2 started' in status
    assert '1 records in out/sw/results/max_T-2.shard0-of-1.jsonl' in status
  finally:
    stopped = _launcher(script, 'stop', env)
  assert stopped.returncode == 0 and 'stopped' in stopped.stdout
  with pytest.raises(ProcessLookupError):
    os.killpg(pid, 0)
  assert 'not running' in _launcher(script, 'status', env).stdout
  logs = list((home / 'rain_jax_logs').glob('demo.*.log'))
  assert len(logs) == 1 and 'stopped by the stop step' in logs[0].read_text()
  # Started again, it runs both runs in turn to the end; the log says how they ended.
  env['FAKE_SLEEP'] = '0'
  assert _launcher(script, 'start', env).returncode == 0
  assert _wait_for(lambda: 'finished' in logs[0].read_text())
  text = logs[0].read_text()
  assert 'finished: 0 of 2 runs failed' in text
  assert 'run 2 of 2: max_T-4 ended, exit status 0' in text
  assert text.count('fake python -m rain_jax.run --flagfile=out/sw/flags/max_T-4.flags') == 1
  assert '2 records in out/sw/results/max_T-2.shard0-of-1.jsonl' in _launcher(
      script, 'status', env).stdout


# ----- report.py on hand-written records -----


def _rec(i, method, model, seconds, tokens, task='hh', sims=None, sets=None):
  record = {'id': f'q{i}', 'method': method, 'model': model, 'task': task,
            'seconds': seconds, 'num_new_tokens': tokens, 'response': 'r'}
  if sims is not None:
    record['search'] = {'simulations': sims, 'committed_sets': sets}
  return record


def _results_file(path, records, model, parameters, flag_values):
  with results.ResultWriter(str(path)) as writer:
    for record in records:
      writer.write(record)
  results.record_session(str(path), flag_values, {'model': model,
                                                  'model_parameters': parameters})


@pytest.fixture
def two_models(tmp_path):
  """Two models, vanilla and RAIN each; model 'big' split into two shard files."""
  folder = tmp_path / 'res'
  folder.mkdir()
  small = [_rec(0, 'vanilla', 'small', 1.0, 4), _rec(1, 'vanilla', 'small', 3.0, 6),
           _rec(0, 'rain', 'small', 5.0, 4, sims=30, sets=2),
           _rec(1, 'rain', 'small', 9.0, 8, sims=20, sets=3),
           _rec(2, 'rain', 'small', 100.0, 8, sims=50, sets=5)]  # no vanilla for q2
  _results_file(folder / 'small.jsonl', small, 'small', 135_000_000,
                {'model': 'small', 'task': 'hh', 'max_T': 2})
  big0 = [_rec(0, 'vanilla', 'big', 2.0, 5), _rec(0, 'rain', 'big', 6.0, 5, sims=8, sets=1)]
  big1 = [_rec(1, 'vanilla', 'big', 2.0, 7), _rec(1, 'rain', 'big', 10.0, 7, sims=8, sets=1),
          _rec(0, 'rain', 'big', 999.0, 5, sims=1, sets=1)]  # q0 again: counted once
  for i, records in enumerate([big0, big1]):
    _results_file(folder / f'big.shard{i}-of-2.jsonl', records, 'big', 7_000_000_000,
                  {'model': 'big', 'task': 'hh', 'max_T': 2})
  scores = tmp_path / 'scores.jsonl'
  scores.write_text('\n'.join(json.dumps(s) for s in [
      {'id': 'q0', 'method': 'rain', 'model': 'small', 'harmless': True},
      {'id': 'q1', 'method': 'rain', 'model': 'small', 'harmless': 0, 'refusal': 'no',
       'bleu': {'truthful': True, 'diff': 0.25}, 'p_harmless': [0.1, 0.2]},
      {'id': 'q0', 'method': 'vanilla', 'harmless': False},  # both models
      {'id': 'q0', 'method': 'rain', 'model': 'big', 'harmless': 1.0, 'judge': 'gpt-4'},
  ]) + '\n')
  return folder, str(scores)


def test_report_table_csv_and_plots_by_hand(two_models, tmp_path):
  folder, scores = two_models
  out = tmp_path / 'report'
  rows, plots = report.make_report([str(folder)], [scores], str(out))
  table = {(r['model'], r['method']): r for r in rows}
  assert [(r['model'], r['method']) for r in rows] == [
      ('small', 'vanilla'), ('small', 'rain'), ('big', 'vanilla'), ('big', 'rain')]
  small_rain = table[('small', 'rain')]
  assert small_rain['n'] == 3 and small_rain['parameters'] == 135_000_000
  assert small_rain['mean_new_tokens'] == pytest.approx(20 / 3)
  assert small_rain['mean_seconds'] == pytest.approx(38.0)
  assert small_rain['time_ratio_rain_vs_vanilla'] == pytest.approx(7.0 / 2.0)  # q0, q1
  assert small_rain['simulations_per_set'] == pytest.approx(100 / 10)
  assert small_rain['harmless'] == pytest.approx(0.5)
  assert (small_rain['bleu.truthful'], small_rain['bleu.diff']) == (1.0, 0.25)
  assert table[('big', 'rain')]['bleu.diff'] is None
  assert table[('small', 'vanilla')]['harmless'] == 0.0
  assert table[('small', 'vanilla')]['time_ratio_rain_vs_vanilla'] is None
  big_rain = table[('big', 'rain')]
  assert (big_rain['n'], big_rain['mean_seconds']) == (2, pytest.approx(8.0))
  assert big_rain['time_ratio_rain_vs_vanilla'] == pytest.approx(4.0)
  assert big_rain['simulations_per_set'] == pytest.approx(8.0)
  assert big_rain['harmless'] == 1.0 and table[('big', 'vanilla')]['harmless'] == 0.0
  assert all(r['setting'] == '' for r in rows)  # max_T is the same everywhere

  with open(out / 'report.csv', newline='') as f:
    csv_rows = list(csv.DictReader(f))
  assert [float(r['mean_seconds']) for r in csv_rows] == pytest.approx([2.0, 38.0, 2.0, 8.0])
  assert list(csv_rows[0])[-3:] == ['bleu.diff', 'bleu.truthful', 'harmless']
  markdown = (out / 'report.md').read_text()
  assert ('| small | 135M | hh |  | rain | 3 | 6.67 | 38 | 3.5 | 10 | 0.25 | 1 | 0.5 |'
          in markdown)
  assert set(plots) == {'seconds_per_prompt.png', 'time_ratio.png', 'simulations_per_set.png',
                        'metric_harmless.png', 'metric_bleu.diff.png',
                        'metric_bleu.truthful.png'}
  from matplotlib import image
  for name in plots:
    pixels = image.imread(out / name)
    assert pixels.shape[:2] == (600, 960) and pixels.std() > 0.01
    assert f'![{name}]({name})' in markdown


def test_settings_from_a_manifest_or_from_differing_sidecars(tmp_path):
  flags_for = lambda t: {'model': 'm', 'task': 'hh', 'max_T': t, 'seed': 0}
  for t in (2, 4):
    _results_file(tmp_path / f'max_T-{t}.jsonl',
                  [_rec(0, 'rain', 'm', float(t), 3, sims=t, sets=1)], 'm', 10, flags_for(t))
  rows, _ = report.make_report([str(tmp_path)], [], str(tmp_path / 'r1'), plots=False)
  assert [(r['setting'], r['mean_seconds']) for r in rows] == [('max_T=2', 2.0),
                                                               ('max_T=4', 4.0)]
  manifest = {'runs': [{'name': f'max_T-{t}', 'settings': {'task': 'hh', 'max_T': f'T{t}'}}
                       for t in (2, 4)]}
  (tmp_path / 'manifest.json').write_text(json.dumps(manifest))
  rows, _ = report.make_report([str(tmp_path)], [], str(tmp_path / 'r2'), plots=False)
  assert [r['setting'] for r in rows] == ['max_T=T2', 'max_T=T4']
  assert not (tmp_path / 'r2' / 'time_ratio.png').exists()


def test_plots_put_model_size_or_settings_on_the_x_axis():
  rows = [{'model': m, 'setting': t, 'task': 'hh', 'method': 'rain', 'mean_seconds': 1.0}
          for m in ('b', 'a') for t in ('max_T=2', 'max_T=4')]
  assert report.x_axis(rows, {'a': 7e9, 'b': 1e8}) == ('size', ['b', 'a'])
  assert report.x_axis(rows, {'a': 7e9}) == ('model', ['b', 'a'])  # unknown sizes first
  one_model = [r for r in rows if r['model'] == 'a']
  mode, categories = report.x_axis(one_model, {'a': 7e9})
  assert (mode, categories) == ('setting', ['max_T=2', 'max_T=4'])
  assert report.plot_series(one_model, 'mean_seconds', ('rain',), mode, categories, {}) == {
      ('hh', 'rain'): [(0, 1.0), (1, 1.0)]}


def test_report_errors_name_the_problem(tmp_path):
  with pytest.raises(report.ReportError, match='absent.jsonl does not exist'):
    report.make_report([str(tmp_path / 'absent.jsonl')], [], str(tmp_path / 'r'))
  with pytest.raises(report.ReportError, match='no .jsonl result files'):
    report.make_report([str(tmp_path)], [], str(tmp_path / 'r'))
  good = tmp_path / 'a.jsonl'
  _results_file(good, [_rec(0, 'vanilla', 'm', 1.0, 2)], 'm', 10, {'task': 'hh'})
  bad_scores = tmp_path / 'scores.jsonl'
  bad_scores.write_text('{"id": "q0", "harmless": 1}\n')
  with pytest.raises(report.ReportError, match=r'scores.jsonl:1: .*"id" and "method"'):
    report.make_report([str(good)], [str(bad_scores)], str(tmp_path / 'r'))


# ----- tpu_vm_setup.sh through a stand-in gcloud -----

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Stand-in for gcloud: logs its arguments; "scp SRC NAME:" copies into $FAKE_HOME,
# "ssh ... --command=C" runs C in $FAKE_HOME (with a stand-in python3 on PATH).
echo "$*" >> "$FAKE_HOME/../gcloud.log"
if [[ $4 == scp ]]; then cp "$5" "$FAKE_HOME/"; fi
if [[ $4 == ssh ]]; then
  for arg in "$@"; do
    if [[ $arg == --command=* ]]; then (cd "$FAKE_HOME" && bash -c "${arg#--command=}"); fi
  done
fi
'''
FAKE_PYTHON = '#!/usr/bin/env bash\necho "python3 $*" >> "$FAKE_HOME/../python.log"\n'


def test_tpu_vm_setup_checks_out_head_and_installs_on_all_workers(tmp_path):
  bin_dir, home = tmp_path / 'bin', tmp_path / 'home'
  bin_dir.mkdir()
  home.mkdir()
  for name, text in (('gcloud', FAKE_GCLOUD), ('python3', FAKE_PYTHON)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_HOME=str(home))
  script = os.path.join(REPO, 'scripts', 'tpu_vm_setup.sh')
  for _ in range(2):  # a fresh clone, then an update of the existing checkout
    done = subprocess.run(['bash', script, 'my-tpu', 'us-central2-b'], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
  head = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=True).stdout.strip()
  checkout = subprocess.run(['git', '-C', str(home / 'rain_jax'), 'rev-parse', 'HEAD'],
                            capture_output=True, text=True, check=True).stdout.strip()
  assert checkout == head
  assert (home / 'rain_jax' / 'rain_jax' / 'run.py').is_file()
  log = (tmp_path / 'gcloud.log').read_text().splitlines()
  calls = [line for line in log if line.startswith('compute ')]  # the command spans lines
  assert len(calls) == 4
  assert calls[0].startswith('compute tpus tpu-vm scp ') and 'my-tpu:' in calls[0]
  for call in calls:
    assert '--zone=us-central2-b --worker=all' in call
  pip = (tmp_path / 'python.log').read_text().splitlines()
  import jax
  assert pip[0] == (f'python3 -m pip install -q -e ./rain_jax[tpu] jax=={jax.__version__} '
                    f'jaxlib=={jax.__version__}')  # the JAX the tests run with
  assert pip[1].startswith('python3 -c ') and f'== "{jax.__version__}"' in pip[1]
  bad = subprocess.run(['bash', script, 'only-one-arg'], env=env, capture_output=True,
                       text=True, check=False)
  assert bad.returncode == 2 and 'usage' in bad.stderr


# ----- the whole path on a tiny random HF LLaMA (slow) -----


@pytest.mark.slow
def test_sweep_runs_locally_and_reports(tmp_path):
  hf_dir = tmp_path / 'tiny-llama'
  test_cli._save_tiny_llama(hf_dir)
  prompts = test_cli._write_jsonl(tmp_path / 'p.jsonl', [
      {'id': 'a', 'prompt': 'Hello there, how are'}, {'id': 'b', 'prompt': 'One two'}])
  grid = {'name': 'tiny', 'set': {
      'hf_dir': str(hf_dir), 'tokenizer': test_cli.LLAMA_TOKENIZER, 'task': 'custom',
      'prompt_file': prompts, 'num_examples': -1, 'method': 'both', 'max_new_tokens': 3,
      'batch_size': 2, 'max_rollout': 8, 'compilation_cache': str(tmp_path / 'xla')},
      'axes': {'max_T': [2, 3]}}
  (tmp_path / 'grid.json').write_text(json.dumps(grid))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = tmp_path / 'sw'
  swept = subprocess.run([sys.executable, 'scripts/sweep.py', f'--out={out}',
                          f'--grid={tmp_path / "grid.json"}', '--run=local'], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=900, check=False)
  assert swept.returncode == 0, swept.stderr[-3000:]
  for t in (2, 3):
    records = results.read_records(str(out / 'results' / f'max_T-{t}.jsonl'))
    assert sorted((r['id'], r['method']) for r in records) == [
        ('a', 'rain'), ('a', 'vanilla'), ('b', 'rain'), ('b', 'vanilla')]
  made = subprocess.run([sys.executable, 'scripts/report.py', f'--results={out}',
                         f'--out={out / "report"}'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert made.returncode == 0, made.stderr
  with open(out / 'report' / 'report.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert [(r['setting'], r['method'], r['n']) for r in rows] == [
      ('max_T=2', 'vanilla', '2'), ('max_T=2', 'rain', '2'), ('max_T=3', 'vanilla', '2'),
      ('max_T=3', 'rain', '2')]
  assert all(float(r['time_ratio_rain_vs_vanilla']) > 0 for r in rows if r['method'] == 'rain')
  assert (out / 'report' / 'time_ratio.png').is_file()
