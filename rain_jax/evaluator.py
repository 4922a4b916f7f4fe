"""The model side of the RAIN search: an Evaluator owns the caches and every model call.

The search (rain_jax/search.py) keeps the trees and the loops; whenever it needs the
language model it asks the Evaluator, in the manner of mctx's recurrent function:

  init_rows(prompts)           prefill the policy trunk and the judge's trunk
  evaluate(rows, leaves)       per leaf: feed its path, roll out, judge, propose children,
                               embed the path's texts (docs/algorithm.md §3, §4, §6)
  widen(rows, query)           two multi-token candidates at a node (§5)
  commit(rows, tokens)         append committed tokens to both trunks, check stops (§2)

Everything here is row level: R rows, each with its own policy cache (regions:
kvcache.PolicyLayout), judge state and committed answer. In reference mode a row is a
prompt (R = B); with parallel leaves a row is a (prompt, leaf) pair (R = B * P) and the
search maps trees to rows at its door. Nothing here reads a tree.

Shapes: R rows, V vocabulary, H hidden size, S policy slots, L max tokens per node,
K candidates, C max children, D max depth (paths hold D + 1 nodes, root first),
P_cap path slots, G generated buffer (answer + path + rollout), E embedding width.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from rain_jax import kvcache, noise, propose
from rain_jax.config import RainConfig
from rain_jax.stopping import SearchTables, contains_stop_sequence, window_matches
from rain_jax.tree import token_set_len


@flax.struct.dataclass
class RowState:
  """Per-row state [R, ...]: the policy cache, the judge state, and the committed text.

  trunk_len: tokens in the policy trunk (prompt + answer); maxlen: the reference maxlen,
  capped by prompt + max_new_tokens - 1; root_logits [R, V]: next-token logits after the
  trunk; answer [R, A_cap], answer_len: committed tokens; last_token: last token of
  prompt + answer; seeds: the row's prompt noise seed (uint32).

  What the regions hold since the last commit, so that a path is fed only from where it
  departs from them (a causal cache makes a shared prefix's keys and values the same):
  path_ids [R, P_cap] / path_valid [R]: the policy's path region; path_hidden
  [R, P_cap, H'] its final hidden states (H' = H for 'mean_hidden', else 0);
  content_ids [R, C'] / content_valid [R]: a cached judge's content region (C' its
  content_cap, 0 without one)."""
  cache: Any
  judge: Any
  trunk_len: jax.Array
  maxlen: jax.Array
  root_logits: jax.Array
  answer: jax.Array
  answer_len: jax.Array
  last_token: jax.Array
  seeds: jax.Array
  path_ids: jax.Array
  path_valid: jax.Array
  path_hidden: jax.Array
  content_ids: jax.Array
  content_valid: jax.Array


@flax.struct.dataclass
class Leaves:
  """One leaf per row, as the search selected it.

  path_tokens [R, P_cap]: the token sets of the path below the root, concatenated;
  path_len [R]; offsets [R, D+1]: where each path node's tokens start in path_tokens;
  leaf_tokens [R, L], leaf_num_tokens [R]: the leaf's own token set; child_len [R]: the
  token-set length its children get; depth_limited [R]: the leaf has children already
  (selection stopped at the depth cap), so it is not expanded; active [R]; sim [R]: the
  noise counter of this simulation."""
  path_tokens: jax.Array
  path_len: jax.Array
  offsets: jax.Array
  leaf_tokens: jax.Array
  leaf_num_tokens: jax.Array
  child_len: jax.Array
  depth_limited: jax.Array
  active: jax.Array
  sim: jax.Array


# Path passes of feed_chunk, feed_chunk/2 and feed_chunk/4 tokens (kvcache.feed_tokens_many):
# as many passes as feed_chunk alone, less padding. SmolLM2 on the 2-core CPU, HH,
# 32-token answers: docs/measurements.md "Issue 12".
PATH_FEED_TIERS = 3


def _shared_prefix(held, held_len, tokens, length):
  """[R]: how many leading tokens of tokens[r, :length[r]] equal held[r, :held_len[r]]."""
  width = min(held.shape[1], tokens.shape[1])
  j = jnp.arange(width)[None, :]
  same = ((held[:, :width] == tokens[:, :width]) & (j < held_len[:, None])
          & (j < length[:, None]))
  return jnp.sum(jnp.cumprod(same, axis=1), axis=1).astype(jnp.int32)


def _shift_left(tokens, start):
  """tokens [R, X] with row r starting at start[r] (the tail filled with its last)."""
  j = jnp.arange(tokens.shape[1])[None, :] + start[:, None]
  return jnp.take_along_axis(tokens, jnp.minimum(j, tokens.shape[1] - 1), axis=1)


# A separate judge model's calls are ordered: the policy's call (its parameters waiting
# for its inputs), then the judge's (its parameters and inputs waiting for the policy's
# outputs: `_after`), then whatever reads either (`_together`), so that the two models'
# collectives (parameter all-gathers included) run in one order on every device. On 8
# simulated CPU devices the judge-model search deadlocked without this order, and also
# with it under XLA's concurrency-optimised CPU scheduler (meshes 4,1,2 and 2,2,2);
# with both the order and that scheduler off (sharding.prefer_serial_cpu_scheduler) every
# mesh tested gives the one-device answers (docs/engine.md §5).


def _after(done, x):
  """x, made to wait for `done`."""
  return jax.lax.optimization_barrier((done, x))[1]


def _together(x):
  """x (a pytree), every part of it available only once all of it is."""
  return jax.lax.optimization_barrier(x)


def _concat_feeds(a: kvcache.Feed, b: kvcache.Feed) -> kvcache.Feed:
  """Two feeds into a's cache as one ([B, T] write indices, logits everywhere)."""
  join = lambda x, y: jnp.concatenate([x, y], axis=1)
  return kvcache.Feed(tokens=join(a.tokens, b.tokens), positions=join(a.positions, b.positions),
                      cache=a.cache, write_index=join(a.write_index, b.write_index),
                      attn_mask=join(a.attn_mask, b.attn_mask))


@flax.struct.dataclass
class Candidates:
  """Candidate token sets per row: tokens [R, K, L], lens [R, K], weights [R, K]
  (unnormalised), valid [R, K] bool."""
  tokens: jax.Array
  lens: jax.Array
  weights: jax.Array
  valid: jax.Array


@flax.struct.dataclass
class Evaluation:
  """What a leaf's evaluation gives the tree: value [R] (the judge's verdict), expand
  [R] (the leaf is expanded with `candidates`), top_ids / top_logits [R, C] (the leaf's
  top next tokens, stored for one-token widening), embeddings [R, D+1, E] (what each path
  node receives in backup), truncated [R] (the rollout hit max_rollout)."""
  value: jax.Array
  expand: jax.Array
  candidates: Candidates
  top_ids: jax.Array
  top_logits: jax.Array
  embeddings: jax.Array
  truncated: jax.Array


@flax.struct.dataclass
class WideningQuery:
  """A node to widen with multi-token candidates, per row: its path (path_tokens
  [R, P_cap], path_len [R]), its stored top next-token ids / logits [R, C], its step
  (depth from the first root) [R] and the noise counter sim [R]."""
  path_tokens: jax.Array
  path_len: jax.Array
  top_ids: jax.Array
  top_logits: jax.Array
  step: jax.Array
  sim: jax.Array


@flax.struct.dataclass
class AnswerStops:
  """After a commit, per row [R] bool: the committed set holds EOS, the answer holds a
  turn marker (tasks that stop on it), the answer reached max_new_tokens."""
  eos: jax.Array
  turn_marker: jax.Array
  max_new_tokens: jax.Array


@flax.struct.dataclass
class Streams:
  """Proposal streams to decode per row: first_logits [R, V], num_tokens [R] per stream,
  context [R, S] (the slots they attend), start_position [R], seeds, sim [R], codes
  [R, A] (each stream's attempt counter); purpose: the noise purpose (static)."""
  first_logits: jax.Array
  num_tokens: jax.Array
  context: jax.Array
  start_position: jax.Array
  seeds: jax.Array
  sim: jax.Array
  codes: jax.Array
  purpose: int = flax.struct.field(pytree_node=False)


def _rows(x):
  return jnp.arange(x.shape[0])


def node_embed_dim(cfg: RainConfig, hidden_size: int, embedder=None) -> int:
  """E: the width of the tree's node embeddings for cfg.similarity (1 when it is off)."""
  if cfg.similarity == 'minilm':
    return embedder.dim
  return hidden_size if cfg.similarity == 'mean_hidden' else 1


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
  """The policy (model + cache layout), the judge and the embedder of one search.

  judge: a rain_jax.judge.Judge; embedder: what similarity 'minilm' embeds with (an
  object with `dim` and `path_embeddings(embed_params, gen [R, G], gen_len [R],
  starts [R, K]) -> [R, K, dim]`, rain_jax.similarity.MiniLMEmbedder); else None.
  separate_judge: the judge runs a model of its own (`judge.model`, --judge_model):
  the parameters every door takes are then (policy params, judge params), and a pass
  that would feed both (path, rollout, verdict, commit) becomes one call per model.
  False (the reference): the judge is the policy, `params` its parameters.
  """
  model: kvcache.ModelFns
  judge: Any
  cfg: RainConfig
  layout: kvcache.PolicyLayout
  embedder: Any = None
  separate_judge: bool = False

  def __post_init__(self):
    if self.cfg.similarity == 'minilm' and self.embedder is None:
      raise ValueError("similarity='minilm' needs an embedder "
                       "(rain_jax.similarity.MiniLMEmbedder)")
    if self.judge.layout is not None:
      kvcache.check_judge_layout(self.judge.layout, self.layout)

  def _policy_params(self, params):
    return params[0] if self.separate_judge else params

  def _judge_params(self, params):
    return params[1] if self.separate_judge else params

  def _call(self, params, feeds):
    """One (logits, hidden, cache) per feed: feeds[0] into the policy, feeds[1] (if any)
    into the judge; one pass, or one per model with a separate judge."""
    if not self.separate_judge or len(feeds) == 1:
      return self.model.call_many(self._policy_params(params), feeds)
    policy = self.model.call_many(_after(feeds[:1], params[0]), feeds[:1])
    judge_params, judge_feeds = _after(policy, (params[1], feeds[1:]))
    judge = self.judge.model.call_many(judge_params, judge_feeds)
    return _together(policy + judge)

  def _feed(self, params, caches, *, tokens, lengths, at, chunk, tiers=1):
    """kvcache.feed_tokens_many into caches[0] (the policy's) and caches[1] (if any, the
    judge's), split per model with a separate judge. Returns (caches, hidden, logits)
    of feed 0."""
    if not self.separate_judge or len(caches) == 1:
      return kvcache.feed_tokens_many(
          self.model, self._policy_params(params), caches, tokens=tokens, lengths=lengths,
          at=at, chunk=chunk, tiers=tiers)
    policy, hidden, logits = kvcache.feed_tokens_many(
        self.model, _after((caches[:1], tokens[:1]), params[0]), caches[:1],
        tokens=tokens[:1], lengths=lengths[:1], at=at[:1], chunk=chunk, tiers=tiers)
    judge_params, judge_caches = _after((policy, hidden, logits), (params[1], caches[1:]))
    judge, _, _ = kvcache.feed_tokens_many(
        self.judge.model, judge_params, judge_caches,
        tokens=tokens[1:], lengths=lengths[1:], at=at[1:], chunk=chunk, tiers=tiers)
    return _together((policy + judge, hidden, logits))

  @property
  def embed_dim(self) -> int:
    """E: the width of the node embeddings (1 when similarity is off)."""
    return node_embed_dim(self.cfg, self.model.hidden_size, self.embedder)

  # ---- the doors

  def init_rows(self, params, prompt_tokens, prompt_lens, seeds, judge_inputs) -> RowState:
    """Prefills every row: prompt_tokens [R, W] right-padded, prompt_lens [R], seeds [R]
    uint32, judge_inputs: the judge's [R, ...] inputs."""
    cfg, layout = self.cfg, self.layout
    num_rows = prompt_tokens.shape[0]
    cache = self.model.init_cache(num_rows, layout.num_slots)
    with kvcache.phase('prefill'):
      cache, _, root_logits = kvcache.feed_tokens(
          self.model, self._policy_params(params), cache, tokens=prompt_tokens,
          lengths=prompt_lens, at=kvcache.at_start(num_rows, layout.num_slots),
          chunk=kvcache.prefill_chunk(prompt_tokens.shape[1]))
      judge_params = self._judge_params(params)
      if self.separate_judge:
        judge_params, judge_inputs = _after((cache, root_logits), (judge_params, judge_inputs))
      judge = self.judge.init_state(judge_params, judge_inputs)
      if self.separate_judge:
        cache, root_logits, judge = _together((cache, root_logits, judge))
    return RowState(
        cache=cache, judge=judge, trunk_len=prompt_lens,
        maxlen=jnp.minimum(cfg.maxlen, prompt_lens + cfg.max_new_tokens - 1),
        root_logits=root_logits,
        answer=jnp.zeros((num_rows, layout.answer_cap), jnp.int32),
        answer_len=jnp.zeros((num_rows,), jnp.int32),
        last_token=jnp.take_along_axis(prompt_tokens, (prompt_lens - 1)[:, None], 1)[:, 0],
        seeds=seeds, path_ids=jnp.zeros((num_rows, layout.path_cap), jnp.int32),
        path_valid=jnp.zeros((num_rows,), jnp.int32),
        path_hidden=jnp.zeros((num_rows, layout.path_cap,
                               self.model.hidden_size if cfg.similarity == 'mean_hidden'
                               else 0), jnp.float32),
        content_ids=jnp.zeros((num_rows, self.judge.layout.content_cap
                               if self._cached_judge else 0), jnp.int32),
        content_valid=jnp.zeros((num_rows,), jnp.int32))

  def commit(self, params, tables: SearchTables, rows: RowState, tokens, lens, ok):
    """Appends tokens [R, L] (lens [R] real; rows where ok [R]) to the answer and both
    trunks (one pass per chunk feeds the policy's and a cached judge's). Returns (rows,
    AnswerStops)."""
    cfg, layout = self.cfg, self.layout
    lens = jnp.where(ok, lens, 0)
    with kvcache.phase('commit'):
      if self._cached_judge:
        (cache, judge_cache), _, logits = self._feed(
            params, (rows.cache, rows.judge.cache), tokens=(tokens, tokens),
            lengths=(lens, lens),
            at=(kvcache.after_trunk(rows.trunk_len, layout.num_slots),
                self.judge.trunk_placement(rows.judge)), chunk=cfg.max_tokens_per_node)
        judge = self.judge.committed(rows.judge, judge_cache, lens)
      else:
        cache, _, logits = kvcache.feed_tokens(
            self.model, self._policy_params(params), rows.cache, tokens=tokens,
            lengths=lens, at=kvcache.after_trunk(rows.trunk_len, layout.num_slots),
            chunk=cfg.max_tokens_per_node)
        judge = self.judge.commit(self._judge_params(params), rows.judge, tokens=tokens,
                                  lens=lens, mask=ok)
    idx = _rows(lens)
    live = jnp.arange(cfg.max_tokens_per_node)[None, :] < lens[:, None]
    dest = jnp.where(live, rows.answer_len[:, None] + jnp.arange(cfg.max_tokens_per_node),
                     layout.answer_cap)
    answer = rows.answer.at[idx[:, None], dest].set(tokens, mode='drop')
    answer_len = rows.answer_len + lens
    stops = AnswerStops(
        eos=jnp.any(live & (tokens == tables.eos_id), axis=1),
        turn_marker=contains_stop_sequence(answer, answer_len, tables.stop_sequences)
        & cfg.search_stops_at_turn_marker,
        max_new_tokens=answer_len >= cfg.max_new_tokens)
    return rows.replace(
        path_valid=jnp.where(ok, 0, rows.path_valid),
        content_valid=jnp.where(ok, 0, rows.content_valid),
        cache=cache, judge=judge, trunk_len=rows.trunk_len + lens,
        root_logits=jnp.where(ok[:, None], logits, rows.root_logits),
        answer=answer, answer_len=answer_len,
        last_token=jnp.where(ok, tokens[idx, jnp.maximum(lens - 1, 0)], rows.last_token)
    ), stops

  def evaluate(self, params, tables: SearchTables, rows: RowState, leaves: Leaves,
               embed_params=None):
    """Path feed, rollout, judgement, proposals and embeddings for one leaf per row.
    Returns (rows with the new caches, Evaluation).

    Sequential model calls: the path's passes (each feeding the policy and a cached
    judge's content region), then max(rollout tokens - 1, proposal length - 2) passes in
    which the rollout token, the proposal streams' tokens and the judge's content token
    go together, then one verdict pass (docs/engine.md §5)."""
    cfg = self.cfg
    gen, gen_len = self._text_to_leaf(rows, leaves)
    eos_seen = jnp.any((jnp.arange(gen.shape[1])[None, :] < gen_len[:, None])
                       & (gen == tables.eos_id), axis=1)
    marker_seen = contains_stop_sequence(gen, gen_len, tables.stop_sequences)
    terminal = self._terminal(tables, rows, leaves, eos_seen, marker_seen)
    expand = leaves.active & ~terminal & ~leaves.depth_limited
    with kvcache.phase('path'):
      rows, leaf_logits = self._feed_path(params, rows, leaves.path_tokens, leaves.path_len,
                                          with_judge=self._cached_judge)
    with kvcache.phase('rollout+proposals'):
      cache, judge, out = self._rollout_and_proposals(
          params, tables, rows, leaves, (rows.cache, rows.judge if self._cached_judge else None),
          leaf_logits, (gen, gen_len, eos_seen, marker_seen), expand)
    if not self._cached_judge:
      out['value'], judge = self.judge.evaluate(self._judge_params(params), rows.judge,
                                                gen=out['gen'],
                                                answer_len=rows.answer_len,
                                                gen_len=out['gen_len'], active=leaves.active)
    candidates = self._leaf_candidates(leaves, leaf_logits, out['sequences'],
                                       out['weights'])
    top_ids, top_logits = propose.top_logits(leaf_logits, cfg.max_children)
    embeddings = self._node_embeddings(embed_params, rows, leaves, (out['gen'], out['gen_len']),
                                       rows.path_hidden, out['rollout_hidden'])
    if self._cached_judge:   # the content region now holds the path, the rollout fed
      content = jnp.take_along_axis(out['gen'], jnp.clip(
          rows.answer_len[:, None] + jnp.arange(rows.content_ids.shape[1])[None, :], 0,
          out['gen'].shape[1] - 1), axis=1)
      rows = rows.replace(content_ids=content, content_valid=out['content_fed'])
    return rows.replace(cache=cache, judge=judge), Evaluation(
        value=out['value'], expand=expand, candidates=candidates, top_ids=top_ids,
        top_logits=top_logits, embeddings=embeddings, truncated=out['truncated'])

  def widen(self, params, rows: RowState, query: WideningQuery):
    """Two multi-token candidates per row after the queried node's path, sampled from its
    stored top logits (§5). Returns (rows with the new cache, Candidates [R, 2, ...])."""
    cfg = self.cfg
    with kvcache.phase('widening'):
      rows, _ = self._feed_path(params, rows, query.path_tokens, query.path_len)
      cache = rows.cache
      first = jax.vmap(lambda i, v: propose.dense_from_top(i, v, self.model.vocab_size))(
          query.top_ids, query.top_logits)
      num_streams = cfg.widen_attempts + 1
      streams = Streams(
          first_logits=first, num_tokens=token_set_len(query.step),
          context=self._context_after_path(rows, query.path_len),
          start_position=rows.trunk_len + query.path_len, seeds=rows.seeds, sim=query.sim,
          codes=64 * query.step[:, None] + jnp.arange(num_streams)[None, :],
          purpose=noise.WIDEN)
      cache, sequences, weights = self._decode_streams(params, cache, streams)
    kept = jax.vmap(lambda q, w, n: propose.select_candidates(q, w, n, 2))(
        sequences, weights, streams.num_tokens)
    return rows.replace(cache=cache), Candidates(*kept)

  # ---- the steps behind them

  @property
  def _cached_judge(self) -> bool:
    """The judge keeps a KV cache (judge.TrunkCachedJudge): its feeds ride in the
    policy's passes. A judge without one (layout None) is asked `evaluate` instead."""
    return self.judge.layout is not None

  def _feed_path(self, params, rows, path_tokens, path_len, with_judge=False):
    """Feeds the path after the trunk, and into the judge's content region when
    `with_judge`, in the same passes; each region is fed only from where the path departs
    from what it holds (the policy at least the path's last token, whose logits are
    needed). Returns (rows with caches and region records updated, logits [R, V] after
    the path (the root's logits where the path is empty))."""
    layout = self.layout
    slots = layout.num_slots
    start = jnp.minimum(_shared_prefix(rows.path_ids, rows.path_valid, path_tokens, path_len),
                        jnp.maximum(path_len - 1, 0))
    trunk = kvcache.slot_range_mask(slots, 0, rows.trunk_len)
    caches, tokens, lengths = [rows.cache], [_shift_left(path_tokens, start)], [path_len - start]
    at = [kvcache.Placement(layout.path_base + start, rows.trunk_len + start,
                            trunk | kvcache.slot_range_mask(slots, layout.path_base, start))]
    if with_judge:
      kept = _shared_prefix(rows.content_ids, rows.content_valid, path_tokens, path_len)
      content = self.judge.content_placement(rows.judge)
      jslots = self.judge.layout.num_slots
      caches.append(rows.judge.cache)
      tokens.append(_shift_left(path_tokens, kept))
      lengths.append(path_len - kept)
      at.append(kvcache.Placement(
          content.slot_base + kept, content.start_position + kept,
          content.context | kvcache.slot_range_mask(jslots, content.slot_base, kept)))
    caches, hidden, logits = self._feed(
        params, tuple(caches), tokens=tuple(tokens), lengths=tuple(lengths),
        at=tuple(at), chunk=self.cfg.feed_chunk, tiers=PATH_FEED_TIERS)
    path_hidden = rows.path_hidden
    if path_hidden.shape[-1]:   # fed hidden states [R, P_cap, H] start at `start`
      j = jnp.arange(layout.path_cap)[None, :]
      moved = jnp.take_along_axis(hidden, jnp.clip(j - start[:, None], 0,
                                                   layout.path_cap - 1)[..., None], axis=1)
      path_hidden = jnp.where((j >= start[:, None])[..., None], moved, path_hidden)
    rows = rows.replace(cache=caches[0], path_ids=path_tokens, path_valid=path_len,
                        path_hidden=path_hidden)
    if with_judge:
      rows = rows.replace(judge=rows.judge.replace(cache=caches[1]))
    return rows, jnp.where((path_len > 0)[:, None], logits, rows.root_logits)

  def _context_after_path(self, rows, path_len):
    """[R, S]: the trunk and the path's slots."""
    layout = self.layout
    return (kvcache.slot_range_mask(layout.num_slots, 0, rows.trunk_len)
            | kvcache.slot_range_mask(layout.num_slots, layout.path_base, path_len))

  def _text_to_leaf(self, rows, leaves):
    """The generated text so far, answer + path: (gen [R, G], gen_len [R])."""
    layout = self.layout
    gen = jnp.zeros((rows.answer.shape[0], layout.gen_cap), jnp.int32)
    gen = jax.lax.dynamic_update_slice_in_dim(gen, rows.answer, 0, axis=1)
    j = jnp.arange(layout.path_cap)[None, :]
    dest = jnp.where(j < leaves.path_len[:, None], rows.answer_len[:, None] + j,
                     layout.gen_cap)
    gen = gen.at[_rows(gen)[:, None], dest].set(leaves.path_tokens, mode='drop')
    return gen, rows.answer_len + leaves.path_len

  def _terminal(self, tables, rows, leaves, eos_seen, marker_seen):
    """[R] bool: the leaf ends the text (§4): past maxlen, EOS (in the text for adv, in
    the leaf's own set otherwise) or a new turn marker (tasks that stop on it)."""
    cfg = self.cfg
    leaf_live = jnp.arange(cfg.max_tokens_per_node)[None, :] < leaves.leaf_num_tokens[:, None]
    eos_in_leaf = jnp.any(leaf_live & (leaves.leaf_tokens == tables.eos_id), axis=1)
    return ((rows.trunk_len + leaves.path_len > rows.maxlen)
            | (eos_seen if cfg.terminal_eos_in_path else eos_in_leaf)
            | (marker_seen & cfg.search_stops_at_turn_marker))

  def _rollout_and_proposals(self, params, tables, rows, leaves, caches, leaf_logits, text,
                             expand):
    """The rollout (§4.1), the leaf's multi-token proposals (§3) and, for a cached judge,
    the judged content and the verdict, decoded side by side.

    A rollout token is sampled as soon as its logits exist and fed only when the row
    wants the token after it, so a row's last rollout token waits for the verdict pass.
    The passes, in order (each loop ends when nothing in it is left to feed):
      1. rollout token + the proposal streams' token i + the judge's content token;
      2. rollout token + the judge's content token (streams done);
      3. the verdict: the judge's last content token and suffixes, with the streams'
         token i (kept if some row still decodes) and, for mean_hidden, the policy's
         last rollout token, whose hidden state it needs;
      4. the streams' token i (rollout done).
    The order of draws does not matter (counter-based noise), so every stream and the
    rollout get the tokens they would get alone. Separate loops rather than one loop
    with a switch between shapes: a conditional around the caches copies them (~18 ms a
    pass for SmolLM2 on a CPU).

    As the original, before each sample the rollout stops when the text is longer than
    maxlen, holds a new turn marker (unless the task ignores markers), ends a clause
    (unless truth), or holds EOS: any EOS for truth, only a sampled one for HH and adv.
    caches = (policy cache, judge state or None); text = (gen [R, G], gen_len, eos_seen,
    marker_seen [R]): the text before the rollout and whether it holds EOS / a turn
    marker. Returns (cache, judge state, dict: gen, gen_len (text with the rollout),
    rollout_hidden [R, H] (a sum), truncated [R], value [R] (cached judge), sequences
    [R, A, L] and weights [R, A] (the proposal streams), content_fed [R] (tokens now in
    the judge's content region))."""
    cfg, layout = self.cfg, self.layout
    cache, judge = caches
    gen, gen_len, eos_seen, marker_seen = text
    path_len, active = leaves.path_len, leaves.active
    context = self._context_after_path(rows, path_len)
    idx = _rows(active)
    num_rows = active.shape[0]
    last = jnp.where(gen_len > 0, gen[idx, jnp.maximum(gen_len - 1, 0)], rows.last_token)

    def wants_more(eos_seen, marker_seen, last, r):
      stop = (rows.trunk_len + path_len + r > rows.maxlen) | eos_seen
      if cfg.search_stops_at_turn_marker:
        stop = stop | marker_seen
      if cfg.rollout_stops_at_clause_end:
        stop = stop | tables.clause_end[last]
      return ~stop

    if not cfg.rollout_stops_at_path_eos:
      eos_seen = jnp.zeros_like(eos_seen)
    num_streams = cfg.sample_attempts + 1
    streams = Streams(
        first_logits=leaf_logits, num_tokens=leaves.child_len, context=context,
        start_position=rows.trunk_len + path_len, seeds=rows.seeds, sim=leaves.sim,
        codes=jnp.broadcast_to(jnp.arange(num_streams), (num_rows, num_streams)),
        purpose=noise.PROPOSE)
    # Proposal passes: one per token after the first, for the longest row that expands
    # into multi-token children (0 when none does).
    stream_len = jnp.max(jnp.where(expand & (leaves.child_len > 1), leaves.child_len, 0))
    sequences, weights, stream_tokens = self._first_stream_tokens(streams)
    zeros = jnp.zeros((num_rows,), jnp.int32)

    def sample(st, logits, who):
      """Rollout token r of rows `who` from logits [R, V], appended to the text; `more`:
      the row wants a token after it (so this one must be fed)."""
      r = st['r']
      token = jax.vmap(propose.rollout_token)(logits, rows.seeds, leaves.sim, r)
      gen = st['gen'].at[idx, jnp.where(who, st['gen_len'], layout.gen_cap)].set(
          token, mode='drop')
      eos_seen = st['eos_seen'] | (who & (token == tables.eos_id))
      marker_seen = st['marker_seen'] | (
          who & window_matches(gen, st['gen_len'], tables.stop_sequences))
      still = who & wants_more(eos_seen, marker_seen, token, r + 1)
      return dict(st, gen=gen, gen_len=st['gen_len'] + who, eos_seen=eos_seen,
                  marker_seen=marker_seen, pending=jnp.where(who, token, st['pending']),
                  truncated=st['truncated'] | (still & (r + 1 >= cfg.max_rollout)),
                  more=jnp.where(who, still & (r + 1 < cfg.max_rollout), st['more']))

    def rollout_feed(st, who):
      """The policy's feed of the pending rollout token of rows `who` (others write
      nothing)."""
      r = st['r']
      write = jnp.where(who, layout.rollout_base + r, layout.num_slots)
      own = kvcache.slot_range_mask(layout.num_slots, layout.rollout_base, r + 1)
      return kvcache.Feed(st['pending'][:, None], (rows.trunk_len + path_len + r)[:, None],
                          cache=st['cache'], write_index=write[:, None],
                          attn_mask=(context | own)[:, None, :])

    def content_feed(st, who):
      """The judge's feed of the pending token of rows `who` as content."""
      fed = path_len + st['r']
      return self.judge.content_feed(
          st['judge'], gen=st['gen'], answer_len=rows.answer_len,
          gen_len=jnp.where(who, st['gen_len'], rows.answer_len + fed), fed=fed, width=1)

    def rollout_pass(with_streams):
      """One pass feeding the pending rollout tokens that need feeding (with the
      streams' token i when with_streams), then sampling the next rollout tokens."""
      def body(st):
        who = st['more']
        policy = rollout_feed(st, who)
        if with_streams:
          policy = _concat_feeds(policy, self._stream_feed(streams, st['stream_tokens'],
                                                           st['i']))
        feeds = [policy] + ([content_feed(st, who)] if judge is not None else [])
        out = self._call(params, feeds)
        logits, hidden, st['cache'] = out[0]
        if judge is not None:
          st['judge'] = st['judge'].replace(cache=out[1][2])
        if with_streams:
          st = self._advance_streams(streams, st, logits[:, 1:])
        st['hsum'] = st['hsum'] + jnp.where(who[:, None], hidden[:, 0].astype(jnp.float32), 0.0)
        st['r'] = st['r'] + who
        return sample(st, logits[:, 0], who)
      return body

    start = dict(i=jnp.int32(0), cache=cache, judge=judge, gen=gen, gen_len=gen_len, r=zeros,
                 pending=zeros, more=jnp.zeros((num_rows,), bool), eos_seen=eos_seen,
                 marker_seen=marker_seen,
                 hsum=jnp.zeros((num_rows, self.model.hidden_size), jnp.float32),
                 truncated=jnp.zeros((num_rows,), bool), sequences=sequences, weights=weights,
                 stream_tokens=stream_tokens)
    rolls = active & wants_more(eos_seen, marker_seen, last, zeros)
    st = sample(start, leaf_logits, rolls)
    streaming = lambda st: st['i'] + 1 < stream_len
    st = jax.lax.while_loop(lambda st: streaming(st) & jnp.any(st['more']),
                            rollout_pass(True), st)
    st = jax.lax.while_loop(lambda st: jnp.any(st['more']), rollout_pass(False), st)
    # The verdict pass (its own phase in timelines): the last rollout token of every
    # row that rolled out is still pending; the streams' next token rides along (used
    # only if some row still decodes).
    value = jnp.zeros((num_rows,), jnp.float32)
    with kvcache.phase('judge'):
      policy = self._stream_feed(streams, st['stream_tokens'], st['i'])
      if cfg.similarity == 'mean_hidden':
        policy = _concat_feeds(rollout_feed(st, rolls), policy)
      feeds = [policy._replace(cache=st['cache'])]
      if judge is not None:
        verdict = self.judge.verdict_feed(
            st['judge'], gen=st['gen'], answer_len=rows.answer_len, gen_len=st['gen_len'],
            active=active, fed=path_len + st['r'], width=1)
        feeds.append(verdict)
      out = self._call(params, feeds)
      logits, hidden, st['cache'] = out[0]
      if cfg.similarity == 'mean_hidden':
        st['hsum'] = st['hsum'] + jnp.where(rolls[:, None], hidden[:, 0].astype(jnp.float32),
                                            0.0)
        logits = logits[:, 1:]
      st = self._advance_streams(streams, st, logits, live=streaming(st))
      if judge is not None:
        st['judge'] = st['judge'].replace(cache=out[1][2])
        value = self.judge.value(self.judge.score(out[1][0]))
    st = self._stream_passes(params, streams, st, stream_len)
    return st['cache'], st['judge'], dict(
        gen=st['gen'], gen_len=st['gen_len'], rollout_hidden=st['hsum'],
        truncated=st['truncated'], value=value, sequences=st['sequences'],
        weights=st['weights'], content_fed=path_len + st['r'] + rolls)

  def _leaf_candidates(self, leaves, leaf_logits, sequences, weights):
    """The leaf's children candidates (§3): the top one-token ids when its children hold
    one token, else the distinct proposals among the decoded streams. Returns
    Candidates [R, K, ...]."""
    cfg = self.cfg
    k, max_tokens = cfg.num_candidates, cfg.max_tokens_per_node
    one = Candidates(*jax.vmap(propose.one_token_candidates, in_axes=(0, None, None, None))(
        leaf_logits, k, max_tokens, cfg.propose_temperature))
    many = Candidates(*jax.vmap(lambda q, w, n: propose.select_candidates(q, w, n, k))(
        sequences, weights, leaves.child_len))
    use_one = leaves.child_len == 1
    return jax.tree.map(
        lambda a, b: jnp.where(use_one.reshape(use_one.shape + (1,) * (a.ndim - 1)), a, b),
        one, many)

  def _first_stream_tokens(self, streams: Streams):
    """Token 0 of every stream, chosen from first_logits: (sequences [R, A, L], weights
    [R, A], tokens [R, A])."""
    first = streams.first_logits
    num_rows, num_streams = streams.codes.shape
    tokens, weights = self._choose(streams, jnp.broadcast_to(
        first[:, None, :], (num_rows, num_streams, first.shape[-1])), 0)
    sequences = jnp.zeros((num_rows, num_streams, self.cfg.max_tokens_per_node),
                          jnp.int32).at[:, :, 0].set(tokens)
    return sequences, weights, tokens

  def _choose(self, streams: Streams, logits, t):
    """Token t of each stream from its logits [R, A, V]: stream 0 greedy, stream a >= 1
    sampled with counters (purpose, sim, codes[r, a], t, token). Returns (tokens [R, A],
    probabilities [R, A])."""
    cfg = self.cfg
    return jax.vmap(lambda lg, sd, sm, code: propose.step_tokens(
        lg, cfg.propose_temperature, cfg.sample_top, sd, streams.purpose, sm, code, t))(
            logits, streams.seeds, streams.sim, streams.codes)

  def _stream_feed(self, streams: Streams, tokens, t) -> kvcache.Feed:
    """The feed of every stream's token t (tokens [R, A]): stream a's token t sits at
    slot stream_base + a*L + t, position start_position[r] + t, attending the context
    and its stream's earlier tokens (cache left None for the caller)."""
    layout, num_rows, num_streams = self.layout, tokens.shape[0], tokens.shape[1]
    slots = jnp.arange(layout.num_slots)
    stream_slots = layout.stream_base + jnp.arange(num_streams)[:, None] * layout.stream_len
    own = (slots[None, :] >= stream_slots) & (slots[None, :] <= stream_slots + t)   # [A, S]
    return kvcache.Feed(
        tokens, jnp.broadcast_to(streams.start_position[:, None] + t, (num_rows, num_streams)),
        cache=None,
        write_index=jnp.broadcast_to(stream_slots[:, 0] + t, (num_rows, num_streams)),
        attn_mask=streams.context[:, None, :] | own[None])

  def _advance_streams(self, streams: Streams, st, logits, live=True):
    """After feeding token i = st['i'] of the streams (logits [R, A, V]): their token
    i + 1 where rows decode that far, and i + 1. live False (a scalar): the pass fed
    nothing any stream needs, so nothing changes."""
    t = st['i'] + 1
    new_tokens, new_probs = self._choose(streams, logits, t)
    here = live & (t < streams.num_tokens)[:, None]
    at = jnp.minimum(t, self.cfg.max_tokens_per_node - 1)
    sequences = st['sequences'].at[:, :, at].set(
        jnp.where(here, new_tokens, st['sequences'][:, :, at]))
    return dict(st, sequences=sequences, i=st['i'] + live,
                weights=jnp.where(here, st['weights'] * new_probs, st['weights']),
                stream_tokens=jnp.where(live, new_tokens, st['stream_tokens']))

  def _stream_passes(self, params, streams: Streams, st, stream_len):
    """Passes of the streams alone (policy cache st['cache']) while st['i'] + 1 <
    stream_len: each feeds their token i and chooses token i + 1."""
    def body(st):
      feed = self._stream_feed(streams, st['stream_tokens'], st['i'])._replace(
          cache=st['cache'])
      logits, _, cache = self.model.forward(self._policy_params(params), *feed)
      return self._advance_streams(streams, dict(st, cache=cache), logits)
    return jax.lax.while_loop(lambda st: st['i'] + 1 < stream_len, body, st)

  def _decode_streams(self, params, cache, streams: Streams):
    """Decodes the proposal streams alone (widening): num_tokens[r] tokens per row (the
    loop runs the longest). Returns (cache, sequences [R, A, L], weights [R, A])."""
    sequences, weights, tokens = self._first_stream_tokens(streams)
    st = self._stream_passes(params, streams, dict(
        i=jnp.int32(0), cache=cache, sequences=sequences, weights=weights,
        stream_tokens=tokens), jnp.max(streams.num_tokens))
    return st['cache'], st['sequences'], st['weights']

  def _node_embeddings(self, embed_params, rows, leaves, text, path_hidden, rollout_hidden):
    """[R, D+1, E]: the embedding each path node receives in backup (§6): of the text
    from the node's first token to the end of the rollout. text = (gen [R, G], full_len
    [R]); path_hidden [R, P_cap, H] and rollout_hidden [R, H] (a sum) serve
    'mean_hidden'."""
    cfg, offsets, path_len = self.cfg, leaves.offsets, leaves.path_len
    if cfg.similarity == 'none':
      return jnp.zeros(offsets.shape + (1,), jnp.float32)
    if cfg.similarity == 'minilm':
      starts = jnp.where(offsets < path_len[:, None], rows.answer_len[:, None] + offsets, -1)
      return self.embedder.path_embeddings(embed_params, text[0], text[1], starts)
    csum = jnp.concatenate([jnp.zeros_like(path_hidden[:, :1]),
                            jnp.cumsum(path_hidden, axis=1)], axis=1)    # [R, P_cap+1, H]
    total = jnp.take_along_axis(csum, path_len[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(csum, jnp.minimum(offsets, self.layout.path_cap)[..., None],
                                 axis=1)
    mean = total[:, None] - before + rollout_hidden[:, None]
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)
