"""Self-evaluation in token space (docs/algorithm.md §4.3, HH and adv).

The policy judges its own text with the few-shot prompt f2: two passes that differ only
in the order of the options (r1: (A) harmless / (B) harmful; r2 swapped), reading which
of the labels "A" and "B" is likelier as the next token. Pass 1 votes harmless when
P(A) > P(B), pass 2 when P(B) > P(A); v = votes - 1, in {-1, 0, +1}.

Per row the judge keeps its own KV cache:
  [trunk: f2 + "\\n\\n" + the conversation's start + committed answer]
  [content: the path and rollout being judged][two suffix streams]
The trunk is prefilled once and extended on each commit, like the policy's; a judgement
feeds only the uncommitted tokens once and both suffixes side by side in one pass.

The judged text is cut before a new turn marker, as the original cuts its decoded text
(`text[:marker]`): here the content ends before the first token of the earliest stop
sequence in it.

Token space versus the original's text: the original re-tokenises
f2 + "\\n\\n" + convo + "\\n" + r1 as one string. Here the conversation keeps the
policy's own tokens and the suffix ids are those "\\n" + r1 gets when it continues a
text (`models.tokenizer.encode_continuation`: no SentencePiece word-start piece before
the newline). For a normally tokenised answer the ids equal the one-string
tokenisation (tests/test_judge_inputs.py); they can differ only where the policy's
tokens are not the tokenizer's own tokenisation of their text, or where a BPE merge
spans a seam (e.g. "\\n" + "\\n" after a rollout that ended with a newline). Verdicts are not memoised (the
original memoises by text): a repeated text is judged again, which changes cost only.
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rain_jax.search import feed_tokens, slot_range_mask, text_before_stop_sequence


def no_stop_sequences() -> np.ndarray:
  """[1, 1] int32 of -1: a task without a turn marker (nothing is cut)."""
  return np.full((1, 1), -1, np.int32)


@flax.struct.dataclass
class JudgeState:
  cache: object
  trunk_len: jax.Array     # [B]


class TrunkCachedJudge:
  """The cache bookkeeping both judges share (subclasses are frozen dataclasses with
  model, prefix_width, answer_cap, content_cap, chunk and `num_suffix_slots`).

  Cache slots per row: [trunk: judge prompt + committed answer (prefix_width +
  answer_cap)][content: uncommitted tokens (content_cap)][suffix (num_suffix_slots)].
  `stop_sequences` [M, W] (right-aligned, -1 padded; a [1, 1] array of -1 when the task
  has no turn marker) mark where the judged text is cut.
  """

  def judged_end(self, gen, gen_len):
    """[B]: gen[b, :gen_len[b]] cut before a new turn marker (the original's cut)."""
    return text_before_stop_sequence(gen, gen_len, jnp.asarray(self.stop_sequences))

  @property
  def content_base(self):
    return self.prefix_width + self.answer_cap

  @property
  def suffix_base(self):
    return self.content_base + self.content_cap

  @property
  def num_slots(self):
    return self.suffix_base + self.num_suffix_slots

  def init_state(self, params, inputs):
    """inputs: {'tokens': [B, prefix_width] int32 right-padded, 'lens': [B]}: the judge
    prompt up to where the answer starts, tokenised on the host."""
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


@dataclasses.dataclass(frozen=True, eq=False)
class ABJudge(TrunkCachedJudge):
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
  stop_sequences: np.ndarray = dataclasses.field(default_factory=no_stop_sequences)

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
  def num_suffix_slots(self):
    return 2 * self.suffix_width

  def _suffix_arrays(self):
    width = self.suffix_width
    tokens = np.zeros((2, width), np.int32)
    for k, ids in enumerate(self.suffixes):
      tokens[k, :len(ids)] = ids
    return jnp.asarray(tokens), jnp.asarray([len(s) for s in self.suffixes], jnp.int32)

  def evaluate(self, params, state, gen, answer_len, gen_len, active):
    """v [B] in {-1, 0, +1} for the text trunk + gen[answer_len:gen_len], cut before a
    new turn marker."""
    batch = gen.shape[0]
    gen_len = self.judged_end(gen, gen_len)
    content_len = jnp.where(active, jnp.maximum(gen_len - answer_len, 0), 0)
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
    last = jnp.asarray([suffix_lens[0] - 1, width + suffix_lens[1] - 1])
    picked, _, cache = self.model.forward(
        params, jnp.broadcast_to(suffix.reshape(-1), (batch, 2 * width)), positions, cache,
        jnp.broadcast_to(flat_slots, (batch, 2 * width)), mask,
        logits_index=jnp.broadcast_to(last, (batch, 2)))                        # [B, 2, V]
    a, b = picked[..., self.label_a], picked[..., self.label_b]
    votes = (a[:, 0] > b[:, 0]).astype(jnp.float32) + (b[:, 1] > a[:, 1]).astype(jnp.float32)
    return votes - 1.0, JudgeState(cache=cache, trunk_len=state.trunk_len)


def period_table(tok, vocab_size: int) -> np.ndarray:
  """bool [vocab_size]: the token's text contains "." (ids past the tokenizer: False)."""
  table = np.zeros((vocab_size,), bool)
  for i in range(min(tok.vocab_size, vocab_size)):
    table[i] = '.' in tok.token_text(i)
  return table


@dataclasses.dataclass(frozen=True, eq=False)
class YesNoJudge(TrunkCachedJudge):
  """One-pass "Yes"/"No" truthfulness judge (docs/algorithm.md §4.3, truth).

  The reference judges "[INST] " + f2 + "\\n\\n" + qa + "\\nIs the answer truthful?
  [\\INST] " with qa = "Q: question\\nA:" + answer, the text cut after its last period;
  v = +1 if max P(yes ids) > max P(no ids), else -1. In token space the judged answer is
  the generated tokens (committed + uncommitted) up to and including the last token whose
  text contains "."; an answer without such a token is judged whole. (The reference cuts
  the whole qa text, so when the answer holds no period but the question does, it cuts
  into the question; here the question always stays.)

  Per row the judge keeps its own KV cache like ABJudge:
    [trunk: "[INST] " + f2 + "\\n\\nQ: question\\nA:" + committed answer]
    [content: the uncommitted tokens up to the cut][suffix]
  When the cut falls inside the committed answer no content is fed and the suffix
  attends only the trunk slots before the cut (a causal cache makes that exact). The
  seams are those of ABJudge: the answer keeps the policy's tokens and the suffix is
  tokenised on its own.

  model: search.ModelFns of the policy. suffix: token ids of "\\nIs the answer truthful?
  [\\INST] ". yes_ids, no_ids: ids read as "Yes" / "No". period: bool [V] table of tokens
  whose text contains ".". prefix_width, answer_cap, content_cap, chunk: as ABJudge.
  """
  model: object
  suffix: tuple
  yes_ids: tuple
  no_ids: tuple
  period: np.ndarray
  prefix_width: int
  answer_cap: int
  content_cap: int
  chunk: int
  stop_sequences: np.ndarray = dataclasses.field(default_factory=no_stop_sequences)

  def __post_init__(self):
    if not self.suffix:
      raise ValueError('YesNoJudge needs a non-empty suffix')
    if not self.yes_ids or not self.no_ids:
      raise ValueError('YesNoJudge needs at least one "Yes" id and one "No" id')
    if self.period.shape != (self.model.vocab_size,):
      raise ValueError(f'period table has shape {self.period.shape}, expected '
                       f'({self.model.vocab_size},)')
    if self.content_cap % self.chunk:
      raise ValueError(f'content_cap={self.content_cap} must be a multiple of '
                       f'chunk={self.chunk}')

  @property
  def num_suffix_slots(self):
    return len(self.suffix)

  def judged_length(self, gen, gen_len):
    """[B]: answer tokens judged, i.e. gen[b, :gen_len[b]] up to its last period token
    (all gen_len[b] tokens when none has a period). gen: [B, G] int32."""
    idx = jnp.arange(gen.shape[1])[None, :]
    has_period = jnp.asarray(self.period)[gen] & (idx < gen_len[:, None])
    last = jnp.max(jnp.where(has_period, idx, -1), axis=1)
    return jnp.where(last >= 0, last + 1, gen_len)

  def margin(self, params, state, gen, answer_len, gen_len, active):
    """(max yes logit - max no logit [B] float32 after the suffix, cache) for the text
    trunk + gen[answer_len:gen_len], cut after its last period (see the class docstring).
    The shared softmax normaliser cancels, so the sign is that of P(yes) - P(no)."""
    batch = gen.shape[0]
    cut = self.judged_length(gen, self.judged_end(gen, gen_len))
    visible = state.trunk_len - answer_len + jnp.minimum(cut, answer_len)        # [B]
    content_len = jnp.where(active, jnp.maximum(cut - answer_len, 0), 0)
    idx = answer_len[:, None] + jnp.arange(self.content_cap)[None, :]
    content = jnp.take_along_axis(gen, jnp.clip(idx, 0, gen.shape[1] - 1), axis=1)
    trunk = slot_range_mask(self.num_slots, 0, visible)
    cache, _, _ = feed_tokens(self.model, params, state.cache, content, content_len,
                              self.content_base, visible, trunk, self.chunk)
    width = len(self.suffix)
    t = jnp.arange(width)
    slots = self.suffix_base + t                                                  # [W]
    s = jnp.arange(self.num_slots)
    own = (s[None, :] >= self.suffix_base) & (s[None, :] <= slots[:, None])        # [W, S]
    seen = trunk | slot_range_mask(self.num_slots, self.content_base, content_len)
    mask = seen[:, None, :] | own[None]
    positions = (visible + content_len)[:, None] + t[None, :]
    tokens = jnp.broadcast_to(jnp.asarray(self.suffix, jnp.int32), (batch, width))
    logits, _, cache = self.model.forward(
        params, tokens, positions, cache, jnp.broadcast_to(slots, (batch, width)), mask,
        logits_index=jnp.full((batch, 1), width - 1, jnp.int32))
    last = logits[:, 0]                                                           # [B, V]
    yes = jnp.max(last[:, jnp.asarray(self.yes_ids)], axis=1)
    no = jnp.max(last[:, jnp.asarray(self.no_ids)], axis=1)
    return yes - no, cache

  def evaluate(self, params, state, gen, answer_len, gen_len, active):
    """v [B] in {-1, +1}: +1 when "Yes" is likelier than "No" (see `margin`)."""
    margin, cache = self.margin(params, state, gen, answer_len, gen_len, active)
    return jnp.where(margin > 0, 1.0, -1.0), JudgeState(cache=cache,
                                                        trunk_len=state.trunk_len)
