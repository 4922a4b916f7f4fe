"""KV caches: how a model is called, where each cache region lives, and how tokens enter it.

The model reads and writes its cache only through one forward function that takes an
explicit [B, T, S] attention mask (`ModelFns.forward`; `models.llama.forward`). This
module owns everything above that call:

* `ModelFns`: the model as the search and the judges see it.
* `PolicyLayout`, `JudgeLayout`: every region of the RAIN caches, per row,
    policy: [trunk: prompt + committed answer][path][rollout][A proposal streams]
    judge:  [trunk: judge prompt + committed answer][content][suffixes]
  built in one place (`policy_layout`, `judge_layout`) from the config and the prompt
  widths, so that the judge's content region always holds what the search judges.
* `feed_tokens` (keyword-only, placed by a `Placement`) and `slot_range_mask`: chunked
  feeding into a region and the masks over regions.
* `prefill` / `decode`: the two passes of vanilla decoding over a contiguous cache.

Shapes: B rows, T tokens per pass, S slots, V vocabulary, H hidden size.
"""
import contextlib
import dataclasses
import functools
import itertools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from models import llama
from rain_jax.config import RainConfig


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFns:
  """How the search and the judges call a language model (hashable by identity).

  forward(params, tokens [B,T], positions [B,T], cache, write_index [B] or [B,T],
          mask [B,T,S], logits_index=None [B,K]) -> (logits [B,T,V] f32 (or [B,K,V] at
          logits_index), hidden [B,T,H], cache)
  forward_many(params, feeds: tuple of llama.Feed) -> tuple of (logits, hidden, cache):
          several calls over different caches with the same B rows as one pass (the
          weights read once); None: `call_many` makes them one after another.
  init_cache(batch, slots) -> cache
  """
  forward: Callable
  init_cache: Callable
  vocab_size: int
  hidden_size: int
  forward_many: Optional[Callable] = None

  def call_many(self, params, feeds):
    """One (logits, hidden, cache) per llama.Feed, in one pass when the model can."""
    if self.forward_many is None:
      return tuple(self.forward(params, *feed) for feed in feeds)
    return self.forward_many(params, tuple(feeds))


Feed = llama.Feed

_PHASE = ['other']


@contextlib.contextmanager
def phase(name: str):
  """Labels the model calls traced inside the block (the search's phases: 'prefill',
  'path', 'rollout+proposals', 'judge', 'widening', 'commit'). Labels are read at trace
  time by whatever wraps ModelFns to observe calls (scripts/timeline.py); they change
  nothing in the computation."""
  _PHASE.append(name)
  try:
    yield
  finally:
    _PHASE.pop()


def current_phase() -> str:
  """The innermost `phase` label at trace time ('other' outside any)."""
  return _PHASE[-1]


def round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _lay_out(layout, sizes, ends):
  """Sets layout.<ends[i]> to the slot after regions 0..i, the regions `sizes` laid out
  one after another from slot 0 (a frozen dataclass's derived fields)."""
  for name, end in zip(ends, itertools.accumulate(sizes)):
    object.__setattr__(layout, name, end)


@dataclasses.dataclass(frozen=True)
class PolicyLayout:
  """Slots of one row of the policy cache (static ints), region after region:

    trunk    [0, path_base): prompt_width + answer_cap; prefilled once, extended on commit
    path     [path_base, rollout_base): path_cap slots, the selected path, fed again each
             simulation (a multiple of the feed chunk)
    rollout  [rollout_base, stream_base): rollout_cap slots
    streams  [stream_base, num_slots): num_streams proposal streams of stream_len slots

  gen_cap: the generated buffer the judges read (answer + path + rollout).
  """
  prompt_width: int
  answer_cap: int
  path_cap: int
  rollout_cap: int
  num_streams: int
  stream_len: int
  path_base: int = dataclasses.field(init=False)
  rollout_base: int = dataclasses.field(init=False)
  stream_base: int = dataclasses.field(init=False)
  num_slots: int = dataclasses.field(init=False)
  gen_cap: int = dataclasses.field(init=False)

  def __post_init__(self):
    _lay_out(self, (self.prompt_width + self.answer_cap, self.path_cap, self.rollout_cap,
                    self.num_streams * self.stream_len),
             ('path_base', 'rollout_base', 'stream_base', 'num_slots'))
    object.__setattr__(self, 'gen_cap', self.answer_cap + self.path_cap + self.rollout_cap)


@dataclasses.dataclass(frozen=True)
class JudgeLayout:
  """Slots of one row of a judge's cache (static ints), region after region:

    trunk     [0, content_base): the judge prompt (prefix_width) + the committed answer
              (answer_cap)
    content   [content_base, suffix_base): content_cap slots for the uncommitted tokens
              judged (a multiple of the feed chunk)
    suffixes  [suffix_base, num_slots): suffix_slots for the judge's question(s)
  """
  content_base: int = dataclasses.field(init=False)   # derived from the sizes below
  suffix_base: int = dataclasses.field(init=False)
  num_slots: int = dataclasses.field(init=False)
  prefix_width: int
  answer_cap: int
  content_cap: int
  suffix_slots: int

  def __post_init__(self):
    _lay_out(self, (self.prefix_width + self.answer_cap, self.content_cap, self.suffix_slots),
             ('content_base', 'suffix_base', 'num_slots'))


def policy_layout(cfg: RainConfig, prompt_width: int) -> PolicyLayout:
  """The policy cache of a search with `cfg` over prompts padded to `prompt_width`."""
  return PolicyLayout(
      prompt_width=prompt_width,
      answer_cap=cfg.max_new_tokens + cfg.max_tokens_per_node,
      path_cap=round_up(cfg.max_depth * cfg.max_tokens_per_node, cfg.feed_chunk),
      rollout_cap=cfg.max_rollout,
      num_streams=max(cfg.sample_attempts, cfg.widen_attempts) + 1,
      stream_len=cfg.max_tokens_per_node)


def judge_layout(cfg: RainConfig, policy: PolicyLayout, *, prefix_width: int,
                 suffix_slots: int) -> JudgeLayout:
  """The judge cache matching `policy`: its content holds every uncommitted token the
  search can judge (path + rollout), rounded up to the feed chunk."""
  return JudgeLayout(prefix_width=prefix_width, answer_cap=policy.answer_cap,
                     content_cap=round_up(policy.path_cap + policy.rollout_cap,
                                          cfg.feed_chunk),
                     suffix_slots=suffix_slots)


def check_judge_layout(judge: JudgeLayout, policy: PolicyLayout) -> None:
  """ValueError unless the judge's trunk and content hold what the search judges (a
  smaller content region would silently clip the judged text)."""
  if judge.answer_cap != policy.answer_cap:
    raise ValueError(f'judge answer_cap={judge.answer_cap} differs from the policy '
                     f'answer_cap={policy.answer_cap}')
  need = policy.path_cap + policy.rollout_cap
  if judge.content_cap < need:
    raise ValueError(f'judge content_cap={judge.content_cap} cannot hold the path + '
                     f'rollout of {need} tokens the search judges')


def slot_range_mask(num_slots, start, length):
  """[B, S] bool: slots start .. start+length-1 (start: int or [B]; length [B])."""
  s = jnp.arange(num_slots)[None, :]
  start = jnp.broadcast_to(jnp.asarray(start), length.shape)[:, None]
  return (s >= start) & (s < start + length[:, None])


# A 65B judge trunk of 1600 tokens fed at once made 800 MiB of float32 scores per TPU
# chip (8 heads x 1600 x 2024 slots x 8 rows); 256 tokens per pass make 128 MiB.
PREFILL_CHUNK = 256


class Placement(NamedTuple):
  """Where fed tokens go: token j of row b at slot slot_base[b] + j (slot_base: int or
  [B]) and position start_position[b] + j ([B]), attending context [B, S] bool plus the
  fed slots up to itself."""
  slot_base: Any
  start_position: jax.Array
  context: jax.Array


def at_start(batch: int, num_slots: int) -> Placement:
  """From slot and position 0 of an empty cache."""
  return Placement(0, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, num_slots), bool))


def after_trunk(trunk_len, num_slots: int) -> Placement:
  """Right after each row's trunk of trunk_len [B] tokens (slots and positions
  0 .. trunk_len - 1), attending the trunk."""
  return Placement(trunk_len, trunk_len, slot_range_mask(num_slots, 0, trunk_len))


def feed_tokens(model: ModelFns, params, cache, *, tokens, lengths, at: Placement, chunk):
  """Feeds tokens [B, X] (row b's first lengths[b] real) where `at` places them.

  One forward pass per `chunk` tokens (X is padded up to a multiple of chunk; the loop
  runs for the longest row). Returns (cache, hidden [B, X, H] f32, logits [B, V] at each
  row's last real token; zeros where lengths[b] == 0). Padding tokens write slots past
  the real ones, which no mask includes until they are written again.
  """
  (cache,), hidden, logits = feed_tokens_many(model, params, (cache,), tokens=(tokens,),
                                              lengths=(lengths,), at=(at,), chunk=chunk)
  return cache, hidden, logits


def feed_tokens_many(model: ModelFns, params, caches, *, tokens, lengths, at, chunk,
                     tiers=1):
  """`feed_tokens` into several caches at once: tokens[g] [B, X] (lengths[g] [B] real)
  into caches[g], placed by at[g], every pass one `ModelFns.call_many` for all of them
  (the search feeds a path to the policy and to its judge together). The passes run
  for the longest row of any feed.

  tiers > 1: passes of `chunk` tokens while more than chunk/2 remain, then at most one
  pass of chunk/2 while more than chunk/4 remain, and so on: as many passes as chunks
  of `chunk` alone, with less padding in the last one (which costs compute on a CPU,
  never passes). Returns (caches, hidden [B, X, H], logits) with hidden and logits
  those of feed 0."""
  batch, width = tokens[0].shape
  if any(t.shape != tokens[0].shape for t in tokens):
    raise ValueError(f'feeds of different shapes: {[t.shape for t in tokens]}')
  sizes = sorted({max(chunk >> i, 1) for i in range(tiers)}, reverse=True)
  longest = functools.reduce(jnp.maximum, [jnp.max(n) for n in lengths])
  # Room for the last pass: a tiered one can start up to chunk/2 before the end.
  padded = round_up(width, chunk) + (chunk // 2 if len(sizes) > 1 else 0)
  tokens = [jnp.pad(t, ((0, 0), (0, padded - width))) for t in tokens]
  slot_ids = [jnp.arange(a.context.shape[1]) for a in at]
  bases = [jnp.broadcast_to(jnp.asarray(a.slot_base, jnp.int32), (batch,)) for a in at]
  last = lengths[0] - 1
  no_logits = jnp.zeros((batch, 0), jnp.int32)

  def body(size):
    def step(carry):
      done, caches, hidden, last_logits = carry
      idx = done + jnp.arange(size)
      feeds = []
      for g, (cache, toks, a, slots, base) in enumerate(zip(caches, tokens, at, slot_ids,
                                                             bases)):
        toks = jax.lax.dynamic_slice_in_dim(toks, done, size, axis=1)
        write = base[:, None] + idx[None, :]                                 # [B, T]
        fed = ((slots[None, None, :] >= base[:, None, None])
               & (slots[None, None, :] <= write[:, :, None]))                # [B, T, S]
        feeds.append(Feed(toks, a.start_position[:, None] + idx[None, :], cache, write,
                          a.context[:, None, :] | fed,
                          jnp.clip(last - done, 0, size - 1)[:, None] if g == 0
                          else no_logits))
      out = model.call_many(params, feeds)
      (logits, h, _), caches = out[0], tuple(o[2] for o in out)
      hidden = jax.lax.dynamic_update_slice_in_dim(hidden, h.astype(jnp.float32), done,
                                                   axis=1)
      here = (last - done >= 0) & (last - done < size)
      last_logits = jnp.where(here[:, None], logits[:, 0], last_logits)
      return done + size, caches, hidden, last_logits
    return step

  carry = (jnp.int32(0), tuple(caches),
           jnp.zeros((batch, padded, model.hidden_size), jnp.float32),
           jnp.zeros((batch, model.vocab_size), jnp.float32))
  for i, size in enumerate(sizes):
    floor = sizes[i + 1] if i + 1 < len(sizes) else 0
    carry = jax.lax.while_loop(lambda c, floor=floor: longest - c[0] > floor, body(size),
                               carry)
  _, caches, hidden, last_logits = carry
  return caches, hidden[:, :width], last_logits


def prefill_chunk(width: int) -> int:
  """Tokens per forward pass when a trunk of `width` tokens is fed into an empty cache:
  at most PREFILL_CHUNK, so the attention scores of one pass, [B, heads, chunk, S] f32,
  stay a fraction of the cache instead of [B, heads, width, S]."""
  return min(width, PREFILL_CHUNK)


# ------------------------------------------------- vanilla decoding: one contiguous cache


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
