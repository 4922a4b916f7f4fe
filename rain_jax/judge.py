"""Self-evaluation in token space (rain-reference.md §4.3, HH and adv).

The policy judges its own text with the few-shot prompt f2: two passes that differ only
in the order of the options (r1: (A) harmless / (B) harmful; r2 swapped), reading which
of the labels "A" and "B" is likelier as the next token. Pass 1 votes harmless when
P(A) > P(B), pass 2 when P(B) > P(A); v = votes - 1, in {-1, 0, +1}.

Per row the judge keeps its own KV cache:
  [trunk: f2 + "\\n\\n" + the conversation's start + committed answer]
  [content: the path and rollout being judged][two suffix streams]
The trunk is prefilled once and extended on each commit, like the policy's; a judgement
feeds only the uncommitted tokens once and both suffixes side by side in one pass.

Token space versus the original's text: the original re-tokenises
f2 + "\\n\\n" + convo + "\\n" + r1 as one string. Here the conversation keeps the
policy's own tokens, and "\\n" + r1 is tokenised on its own, so at the two seams
(conversation start / generated tokens, generated tokens / "\\n") the tokens can differ
from a re-tokenisation of the same text (e.g. a BPE merge of "." and "\\n"). The text
is the same; only those boundary merges differ. Verdicts are not memoised (the
original memoises by text): a repeated text is judged again, which changes cost only.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rain_jax.search import feed_tokens, slot_range_mask


@flax.struct.dataclass
class JudgeState:
  cache: object
  trunk_len: jax.Array     # [B]


@dataclasses.dataclass(frozen=True, eq=False)
class ABJudge:
  """Two-order A/B harmfulness judge; see the module docstring.

  model: search.ModelFns of the policy (the judge is the policy).
  suffixes: token ids of "\\n" + r1 and "\\n" + r2.
  label_a, label_b: ids of "A" and "B" after "(".
  prefix_width: width of the padded judge prompts; answer_cap, content_cap: capacities
  of the committed answer and of the judged uncommitted tokens; chunk: feed chunk.
  """
  model: object
  suffixes: tuple
  label_a: int
  label_b: int
  prefix_width: int
  answer_cap: int
  content_cap: int
  chunk: int

  def __post_init__(self):
    if len(self.suffixes) != 2 or not all(self.suffixes):
      raise ValueError('ABJudge needs two non-empty suffixes (r1 and r2)')
    if self.content_cap % self.chunk:
      raise ValueError(f'content_cap={self.content_cap} must be a multiple of '
                       f'chunk={self.chunk}')

  @property
  def suffix_width(self):
    return max(len(s) for s in self.suffixes)

  @property
  def content_base(self):
    return self.prefix_width + self.answer_cap

  @property
  def suffix_base(self):
    return self.content_base + self.content_cap

  @property
  def num_slots(self):
    return self.suffix_base + 2 * self.suffix_width

  def _suffix_arrays(self):
    width = self.suffix_width
    tokens = np.zeros((2, width), np.int32)
    for k, ids in enumerate(self.suffixes):
      tokens[k, :len(ids)] = ids
    return jnp.asarray(tokens), jnp.asarray([len(s) for s in self.suffixes], jnp.int32)

  def init_state(self, params, inputs):
    """inputs: {'tokens': [B, prefix_width] int32 right-padded, 'lens': [B]} (the judge
    prompt f2 + "\\n\\n" + conversation start, tokenised on the host)."""
    tokens, lens = inputs['tokens'], inputs['lens']
    batch = tokens.shape[0]
    cache = self.model.init_cache(batch, self.num_slots)
    context = jnp.zeros((batch, self.num_slots), bool)
    cache, _, _ = feed_tokens(self.model, params, cache, tokens, lens, 0,
                              jnp.zeros((batch,), jnp.int32), context, tokens.shape[1])
    return JudgeState(cache=cache, trunk_len=lens)

  def commit(self, params, state, tokens, lens, mask):
    """Appends committed tokens [B, L] (lens real; only rows in mask) to the trunk."""
    lens = jnp.where(mask, lens, 0)
    context = slot_range_mask(self.num_slots, 0, state.trunk_len)
    cache, _, _ = feed_tokens(self.model, params, state.cache, tokens, lens,
                              state.trunk_len, state.trunk_len, context, tokens.shape[1])
    return JudgeState(cache=cache, trunk_len=state.trunk_len + lens)

  def evaluate(self, params, state, gen, answer_len, gen_len, active):
    """v [B] in {-1, 0, +1} for the text trunk + gen[answer_len:gen_len]."""
    batch = gen.shape[0]
    content_len = jnp.where(active, gen_len - answer_len, 0)
    idx = answer_len[:, None] + jnp.arange(self.content_cap)[None, :]
    content = jnp.take_along_axis(gen, jnp.clip(idx, 0, gen.shape[1] - 1), axis=1)
    trunk = slot_range_mask(self.num_slots, 0, state.trunk_len)
    cache, _, _ = feed_tokens(self.model, params, state.cache, content, content_len,
                              self.content_base, state.trunk_len, trunk, self.chunk)
    suffix, suffix_lens = self._suffix_arrays()
    width = self.suffix_width
    t = jnp.arange(width)
    slots = self.suffix_base + jnp.arange(2)[:, None] * width + t[None, :]      # [2, W]
    flat_slots = slots.reshape(-1)
    s = jnp.arange(self.num_slots)
    own = (s[None, None, :] >= slots[:, :1, None]) & (s[None, None, :] <= slots[:, :, None])
    seen = trunk | slot_range_mask(self.num_slots, self.content_base, content_len)
    mask = seen[:, None, :] | own.reshape(2 * width, self.num_slots)[None]
    positions = (state.trunk_len + content_len)[:, None] + jnp.tile(t, 2)[None, :]
    logits, _, cache = self.model.forward(
        params, jnp.broadcast_to(suffix.reshape(-1), (batch, 2 * width)), positions, cache,
        jnp.broadcast_to(flat_slots, (batch, 2 * width)), mask)
    last = jnp.asarray([suffix_lens[0] - 1, width + suffix_lens[1] - 1])
    picked = logits[:, last]                                                     # [B, 2, V]
    a, b = picked[..., self.label_a], picked[..., self.label_b]
    votes = (a[:, 0] > b[:, 0]).astype(jnp.float32) + (b[:, 1] > a[:, 1]).astype(jnp.float32)
    return votes - 1.0, JudgeState(cache=cache, trunk_len=state.trunk_len)
