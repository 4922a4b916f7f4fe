"""Closing the loop: scripts/sweep.py's chain (RAIN generation -> rain_jax.train -> a
vanilla run of the trained model) and scripts/report.py's distilled rows.

Oracles: absl reading the written flagfiles with rain_jax.run's flag definitions (and,
in a subprocess, rain_jax.train's), stand-in `python` executables that log the stages
they are asked to run, hand-computed means over hand-written records and a hand-made
training folder; the slow test runs the whole chain on a tiny random LLaMA.
"""
import csv
import json
import os
import subprocess
import sys

import pytest

from rain_jax import results
from scripts import report, sweep
from tests import test_sweep_report as sweep_tests

REPO = sweep_tests.REPO
TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama', 'tokenizer.model')
TRAIN = {'objective': 'sft', 'steps': 3, 'lora_rank': 4, 'learning_rate': 1e-3}


def _train_values(flagfile):
  """{flag: value} of rain_jax.train after absl reads `flagfile` (in a subprocess: its
  flags clash with rain_jax.run's)."""
  code = ('import json, sys\nfrom absl import flags\nimport rain_jax.train\n'
          'flags.FLAGS(["rain_jax.train", "--flagfile=" + sys.argv[1]])\n'
          'print(json.dumps({n: flags.FLAGS[n].value for n in ("model", "checkpoint", '
          '"hf_dir", "gguf", "tokenizer", "dtype", "scan_layers", "mesh", '
          '"compilation_cache", "objective", "steps", "lora_rank", "learning_rate", "data", '
          '"output")}))')
  done = subprocess.run([sys.executable, '-c', code, os.path.abspath(flagfile)], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=True)
  return json.loads(done.stdout)


def _chain(tmp_path, monkeypatch, set_flags, axis=('max_T=2,4',), train=TRAIN,
           tpu_slice=None, replicas=None):
  """The spec and runs (with their chains, fitted to `tpu_slice` first as main() does)."""
  monkeypatch.chdir(tmp_path)
  spec = sweep.load_spec(None, list(axis), [f'{k}={v}' for k, v in set_flags.items()],
                         name='demo', train_flags=[f'{k}={v}' for k, v in train.items()])
  runs = sweep.expand(spec, 'sw')
  if tpu_slice:
    sweep.fit_runs(runs, tpu_slice, replicas)
  sweep.add_chain(runs, spec['train'], 'sw')
  return spec, runs


def test_chain_flagfiles_give_each_stage_its_flags(tmp_path, monkeypatch):
  hf = {'hf_dir': '/w/tiny', 'method': 'both', 'mesh': '1,1,-1', 'task': 'hh',
        'dtype': 'bfloat16', 'scan_layers': False, 'compilation_cache': '/c'}
  spec, runs = _chain(tmp_path, monkeypatch, hf)
  manifest = sweep.write_sweep(spec, runs, 'sw')
  assert manifest['train'] == {k: str(v) for k, v in TRAIN.items()}
  entry = manifest['runs'][1]
  assert entry['train_output'] == 'sw/train/max_T-4'
  assert entry['distilled_output'] == 'sw/results/max_T-4.distilled.jsonl'
  trained = _train_values(entry['train_flagfile'])
  assert trained == {'model': None, 'checkpoint': None, 'hf_dir': '/w/tiny', 'gguf': None,
                     'tokenizer': None, 'dtype': 'bfloat16', 'scan_layers': False,
                     'mesh': '1,1,-1', 'compilation_cache': '/c', 'objective': 'sft', 'steps': 3,
                     'lora_rank': 4, 'learning_rate': 1e-3,
                     'data': 'sw/results/max_T-4.jsonl', 'output': 'sw/train/max_T-4'}
  distilled = sweep_tests._absl_parse(entry['distilled_flagfile'])
  assert (distilled.method, distilled.checkpoint, distilled.hf_dir) == (
      'vanilla', 'sw/train/max_T-4/model', None)
  assert distilled.tokenizer == '/w/tiny'  # the HF folder carries the tokenizer
  assert (distilled.max_T, distilled.task, distilled.mesh, distilled.dtype,
          distilled.scan_layers) == (4, 'hh', '1,1,-1', 'bfloat16', False)
  assert distilled.output == entry['distilled_output']
  assert [s for s, *_ in sweep.stages(runs[0])] == ['generate', 'train', 'distilled']


@pytest.mark.parametrize('set_flags,model,tokenizer', [
    ({'model': 'smollm2-135m-instruct'}, 'smollm2-135m-instruct', None),
    ({}, 'smollm2-135m-instruct', None),  # rain_jax.run's default model, named
    ({'gguf': '/w/m.gguf'}, None, '/w/m.gguf'),
    ({'hf_dir': '/w/tiny', 'tokenizer': '/w/t.model'}, None, '/w/t.model'),
    ({'model': 'llama-7b', 'checkpoint': '/ckpt/llama-7b'}, 'llama-7b', None),
])
def test_distilled_run_keeps_the_model_name_or_the_tokenizer(tmp_path, monkeypatch,
                                                             set_flags, model, tokenizer):
  spec, runs = _chain(tmp_path, monkeypatch, dict(set_flags, method='both'), axis=())
  sweep.write_sweep(spec, runs, 'sw')
  parsed = sweep_tests._absl_parse(runs[0]['distilled']['flagfile'])
  assert (parsed.model, parsed.tokenizer, parsed.checkpoint, parsed.hf_dir, parsed.gguf) == (
      model, tokenizer, 'sw/train/demo/model', None, None)


def test_chain_refuses_what_it_cannot_run(tmp_path, monkeypatch):
  with pytest.raises(sweep.SpecError, match='needs --method=both'):
    _chain(tmp_path, monkeypatch, {'method': 'rain'})
  with pytest.raises(sweep.SpecError, match='--data, --output are set by the sweep'):
    sweep.load_spec(None, [], [], train_flags=['data=x.jsonl', 'output=o'])
  grid = tmp_path / 'grid.json'
  grid.write_text(json.dumps({'train': ['sft']}))
  with pytest.raises(sweep.SpecError, match='"train" must be an object'):
    sweep.load_spec(str(grid), [], [])
  _, runs = _chain(tmp_path, monkeypatch, {'method': 'both'}, train={'stepz': 3})
  with pytest.raises(sweep.SpecError, match="run max_T-2: the training stage: .*stepz"):
    sweep.check_train_flags(runs)
  _, runs = _chain(tmp_path, monkeypatch, {'method': 'both'}, train={'objective': 'ppo'})
  with pytest.raises(sweep.SpecError, match='objective'):
    sweep.check_train_flags(runs)
  with pytest.raises(sweep.SpecError, match='one TPU VM, not 2'):
    sweep.check_chain_slices(['a', 'b'], sweep.parse_slice('v4-8'))
  with pytest.raises(sweep.SpecError, match='one-host slice, not v4-32'):
    sweep.check_chain_slices(['a'], sweep.parse_slice('v4-32'))


FAKE_PYTHON = """#!/usr/bin/env bash
# Stand-in for python: logs "<module> <args>", fails for the module named in $FAIL_MODULE
# when the flagfile's name contains $FAIL_RUN.
echo "$2 ${*:3}" >> "$STAGE_LOG"
if [[ $2 == "$FAIL_MODULE" && $3 == *"$FAIL_RUN"* ]]; then exit 3; fi
"""


def _fake_python(tmp_path, name='python3'):
  folder = tmp_path / 'bin'
  folder.mkdir(exist_ok=True)
  (folder / name).write_text(FAKE_PYTHON)
  (folder / name).chmod(0o755)
  return str(folder / name)


def test_local_runs_the_stages_in_order_and_stops_a_failed_chain(tmp_path, monkeypatch):
  spec, runs = _chain(tmp_path, monkeypatch, {'method': 'both'})
  sweep.write_sweep(spec, runs, 'sw')
  log = tmp_path / 'stages.log'
  monkeypatch.setenv('STAGE_LOG', str(log))
  monkeypatch.setenv('FAIL_MODULE', 'rain_jax.train')
  monkeypatch.setenv('FAIL_RUN', 'max_T-2')
  failed = sweep.run_local(runs, python=_fake_python(tmp_path))
  assert failed == ['max_T-2 (train)']
  assert log.read_text().splitlines() == [
      'rain_jax.run --flagfile=sw/flags/max_T-2.flags',
      'rain_jax.train --flagfile=sw/flags/max_T-2.train.flags',  # fails: no distilled run
      'rain_jax.run --flagfile=sw/flags/max_T-4.flags',
      'rain_jax.train --flagfile=sw/flags/max_T-4.train.flags',
      'rain_jax.run --flagfile=sw/flags/max_T-4.distilled.flags']


def test_print_launcher_chains_the_stages_and_fetch_brings_the_training_record(
    tmp_path, monkeypatch):
  tpu_slice = sweep.parse_slice('v4-8')
  spec, runs = _chain(tmp_path, monkeypatch, {'method': 'both', 'model': 'llama-7b',
                                              'mesh': '1,1,-1'}, tpu_slice=tpu_slice,
                      replicas=2)
  sweep.write_sweep(spec, runs, 'sw')
  assert sweep_tests._absl_parse(runs[0]['distilled']['flagfile']).mesh == '2,1,2'
  assert _train_values(runs[0]['train']['flagfile'])['mesh'] == '2,1,2'
  sweep.write_launchers(runs, 'demo', 'sw', ['tpu-a'], tpu_slice, 'python3')
  lines = sweep.tpu_commands(runs, 'sw', ['tpu-a'], 'us-central2-b', tpu_slice, 'rain_jax',
                             'python3', ('fetch',))
  fetch = [sweep_tests._gcloud(l) for l in lines if l.startswith('gcloud')]
  assert [p for _, p, _ in fetch] == [['tpu-a:rain_jax/sw/results', 'sw/']] + [
      [f'tpu-a:rain_jax/sw/train/{run}/{name}' for name in sweep.TRAIN_RECORDS]
      + [f'sw/train/{run}/'] for run in ('max_T-2', 'max_T-4')]
  assert 'mkdir -p sw/train/max_T-4' in lines
  home, log = tmp_path / 'home', tmp_path / 'stages.log'
  (home / 'rain_jax_logs').mkdir(parents=True)
  _fake_python(tmp_path)
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}', HOME=str(home),
             STAGE_LOG=str(log), FAIL_MODULE='rain_jax.run', FAIL_RUN='max_T-4.flags')
  done = subprocess.run(['bash', 'sw/launch/tpu-a.sh', 'run'], env=env, capture_output=True,
                        text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  shard = '--shard_index=0 --num_shards=1 --output=sw/results'
  assert log.read_text().splitlines() == [
      f'rain_jax.run --flagfile=sw/flags/max_T-2.flags {shard}/max_T-2.shard0-of-1.jsonl',
      'rain_jax.train --flagfile=sw/flags/max_T-2.train.flags '
      '--data=sw/results/max_T-2.shard0-of-1.jsonl',
      f'rain_jax.run --flagfile=sw/flags/max_T-2.distilled.flags '
      f'{shard}/max_T-2.distilled.shard0-of-1.jsonl',
      f'rain_jax.run --flagfile=sw/flags/max_T-4.flags {shard}/max_T-4.shard0-of-1.jsonl']
  assert 'run 2 of 2: max_T-4, generate ended, exit status 3' in done.stdout
  assert 'finished: 1 of 2 runs failed' in done.stdout
  assert 'max_T-4.distilled.shard0-of-1.jsonl' in open('sw/launch/tpu-a.sh').read()


def test_sweep_cli_checks_and_prints_a_chain(tmp_path):
  common = ['--set=model=llama-7b', '--set=method=both', '--set=mesh=1,1,-1',
            '--accelerator_type=v4-8', '--replicas_per_tpu=2', '--train=steps=3']
  two = sweep_tests._sweep_cli(tmp_path, *common, '--tpu_names=rain-a,rain-b')
  assert two.returncode == 1 and 'one TPU VM, not 2' in two.stderr
  typo = sweep_tests._sweep_cli(tmp_path, *common, '--train=stepz=3')
  assert typo.returncode == 1 and 'the training stage' in typo.stderr
  good = sweep_tests._sweep_cli(tmp_path, *common, '--print_step=fetch')
  assert good.returncode == 0, good.stderr
  fetch = [sweep_tests._gcloud(l) for l in good.stdout.splitlines() if l.startswith('gcloud')]
  assert [len(sources) for _, sources, _ in fetch] == [2, len(sweep.TRAIN_RECORDS) + 1]
  launcher = open(tmp_path / 'sw' / 'launch' / 'rain-a.sh').read()
  order = [launcher.index(f'-m {m} --flagfile={os.path.relpath(tmp_path, REPO)}/sw/flags/{f}')
           for m, f in (('rain_jax.run', 'sw.flags'), ('rain_jax.train', 'sw.train.flags'),
                        ('rain_jax.run', 'sw.distilled.flags'))]
  assert order == sorted(order)
  distilled = sweep_tests._absl_parse(str(tmp_path / 'sw' / 'flags' / 'sw.distilled.flags'))
  assert (distilled.mesh, distilled.batch_size) == ('2,1,2', 16)  # fitted before the chain


# ----- report.py: distilled rows from hand-written records and training folders -----


def _train_folder(folder, objective, steps, lora_rank, data, model='small'):
  """A stand-in rain_jax.train output: train_config.json, metrics.jsonl, model/."""
  (folder / 'model').mkdir(parents=True)
  (folder / 'train_config.json').write_text(json.dumps({'config': {
      'model': model, 'checkpoint': None, 'hf_dir': None, 'gguf': None, 'data': data,
      'objective': objective, 'steps': steps, 'lora_rank': lora_rank}, 'data': {}}))
  (folder / 'metrics.jsonl').write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
  return str(folder / 'model')


def _distilled_file(path, checkpoint, seconds):
  records = [sweep_tests._rec(i, 'vanilla', 'model', s, 5) for i, s in enumerate(seconds)]
  sweep_tests._results_file(path, records, 'model', 135_000_000,
                            {'checkpoint': checkpoint, 'tokenizer': 't', 'task': 'hh',
                             'max_T': 2})


@pytest.fixture
def distilled_sweep(tmp_path):
  """A sweep folder: run 'r' (vanilla + RAIN of model 'small'), trained twice on it."""
  out = tmp_path / 'sw'
  (out / 'results').mkdir(parents=True)
  base = out / 'results' / 'r.jsonl'
  rec = sweep_tests._rec
  sweep_tests._results_file(base, [
      rec(0, 'vanilla', 'small', 1.0, 4), rec(1, 'vanilla', 'small', 3.0, 6),
      rec(0, 'rain', 'small', 5.0, 4, sims=30, sets=2),
      rec(1, 'rain', 'small', 9.0, 8, sims=20, sets=3)], 'small', 135_000_000,
      {'model': 'small', 'task': 'hh', 'max_T': 2})
  (out / 'manifest.json').write_text(json.dumps({'runs': [
      {'name': 'r', 'settings': {'task': 'hh', 'max_T': '2'}}]}))
  sft = _train_folder(out / 'train' / 'r', 'sft', 100, 8, str(base))
  _distilled_file(out / 'results' / 'r.distilled.jsonl', sft, [2.0, 4.0])
  dpo = _train_folder(tmp_path / 'elsewhere' / 'dpo', 'dpo', 50, 0, str(base))
  _distilled_file(tmp_path / 'dpo.jsonl', dpo, [6.0])
  return out, tmp_path / 'dpo.jsonl'


def test_report_puts_distilled_rows_next_to_vanilla_and_rain(distilled_sweep, tmp_path):
  out, dpo = distilled_sweep
  scores = tmp_path / 'scores.jsonl'
  scores.write_text(''.join(json.dumps(s) + '\n' for s in [
      {'id': 'q0', 'method': 'vanilla', 'harmless': 0},  # the starting model's only
      {'id': 'q1', 'method': 'vanilla', 'harmless': 0},
      {'id': 'q0', 'method': 'rain', 'harmless': 1},
      {'id': 'q0', 'method': 'distilled-vanilla', 'harmless': 1},  # both trainings
      {'id': 'q1', 'method': 'vanilla', 'run': 'r.distilled', 'harmless': 1},  # sft's
  ]))
  rows, _ = report.make_report([str(out), str(dpo)], [str(scores)], str(tmp_path / 'rep'),
                               plots=False)
  assert [(r['model'], r['setting'], r['method'], r['training'], r['n']) for r in rows] == [
      ('small', 'max_T=2', 'vanilla', '', 2), ('small', 'max_T=2', 'rain', '', 2),
      ('small', 'max_T=2', 'distilled-vanilla', 'dpo, 50 steps, full', 1),
      ('small', 'max_T=2', 'distilled-vanilla', 'sft, 100 steps, LoRA r=8', 2)]
  vanilla, rain, dpo_row, sft_row = rows
  assert [r['mean_seconds'] for r in rows] == pytest.approx([2.0, 7.0, 6.0, 3.0])
  assert all(r['parameters'] == 135_000_000 for r in rows)
  assert rain['time_ratio_rain_vs_vanilla'] == pytest.approx(3.5)
  assert sft_row['time_ratio_rain_vs_vanilla'] is None
  assert (vanilla['harmless'], rain['harmless']) == (0.0, 1.0)
  assert (sft_row['harmless'], dpo_row['harmless']) == (1.0, 1.0)
  with open(tmp_path / 'rep' / 'report.csv', newline='') as f:
    header = next(csv.reader(f))
  assert header[4:7] == ['method', 'training', 'n']
  markdown = (tmp_path / 'rep' / 'report.md').read_text()
  assert '| small | 135M | hh | max_T=2 | distilled-vanilla | sft, 100 steps, LoRA r=8 | 2 |' \
      in markdown
  assert 'metrics.jsonl' not in markdown  # a training folder's file is not a result file
  series = report.plot_series(rows, 'mean_seconds', report.METHODS, 'setting', ['max_T=2'],
                              {})
  assert series[('hh', 'distilled-vanilla: sft, 100 steps, LoRA r=8')] == [(0, 3.0)]


def test_report_without_the_training_folder_warns_and_keeps_the_rows_apart(
    distilled_sweep, tmp_path, capsys):
  out, _ = distilled_sweep
  os.rename(out / 'train', tmp_path / 'moved')
  rows, _ = report.make_report([str(out)], [], str(tmp_path / 'rep'), plots=False)
  assert 'not marked distilled' in capsys.readouterr().err
  assert {r['method'] for r in rows} == {'vanilla', 'rain'}
  assert {r['model'] for r in rows} == {'small', 'model'}
  assert 'training' not in open(tmp_path / 'rep' / 'report.csv').readline()


# ----- the whole chain on a tiny random LLaMA (slow) -----


@pytest.mark.slow
def test_chain_runs_locally_resumes_and_reports(tmp_path, tiny_llama_32k_dir):
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text(''.join(json.dumps({'id': f'p{i}', 'prompt': t}) + '\n' for i, t in
                             enumerate(['Hello there, how are', 'One two', 'The sky is',
                                        'I like to eat'])))
  grid = {'name': 'tiny', 'set': {
      'hf_dir': str(tiny_llama_32k_dir), 'tokenizer': TOKENIZER, 'task': 'custom',
      'prompt_file': str(prompts), 'num_examples': -1, 'method': 'both',
      'max_new_tokens': 4, 'batch_size': 2, 'max_rollout': 8, 'max_T': 2,
      'compilation_cache': str(tmp_path / 'xla')},
      'train': {'objective': 'sft', 'steps': 2, 'batch_size': 2, 'learning_rate': 1e-3,
                'lora_rank': 2, 'heldout_fraction': 0.0, 'save_every': 1}}
  (tmp_path / 'grid.json').write_text(json.dumps(grid))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = tmp_path / 'sw'

  def sweep_local():
    done = subprocess.run([sys.executable, 'scripts/sweep.py', f'--out={out}',
                           f'--grid={tmp_path / "grid.json"}', '--run=local'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr

  log = sweep_local()
  assert [l for l in log.splitlines() if l.startswith('[sweep 1/1]')] == [
      '[sweep 1/1] tiny (generate)', '[sweep 1/1] tiny (train)', '[sweep 1/1] tiny (distilled)']
  summary = json.loads((out / 'train' / 'tiny' / 'summary.json').read_text())
  assert summary['objective'] == 'sft' and summary['data']['examples'] == 4
  distilled = results.read_records(str(out / 'results' / 'tiny.distilled.jsonl'))
  assert sorted((r['id'], r['method']) for r in distilled) == [
      (f'p{i}', 'vanilla') for i in range(4)]
  saved = results.read_config(str(out / 'results' / 'tiny.distilled.jsonl'))
  assert saved['config']['checkpoint'] == str(out / 'train' / 'tiny' / 'model')
  before = {p.name: p.read_bytes() for p in (out / 'results').iterdir()
            if p.suffix == '.jsonl'}
  log = sweep_local()  # everything done: each stage returns without new work
  assert 'is complete (trained and exported); nothing to do' in log
  assert before == {p.name: p.read_bytes() for p in (out / 'results').iterdir()
                    if p.suffix == '.jsonl'}
  rows, _ = report.make_report([str(out)], [], str(tmp_path / 'rep'), plots=False)
  assert [(r['model'], r['method'], r['training'], r['n']) for r in rows] == [
      ('tiny-llama', 'vanilla', '', 4), ('tiny-llama', 'rain', '', 4),
      ('tiny-llama', 'distilled-vanilla', 'sft, 2 steps, LoRA r=2', 4)]
