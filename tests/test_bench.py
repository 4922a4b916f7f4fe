"""scripts/bench.py: the JSON report of a tiny run, the HF copy of the weights, the
arithmetic behind the reported numbers."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import llama, presets
from scripts import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_report():
  """stdout and stderr of a whole decode-suite run on a tiny random preset."""
  command = [sys.executable, os.path.join(REPO, 'scripts', 'bench.py'), '--suite=decode',
             '--preset=tiny-gqa', '--prompt_len=8', '--new_tokens=3', '--batch_sizes=2',
             '--repeats=2']
  # Passive OpenMP waits keep torch's threads from spinning against other processes on
  # a busy machine (here they only make the run shorter, not its output different).
  env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
  done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False,
                        cwd='/', env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout, done.stderr


def test_stdout_is_one_json_object_with_the_report(tiny_report):
  stdout, stderr = tiny_report
  report = json.loads(stdout)  # fails on any stray output around the object
  assert 'batch 2: rain_jax' in stderr
  assert report['suite'] == 'decode'
  assert report['settings'] == {
      'prompt_len': 8, 'new_tokens': 3, 'batch_sizes': [2], 'dtype': 'float32',
      'repeats': 2, 'scan_layers': True, 'greedy': True,
      'persistent_compilation_cache': False,
      'prompts': 'uniform random ids in [3, vocab), numpy seed 0'}
  machine = report['machine']
  assert machine['cpu_count'] == os.cpu_count()
  assert machine['torch_num_threads'] == os.cpu_count()
  assert (machine['jax'], machine['torch']) == (jax.__version__, torch.__version__)
  assert machine['jax_backend'] == 'cpu' and machine['hf_device'] == 'cpu'
  assert machine['environment']['OMP_WAIT_POLICY'] == 'PASSIVE'
  assert len(machine['load_average_at_start']) == 3
  assert len(machine['load_average_at_end']) == 3
  assert report['model']['config'] == json.loads(
      presets.get_preset('tiny-gqa').to_json())
  assert report['model']['num_params'] == presets.get_preset('tiny-gqa').num_params


def test_reported_rates_follow_from_the_medians(tiny_report):
  (row,) = json.loads(tiny_report[0])['results']
  assert row['batch_size'] == 2
  for side in ('rain_jax', 'hf'):
    r = row[side]
    assert len(r['prefill_s_all']) == len(r['generate_s_all']) == 2
    assert r['prefill_s_median'] == pytest.approx(np.median(r['prefill_s_all']))
    assert r['generate_s_median'] == pytest.approx(np.median(r['generate_s_all']))
    assert r['prefill_tokens_per_s'] == pytest.approx(2 * 8 / r['prefill_s_median'])
    decode = r['generate_s_median'] - r['prefill_s_median']
    assert r['decode_s'] == pytest.approx(decode)
    if decode > 0:
      assert r['decode_tokens_per_s'] == pytest.approx(2 * 3 / decode)
      assert r['decode_ms_per_step'] == pytest.approx(decode / 2 * 1e3)
    else:
      assert r['decode_tokens_per_s'] is None and r['decode_ms_per_step'] is None
    assert r['prefill_first_call_s'] > 0 and r['generate_first_call_s'] > 0
  assert row['rain_jax']['prefill_compile_s'] > 0
  assert row['rain_jax']['generate_compile_s'] > 0
  assert row['ratio_rain_jax_over_hf']['prefill_tokens_per_s'] == pytest.approx(
      row['rain_jax']['prefill_tokens_per_s'] / row['hf']['prefill_tokens_per_s'])
  # Same weights, same prompts, fp32: both sides decode the same greedy tokens.
  assert row['same_greedy_prefix'] == 1.0
  assert 'bandwidth' not in row  # reported on GPU backends only


def _distinct_random_params(config, seed):
  """Random params where every tensor (norm scales included) differs from the others."""
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    noise = rng.standard_normal(shape.shape).astype(np.float32)
    is_scale = 'scale' in jax.tree_util.keystr(path)
    return jnp.asarray(1.0 + 0.3 * noise if is_scale else 0.2 * noise)

  return jax.tree_util.tree_map_with_path(draw, llama.param_shapes(config))


@pytest.mark.parametrize('preset,scan_layers', [('tiny-mha', False), ('tiny-gqa', True)])
def test_hf_model_holds_the_same_network(preset, scan_layers):
  config = presets.get_preset(preset, scan_layers=scan_layers)
  params = _distinct_random_params(config, seed=3)
  model = bench.build_hf_model(config, params, 'cpu')
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
  with torch.no_grad():
    expected = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
  mask = np.broadcast_to(np.tril(np.ones((12, 12), bool)), (2, 12, 12))
  forward = jax.jit(llama.forward, static_argnums=0)
  got, _, _ = forward(config, params, tokens, positions, llama.init_cache(config, 2, 12),
                      np.zeros((2,), np.int32), mask)
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-4)


def test_weight_bytes_per_decode_step_by_hand():
  # LLaMA-7B: 6,738,415,616 parameters (published); the 32000 x 4096 embedding table is
  # only gathered from, the separate LM head is read whole. bfloat16: 2 bytes each.
  llama7b = presets.get_preset('llama-7b', dtype='bfloat16', param_dtype='bfloat16')
  assert bench.weight_bytes_per_decode_step(llama7b) == (6_738_415_616 - 32000 * 4096) * 2
  # SmolLM2-135M, tied: the table is read once, as the LM head. Per layer: q,k,v,o
  # 576*64*(9+3+3+9), MLP 3*576*1536, two norms 2*576; plus the table and final norm.
  per_layer = 576 * 64 * 24 + 3 * 576 * 1536 + 2 * 576
  smol = presets.get_preset('smollm2-135m')
  assert bench.weight_bytes_per_decode_step(smol) == (
      49152 * 576 + 30 * per_layer + 576) * 4 == 134_515_008 * 4


def test_bandwidth_floor_by_hand():
  got = bench.bandwidth_floor(13.5e9, ms_per_step=9.0, peak_bandwidth_gbs=3000.0)
  assert got['floor_ms_per_step'] == pytest.approx(4.5)
  assert got['fraction_of_floor'] == pytest.approx(0.5)


def test_same_greedy_prefix_by_hand():
  ours = [[1, 2, 3, 4], [1, 9, 3, 4], [5, 5, 5, 5]]
  theirs = [[1, 2, 3, 4], [1, 2, 3, 4], [6, 5, 5, 5]]
  assert bench.same_greedy_prefix(ours, theirs) == pytest.approx((1 + 0.25 + 0) / 3)


def _args(*flags):
  return bench.build_parser().parse_args(['--suite=decode', *flags])


def test_bad_settings_are_named():
  with pytest.raises(ValueError, match='--model or --preset, not both'):
    bench.check_settings(_args('--model=smollm2-135m-instruct', '--preset=tiny-gqa'))
  with pytest.raises(ValueError, match='--new_tokens must be >= 2'):
    bench.check_settings(_args('--new_tokens=1'))
  with pytest.raises(ValueError, match='--repeats must be >= 1'):
    bench.check_settings(_args('--repeats=0'))
  with pytest.raises(ValueError, match='exceeds the model context of 256'):
    bench.check_context(_args('--prompt_len=250', '--new_tokens=7'), 256)
  bench.check_context(_args('--prompt_len=250', '--new_tokens=6'), 256)
  with pytest.raises(ValueError, match="unknown model preset 'llama-9b'"):
    bench.load_rain_jax(_args('--preset=llama-9b'), scan_layers=True)


def test_flag_parsing():
  args = _args('--batch_sizes=1,4,16', '--scan_layers=false', '--skip_hf')
  assert (args.batch_sizes, args.scan_layers, args.skip_hf) == ([1, 4, 16], False, True)
  assert _args().scan_layers is None  # chosen from the backend at run time
  assert bench.main(['--suite=decode', '--preset=tiny-gqa', '--new_tokens=1']) == 2
  for bad in ('0,2', 'a'):
    with pytest.raises(SystemExit):
      _args(f'--batch_sizes={bad}')
  with pytest.raises(SystemExit):
    _args('--scan_layers=maybe')


def test_device_check_flags():
  assert bench.parse_overrides('vocab_size=32000,rope_theta=1e4,,dtype=float32') == {
      'vocab_size': 32000, 'rope_theta': 1e4, 'dtype': 'float32'}
  for bad in ('vocab_size', '=3'):
    with pytest.raises(Exception):
      bench.parse_overrides(bad)
  args = bench.build_parser().parse_args(
      ['--suite=rain', '--rain_parallel_leaves=4', '--rain_vanilla=false',
       '--rain_count_calls=false', '--rain_runs=1', '--preset_override=vocab_size=512'])
  assert (args.rain_parallel_leaves, args.rain_vanilla, args.rain_count_calls,
          args.rain_runs, args.preset_override) == (4, False, False, 1, {'vocab_size': 512})
  defaults = bench.build_parser().parse_args(['--suite=rain'])
  assert (defaults.rain_parallel_leaves, defaults.rain_vanilla, defaults.rain_count_calls,
          defaults.rain_runs, defaults.peak_bandwidth_gbs) == (1, True, True, 2, None)
  args.rain_parallel_leaves = 0
  with pytest.raises(ValueError, match='--rain_parallel_leaves must be >= 1'):
    bench.check_rain_settings(args)
  config = bench.load_rain_jax(_args('--preset=tiny-gqa', '--preset_override=vocab_size=300',
                                     '--prompt_len=4', '--new_tokens=2'), True)[2]
  assert config.vocab_size == 300
