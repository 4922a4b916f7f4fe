"""Mesh construction, partition rules and sharded execution (rain_jax/sharding.py).

Rule tests run here on plain axis-size dicts, with expected specs written out by hand
from the table in the module docstring. Multi-device runs happen in a subprocess
(tests/sharding_e2e.py) that forces 8 CPU devices before JAX starts; its logits are
compared with the same model on one device.
"""
import json
import logging
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from models.llama import param_shapes
from models.presets import get_preset
from rain_jax import sharding

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = ('data', 'fsdp')


def sizes(data, fsdp, tensor):
  return {'data': data, 'fsdp': fsdp, 'tensor': tensor}


def flat_specs(specs):
  """'/'-joined path -> PartitionSpec."""
  leaves = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda node: isinstance(node, P))[0]
  return {sharding.path_name(path): spec for path, spec in leaves}


def expected_specs(qkvo_tensor=True, kv_tensor=True, lm_head=True, stacked=True):
  """Hand-written table: the rules with the q/o and k/v head splits on or off."""
  lead = (None,) if stacked else ()
  q = 'tensor' if qkvo_tensor else None
  kv = 'tensor' if kv_tensor else None
  layer = {
      'attn_norm/scale': P(*lead, None),
      'attn/wq/kernel': P(*lead, 'fsdp', q),
      'attn/wk/kernel': P(*lead, 'fsdp', kv),
      'attn/wv/kernel': P(*lead, 'fsdp', kv),
      'attn/wo/kernel': P(*lead, q, 'fsdp'),
      'mlp_norm/scale': P(*lead, None),
      'mlp/w_gate/kernel': P(*lead, 'fsdp', 'tensor'),
      'mlp/w_up/kernel': P(*lead, 'fsdp', 'tensor'),
      'mlp/w_down/kernel': P(*lead, 'tensor', 'fsdp'),
  }
  specs = {'embed/embedding': P('tensor', 'fsdp'), 'final_norm/scale': P(None)}
  if lm_head:
    specs['lm_head'] = P('fsdp', 'tensor')
  if stacked:
    specs.update({f'layers/{name}': spec for name, spec in layer.items()})
  else:
    specs.update({f'layers_{i}/{name}': spec for i in range(2) for name, spec in layer.items()})
  return specs


# ---------------------------------------------------------------- mesh shapes


@pytest.mark.parametrize('spec, devices, shape', [
    ('1,-1,1', 8, (1, 8, 1)),
    ('2,2,2', 8, (2, 2, 2)),
    (' 4, 2 ,1 ', 8, (4, 2, 1)),
    ((-1, 1, 8), 64, (8, 1, 8)),
    ('2,4,-1', 64, (2, 4, 8)),
    ('-1,1,1', 1, (1, 1, 1)),
])
def test_parse_mesh_shape(spec, devices, shape):
  assert sharding.parse_mesh_shape(spec, devices) == shape


def test_mesh_product_mismatch_names_mesh_product_and_devices():
  with pytest.raises(ValueError) as error:
    sharding.parse_mesh_shape('3,1,2', 8)
  message = str(error.value)
  assert "'3,1,2'" in message and ' 6 ' in message and '8 devices' in message


@pytest.mark.parametrize('spec, fragment', [
    ('-1,-1,2', 'at most one entry may be -1'),
    ('a,1,8', "'a' is not an integer"),
    ('2.0,1,4', "'2.0' is not an integer"),
    ((1.5, 1, 8), '1.5 is not an integer'),
    ((True, 1, 8), 'True is not an integer'),
    ('0,1,8', 'must be positive or -1'),
    ('-2,1,4', 'must be positive or -1'),
    ('1,8', 'must have 3 entries'),
    ('3,-1,1', 'does not divide the device count 8'),
])
def test_bad_mesh_specs(spec, fragment):
  with pytest.raises(ValueError, match='mesh spec') as error:
    sharding.parse_mesh_shape(spec, 8)
  assert fragment in str(error.value)


def test_make_mesh_on_the_local_device():
  mesh = sharding.make_mesh('1,1,-1', jax.devices()[:1])
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  with pytest.raises(ValueError, match='but there are 1 devices'):
    sharding.make_mesh('1,1,2', jax.devices()[:1])


# ---------------------------------------------------------------- parameter rules


@pytest.mark.parametrize('preset, axis_sizes, expected', [
    # 32 heads, vocab 32000: everything divides on a 64-device pod slice.
    ('llama-7b', sizes(2, 4, 8), expected_specs()),
    # GQA: 64 query heads, 8 KV heads; tensor 8 splits both.
    ('llama2-70b', sizes(1, 8, 8), expected_specs()),
    # tensor 16 still splits 64 query heads, but not 8 KV heads.
    ('llama2-70b', sizes(1, 4, 16), expected_specs(kv_tensor=False)),
    # SmolLM2: 9 heads, 3 KV heads, tied embeddings; 576 = 9*64 divides by 8 but heads do not.
    ('smollm2-135m', sizes(1, 1, 8), expected_specs(False, False, lm_head=False)),
    ('smollm2-135m', sizes(1, 2, 3), expected_specs(lm_head=False)),
])
def test_preset_param_specs(preset, axis_sizes, expected):
  config = get_preset(preset)
  specs = sharding.param_specs(param_shapes(config), axis_sizes, head_dim=config.head_dim)
  assert flat_specs(specs) == expected


def test_unrolled_layers_have_no_layer_axis():
  config = get_preset('tiny-mha', num_layers=2, scan_layers=False)
  specs = sharding.param_specs(param_shapes(config), sizes(1, 2, 4), head_dim=config.head_dim)
  assert flat_specs(specs) == expected_specs(stacked=False)


def test_fallback_warns_once_per_parameter(caplog):
  config = get_preset('smollm2-135m')
  with caplog.at_level(logging.WARNING, logger='rain_jax.sharding'):
    sharding.param_specs(param_shapes(config), sizes(1, 1, 8), head_dim=config.head_dim)
  messages = [record.getMessage() for record in caplog.records]
  assert len(messages) == 4
  for name, heads in [('wq', 9), ('wk', 3), ('wv', 3), ('wo', 9)]:
    [message] = [m for m in messages if m.startswith(f'layers/attn/{name}/kernel:')]
    assert f'{heads} heads of 64' in message
    assert "mesh axis 'tensor' of size 8" in message and 'replicated' in message


def test_strict_raises_naming_parameter_axis_and_sizes():
  config = get_preset('llama2-70b')
  with pytest.raises(ValueError) as error:
    sharding.param_specs(param_shapes(config), sizes(1, 4, 16), True, head_dim=config.head_dim)
  message = str(error.value)
  assert 'layers/attn/wk/kernel' in message and 'layers/attn/wv/kernel' in message
  assert '8 heads of 128' in message and "'tensor' of size 16" in message
  assert 'wq' not in message


def test_vocab_not_divisible_falls_back():
  shapes = {'embed': {'embedding': jax.ShapeDtypeStruct((49153, 64), 'float32')}}
  specs = sharding.param_specs(shapes, sizes(1, 8, 8), head_dim=8)
  assert specs['embed']['embedding'] == P(None, 'fsdp')
  with pytest.raises(ValueError, match='embed/embedding: dimension 0 .size 49153.'):
    sharding.param_specs(shapes, sizes(1, 8, 8), strict=True, head_dim=8)


@pytest.mark.parametrize('shapes, fragment', [
    ({'attn': {'wz': {'kernel': (4, 4)}}}, "no partition rule matches parameter 'attn/wz/kernel'"),
    ({'layers': {'attn': {'wq': {'kernel': (2, 2, 4, 8)}}}}, 'or one more leading layer axis'),
    ({'attn': {'wq': {'kernel': (8, 12)}}}, 'not a whole number of heads of size 8'),
])
def test_bad_parameter_trees(shapes, fragment):
  shapes = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, 'float32'), shapes,
                        is_leaf=lambda node: isinstance(node, tuple))
  with pytest.raises(ValueError) as error:
    sharding.param_specs(shapes, sizes(1, 1, 1), head_dim=8)
  assert fragment in str(error.value)


# ---------------------------------------------------------------- cache and batch


@pytest.mark.parametrize('axis_sizes, cache_shape, expected', [
    (sizes(2, 2, 2), (30, 8, 4, 64, 64), P(None, BATCH, 'tensor', None, None)),
    (sizes(4, 2, 1), (30, 4, 4, 64, 64), P(None, 'data', 'tensor', None, None)),
    (sizes(2, 4, 1), (30, 1, 4, 64, 64), P(None, None, 'tensor', None, None)),
    (sizes(1, 1, 8), (30, 8, 3, 64, 64), P(None, BATCH, None, None, None)),
])
def test_cache_spec(axis_sizes, cache_shape, expected):
  assert sharding.cache_spec(axis_sizes, cache_shape) == expected


def test_cache_spec_errors():
  with pytest.raises(ValueError, match=r'\[L, B, KVH, S, D\]'):
    sharding.cache_spec(sizes(1, 1, 1), (8, 64, 4, 64))
  with pytest.raises(ValueError, match=r"kv cache: dimension 2 \(size 3\).*'tensor' of size 8"):
    sharding.cache_spec(sizes(1, 1, 8), (30, 8, 3, 64, 64), strict=True)


def test_batch_spec():
  assert sharding.batch_spec(sizes(2, 2, 2), 3, 8) == P(BATCH, None, None)
  assert sharding.batch_spec(sizes(2, 4, 1), 2, 6) == P('data', None)
  assert sharding.batch_spec(sizes(2, 4, 1), 1, 3) == P(None)
  with pytest.raises(ValueError, match=r"batch of 6 rows.*\('data', 'fsdp'\) of size 8"):
    sharding.batch_spec(sizes(2, 4, 1), 2, 6, strict=True)
  with pytest.raises(ValueError, match='leading batch axis'):
    sharding.batch_spec(sizes(1, 1, 1), 0, 1)


# ---------------------------------------------------------------- 8 devices, end to end


def run_e2e(runs):
  """Runs tests/sharding_e2e.py in a fresh process with 8 CPU devices; its JSON report."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  process = subprocess.run([sys.executable, '-m', 'tests.sharding_e2e', *runs],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
  assert process.returncode == 0, process.stderr[-4000:]
  return json.loads(process.stdout.strip().splitlines()[-1])


def as_report_spec(spec):
  return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def check_mesh_run(result, expected_params, expected_cache, axis_sizes):
  """Logits and greedy tokens (hand-rolled loop and rain_jax.generate) match one device;
  arrays are split as the specs say."""
  assert result['max_abs_diff'] < 1e-5
  assert result['greedy_equal']
  assert result['generate_equal']
  arrays = {**result['params'], **{f'cache/{k}': v for k, v in result['cache'].items()}}
  expected = {**expected_params, 'cache/k': expected_cache, 'cache/v': expected_cache}
  assert set(arrays) == set(expected)
  for name, array in arrays.items():
    assert array['spec'] == as_report_spec(expected[name]), name
    splits = [1 if entry is None else
              axis_sizes[entry] if isinstance(entry, str) else
              axis_sizes[entry[0]] * axis_sizes[entry[1]] for entry in expected[name]]
    assert array['shard_shape'] == [size // split for size, split in
                                    zip(array['shape'], splits)], name


def mesh_sizes(spec):
  return sizes(*map(int, spec.split(',')))


def check_runs(report, runs):
  """Checks every "preset/mesh/batch" run against the hand-written expectations.

  tiny-gqa (8 heads, 4 KV heads, tied embeddings): on tensor=8 its KV heads cannot be
  split, so wk/wv and the cache fall back to replicated heads. A batch of 4 rows cannot
  split over data*fsdp=8 and falls back to 'data' alone.
  """
  for run in runs:
    preset, mesh, batch = run.split('/')
    axis_sizes = mesh_sizes(mesh)
    kv_tensor = preset == 'tiny-mha' or axis_sizes['tensor'] < 8
    rows = BATCH if int(batch) % (axis_sizes['data'] * axis_sizes['fsdp']) == 0 else 'data'
    check_mesh_run(report[preset]['meshes'][f'{mesh} B={batch}'],
                   expected_specs(kv_tensor=kv_tensor, lm_head=preset == 'tiny-mha'),
                   P(None, rows, 'tensor' if kv_tensor else None, None, None), axis_sizes)
  for preset in {run.split('/')[0] for run in runs}:
    assert 1.0 < report[preset]['max_abs_logit'] < 10.0
    greedy = report[preset]['greedy']
    assert len({token for row in greedy for token in row}) > 8
    assert report[preset]['generate'] == greedy


DEFAULT_RUNS = ('tiny-gqa/2,2,2/8', 'tiny-gqa/1,1,8/8', 'tiny-gqa/4,2,1/4', 'tiny-mha/1,1,8/8')
SLOW_RUNS = ('tiny-gqa/8,1,1/8', 'tiny-gqa/1,8,1/8', 'tiny-gqa/4,2,1/8',
             'tiny-mha/8,1,1/8', 'tiny-mha/2,2,2/8', 'tiny-mha/1,8,1/8', 'tiny-mha/4,2,1/8')


def test_meshes_match_one_device():
  """All three axes at once (2x2x2), the KV-head fallback (tiny-gqa on 1x1x8), a full
  8-way head split with an untied LM head (tiny-mha on 1x1x8), the batch fallback
  (4 rows on 4x2x1); and what make_mesh builds on the 8 devices."""
  report = run_e2e(DEFAULT_RUNS)
  assert report['mesh'] == {
      'device_count': 8, 'axis_names': ['data', 'fsdp', 'tensor'],
      'shape': {'data': 2, 'fsdp': 2, 'tensor': 2},
      'device_ids': [[[0, 1], [2, 3]], [[4, 5], [6, 7]]],
      'mismatch_error': "mesh spec '3,1,1' has 3 devices in all (product of [3, 1, 1]), "
                        'but there are 8 devices'}
  check_runs(report, DEFAULT_RUNS)


@pytest.mark.slow
def test_more_meshes_match_one_device():
  """The remaining meshes 8x1x1 (data only), 1x8x1 (fsdp only), 4x2x1, for both models."""
  check_runs(run_e2e(SLOW_RUNS), SLOW_RUNS)


@pytest.mark.parametrize('flags_before, added', [
    ('--xla_force_host_platform_device_count=8', True),
    ('--foo --xla_force_host_platform_device_count=2', True),
    ('--xla_force_host_platform_device_count=1', False),
    ('', False),
    ('--xla_force_host_platform_device_count=8 '
     '--xla_cpu_enable_concurrency_optimized_scheduler=true', False),
])
def test_prefer_serial_cpu_scheduler(flags_before, added):
  environ = {'XLA_FLAGS': flags_before} if flags_before else {}
  assert sharding.prefer_serial_cpu_scheduler(environ) == added
  after = environ.get('XLA_FLAGS', '')
  if added:
    assert after == f'{flags_before} {sharding.SERIAL_CPU_SCHEDULER}'
  else:
    assert after == flags_before
