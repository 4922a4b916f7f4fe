"""Attention masks and the two usual cache passes (prefill, one-token decode).

The model reads and writes its cache only through `models.llama.forward`, which takes an
explicit [B, T, S] mask; this module builds the masks for contiguous sequences. Tree-shaped
masks for the search are built from ancestor chains in `rain_jax/search.py`.
"""
import jax.numpy as jnp

from models import llama


def prefill_mask(lengths, num_tokens, max_len):
  """Causal mask for right-padded prompts written at slots [0, T).

  lengths: [B] int32 real prompt lengths; returns [B, T, S] bool. Query t sees slots
  s <= t that hold real tokens; a padding query sees only itself (its output is unused).
  """
  t = jnp.arange(num_tokens)[None, :, None]
  s = jnp.arange(max_len)[None, None, :]
  real = s < lengths[:, None, None]
  return (s <= t) & (real | (s == t))


def decode_mask(write_index, max_len):
  """[B, 1, S] mask for one new token per row at slot write_index[b] over slots [0, w]."""
  return jnp.arange(max_len)[None, None, :] <= write_index[:, None, None]


def prefill(config, params, tokens, lengths, cache):
  """Runs right-padded prompts tokens [B, T] (real lengths [B]) into slots [0, T).

  Returns the logits [B, V] and hidden state [B, H] at each row's last real token, and
  the cache.
  """
  batch, num_tokens = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
  mask = prefill_mask(lengths, num_tokens, cache.max_len)
  last = (lengths - 1)[:, None]
  logits, hidden, cache = llama.forward(config, params, tokens, positions, cache,
                                        jnp.zeros((batch,), jnp.int32), mask,
                                        logits_index=last)
  return logits[:, 0], jnp.take_along_axis(hidden, last[:, :, None], axis=1)[:, 0], cache


def decode(config, params, tokens, positions, cache):
  """One token per row: tokens, positions [B] int32 (slot = position) -> logits [B, V],
  hidden [B, H], cache."""
  mask = decode_mask(positions, cache.max_len)
  logits, hidden, cache = llama.forward(config, params, tokens[:, None], positions[:, None],
                                        cache, positions, mask)
  return logits[:, 0], hidden[:, 0], cache
