"""Scripted fake language models and judges for the RAIN oracle and the JAX engine.

Everything is held in plain numpy float32 tables so that a JAX version of the same fake
can be built from exactly the same numbers:

  logits_table    [V, V] float32   next-token logits given the last token
  embedding_table [V, E] float32   per-token vectors; a text embeds as their mean
  clause_end      [V] bool         tokens that end a clause (, . ? : ; newline)
"""
import numpy as np


class BigramLM:
  """A bigram model: next_logits(ids) = logits_table[ids[-1]].

  logits_table: [V, V] logits of the next token given the last one.
  embedding_table: [V, E] token vectors; embed(ids, k) is the mean of the vectors of
    the last k tokens.
  eos_id: the end-of-sequence id.
  clause_end_ids: ids whose text ends a clause.
  turn_marker_id: an id that starts a new turn, or None.
  """

  def __init__(self, logits_table, embedding_table, eos_id, clause_end_ids=(),
               turn_marker_id=None):
    self.logits_table = np.asarray(logits_table, np.float32)
    self.embedding_table = np.asarray(embedding_table, np.float32)
    vocab_size = self.logits_table.shape[0]
    if self.logits_table.shape != (vocab_size, vocab_size):
      raise ValueError(f"logits_table must be [V, V], got {self.logits_table.shape}")
    if self.embedding_table.ndim != 2 or self.embedding_table.shape[0] != vocab_size:
      raise ValueError(f"embedding_table must be [{vocab_size}, E], got "
                       f"{self.embedding_table.shape}")
    for name, token in (("eos_id", eos_id), ("turn_marker_id", turn_marker_id)):
      if token is not None and not 0 <= token < vocab_size:
        raise ValueError(f"{name}={token} is outside the vocabulary of {vocab_size}")
    self.vocab_size = vocab_size
    self.eos_id = eos_id
    self.turn_marker_id = turn_marker_id
    self.clause_end = np.zeros(vocab_size, bool)
    self.clause_end[list(clause_end_ids)] = True

  def next_logits(self, ids):
    """Logits [V] (Python floats) for the token after ids."""
    if not ids:
      raise ValueError("next_logits: empty ids")
    return [float(x) for x in self.logits_table[ids[-1]]]

  def embed(self, ids, k):
    """Mean [E] of the vectors of the last k tokens of ids, L2-normalised (float64),
    like the engine's 'mean_hidden' embedding."""
    if not 1 <= k <= len(ids):
      raise ValueError(f"embed: k={k} must be in [1, {len(ids)}]")
    mean = self.embedding_table[list(ids[-k:])].astype(np.float64).mean(axis=0)
    return [float(x) for x in mean / max(np.linalg.norm(mean), 1e-12)]

  def is_clause_end(self, token):
    return bool(self.clause_end[token])

  def has_turn_marker(self, ids, prompt_len):
    """Whether the turn-marker token occurs in ids[prompt_len:]."""
    return self.turn_marker_id is not None and self.turn_marker_id in ids[prompt_len:]

  def turn_marker_start(self, ids, prompt_len):
    """Index of the first turn-marker token in ids[prompt_len:] (len(ids) when none)."""
    if self.has_turn_marker(ids, prompt_len):
      return prompt_len + list(ids[prompt_len:]).index(self.turn_marker_id)
    return len(ids)


def bigram_logits(vocab_size, preferences, base_logit=0.0):
  """A [V, V] float32 logits table: every entry base_logit, except
  preferences[prev][next] = logit."""
  table = np.full((vocab_size, vocab_size), base_logit, np.float32)
  for prev, row in preferences.items():
    for nxt, logit in row.items():
      table[prev, nxt] = logit
  return table


def random_bigram_lm(vocab_size, embed_dim, seed, eos_id=1, clause_end_ids=(2,),
                     turn_marker_id=None, logit_scale=3.0):
  """A BigramLM with normal(0, logit_scale) logits and normal(0, 1) token vectors,
  drawn from numpy's default_rng(seed) (only the tables are random)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, logit_scale, (vocab_size, vocab_size)).astype(np.float32)
  vectors = rng.normal(0.0, 1.0, (vocab_size, embed_dim)).astype(np.float32)
  return BigramLM(logits, vectors, eos_id, clause_end_ids, turn_marker_id)


class HarmfulTokenJudge:
  """v = -1 when the harmful token occurs in the generated part ids[prompt_len:],
  else +1."""

  def __init__(self, harmful_id):
    self.harmful_id = harmful_id

  def value(self, ids, prompt_len):
    return -1.0 if self.harmful_id in ids[prompt_len:] else 1.0


class ConstantJudge:
  """Always the same verdict; value 0 models SmolLM2's position-biased judge, which
  picks the same letter in both option orders."""

  def __init__(self, value=0.0):
    self.constant = float(value)

  def value(self, ids, prompt_len):
    return self.constant
