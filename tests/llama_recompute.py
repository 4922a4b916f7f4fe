"""A tiny random LLaMA run by full recomputation: the independent side of the engine tests.

Every call starts from an empty cache and runs the whole sequence through
`models.llama.forward` with a plain causal mask, so nothing the search caches (trunk,
path, rollout or judge slots) is reused. Sequences are right-padded to a fixed width so
that one compiled program serves every length; the causal mask keeps the padding
invisible to the real positions.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import llama


def scaled_params(config, seed, embed_scale):
  """`llama.init_params` with the embedding table multiplied by `embed_scale`.

  The preset's 0.02-scale tied embeddings give logits of about 0.2, almost uniform;
  a larger table spreads them so that greedy choices and samples are far from ties.
  """
  params = dict(llama.init_params(config, jax.random.PRNGKey(seed)))
  params['embed'] = {'embedding': params['embed']['embedding'] * embed_scale}
  return params


@functools.partial(jax.jit, static_argnums=0)
def full_forward(config, params, tokens):
  """Causal forward pass from scratch: tokens [N, W] int32 -> (logits [N, W, V] float32,
  hidden [N, W, H] after the final norm)."""
  batch, width = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
  causal = jnp.arange(width)[None, :] <= jnp.arange(width)[:, None]
  mask = jnp.broadcast_to(causal, (batch, width, width))
  logits, hidden, _ = llama.forward(config, params, tokens, positions,
                                    llama.init_cache(config, batch, width),
                                    jnp.zeros((batch,), jnp.int32), mask)
  return logits, hidden


def pad_rows(rows, width):
  """Right-pads token lists into [len(rows), width] int32 with zeros."""
  tokens = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    if not 1 <= len(row) <= width:
      raise ValueError(f'row {i} has {len(row)} tokens; expected 1..{width}')
    tokens[i, :len(row)] = row
  return tokens


def last_logits(config, params, rows, width):
  """Logits [N, V] float32 (numpy) after the last token of each token list in rows."""
  logits, _ = full_forward(config, params, jnp.asarray(pad_rows(rows, width)))
  logits = np.asarray(logits)
  return logits[np.arange(len(rows)), [len(r) - 1 for r in rows]]
