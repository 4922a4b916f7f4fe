"""Why a generation stopped, and where a text holds a stop sequence (vanilla and RAIN).

One vocabulary of stop reasons serves both decoders, and one matcher finds stop
sequences (a task's turn marker, as token ids) in generated tokens. Stop sequences are
[M, W] int32 arrays, each sequence right-aligned and padded on the left with -1
(`right_align`); an all-padding row never matches.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np

STOP_REASONS = ('running', 'eos', 'turn_marker', 'max_new_tokens', 'max_length',
                'no_children')
RUNNING, EOS, TURN_MARKER, MAX_NEW_TOKENS, MAX_LENGTH, NO_CHILDREN = range(len(STOP_REASONS))


@flax.struct.dataclass
class SearchTables:
  """The token facts the RAIN search stops on: clause_end [V] bool (a rollout stops after
  a clause end), stop_sequences [M, W] int32 (the turn marker(s), `right_align`ed), eos_id
  () int32."""
  clause_end: jax.Array
  stop_sequences: jax.Array
  eos_id: jax.Array


def right_align(sequences, width=None):
  """list of token lists -> [M, W] int32, each right-aligned, padded on the left with -1
  (a [1, W] row of -1 when no sequence is given)."""
  width = width or max([len(s) for s in sequences] + [1])
  rows = [[-1] * (width - len(s)) + list(s) for s in sequences if s]
  return jnp.asarray(rows or [[-1] * width], jnp.int32).reshape(-1, width)


def no_stop_sequences() -> np.ndarray:
  """[1, 1] int32 of -1: a task without a turn marker (nothing matches)."""
  return np.full((1, 1), -1, np.int32)


def stop_sequence_matches(gen, end, stop_sequences):
  """[B, M] bool: gen[b, :end[b]+1] ends with stop sequence m (end may be -1).

  gen [B, G] int32, end [B] int32, stop_sequences [M, W] right-aligned, -1 padded."""
  width = stop_sequences.shape[1]
  idx = end[:, None] - width + 1 + jnp.arange(width)[None, :]
  window = jnp.where(idx >= 0, jnp.take_along_axis(gen, jnp.clip(idx, 0), axis=1), -2)
  real = stop_sequences >= 0
  match = jnp.all(~real[None] | (window[:, None, :] == stop_sequences[None]), axis=-1)
  return match & jnp.any(real, axis=-1)[None] & (end >= 0)[:, None]


def window_matches(gen, end, stop_sequences):
  """[B] bool: gen[b, :end[b]+1] ends with one of the stop sequences (end may be -1)."""
  return jnp.any(stop_sequence_matches(gen, end, stop_sequences), axis=-1)


def text_before_stop_sequence(gen, length, stop_sequences):
  """[B] int32: length of gen[b, :length[b]] cut before the first stop sequence in it.

  The original judges the conversation cut before a new turn marker (text[:marker]);
  in token space the cut falls before the first token of the earliest matching stop
  sequence (length[b] when none matches). gen [B, G] int32, length [B].
  """
  seq_len = jnp.sum(stop_sequences >= 0, axis=1)                            # [M]

  def start_of_match_ending_at(e):
    end = jnp.full(gen.shape[:1], e)
    match = stop_sequence_matches(gen, end, stop_sequences) & (e < length)[:, None]
    return jnp.min(jnp.where(match, e - seq_len[None] + 1, gen.shape[1]), axis=1)

  first = jnp.min(jax.vmap(start_of_match_ending_at, out_axes=1)(jnp.arange(gen.shape[1])),
                  axis=1)
  return jnp.minimum(length, first).astype(jnp.int32)


def contains_stop_sequence(gen, length, stop_sequences):
  """[B] bool: a stop sequence ends somewhere in gen[b, :length[b]]."""
  return text_before_stop_sequence(gen, length, stop_sequences) < length
