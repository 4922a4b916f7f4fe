"""The fine-tuning step (rain_jax/training.py) on a tiny random LLaMA, against oracles:
a plain-numpy LLaMA and loss (tests/numpy_llama.py), finite differences, the merged
LoRA model, and one batch against its accumulated micro-batches. The default suite runs
one of each kind; the DPO and LoRA variants of the step tests are marked slow (each is a
fresh compile)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from models import llama, lora, presets
from rain_jax import sharding, train_data, training
from tests import numpy_llama

CONFIG = presets.get_preset('tiny-gqa')  # fp32, 3 layers, tied embeddings, GQA
WIDTH, ANSWER_WIDTH = 24, 6


def base_params(seed=0):
  params = dict(llama.init_params(CONFIG, jax.random.PRNGKey(seed)))
  # A larger embedding table spreads the logits away from uniform.
  params['embed'] = {'embedding': params['embed']['embedding'] * 30.0}
  return params


def examples(count, seed=0, pairs=False):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(count):
    prompt = tuple(int(t) for t in rng.integers(1, CONFIG.vocab_size, rng.integers(4, 12)))
    answer = lambda: tuple(int(t) for t in rng.integers(1, CONFIG.vocab_size,
                                                        rng.integers(1, ANSWER_WIDTH + 1)))
    chosen = train_data.Sequence(prompt, answer())
    rejected = train_data.Sequence(prompt, answer()) if pairs else None
    out.append(train_data.Example(f'ex{i}', chosen, rejected))
  return out


def rows_of(exs, objective, ref=None):
  rows = train_data.encode_examples(exs, objective, WIDTH, ANSWER_WIDTH)
  if objective == 'dpo':
    rows['ref'] = np.asarray(ref, np.float32)
    rows['pair_weights'] = np.ones((len(exs),), np.float32)
  return {k: jnp.asarray(v) for k, v in rows.items()}


def with_updates(params, spec, seed=1, b_scale=0.05):
  """params plus LoRA updates whose b is non-zero (so the update changes the model)."""
  updates = lora.init_updates(CONFIG, spec, jax.random.PRNGKey(seed))
  key = jax.random.PRNGKey(seed + 100)
  for path in sorted(updates):
    if path[-1] == 'b':
      key, sub = jax.random.split(key)
      updates[path] = b_scale * jax.random.normal(sub, updates[path].shape)
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(params), **updates})


def settings(objective, spec=None, **kw):
  return training.Settings(objective=objective, learning_rate=kw.pop('learning_rate', 1e-3),
                           total_steps=kw.pop('total_steps', 100), lora=spec, **kw)


@functools.partial(jax.jit, static_argnames=('objective', 'spec', 'beta'))
def step_loss(objective, params, rows, spec=None, beta=0.1):
  """The step loss of one batch (batch_terms normalised by its own totals)."""
  s = settings(objective, spec, beta=beta)
  terms = training.batch_terms(CONFIG, s, params, rows)
  total = terms['tokens'] if objective == 'sft' else terms['pairs']
  return training.step_loss(terms, total, objective)


@pytest.mark.slow  # the SFT and DPO loss tests below compare through the same oracle
def test_numpy_oracle_agrees_with_the_model():
  params = base_params()
  tokens = [5, 17, 99, 3, 64, 2, 77]
  mask = training.causal_mask(jnp.asarray([len(tokens)]), len(tokens))
  ours, _ = jax.jit(llama.sequence_forward, static_argnums=0)(
      CONFIG, params, jnp.asarray([tokens]), jnp.arange(len(tokens))[None], mask)
  np.testing.assert_allclose(np.asarray(ours[0]), numpy_llama.logits(CONFIG, params, tokens),
                             atol=2e-4, rtol=1e-4)


def test_sft_loss_equals_numpy_mean_answer_nll():
  params, exs = base_params(), examples(5)
  loss = float(step_loss('sft', params, rows_of(exs, 'sft')))
  logps = [numpy_llama.answer_logprob(CONFIG, params, e.chosen.prompt, e.chosen.answer)
           for e in exs]
  tokens = sum(len(e.chosen.answer) for e in exs)
  assert loss == pytest.approx(-sum(logps) / tokens, abs=1e-5)


def test_dpo_loss_equals_numpy_reference():
  policy, reference = base_params(0), base_params(1)
  exs = examples(6, seed=3, pairs=True)
  rows = rows_of(exs, 'dpo', ref=np.zeros(12))
  ref = training.sequence_logprobs(CONFIG, reference, rows)  # the production path
  rows['ref'] = ref
  for beta in (0.1, 0.5):
    loss = float(step_loss('dpo', policy, rows, beta=beta))
    lp = lambda params, seq: numpy_llama.answer_logprob(CONFIG, params, seq.prompt, seq.answer)
    expected = numpy_llama.dpo_loss(
        [lp(policy, e.chosen) for e in exs], [lp(policy, e.rejected) for e in exs],
        np.array([lp(reference, e.chosen) for e in exs]),
        np.array([lp(reference, e.rejected) for e in exs]), beta)
    assert abs(expected - np.log(2)) > 0.01  # not the trivial policy == reference value
    assert loss == pytest.approx(expected, abs=1e-5)


def directional_check(loss_fn, params, seed, eps=3e-2):
  """(analytic, central finite difference) derivatives of loss_fn along a random
  direction of unit norm over all leaves. eps 3e-2: float32 losses of ~20 resolve
  differences of ~1e-6, so smaller steps drown the slope in rounding (1e-3: 5% off);
  the curvature error at 3e-2 is below 0.5% here."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  direction = [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(d * d) for d in direction))
  direction = jax.tree.unflatten(tree, [d / norm for d in direction])
  grad = jax.grad(loss_fn)(params)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grad),
                                                       jax.tree.leaves(direction)))
  shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  numeric = (float(loss_fn(shift(eps))) - float(loss_fn(shift(-eps)))) / (2 * eps)
  return analytic, numeric


@pytest.mark.parametrize('objective', ['sft', pytest.param('dpo', marks=pytest.mark.slow)])
def test_gradients_equal_finite_differences(objective):
  params, exs = base_params(), examples(4, seed=5, pairs=objective == 'dpo')
  ref = np.array([-20.0, -25.0, -18.0, -30.0, -22.0, -19.0, -27.0, -21.0])[:2 * len(exs)]
  rows = rows_of(exs, objective, ref=ref)
  # beta 1: DPO's slope at beta 0.1 is too small for float32 differences to resolve.
  loss_fn = jax.jit(lambda p: step_loss(objective, p, rows, beta=1.0))
  for seed in range(3):
    analytic, numeric = directional_check(loss_fn, params, seed)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-4), seed


@pytest.mark.slow
def test_lora_gradients_equal_finite_differences():
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=('wq', 'wv', 'w_down'))
  trainable, frozen = training.split_params(with_updates(base_params(), spec), spec)
  rows = rows_of(examples(4, seed=6), 'sft')
  loss_fn = jax.jit(lambda t: step_loss('sft', training.join_params(t, frozen), rows,
                                        spec=spec))
  for seed in range(2):
    analytic, numeric = directional_check(loss_fn, trainable, seed)
    assert abs(analytic) > 1e-4
    assert numeric == pytest.approx(analytic, rel=1e-2, abs=1e-4), seed


def test_lora_forward_equals_the_merged_model():
  spec = lora.LoraSpec(rank=4, alpha=16.0)
  params = with_updates(base_params(), spec)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 10)))
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  mask = training.causal_mask(jnp.asarray([10, 7]), 10)
  forward = jax.jit(llama.sequence_forward, static_argnums=0, static_argnames='lora')
  with_lora, _ = forward(CONFIG, params, tokens, positions, mask, lora=spec)
  merged = lora.merge(params, spec)
  assert not any(lora.is_lora_path(p) for p in traverse_util.flatten_dict(merged))
  plain, _ = forward(CONFIG, merged, tokens, positions, mask)
  unchanged, _ = forward(CONFIG, base_params(), tokens, positions, mask)
  np.testing.assert_allclose(np.asarray(with_lora), np.asarray(plain), atol=2e-5, rtol=1e-5)
  assert np.abs(np.asarray(with_lora) - np.asarray(unchanged)).max() > 1e-2
  # The cached decoding path reads the merged weights like any checkpoint.
  cached, _, _ = jax.jit(llama.forward, static_argnums=0)(CONFIG, merged, tokens, positions,
                               llama.init_cache(CONFIG, 2, 10), jnp.zeros((2,), jnp.int32), mask)
  np.testing.assert_allclose(np.asarray(cached), np.asarray(plain), atol=2e-5, rtol=1e-5)


def run_steps(objective, exs, accumulation, steps, spec=None, learning_rate=1e-3,
              mesh_shape=(1, 1, 1)):
  """Trains on `exs` (one fixed batch, split into `accumulation` micro-batches) for
  `steps` steps; returns (losses, final trainable params)."""
  s = settings(objective, spec, learning_rate=learning_rate, total_steps=steps,
               warmup_steps=2)
  params = base_params()
  if spec:
    params = with_updates(params, spec, b_scale=0.0)
  trainable, frozen = training.split_params(params, spec)
  mesh = sharding.make_mesh(','.join(map(str, mesh_shape)), jax.devices()[:np.prod(mesh_shape)])
  per = len(exs) // accumulation
  micro = []
  for a in range(accumulation):
    part = exs[a * per:(a + 1) * per]
    rows = train_data.encode_examples(part, objective, WIDTH, ANSWER_WIDTH)
    if objective == 'dpo':
      rows['ref'] = np.full((2 * per,), -20.0, np.float32)
      rows['pair_weights'] = np.ones((per,), np.float32)
    micro.append(rows)
  batch = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  trainable_shapes = jax.eval_shape(lambda: trainable)
  frozen_shapes = jax.eval_shape(lambda: frozen)
  compiled, (state_sh, frozen_sh, batch_sh) = training.compile_train_step(
      CONFIG, s, mesh, trainable_shapes, frozen_shapes, shapes)
  state = jax.jit(lambda t: training.init_state(s, t), out_shardings=state_sh)(trainable)
  frozen = jax.device_put(frozen, frozen_sh)
  batch = jax.device_put(batch, batch_sh)
  losses, grad_norms = [], []
  for _ in range(steps):
    state, metrics = compiled(state, frozen, batch)
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  run_steps.grad_norms = grad_norms
  return losses, jax.device_get(state.trainable)


@pytest.mark.parametrize('objective', ['sft', pytest.param('dpo', marks=pytest.mark.slow)])
def test_accumulated_micro_batches_equal_one_batch(objective):
  exs = examples(4, seed=7, pairs=objective == 'dpo')
  one_loss, one_params = run_steps(objective, exs, 1, 3)
  one_norms = run_steps.grad_norms
  acc_loss, acc_params = run_steps(objective, exs, 2, 3)
  np.testing.assert_allclose(acc_loss, one_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(run_steps.grad_norms, one_norms, rtol=1e-5)
  # Adam's first steps move every weight by about the learning rate whatever the size of
  # its gradient, so a near-zero gradient's rounding can change a weight by up to ~1e-4
  # (lr 1e-3): the weights agree to that, the losses and gradient norms above to 1e-5.
  for a, b in zip(jax.tree.leaves(acc_params), jax.tree.leaves(one_params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
  assert one_loss[-1] < one_loss[0]


@pytest.mark.slow
def test_sft_overfits_a_fixed_batch():
  losses, _ = run_steps('sft', examples(4, seed=8), 1, 80, learning_rate=1e-2)
  assert losses[0] > 3.0
  assert losses[-1] < 0.05, losses[::10]


@pytest.mark.slow
def test_lora_training_moves_only_the_updates():
  spec = lora.LoraSpec(rank=2, alpha=4.0)
  losses, trainable = run_steps('sft', examples(4, seed=9), 1, 30, spec=spec,
                                learning_rate=1e-2)
  flat = traverse_util.flatten_dict(trainable)
  assert flat and all(lora.is_lora_path(p) for p in flat)
  assert losses[-1] < 0.7 * losses[0]
