"""Vanilla decoding: cache reuse, batching, stopping and sampling against plain oracles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama, presets
from rain_jax import generate as gen
from rain_jax import stopping

CONFIG = presets.get_preset('tiny-gqa')
PARAMS = llama.init_params(CONFIG, jax.random.PRNGKey(0))


def _run(prompts, max_new=10, sampling=gen.SamplingParams(), stops=(), eos=-1, seed=7,
         cache_len=48):
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  out = gen.generate(CONFIG, PARAMS, jnp.asarray(tokens),
                     jnp.asarray([len(p) for p in prompts], jnp.int32),
                     jnp.full((len(prompts),), seed, jnp.uint32),
                     stopping.right_align(list(stops)), eos,
                     settings=gen.DecodeSettings(max_new, cache_len, sampling))
  return [list(np.asarray(out.tokens[i, :out.num_tokens[i]])) for i in range(len(prompts))], \
      [stopping.STOP_REASONS[r] for r in np.asarray(out.stop_reason)]


@jax.jit
def _logits_from_scratch(tokens):
  """Causal forward over tokens [1, 64] with no cache reuse (one compiled program)."""
  width = tokens.shape[1]
  mask = jnp.arange(width)[None, None, :] <= jnp.arange(width)[None, :, None]
  logits, _, _ = llama.forward(CONFIG, PARAMS, tokens, jnp.arange(width)[None],
                               llama.init_cache(CONFIG, 1, width),
                               jnp.zeros((1,), jnp.int32), mask)
  return logits[0]


def _greedy_by_recomputation(prompt, n):
  seq = list(prompt)
  for _ in range(n):
    padded = jnp.zeros((1, 64), jnp.int32).at[0, :len(seq)].set(jnp.asarray(seq))
    seq.append(int(jnp.argmax(_logits_from_scratch(padded)[len(seq) - 1])))
  return seq[len(prompt):]


PROMPTS = [[5, 9, 13, 77, 3], [100, 4, 8, 15, 16, 23, 42, 11, 12], [64]]


def test_greedy_equals_full_recomputation():
  got, reasons = _run(PROMPTS[:2])
  for prompt, tokens in zip(PROMPTS[:2], got):
    assert tokens == _greedy_by_recomputation(prompt, 10)
  assert reasons == ['max_new_tokens'] * 2


def test_batch_of_different_lengths_equals_one_by_one():
  batched, _ = _run(PROMPTS)
  for prompt, tokens in zip(PROMPTS, batched):
    assert _run([prompt])[0][0] == tokens
  sampling = gen.SamplingParams(temperature=1.0, top_k=30, top_p=0.9)
  batched, _ = _run(PROMPTS, sampling=sampling)
  for prompt, tokens in zip(PROMPTS, batched):
    assert _run([prompt], sampling=sampling)[0][0] == tokens


def test_stops_at_eos_and_at_stop_sequence():
  free, _ = _run([PROMPTS[0]])
  tokens = free[0]
  got, reasons = _run([PROMPTS[0]], eos=tokens[3])
  assert got[0] == tokens[:tokens.index(tokens[3]) + 1] and reasons == ['eos']
  got, reasons = _run([PROMPTS[0]], stops=[[99, 98], tokens[4:6]])
  assert reasons == ['turn_marker']
  assert got[0][-2:] == tokens[4:6] and len(got[0]) <= 6


def test_stops_when_cache_is_full():
  got, reasons = _run([PROMPTS[1]], max_new=30, cache_len=12)
  assert reasons == ['max_length'] and len(got[0]) == 12 - len(PROMPTS[1])


def test_sampling_reproducible_and_seed_dependent():
  sampling = gen.SamplingParams(temperature=1.0)
  a, _ = _run(PROMPTS[:1], sampling=sampling, seed=1)
  b, _ = _run(PROMPTS[:1], sampling=sampling, seed=1)
  c, _ = _run(PROMPTS[:1], sampling=sampling, seed=2)
  assert a == b and a != c


def test_truncate_logits_matches_numpy_oracle():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 50)).astype(np.float32)
  for top_k, top_p in [(5, 1.0), (0, 0.7), (10, 0.5)]:
    got = np.asarray(gen.truncate_logits(jnp.asarray(logits), top_k, top_p))
    for row, out in zip(logits, got):
      keep = np.ones(50, bool)
      if top_k:
        keep &= row >= np.sort(row)[-top_k]
      if top_p < 1.0:  # nucleus of the top-k-truncated distribution (HF order)
        order = np.argsort(-np.where(keep, row, -np.inf))
        probs = np.where(keep[order], np.exp(row[order] - row.max()), 0.0)
        probs /= probs.sum()
        nucleus = np.zeros(50, bool)
        nucleus[order[(np.cumsum(probs) - probs) < top_p]] = True
        keep &= nucleus
      assert np.array_equal(np.isfinite(out), keep)


def test_sampled_frequencies_follow_softmax():
  """Gumbel-max with counter noise draws from softmax(logits / T)."""
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0]] * 4000, jnp.float32)
  seeds = jnp.arange(4000, dtype=jnp.uint32)
  draws = np.asarray(gen.sample_tokens(logits, gen.SamplingParams(temperature=1.0), seeds, 3))
  expected = np.exp([0.0, 1.0, 2.0, -1.0])
  expected /= expected.sum()
  freq = np.bincount(draws, minlength=4) / 4000
  assert np.abs(freq - expected).max() < 0.03


def test_bad_sampling_params():
  with pytest.raises(ValueError, match='top_p'):
    gen.SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match='temperature'):
    gen.SamplingParams(temperature=-1.0)
