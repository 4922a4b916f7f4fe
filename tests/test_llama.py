"""Model-level checks on tiny random configs (HF parity lives in test_parity_hf.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, presets
from rain_jax import kvcache


def _full_logits(config, params, seq, cache_len):
  """Recomputes logits [T, V] of a whole sequence from scratch (no cache reuse).

  The sequence is padded to cache_len so that every length shares one compiled program;
  causal masking keeps the padding out of the real positions."""
  n = len(seq)
  padded = jnp.zeros((1, cache_len), jnp.int32).at[0, :n].set(jnp.asarray(seq, jnp.int32))
  logits, _, _ = _forward_from_scratch(config, params, padded)
  return np.asarray(logits[0, :n])


@functools.partial(jax.jit, static_argnums=0)
def _forward_from_scratch(config, params, tokens):
  width = tokens.shape[1]
  cache = llama.init_cache(config, 1, width)
  mask = jnp.arange(width)[None, None, :] <= jnp.arange(width)[None, :, None]
  return llama.forward(config, params, tokens, jnp.arange(width, dtype=jnp.int32)[None],
                       cache, jnp.zeros((1,), jnp.int32), mask)


@pytest.mark.parametrize('name', ['tiny-mha', 'tiny-gqa'])
def test_scanned_and_unrolled_layers_agree(name):
  config = presets.get_preset(name)
  params = llama.init_params(config, jax.random.PRNGKey(0))
  unrolled = config.replace(scan_layers=False)
  seq = list(range(3, 20))
  np.testing.assert_allclose(
      _full_logits(config, params, seq, 32),
      _full_logits(unrolled, llama.unstack_layers(params, config.num_layers), seq, 32),
      atol=1e-5)


@pytest.mark.parametrize('name', ['tiny-mha', 'tiny-gqa'])
def test_cached_decode_equals_full_recomputation_each_step(name):
  config = presets.get_preset(name)
  params = llama.init_params(config, jax.random.PRNGKey(1))
  prompt = [5, 17, 99, 3, 42]
  cache_len = 24
  cache = llama.init_cache(config, 1, cache_len)
  prefill = jax.jit(kvcache.prefill, static_argnums=0)
  decode = jax.jit(kvcache.decode, static_argnums=0)
  logits, _, cache = prefill(config, params, jnp.asarray([prompt], jnp.int32),
                             jnp.asarray([len(prompt)], jnp.int32), cache)
  seq = list(prompt)
  for _ in range(10):
    reference = _full_logits(config, params, seq, cache_len)[-1]
    np.testing.assert_allclose(np.asarray(logits[0]), reference, atol=2e-5)
    token = int(np.argmax(reference))
    position = jnp.asarray([len(seq)], jnp.int32)
    seq.append(token)
    logits, _, cache = decode(config, params, jnp.asarray([token], jnp.int32), position,
                              cache)


def test_tree_mask_reads_only_ancestors():
  """Two sibling branches decoded in one row with a tree mask equal two separate runs."""
  config = presets.get_preset('tiny-gqa')
  params = llama.init_params(config, jax.random.PRNGKey(2))
  prefix, branch_a, branch_b = [7, 8, 9], [30, 31], [40, 41]
  s = 16
  # slots: prefix 0-2, branch a 3-4, branch b 5-6; branch b reuses positions 3-4.
  tokens = jnp.asarray([prefix + branch_a + branch_b], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 3, 4]], jnp.int32)
  allowed = np.zeros((7, s), bool)
  for t in range(3):
    allowed[t, :t + 1] = True
  allowed[3, [0, 1, 2, 3]] = True
  allowed[4, [0, 1, 2, 3, 4]] = True
  allowed[5, [0, 1, 2, 5]] = True
  allowed[6, [0, 1, 2, 5, 6]] = True
  logits, _, _ = llama.forward(config, params, tokens, positions,
                               llama.init_cache(config, 1, s), jnp.zeros((1,), jnp.int32),
                               jnp.asarray(allowed[None]))
  np.testing.assert_allclose(np.asarray(logits[0, 3:5]),
                             _full_logits(config, params, prefix + branch_a, s)[3:], atol=2e-5)
  np.testing.assert_allclose(np.asarray(logits[0, 5:7]),
                             _full_logits(config, params, prefix + branch_b, s)[3:], atol=2e-5)


def test_bfloat16_compute_close_to_float32():
  config = presets.get_preset('tiny-mha')
  params = llama.init_params(config, jax.random.PRNGKey(3))
  seq = list(range(10, 30))
  full = _full_logits(config, params, seq, 32)
  half = _full_logits(config.replace(dtype='bfloat16'), params, seq, 32)
  assert np.abs(full - half).max() < 0.05 * np.abs(full).max() + 0.05


def test_config_json_round_trip_and_errors():
  config = presets.get_preset('llama2-70b')
  assert llama.LlamaConfig.from_json(config.to_json()) == config
  assert abs(config.num_params - 69e9) < 1.5e9
  assert abs(presets.get_preset('llama-7b').num_params - 6.74e9) < 0.05e9
  with pytest.raises(ValueError, match='unknown model preset'):
    presets.get_preset('llama-8b')
  with pytest.raises(ValueError, match='num_kv_heads'):
    config.replace(num_kv_heads=7)
  with pytest.raises(ValueError, match='unknown dtype'):
    config.replace(dtype='float8')


@pytest.mark.parametrize('scan_layers', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_forward_many_equals_separate_calls_over_each_cache(scan_layers):
  """Two caches of different sizes fed in one pass (different prompts already in them,
  tokens with explicit slots, logits at chosen or all positions): each feed's logits,
  hidden states and cache equal those of a `forward` call over that cache alone."""
  config = presets.get_preset('tiny-gqa').replace(scan_layers=scan_layers)
  params = llama.init_params(config, jax.random.PRNGKey(3))
  rng = np.random.default_rng(0)
  batch = 2

  def primed(slots, prompt_len):
    cache = llama.init_cache(config, batch, slots)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32)
    _, _, cache = kvcache.prefill(config, params, tokens,
                                  jnp.full((batch,), prompt_len, jnp.int32), cache)
    return cache

  def feed(cache, num_tokens, start, logits_index):
    slots = cache.max_len
    write = start + jnp.arange(num_tokens)[None, :] + jnp.asarray([[0], [1]])   # [B, T]
    mask = jnp.arange(slots)[None, None, :] <= write[:, :, None]
    return llama.Feed(tokens=jnp.asarray(rng.integers(0, config.vocab_size,
                                                      (batch, num_tokens)), jnp.int32),
                      positions=write, cache=cache, write_index=write, attn_mask=mask,
                      logits_index=logits_index)

  feeds = (feed(primed(12, 5), 3, 5, jnp.asarray([[2], [0]])),
           feed(primed(20, 9), 4, 9, None))
  together = jax.jit(functools.partial(llama.forward_many, config))(params, feeds)
  for f, (logits, hidden, cache) in zip(feeds, together):
    want_logits, want_hidden, want_cache = llama.forward(config, params, *f)
    assert logits.shape == want_logits.shape and hidden.shape == want_hidden.shape
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(want_hidden), atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(want_cache.k), atol=2e-5)
    np.testing.assert_allclose(np.asarray(cache.v), np.asarray(want_cache.v), atol=2e-5)
