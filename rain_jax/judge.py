"""Self-evaluation in token space (docs/algorithm.md §4.3): the judge protocol and the
two judges of the original, ABJudge (HH, adv) and YesNoJudge (truth).

The protocol (`Judge`) is three pure functions over a per-row judge state:
  init_state(params, inputs) -> state          once per generation (inputs: [B, ...])
  commit(params, state, *, tokens, lens, mask) -> state    after each committed set
  evaluate(params, state, *, gen, answer_len, gen_len, active) -> (v [B], state)
plus `layout`, the judge's cache regions (kvcache.JudgeLayout; None for a judge without
a cache), which the search checks against its own. A judge with a cache
(TrunkCachedJudge) also hands out its feeds, so that the search can make them in the
policy's own passes (rain_jax/evaluator.py): `trunk_placement` + `committed` for
commits, `content_placement` / `content_feed` for the judged text as it is generated,
`verdict_feed` + `score` + `value` for the verdict pass.

ABJudge: the policy judges its own text with the few-shot prompt f2: two passes that differ only
in the order of the options (r1: (A) harmless / (B) harmful; r2 swapped), reading which
of the labels "A" and "B" is likelier as the next token. Pass 1 votes harmless when
P(A) > P(B), pass 2 when P(B) > P(A); v = votes - 1, in {-1, 0, +1}.

Per row the judge keeps its own KV cache:
  [trunk: f2 + "\\n\\n" + the conversation's start + committed answer]
  [content: the path and rollout being judged][two suffix streams]
The trunk is prefilled once and extended on each commit, like the policy's; the
uncommitted tokens are fed once, and both suffixes side by side in one pass.

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
spans a seam (e.g. "\\n" + "\\n" after a rollout that ended with a newline). Verdicts
are not memoised (the original memoises by text): a repeated text is judged again,
which changes cost only.
"""
import dataclasses
from typing import Optional, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np

from rain_jax import kvcache
from rain_jax.stopping import no_stop_sequences, text_before_stop_sequence


class Judge(Protocol):
  """What the search asks of a judge (see the module docstring)."""
  layout: Optional[kvcache.JudgeLayout]

  def init_state(self, params, inputs): ...

  def commit(self, params, state, *, tokens, lens, mask): ...

  def evaluate(self, params, state, *, gen, answer_len, gen_len, active): ...


@flax.struct.dataclass
class JudgeState:
  cache: object
  trunk_len: jax.Array     # [B]


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class TrunkCachedJudge:
  """The cache both judges keep per row (regions: `layout`, a kvcache.JudgeLayout).

  model: kvcache.ModelFns of the policy (the judge is the policy). chunk: feed chunk.
  stop_sequences [M, W] (right-aligned, -1 padded; stopping.no_stop_sequences() when
  the task has no turn marker) mark where the judged text is cut.

  A judgement is one forward pass (`verdict_feed`): the uncommitted tokens not yet in
  the content region, then the judge's suffix stream(s), each attending the visible
  trunk, the judged content and its own earlier tokens. The search feeds the content
  region as it goes, in the same passes as the policy's path and rollout
  (`content_placement`, `content_feed`), so that its verdict pass carries one content
  token; `evaluate` alone feeds the whole content in the verdict pass. Content token j
  sits at slot content_base + j, position trunk_len + j, whatever part of it is judged:
  a causal cache makes the suffix's view of a prefix exact.
  Subclasses give `judged_span`, `suffix_streams` and `score`.
  """
  model: kvcache.ModelFns
  layout: kvcache.JudgeLayout
  chunk: int
  stop_sequences: np.ndarray = dataclasses.field(default_factory=no_stop_sequences)

  def __post_init__(self):
    if self.layout.content_cap % self.chunk:
      raise ValueError(f'content_cap={self.layout.content_cap} must be a multiple of '
                       f'chunk={self.chunk}')

  def _check_suffix_slots(self, needed):
    if self.layout.suffix_slots < needed:
      raise ValueError(f'the judge layout has {self.layout.suffix_slots} suffix slots, '
                       f'its suffixes need {needed}')

  def init_state(self, params, inputs):
    """inputs: {'tokens': [B, prefix_width] int32 right-padded, 'lens': [B]}: the judge
    prompt up to where the answer starts, tokenised on the host."""
    tokens, lens = inputs['tokens'], inputs['lens']
    batch = tokens.shape[0]
    cache = self.model.init_cache(batch, self.layout.num_slots)
    cache, _, _ = kvcache.feed_tokens(
        self.model, params, cache, tokens=tokens, lengths=lens,
        at=kvcache.at_start(batch, self.layout.num_slots),
        chunk=kvcache.prefill_chunk(tokens.shape[1]))
    return JudgeState(cache=cache, trunk_len=lens)

  # ---- committing: the trunk grows by the committed tokens

  def trunk_placement(self, state) -> kvcache.Placement:
    """Where committed tokens go: right after each row's trunk."""
    return kvcache.after_trunk(state.trunk_len, self.layout.num_slots)

  def committed(self, state, cache, lens):
    """The state after lens [B] committed tokens were fed at `trunk_placement` into cache."""
    return JudgeState(cache=cache, trunk_len=state.trunk_len + lens)

  def commit(self, params, state, *, tokens, lens, mask):
    """Appends committed tokens [B, L] (lens real; only rows in mask) to the trunk."""
    lens = jnp.where(mask, lens, 0)
    cache, _, _ = kvcache.feed_tokens(self.model, params, state.cache, tokens=tokens,
                                      lengths=lens, at=self.trunk_placement(state),
                                      chunk=tokens.shape[1])
    return self.committed(state, cache, lens)

  # ---- judging

  def judged_end(self, gen, gen_len):
    """[B]: gen[b, :gen_len[b]] cut before a new turn marker (the original's cut)."""
    return text_before_stop_sequence(gen, gen_len, jnp.asarray(self.stop_sequences))

  def content_placement(self, state) -> kvcache.Placement:
    """Where uncommitted tokens go: content token j at slot content_base + j, position
    trunk_len + j, attending the trunk (and the content up to itself)."""
    layout = self.layout
    return kvcache.Placement(layout.content_base, state.trunk_len,
                             kvcache.slot_range_mask(layout.num_slots, 0, state.trunk_len))

  def content_feed(self, state, *, gen, answer_len, gen_len, fed, width) -> kvcache.Feed:
    """Content tokens fed .. fed + width - 1 (content index j = gen index answer_len + j),
    those before gen_len [B]; the others write nothing. gen [B, G]; fed [B]. No logits
    are read."""
    layout = self.layout
    j = fed[:, None] + jnp.arange(width)[None, :]                              # [B, W]
    at = answer_len[:, None] + j
    tokens = jnp.take_along_axis(gen, jnp.clip(at, 0, gen.shape[1] - 1), axis=1)
    live = at < gen_len[:, None]
    slots = layout.content_base + j
    s = jnp.arange(layout.num_slots)
    mask = (kvcache.slot_range_mask(layout.num_slots, 0, state.trunk_len)[:, None, :]
            | ((s[None, None, :] >= layout.content_base) & (s[None, None, :] <= slots[..., None])))
    return kvcache.Feed(tokens=tokens, positions=state.trunk_len[:, None] + j,
                        cache=state.cache,
                        write_index=jnp.where(live, slots, layout.num_slots),
                        attn_mask=mask,
                        logits_index=jnp.zeros((gen.shape[0], 0), jnp.int32))

  def verdict_feed(self, state, *, gen, answer_len, gen_len, active, fed, width):
    """The verdict pass: `content_feed` of `width` tokens from `fed` [B], then the
    suffix stream(s) after the judged text. Returns the kvcache.Feed; its logits (read
    at the suffix ends: [B, K, V]) go to `score`."""
    layout = self.layout
    gen_len = jnp.where(active, gen_len, answer_len)
    content = self.content_feed(state, gen=gen, answer_len=answer_len, gen_len=gen_len,
                                fed=fed, width=width)
    visible, content_len = self.judged_span(state, gen, answer_len, gen_len)
    tokens, offsets, sees, reads = self.suffix_streams()
    num = len(tokens)
    slots = layout.suffix_base + jnp.arange(num)                               # [T]
    own = np.zeros((num, layout.num_slots), bool)
    own[:, layout.suffix_base:layout.suffix_base + num] = sees
    own = jnp.asarray(own)                                                       # [T, S]
    seen = (kvcache.slot_range_mask(layout.num_slots, 0, visible)
            | kvcache.slot_range_mask(layout.num_slots, layout.content_base, content_len))
    positions = (visible + content_len)[:, None] + jnp.asarray(offsets)[None, :]
    batch = gen.shape[0]
    feed = kvcache.Feed(
        tokens=jnp.concatenate([content.tokens, jnp.broadcast_to(jnp.asarray(tokens, jnp.int32),
                                                                  (batch, num))], axis=1),
        positions=jnp.concatenate([content.positions, positions], axis=1),
        cache=state.cache,
        write_index=jnp.concatenate([content.write_index,
                                     jnp.broadcast_to(slots, (batch, num))], axis=1),
        attn_mask=jnp.concatenate([content.attn_mask, seen[:, None, :] | own[None]], axis=1),
        logits_index=jnp.broadcast_to(width + jnp.asarray(reads, jnp.int32),
                                      (batch, len(reads))))
    return feed

  def judge_call(self, params, state, *, gen, answer_len, gen_len, active):
    """(score [B], cache): one verdict pass feeding the whole content (nothing of it in
    the cache yet)."""
    feed = self.verdict_feed(state, gen=gen, answer_len=answer_len, gen_len=gen_len,
                                active=active, fed=jnp.zeros_like(answer_len),
                                width=self.layout.content_cap)
    ((logits, _, cache),) = self.model.call_many(params, [feed])
    return self.score(logits), cache

  def evaluate(self, params, state, *, gen, answer_len, gen_len, active):
    """v [B] for the text trunk + gen[answer_len:gen_len] (see the subclass), in one
    forward pass. gen [B, G] int32; answer_len, gen_len [B]; active [B] bool."""
    score, cache = self.judge_call(params, state, gen=gen, answer_len=answer_len,
                                   gen_len=gen_len, active=active)
    return self.value(score), JudgeState(cache=cache, trunk_len=state.trunk_len)

  def value(self, score):
    """v [B] from `score`'s output."""
    return score


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ABJudge(TrunkCachedJudge):
  """Two-order A/B harmfulness judge; see the module docstring.

  suffixes: token ids of "\\n" + r1 and "\\n" + r2. label_a, label_b: ids of "A" and "B"
  after "(". The layout's suffix region holds both suffixes side by side
  (`suffix_slots(suffixes)`); both are read in the verdict pass, each seeing the
  judged text, their shared prefix and itself.
  """
  suffixes: tuple
  label_a: int
  label_b: int

  def __post_init__(self):
    super().__post_init__()
    if len(self.suffixes) != 2 or not all(self.suffixes):
      raise ValueError('ABJudge needs two non-empty suffixes (r1 and r2)')
    self._check_suffix_slots(self.suffix_slots(self.suffixes))

  @staticmethod
  def shared_prefix(suffixes) -> int:
    """Leading tokens the two suffixes share (fed once; r1 and r2 differ only from
    where their options' order does)."""
    first, second = suffixes
    n = 0
    while n < min(len(first), len(second)) and first[n] == second[n]:
      n += 1
    return n

  @staticmethod
  def suffix_slots(suffixes) -> int:
    """Suffix slots the two suffixes need: their shared prefix once, then each one's
    rest."""
    return sum(len(s) for s in suffixes) - ABJudge.shared_prefix(suffixes)

  def suffix_streams(self):
    """The verdict pass's suffix tokens: the shared prefix, then the rest of suffix 1,
    then the rest of suffix 2, each rest seeing the prefix and itself. Returns (tokens
    [T], position offsets [T] (from the end of the judged text), sees [T, T] bool
    (which suffix tokens each attends), reads [2] (where each suffix ends))."""
    first, second = self.suffixes
    shared = self.shared_prefix(self.suffixes)
    tokens = list(first) + list(second[shared:])
    stream = np.asarray([0] * shared + [1] * (len(first) - shared)
                        + [2] * (len(second) - shared))
    offsets = np.concatenate([np.arange(len(first)), np.arange(shared, len(second))])
    t = np.arange(len(tokens))
    sees = (t[None, :] <= t[:, None]) & ((stream[None, :] == 0)
                                        | (stream[None, :] == stream[:, None]))
    return (np.asarray(tokens, np.int32), offsets, sees,
            np.asarray([len(first) - 1, len(tokens) - 1 if len(second) > shared
                        else len(second) - 1]))

  def judged_span(self, state, gen, answer_len, gen_len):
    """(visible trunk [B], judged content tokens [B]): the whole trunk, and the
    uncommitted text cut before a new turn marker."""
    return state.trunk_len, jnp.maximum(self.judged_end(gen, gen_len) - answer_len, 0)

  def score(self, picked):
    """v [B] in {-1, 0, +1} from the label logits at both suffix ends picked [B, 2, V]:
    pass 1 votes harmless when P(A) > P(B), pass 2 when P(B) > P(A)."""
    a, b = picked[..., self.label_a], picked[..., self.label_b]
    votes = (a[:, 0] > b[:, 0]).astype(jnp.float32) + (b[:, 1] > a[:, 1]).astype(jnp.float32)
    return votes - 1.0


def period_table(tok, vocab_size: int) -> np.ndarray:
  """bool [vocab_size]: the token's text contains "." (ids past the tokenizer: False)."""
  table = np.zeros((vocab_size,), bool)
  for i in range(min(tok.vocab_size, vocab_size)):
    table[i] = '.' in tok.token_text(i)
  return table


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
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
    [content: the uncommitted tokens][suffix]
  The suffix attends the content up to the cut; when the cut falls inside the committed
  answer it attends no content, only the trunk slots before the cut (a causal cache
  makes both exact). The
  seams are those of ABJudge: the answer keeps the policy's tokens and the suffix is
  tokenised on its own.

  suffix: token ids of "\\nIs the answer truthful? [\\INST] ". yes_ids, no_ids: ids read
  as "Yes" / "No". period: bool [V] table of tokens whose text contains ".".
  """
  suffix: tuple
  yes_ids: tuple
  no_ids: tuple
  period: np.ndarray

  def __post_init__(self):
    super().__post_init__()
    if not self.suffix:
      raise ValueError('YesNoJudge needs a non-empty suffix')
    if not self.yes_ids or not self.no_ids:
      raise ValueError('YesNoJudge needs at least one "Yes" id and one "No" id')
    if self.period.shape != (self.model.vocab_size,):
      raise ValueError(f'period table has shape {self.period.shape}, expected '
                       f'({self.model.vocab_size},)')
    self._check_suffix_slots(self.suffix_slots(self.suffix))

  @staticmethod
  def suffix_slots(suffix) -> int:
    return len(suffix)

  def judged_length(self, gen, gen_len):
    """[B]: answer tokens judged, i.e. gen[b, :gen_len[b]] up to its last period token
    (all gen_len[b] tokens when none has a period). gen: [B, G] int32."""
    idx = jnp.arange(gen.shape[1])[None, :]
    has_period = jnp.asarray(self.period)[gen] & (idx < gen_len[:, None])
    last = jnp.max(jnp.where(has_period, idx, -1), axis=1)
    return jnp.where(last >= 0, last + 1, gen_len)

  def suffix_streams(self):
    """One stream: the suffix at offsets 0 .. W-1, causal, read at its last token."""
    width = len(self.suffix)
    t = np.arange(width)
    return (np.asarray(self.suffix, np.int32), t, t[None, :] <= t[:, None],
            np.asarray([width - 1]))

  def judged_span(self, state, gen, answer_len, gen_len):
    """(visible trunk [B], judged content [B]) for the text cut after its last period:
    when the cut falls inside the committed answer no content is judged and only the
    trunk before the cut is visible."""
    cut = self.judged_length(gen, self.judged_end(gen, gen_len))
    visible = state.trunk_len - answer_len + jnp.minimum(cut, answer_len)
    return visible, jnp.maximum(cut - answer_len, 0)

  def score(self, picked):
    """max yes logit - max no logit [B] float32 at the suffix end (picked [B, 1, V]).
    The shared softmax normaliser cancels, so the sign is that of P(yes) - P(no)."""
    last = picked[:, 0]
    yes = jnp.max(last[:, jnp.asarray(self.yes_ids)], axis=1)
    no = jnp.max(last[:, jnp.asarray(self.no_ids)], axis=1)
    return yes - no

  def margin(self, params, state, *, gen, answer_len, gen_len, active):
    """(`score` [B], cache) for the text trunk + gen[answer_len:gen_len], cut after its
    last period (see the class docstring)."""
    return self.judge_call(params, state, gen=gen, answer_len=answer_len, gen_len=gen_len,
                           active=active)

  def value(self, score):
    """v [B] in {-1, +1}: +1 when "Yes" is likelier than "No"."""
    return jnp.where(score > 0, 1.0, -1.0)
