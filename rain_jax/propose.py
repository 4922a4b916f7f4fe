"""Candidate token sets and samples (docs/algorithm.md §3, §4.1), without model calls.

Everything here works on logits the search has already computed. Multi-token proposals
decode A streams side by side (stream 0 greedy, streams 1..A-1 sampling attempts); this
module picks each step's tokens and, at the end, keeps the greedy sequence plus the
first k-1 distinct samples with the clamped greedy weight. Shapes: B rows, V vocabulary,
A streams, L max tokens per node, K candidates, C stored top logits.
"""
import jax
import jax.numpy as jnp

from rain_jax import noise


def top_logits(logits, count):
  """Top `count` (ids [.., count] int32, logits [.., count]) in descending order, ties to
  the lower id; ids of -inf logits become -1."""
  vocab = logits.shape[-1]
  if count > vocab:  # tiny vocabularies (tests): pad with empty entries
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, count - vocab)]
    logits = jnp.pad(logits, pad, constant_values=-jnp.inf)
  values, ids = jax.lax.top_k(logits, count)
  ids = jnp.where(ids < vocab, ids, -1)
  return jnp.where(jnp.isfinite(values), ids, -1).astype(jnp.int32), values


def one_token_candidates(logits, num_candidates, max_tokens, temperature=1.0):
  """One-token proposal: the top-k tokens with their softmax-over-top-k probabilities.

  The original collects the tokens with non-zero probability by `np.where` over the
  vocabulary, so the candidates come in ascending token id (which decides every "first
  maximum wins" tie among the children). Probabilities are softmax(top-k logits /
  temperature) (adv: temperature 2).

  logits: [V] -> (tokens [k, L], lens [k], weights [k], valid [k]): valid candidates
  first in ascending id, then the invalid ones (a -inf logit or zero probability).
  """
  ids, values = top_logits(logits, num_candidates)
  valid = ids >= 0
  probs = jax.nn.softmax(jnp.where(valid, values / temperature, -jnp.inf))
  valid = valid & (probs > 0)
  order = jnp.argsort(jnp.where(valid, ids, jnp.iinfo(jnp.int32).max))
  ids, probs, valid = ids[order], probs[order], valid[order]
  tokens = jnp.zeros((num_candidates, max_tokens), jnp.int32).at[:, 0].set(jnp.maximum(ids, 0))
  return tokens, jnp.ones((num_candidates,), jnp.int32), probs, valid


def step_tokens(logits, temperature, sample_top, seed, purpose, sim, attempt_code, position):
  """Tokens and their probabilities for one step of A proposal streams.

  logits: [A, V] float32 (stream a's next-token logits). Stream 0 takes the argmax;
  stream a >= 1 samples from the softmax of the top-`sample_top` logits at
  `temperature` with counters (purpose, sim, attempt_code[a], position, token).
  The probability of each chosen token is its top-`sample_top` softmax probability.
  Returns tokens [A] int32, probs [A] float32.
  """
  ids, values = top_logits(logits, sample_top)               # [A, top]
  scaled = values / temperature
  probs_top = jax.nn.softmax(scaled, axis=-1)
  u = noise.uniform(seed, purpose, sim, attempt_code[:, None], position, jnp.maximum(ids, 0))
  # Scan ids in increasing order so that exact ties go to the lower id, like argmax.
  order = jnp.argsort(jnp.where(ids >= 0, ids, jnp.iinfo(jnp.int32).max), axis=-1)
  scores = jnp.take_along_axis(jnp.where(ids >= 0, scaled + noise.gumbel(u), -jnp.inf),
                               order, axis=-1)
  sampled_rank = jnp.take_along_axis(order, jnp.argmax(scores, axis=-1)[:, None], axis=-1)[:, 0]
  # The argmax is the first of the top logits (both break ties toward the lower id).
  rank = jnp.where(jnp.arange(logits.shape[0]) == 0, 0, sampled_rank)
  tokens = jnp.take_along_axis(ids, rank[:, None], axis=-1)[:, 0]
  probs = jnp.take_along_axis(probs_top, rank[:, None], axis=-1)[:, 0]
  return tokens, probs


def clamp_greedy_weight(greedy, sampled, kept):
  """g = min(g, sum kept); g = max(g, max kept + min kept); unchanged if none kept.

  greedy: () float32; sampled: [A-1] weights; kept: [A-1] bool.
  """
  any_kept = jnp.any(kept)
  total = jnp.sum(jnp.where(kept, sampled, 0.0))
  high = jnp.max(jnp.where(kept, sampled, -jnp.inf))
  low = jnp.min(jnp.where(kept, sampled, jnp.inf))
  clamped = jnp.maximum(jnp.minimum(greedy, total), high + low)
  return jnp.where(any_kept, clamped, greedy)


def select_candidates(sequences, weights, length, num_keep):
  """Greedy + the first `num_keep - 1` distinct samples, in attempt order.

  sequences: [A, L] int32 (stream 0 greedy), weights: [A], length: () int32 tokens per
  sequence. A sample equal to the greedy sequence or to an earlier sample is dropped.
  Returns (tokens [num_keep, L], lens [num_keep], weights [num_keep], valid [num_keep]),
  greedy first with its clamped weight.
  """
  num_streams, max_tokens = sequences.shape
  live = jnp.arange(max_tokens) < length
  seqs = jnp.where(live, sequences, 0)
  same = jnp.all(seqs[:, None, :] == seqs[None, :, :], axis=-1)        # [A, A]
  earlier = jnp.arange(num_streams)[None, :] < jnp.arange(num_streams)[:, None]
  duplicate = jnp.any(same & earlier, axis=-1)
  fresh = ~duplicate & (jnp.arange(num_streams) > 0)
  kept = fresh & (jnp.cumsum(fresh) <= num_keep - 1)
  greedy_weight = clamp_greedy_weight(weights[0], weights[1:], kept[1:])
  keep_mask = kept.at[0].set(True)
  order = jnp.nonzero(keep_mask, size=num_keep, fill_value=num_streams)[0]
  valid = order < num_streams
  safe = jnp.where(valid, order, 0)
  out_weights = jnp.where(order == 0, greedy_weight, weights[safe])
  return (jnp.where(valid[:, None], seqs[safe], 0),
          jnp.where(valid, length, 0).astype(jnp.int32),
          jnp.where(valid, out_weights, 0.0), valid)


def dense_from_top(ids, values, vocab_size):
  """[V] logits that are -inf except at the stored top ids (ids -1 are skipped)."""
  dense = jnp.full((vocab_size,), -jnp.inf, jnp.float32)
  return dense.at[jnp.where(ids >= 0, ids, vocab_size)].set(values, mode='drop')


def rollout_token(logits, seed, sim, position):
  """A rollout sample from the full softmax at temperature 1: logits [V] -> () int32."""
  vocab = jnp.arange(logits.shape[-1])
  u = noise.uniform(seed, noise.ROLLOUT, sim, 0, position, vocab)
  return jnp.argmax(logits + noise.gumbel(u)).astype(jnp.int32)
