"""scripts/device_check.sh --cpu: the dry run of the one-shot GPU check writes every JSON
file it promises, each with the keys the GPU run's reader expects.

The dry run compiles two RAIN programs on the CPU (20-50 s each on a 2-core machine, more
under load), so a RAIN step may run out of its limit on a busy machine: its file must
then still be there, say so (timed_out) and keep the rows it finished.
"""
import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ('env', 'decode_unrolled', 'decode_scan', 'rain_leaves1', 'rain_leaves4')
STEP_KEYS = {'step', 'command', 'ok', 'exit_code', 'timed_out', 'limit_s', 'wall_s',
             'error', 'rows_logged', 'report'}


# Slow (40 s alone, more under load): it made room in the default suite for the
# 2-process tests of issue 10. Run it with `python -m pytest -m slow
# tests/test_device_check.py` before a session that has a device.
@pytest.mark.slow
def test_cpu_dry_run_writes_every_json_file(tmp_path):
  out = tmp_path / 'out'
  env = dict(os.environ, OUT=str(out))
  env.pop('JAX_PLATFORMS', None)
  done = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'device_check.sh'), '--cpu'],
                        capture_output=True, text=True, timeout=420, check=False, cwd='/',
                        env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '== device_check summary ==' in done.stdout + done.stderr
  assert sorted(os.listdir(out)) == sorted(f'{name}.json' for name in STEPS + ('summary',))
  steps = {}
  for name in STEPS:
    with open(out / f'{name}.json', encoding='utf-8') as f:
      steps[name] = json.load(f)
    assert set(steps[name]) == STEP_KEYS, name
    assert steps[name]['step'] == name
    assert steps[name]['ok'] or steps[name]['timed_out'], (name, steps[name]['error'])

  env_report = steps['env']['report']
  assert steps['env']['ok'] and env_report['jax_backend'] == 'cpu'
  assert set(env_report['project_imports'].values()) == {'ok'}
  assert env_report['copy_bandwidth']['gb_per_s'] > 0
  assert env_report['matmul_bf16']['tflop_per_s'] > 0
  assert {'jax', 'flax', 'torch', 'transformers'} <= set(env_report['versions'])

  for name, scan in (('decode_unrolled', False), ('decode_scan', True)):
    step = steps[name]
    assert step['ok'], step['error']
    report = step['report']
    assert report['settings']['scan_layers'] is scan
    assert [row['batch_size'] for row in report['results']] == [1, 2]
    assert [row['batch_size'] for row in step['rows_logged']] == [1, 2]
    for row in report['results']:
      assert ('hf' in row) is (not scan)
      assert row['bandwidth']['peak_bandwidth_gbs'] > 0
      assert row['rain_jax']['prefill_compile_s'] > 0
      assert row['rain_jax']['generate_compile_s'] > 0
      assert 'decode_ms_per_step' in row['rain_jax']

  for leaves in (1, 4):
    step = steps[f'rain_leaves{leaves}']
    rows = step['report']['results'] if step['ok'] else step['rows_logged']
    if step['ok']:
      assert step['report']['settings']['rain_config']['parallel_leaves'] == leaves
      assert rows == step['rows_logged']
    for row in rows:
      assert row['parallel_leaves'] == leaves and row['batch_size'] == 1
      assert {'seconds_per_simulation', 'seconds_per_committed_set', 'compile_seconds',
              'simulations_per_prompt', 'calls_per_simulation'} <= set(row['rain'])
      assert row['rain']['seconds_per_simulation'] > 0

  with open(out / 'summary.json', encoding='utf-8') as f:
    summary = json.load(f)
  assert set(summary['steps']) == set(STEPS)
  assert {r['run'] for r in summary['decode']} == {'decode_unrolled', 'decode_scan'}
  assert summary['env']['copy_gb_per_s'] > 0
