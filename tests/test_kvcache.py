"""kvcache.feed_tokens_many: chunked, tiered feeding into several caches in the same
passes, against a from-scratch causal forward pass (tiny random LLaMA)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, presets
from rain_jax import engine, kvcache

CONFIG = presets.get_preset('tiny-gqa')
PARAMS = llama.init_params(CONFIG, jax.random.PRNGKey(7))
TRUNK = 5            # tokens already in each cache before the feed


def counted_fns(calls):
  """The LLaMA ModelFns, counting passes (one per call_many) into `calls`."""
  fns = engine.llama_model_fns(CONFIG)

  def forward_many(params, feeds):
    jax.debug.callback(lambda: calls.append(1))
    return fns.forward_many(params, feeds)
  return kvcache.ModelFns(forward=fns.forward, init_cache=fns.init_cache,
                          vocab_size=fns.vocab_size, hidden_size=fns.hidden_size,
                          forward_many=forward_many)


def scratch(tokens):
  """Logits [N, W, V] and hidden [N, W, H] of whole sequences, causal, no cache reuse."""
  n, width = tokens.shape
  cache = llama.init_cache(CONFIG, n, width)
  mask = jnp.arange(width)[None, None, :] <= jnp.arange(width)[None, :, None]
  logits, hidden, _ = llama.forward(CONFIG, PARAMS, tokens, jnp.broadcast_to(
      jnp.arange(width), (n, width)), cache, jnp.zeros((n,), jnp.int32),
      jnp.broadcast_to(mask, (n, width, width)))
  return np.asarray(logits), np.asarray(hidden)


# Slow (~26 s a case; the default suite is over its budget): the search's tiered path
# feeds are also checked end to end by the recomputation oracles (tests/test_rain_llama.py,
# tests/test_judge_model.py).
@pytest.mark.slow
@pytest.mark.parametrize('tiers', [1, 3])
def test_tiered_feed_into_two_caches_equals_recomputation(tiers):
  """Rows feeding 0, 1, 3, 5, 9, 16, 17 and 21 tokens (chunk 8) after a 5-token trunk,
  into a policy-like cache and into a second, larger cache at another slot base and with
  other trunk tokens: the last-token logits and the hidden states equal a from-scratch
  pass over trunk + fed tokens, the second cache's keys reproduce its own from-scratch
  logits, and the number of passes is ceil(longest / 8) whatever the tiers."""
  rng = np.random.default_rng(0)
  lengths = np.asarray([0, 1, 3, 5, 9, 16, 17, 21], np.int32)
  rows, width, chunk = len(lengths), 24, 8
  trunks = [rng.integers(0, CONFIG.vocab_size, (rows, TRUNK)) for _ in range(2)]
  fed = rng.integers(0, CONFIG.vocab_size, (rows, width))
  calls = []
  fns = counted_fns(calls)

  @jax.jit
  def run(fed, trunks):
    caches, at = [], []
    for g, (slots, base) in enumerate(((40, TRUNK), (64, 30))):
      cache = llama.init_cache(CONFIG, rows, slots)
      cache = kvcache.feed_tokens(fns, PARAMS, cache, tokens=trunks[g],
                                  lengths=jnp.full((rows,), TRUNK, jnp.int32),
                                  at=kvcache.at_start(rows, slots), chunk=TRUNK)[0]
      caches.append(cache)
      at.append(kvcache.Placement(base, jnp.full((rows,), TRUNK, jnp.int32),
                                  kvcache.slot_range_mask(slots, 0,
                                                          jnp.full((rows,), TRUNK))))
    return kvcache.feed_tokens_many(fns, PARAMS, tuple(caches), tokens=(fed, fed),
                                    lengths=(jnp.asarray(lengths),) * 2, at=tuple(at),
                                    chunk=chunk, tiers=tiers)

  (policy, second), hidden, logits = run(jnp.asarray(fed), [jnp.asarray(t) for t in trunks])
  jax.effects_barrier()
  assert len(calls) == 2 + -(-int(lengths.max()) // chunk)    # 2 trunk feeds + the passes
  want_logits, want_hidden = scratch(jnp.asarray(np.concatenate([trunks[0], fed], 1)))
  for r, n in enumerate(lengths):
    if n:
      np.testing.assert_allclose(np.asarray(logits[r]), want_logits[r, TRUNK + n - 1],
                                 atol=2e-5)
      np.testing.assert_allclose(np.asarray(hidden[r, :n]), want_hidden[r, TRUNK:TRUNK + n],
                                 atol=2e-5)
    else:
      assert not np.asarray(logits[r]).any()
  # The second cache: one more token read through it equals recomputation.
  probe = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (rows, 1)), jnp.int32)
  at_slot = 30 + jnp.asarray(lengths)
  mask = (kvcache.slot_range_mask(64, 0, jnp.full((rows,), TRUNK))
          | kvcache.slot_range_mask(64, 30, jnp.asarray(lengths) + 1))
  got, _, _ = llama.forward(CONFIG, PARAMS, probe, (TRUNK + jnp.asarray(lengths))[:, None],
                            second, at_slot, mask[:, None, :])
  for r, n in enumerate(lengths):
    text = np.concatenate([trunks[1][r], fed[r, :n], np.asarray(probe[r])])
    want, _ = scratch(jnp.asarray(text)[None])
    np.testing.assert_allclose(np.asarray(got[r, 0]), want[0, -1], atol=2e-5)
