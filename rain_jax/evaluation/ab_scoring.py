"""The HH A/B harmfulness judge prompt, scored with full forward passes of a model.

For a conversation c the judge reads two texts (docs/algorithm.md §4.3)
  f2 + "\\n\\n" + c + "\\n" + r1        r1: (A) harmless / (B) harmful
  f2 + "\\n\\n" + c + "\\n" + r2        r2: the options swapped
each tokenised whole, as the original tokenises its judge input, and takes the
next-token log-probabilities (over the whole vocabulary) of the labels "A" and "B".

Sharing, exact up to float rounding: the token prefix that every text of one call
starts with (f2) is run once and its keys/values copied into every row. A row holds
the texts of one or a few conversations (both orders) merged into a token trie: each
distinct prefix is fed once, a token attends to the shared prefix and its own
ancestors in the trie, and its position is its depth, so one forward pass per row
gives every text's next-token distribution at its last token, as if each text had
been run alone.
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from models import llama
from models.tokenizer import LABEL_CONTEXT, next_token_id
from rain_jax.tasks.base import read_data_text

LENGTH_BUCKET = 64
LETTERS = ('A', 'B')
_OPTION = re.compile(r"\(([AB])\) Assistant's response is (harmless|harmful)")


def harmless_letter(option_text: str) -> str:
  """The letter ("A" or "B") of the harmless option listed in a judge suffix."""
  found = {}
  for letter, label in _OPTION.findall(option_text):
    found.setdefault(label, letter)
  if set(found) != {'harmless', 'harmful'} or found['harmless'] == found['harmful']:
    raise ValueError(f'judge options must list "(A)"/"(B) Assistant\'s response is '
                     f'harmless/harmful" once each; got {option_text[:120]!r}')
  return found['harmless']


@dataclasses.dataclass(frozen=True)
class JudgePrompts:
  """A two-order A/B judge prompt.

  preamble: the few-shot text (f2). options: the two suffixes (r1, r2), each ending
  just before the label. harmless_letters: the letter of the harmless option in each.
  """
  preamble: str
  options: tuple
  harmless_letters: tuple

  def __post_init__(self):
    if len(self.options) != 2 or len(self.harmless_letters) != 2:
      raise ValueError('a judge prompt needs exactly two option orders')
    if not all(letter in LETTERS for letter in self.harmless_letters):
      raise ValueError(f'harmless_letters must be "A" or "B", got {self.harmless_letters}')

  def text(self, conversation: str, order: int) -> str:
    """preamble + "\\n\\n" + conversation + "\\n" + options[order]."""
    return self.preamble + '\n\n' + conversation + '\n' + self.options[order]


def hh_judge_prompts() -> JudgePrompts:
  """RAIN's HH judge prompt (rain_jax/data/prompts/HH/f2, r1, r2)."""
  options = tuple(read_data_text('prompts', 'HH', name) for name in ('r1.txt', 'r2.txt'))
  return JudgePrompts(preamble=read_data_text('prompts', 'HH', 'f2.txt'), options=options,
                      harmless_letters=tuple(harmless_letter(o) for o in options))


def common_prefix_length(a, b) -> int:
  """Number of leading items two sequences share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def bucket(length: int, size: int) -> int:
  return -(-length // size) * size


def token_trie(sequences) -> tuple:
  """Merges token sequences into one trie, each distinct prefix stored once.

  Returns (tokens [W], parents [W] (index of the previous token, -1 at a root), ends [N]
  (index of each sequence's last token)); a node's index is larger than its parent's.
  Raises ValueError for an empty sequence.
  """
  tokens, parents, index, ends = [], [], {}, []
  for sequence in sequences:
    if not len(sequence):
      raise ValueError('cannot place an empty token sequence in a trie')
    node = -1
    for token in sequence:
      key = (node, int(token))
      if key not in index:
        index[key] = len(tokens)
        tokens.append(int(token))
        parents.append(node)
      node = index[key]
    ends.append(node)
  return tokens, parents, ends


def trie_layout(parents, width: int):
  """Positions [W] int32 (depth below the roots) and mask [W, W] bool of a trie laid out
  in `width` slots: token t sees exactly its ancestors and itself; padding slots (from
  len(parents) on) see only themselves."""
  if len(parents) > width:
    raise ValueError(f'a trie of {len(parents)} tokens does not fit width {width}')
  positions = np.zeros(width, np.int32)
  mask = np.eye(width, dtype=bool)
  for t, parent in enumerate(parents):
    if parent >= 0:
      positions[t] = positions[parent] + 1
      mask[t] |= mask[parent]
  return positions, mask


def head_logits(config, params, hidden):
  """LM-head logits [..., V] float32 of final hidden states [..., H] (docs/engine.md §1)."""
  if config.tie_embeddings:
    table = params['embed']['embedding'].astype(hidden.dtype)
    return jnp.einsum('...h,vh->...v', hidden, table, preferred_element_type=jnp.float32)
  return jnp.einsum('...h,hv->...v', hidden, params['lm_head'].astype(hidden.dtype),
                    preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def prefill_prefix(config, params, tokens):
  """KV cache [L, 1, KVH, P, D] of one prompt tokens [1, P] at positions 0..P-1."""
  length = tokens.shape[1]
  cache = llama.init_cache(config, 1, length)
  positions = jnp.arange(length, dtype=jnp.int32)[None]
  mask = jnp.tril(jnp.ones((length, length), bool))[None]
  _, _, cache = llama.forward(config, params, tokens, positions, cache,
                              jnp.zeros((1,), jnp.int32), mask)
  return cache


@functools.partial(jax.jit, static_argnums=0)
def label_logprobs_after_prefix(config, params, prefix_cache, tokens, positions, inner_mask,
                                read_index, label_ids):
  """Log-probabilities [B, R, 2] of labels (A, B) after R read tokens of each row.

  prefix_cache: KVCache of the shared prefix, [L, 1, KVH, P, D]. tokens, positions:
  [B, W] (positions counted from the prefix end). inner_mask: [B, W, W] bool among the
  row's tokens (every token also sees the whole prefix). read_index: [B, R] int32, the
  tokens whose next-token distributions are read. label_ids: [2] int32.
  """
  batch, width = tokens.shape
  prefix_len = prefix_cache.max_len

  def rows(x):
    copies = jnp.broadcast_to(x, x.shape[:1] + (batch,) + x.shape[2:])
    room = jnp.zeros(x.shape[:1] + (batch,) + x.shape[2:3] + (width,) + x.shape[4:], x.dtype)
    return jnp.concatenate([copies, room], axis=3)

  cache = llama.KVCache(k=rows(prefix_cache.k), v=rows(prefix_cache.v))
  mask = jnp.concatenate([jnp.ones((batch, width, prefix_len), bool), inner_mask], axis=2)
  slots = jnp.broadcast_to(prefix_len + jnp.arange(width, dtype=jnp.int32), (batch, width))
  _, hidden, _ = llama.forward(config, params, tokens, positions + prefix_len, cache, slots,
                               mask)
  picked = jnp.take_along_axis(hidden, read_index[..., None], axis=1)       # [B, R, H]
  logprobs = jax.nn.log_softmax(head_logits(config, params, picked), axis=-1)
  return logprobs[..., label_ids]


class ABScorer:
  """Scores conversations with a two-order A/B judge prompt on one model.

  config, params: the model (models.llama). tokenizer: models.tokenizer.Tokenizer (BOS
  added when `tokenizer.adds_bos`). batch_size: rows per forward pass; length_bucket:
  row widths are rounded up to a multiple of it (one compile per width).
  """

  def __init__(self, config, params, tokenizer, prompts: JudgePrompts, batch_size: int = 8,
               length_bucket: int = LENGTH_BUCKET):
    if batch_size < 1 or length_bucket < 1:
      raise ValueError(f'batch_size and length_bucket must be >= 1, got {batch_size} and '
                       f'{length_bucket}')
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.prompts = prompts
    self.batch_size = batch_size
    self.length_bucket = length_bucket
    self.label_ids = np.array([next_token_id(tokenizer, LABEL_CONTEXT, letter)
                               for letter in LETTERS], np.int32)
    self._last_prefix = None

  def encode(self, conversation: str) -> tuple:
    """Token ids of the two judge texts of `conversation` (order 1, order 2)."""
    if not isinstance(conversation, str):
      raise TypeError(f'conversation must be a str, got {type(conversation).__name__}')
    return tuple(self.tokenizer.encode(self.prompts.text(conversation, order),
                                       add_bos=self.tokenizer.adds_bos) for order in (0, 1))

  def fits(self, conversation: str) -> bool:
    """Whether both judge texts fit the model's context."""
    return max(len(ids) for ids in self.encode(conversation)) <= self.config.max_seq_len

  def _prefix_cache(self, prefix: tuple):
    """The KV cache of the token prefix (the last one computed is kept for reuse)."""
    if self._last_prefix is None or self._last_prefix[0] != prefix:
      cache = prefill_prefix(self.config, self.params, jnp.asarray([prefix], jnp.int32))
      self._last_prefix = (prefix, cache)
    return self._last_prefix[1]

  def label_logprobs(self, conversations: list, group: int = 1) -> np.ndarray:
    """float32 [N, 2, 2]: log P(label) for (order, label A/B) of each conversation.

    Every `group` consecutive conversations share one row (their common tokens run
    once: e.g. group=2 for an HH pair whose transcripts differ only at the end); N must
    be a multiple of `group`. Raises ValueError when a judge text is longer than the
    model's context (check with `fits` first).
    """
    if group < 1 or len(conversations) % group:
      raise ValueError(f'{len(conversations)} conversations do not split into groups of '
                       f'{group}')
    sequences = [ids for c in conversations for ids in self.encode(c)]
    if not sequences:
      return np.zeros((0, 2, 2), np.float32)
    for i, ids in enumerate(sequences):
      if len(ids) > self.config.max_seq_len:
        raise ValueError(f'judge text of conversation {i // 2} has {len(ids)} tokens, more '
                         f'than the model context of {self.config.max_seq_len}')
    # Keep one token after the prefix in every sequence so that each has a read token.
    prefix_len = min(min(common_prefix_length(sequences[0], ids) for ids in sequences),
                     min(len(ids) for ids in sequences) - 1)
    if prefix_len < 1:
      raise ValueError('the judge texts share no leading token')
    prefix_cache = self._prefix_cache(tuple(sequences[0][:prefix_len]))
    per_row = 2 * group
    tries = [token_trie([ids[prefix_len:] for ids in sequences[i:i + per_row]])
             for i in range(0, len(sequences), per_row)]
    out = np.zeros((len(tries), per_row, 2), np.float32)
    order = sorted(range(len(tries)), key=lambda i: len(tries[i][0]))
    num_batches = -(-len(order) // self.batch_size)
    for number, start in enumerate(range(0, len(order), self.batch_size), 1):
      chosen = order[start:start + self.batch_size]
      out[chosen] = self._run_batch([tries[i] for i in chosen], prefix_cache)
      logging.info('judge: batch %d of %d done', number, num_batches)
    return out.reshape(-1, 2, 2)

  def _run_batch(self, tries, prefix_cache):
    """[len(tries), R, 2] label log-probabilities at the R sequence ends of each trie."""
    width = bucket(max(len(trie[0]) for trie in tries), self.length_bucket)
    reads = len(tries[0][2])
    tokens = np.zeros((self.batch_size, width), np.int32)
    positions = np.zeros((self.batch_size, width), np.int32)
    masks = np.zeros((self.batch_size, width, width), bool)
    ends = np.zeros((self.batch_size, reads), np.int32)
    for b in range(self.batch_size):
      trie_tokens, parents, trie_ends = tries[b] if b < len(tries) else tries[0]
      tokens[b, :len(trie_tokens)] = trie_tokens
      positions[b], masks[b] = trie_layout(parents, width)
      ends[b] = trie_ends
    result = label_logprobs_after_prefix(self.config, self.params, prefix_cache,
                                         jnp.asarray(tokens), jnp.asarray(positions),
                                         jnp.asarray(masks), jnp.asarray(ends),
                                         jnp.asarray(self.label_ids))
    return np.asarray(jax.device_get(result))[:len(tries)]
