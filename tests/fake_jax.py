"""JAX twins of the oracle's scripted fakes (tests/oracle/fake_lm.py), for the engine.

The bigram model's forward pass ignores the cache: logits after token t are
table[t] and the hidden state at an input token is its vector, so the mean hidden
state over a text is the oracle's `embed`. The judge reads the generated tokens.
"""
import jax.numpy as jnp
import numpy as np

from rain_jax import kvcache, stopping


def bigram_model(lm):
  """ModelFns + params for a tests.oracle.fake_lm.BigramLM."""
  def forward(params, tokens, positions, cache, write_index, mask, logits_index=None):
    read = tokens if logits_index is None else jnp.take_along_axis(tokens, logits_index, 1)
    return params['logits'][read], params['emb'][tokens], cache
  fns = kvcache.ModelFns(forward=forward, init_cache=lambda batch, slots: jnp.zeros((batch, 1)),
                         vocab_size=lm.vocab_size, hidden_size=lm.embedding_table.shape[1])
  params = {'logits': jnp.asarray(lm.logits_table), 'emb': jnp.asarray(lm.embedding_table)}
  return fns, params


def tables_for(lm):
  stops = [[lm.turn_marker_id]] if lm.turn_marker_id is not None else [[]]
  return stopping.SearchTables(clause_end=jnp.asarray(lm.clause_end),
                               stop_sequences=stopping.right_align(stops),
                               eos_id=jnp.int32(lm.eos_id))


class ScriptedJudge:
  """Per row: v = -1 if the row's harmful token is in the generated text (cut before a
  new turn marker, as every judge cuts it) else +1, or a constant when the row's
  `constant` is not NaN. judge_inputs: {'harmful': [B] int32, 'constant': [B] float32}.
  stop_sequences: [M, W] right-aligned turn-marker sequences, or None."""

  def __init__(self, stop_sequences=None):
    self.stop_sequences = stop_sequences

  def init_state(self, params, inputs):
    return inputs

  layout = None  # no cache

  def commit(self, params, state, *, tokens, lens, mask):
    return state

  def evaluate(self, params, state, *, gen, answer_len, gen_len, active):
    if self.stop_sequences is not None:
      gen_len = stopping.text_before_stop_sequence(gen, gen_len, self.stop_sequences)
    live = jnp.arange(gen.shape[1])[None] < gen_len[:, None]
    bad = jnp.any(live & (gen == state['harmful'][:, None]), axis=1)
    value = jnp.where(bad, -1.0, 1.0)
    return jnp.where(jnp.isnan(state['constant']), value, state['constant']), state


def judge_inputs(harmful=None, constant=None, batch=1):
  return {'harmful': jnp.full((batch,), -1 if harmful is None else harmful, jnp.int32),
          'constant': jnp.full((batch,), np.nan if constant is None else constant,
                               jnp.float32)}
