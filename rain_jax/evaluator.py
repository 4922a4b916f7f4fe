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
  prompt + answer; seeds: the row's prompt noise seed (uint32)."""
  cache: Any
  judge: Any
  trunk_len: jax.Array
  maxlen: jax.Array
  root_logits: jax.Array
  answer: jax.Array
  answer_len: jax.Array
  last_token: jax.Array
  seeds: jax.Array


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
  """
  model: kvcache.ModelFns
  judge: Any
  cfg: RainConfig
  layout: kvcache.PolicyLayout
  embedder: Any = None

  def __post_init__(self):
    if self.cfg.similarity == 'minilm' and self.embedder is None:
      raise ValueError("similarity='minilm' needs an embedder "
                       "(rain_jax.similarity.MiniLMEmbedder)")
    if self.judge.layout is not None:
      kvcache.check_judge_layout(self.judge.layout, self.layout)

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
    cache, _, root_logits = kvcache.feed_tokens(
        self.model, params, cache, tokens=prompt_tokens, lengths=prompt_lens,
        at=kvcache.at_start(num_rows, layout.num_slots),
        chunk=kvcache.prefill_chunk(prompt_tokens.shape[1]))
    return RowState(
        cache=cache, judge=self.judge.init_state(params, judge_inputs), trunk_len=prompt_lens,
        maxlen=jnp.minimum(cfg.maxlen, prompt_lens + cfg.max_new_tokens - 1),
        root_logits=root_logits,
        answer=jnp.zeros((num_rows, layout.answer_cap), jnp.int32),
        answer_len=jnp.zeros((num_rows,), jnp.int32),
        last_token=jnp.take_along_axis(prompt_tokens, (prompt_lens - 1)[:, None], 1)[:, 0],
        seeds=seeds)

  def commit(self, params, tables: SearchTables, rows: RowState, tokens, lens, ok):
    """Appends tokens [R, L] (lens [R] real; rows where ok [R]) to the answer and both
    trunks. Returns (rows, AnswerStops)."""
    cfg, layout = self.cfg, self.layout
    lens = jnp.where(ok, lens, 0)
    cache, _, logits = kvcache.feed_tokens(
        self.model, params, rows.cache, tokens=tokens, lengths=lens,
        at=kvcache.after_trunk(rows.trunk_len, layout.num_slots), chunk=cfg.max_tokens_per_node)
    judge = self.judge.commit(params, rows.judge, tokens=tokens, lens=lens, mask=ok)
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
        cache=cache, judge=judge, trunk_len=rows.trunk_len + lens,
        root_logits=jnp.where(ok[:, None], logits, rows.root_logits),
        answer=answer, answer_len=answer_len,
        last_token=jnp.where(ok, tokens[idx, jnp.maximum(lens - 1, 0)], rows.last_token)
    ), stops

  def evaluate(self, params, tables: SearchTables, rows: RowState, leaves: Leaves,
               embed_params=None):
    """Path feed, rollout, judgement, proposals and embeddings for one leaf per row.
    Returns (rows with the new caches, Evaluation)."""
    cfg = self.cfg
    cache, path_hidden, leaf_logits = self._feed_path(params, rows.cache, rows,
                                                      leaves.path_tokens, leaves.path_len)
    gen, gen_len = self._text_to_leaf(rows, leaves)
    eos_seen = jnp.any((jnp.arange(gen.shape[1])[None, :] < gen_len[:, None])
                       & (gen == tables.eos_id), axis=1)
    marker_seen = contains_stop_sequence(gen, gen_len, tables.stop_sequences)
    terminal = self._terminal(tables, rows, leaves, eos_seen, marker_seen)
    cache, gen, full_len, rollout_hidden, truncated = self._rollout(
        params, tables, rows, leaves, cache, leaf_logits, (gen, gen_len, eos_seen, marker_seen))
    value, judge = self.judge.evaluate(params, rows.judge, gen=gen, answer_len=rows.answer_len,
                                       gen_len=full_len, active=leaves.active)
    expand = leaves.active & ~terminal & ~leaves.depth_limited
    cache, candidates = self._leaf_candidates(params, cache, rows, leaves, leaf_logits, expand)
    top_ids, top_logits = propose.top_logits(leaf_logits, cfg.max_children)
    embeddings = self._node_embeddings(embed_params, rows, leaves, (gen, full_len),
                                       path_hidden, rollout_hidden)
    return rows.replace(cache=cache, judge=judge), Evaluation(
        value=value, expand=expand, candidates=candidates, top_ids=top_ids,
        top_logits=top_logits, embeddings=embeddings, truncated=truncated)

  def widen(self, params, rows: RowState, query: WideningQuery):
    """Two multi-token candidates per row after the queried node's path, sampled from its
    stored top logits (§5). Returns (rows with the new cache, Candidates [R, 2, ...])."""
    cfg = self.cfg
    cache, _, _ = self._feed_path(params, rows.cache, rows, query.path_tokens, query.path_len)
    first = jax.vmap(lambda i, v: propose.dense_from_top(i, v, self.model.vocab_size))(
        query.top_ids, query.top_logits)
    num_streams = cfg.widen_attempts + 1
    streams = Streams(
        first_logits=first, num_tokens=token_set_len(query.step),
        context=self._context_after_path(rows, query.path_len),
        start_position=rows.trunk_len + query.path_len, seeds=rows.seeds, sim=query.sim,
        codes=64 * query.step[:, None] + jnp.arange(num_streams)[None, :],
        purpose=noise.WIDEN)
    cache, candidates = self._propose(params, cache, streams, num_streams, 2)
    return rows.replace(cache=cache), candidates

  # ---- the steps behind them

  def _feed_path(self, params, cache, rows, path_tokens, path_len):
    """Feeds the path after the trunk: (cache, hidden [R, P_cap, H], logits [R, V] after
    the path (the root's logits where the path is empty))."""
    layout = self.layout
    cache, hidden, logits = kvcache.feed_tokens(
        self.model, params, cache, tokens=path_tokens, lengths=path_len,
        at=kvcache.Placement(layout.path_base, rows.trunk_len,
                             kvcache.slot_range_mask(layout.num_slots, 0, rows.trunk_len)),
        chunk=self.cfg.feed_chunk)
    return cache, hidden, jnp.where((path_len > 0)[:, None], logits, rows.root_logits)

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

  def _rollout(self, params, tables, rows, leaves, cache, logits, text):
    """Samples rollouts (§4.1). text = (gen [R, G], gen_len, eos_seen, marker_seen [R]):
    the text before the rollout and whether it holds EOS / a turn marker.

    As the original: before each sample the rollout stops when the text is longer than
    maxlen, holds a new turn marker (unless the task ignores markers), ends a clause
    (unless truth), or holds EOS: any EOS for truth, only a sampled one for HH and adv.
    Returns (cache, gen, gen_len [R], rollout hidden sum [R, H], truncated [R])."""
    cfg, layout = self.cfg, self.layout
    gen, gen_len, eos_seen, marker_seen = text
    path_len, active = leaves.path_len, leaves.active
    context = self._context_after_path(rows, path_len)
    idx = _rows(active)
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
    more = active & wants_more(eos_seen, marker_seen, last, jnp.zeros_like(gen_len))
    num_rows = active.shape[0]
    state = (cache, logits, gen, gen_len, jnp.zeros((num_rows,), jnp.int32), more, eos_seen,
             marker_seen, jnp.zeros((num_rows, self.model.hidden_size), jnp.float32),
             jnp.zeros((num_rows,), bool))

    def body(state):
      cache, logits, gen, gen_len, r, rolling, eos_seen, marker_seen, hsum, trunc = state
      token = jax.vmap(propose.rollout_token)(logits, rows.seeds, leaves.sim, r)
      gen = gen.at[idx, jnp.where(rolling, gen_len, gen.shape[1])].set(token, mode='drop')
      write = layout.rollout_base + jnp.minimum(r, cfg.max_rollout - 1)
      own = kvcache.slot_range_mask(layout.num_slots, layout.rollout_base, r + 1)
      position = rows.trunk_len + path_len + r
      new_logits, hidden, cache = self.model.forward(
          params, token[:, None], position[:, None], cache, write[:, None],
          (context | own)[:, None, :])
      logits = jnp.where(rolling[:, None], new_logits[:, 0], logits)
      hsum = hsum + jnp.where(rolling[:, None], hidden[:, 0].astype(jnp.float32), 0.0)
      eos_seen = eos_seen | (rolling & (token == tables.eos_id))
      marker_seen = marker_seen | (rolling & window_matches(gen, gen_len, tables.stop_sequences))
      gen_len = gen_len + rolling
      r = r + rolling
      still = rolling & wants_more(eos_seen, marker_seen, token, r)
      trunc = trunc | (still & (r >= cfg.max_rollout))
      rolling = still & (r < cfg.max_rollout)
      return cache, logits, gen, gen_len, r, rolling, eos_seen, marker_seen, hsum, trunc

    cache, _, gen, gen_len, _, _, _, _, hsum, trunc = jax.lax.while_loop(
        lambda state: jnp.any(state[5]), body, state)
    return cache, gen, gen_len, hsum, trunc

  def _leaf_candidates(self, params, cache, rows, leaves, leaf_logits, expand):
    """The leaf's children candidates (§3): the top one-token ids when its children hold
    one token, else multi-token proposals (decoded only when some expanding row needs
    them). Returns (cache, Candidates [R, K, ...])."""
    cfg = self.cfg
    num_rows, k, max_tokens = leaf_logits.shape[0], cfg.num_candidates, cfg.max_tokens_per_node
    one = Candidates(*jax.vmap(propose.one_token_candidates, in_axes=(0, None, None, None))(
        leaf_logits, k, max_tokens, cfg.propose_temperature))
    num_streams = cfg.sample_attempts + 1

    def multi(cache):
      streams = Streams(
          first_logits=leaf_logits, num_tokens=leaves.child_len,
          context=self._context_after_path(rows, leaves.path_len),
          start_position=rows.trunk_len + leaves.path_len, seeds=rows.seeds, sim=leaves.sim,
          codes=jnp.broadcast_to(jnp.arange(num_streams), (num_rows, num_streams)),
          purpose=noise.PROPOSE)
      return self._propose(params, cache, streams, num_streams, k)

    def no_multi(cache):
      return cache, Candidates(
          tokens=jnp.zeros((num_rows, k, max_tokens), jnp.int32),
          lens=jnp.zeros((num_rows, k), jnp.int32),
          weights=jnp.zeros((num_rows, k), jnp.float32), valid=jnp.zeros((num_rows, k), bool))

    cache, many = jax.lax.cond(jnp.any(expand & (leaves.child_len > 1)), multi, no_multi, cache)
    use_one = leaves.child_len == 1
    return cache, jax.tree.map(
        lambda a, b: jnp.where(use_one.reshape(use_one.shape + (1,) * (a.ndim - 1)), a, b),
        one, many)

  def _propose(self, params, cache, streams: Streams, num_streams, num_keep):
    """Decodes the streams and keeps num_keep distinct candidates per row (§3)."""
    cache, sequences, weights = self._decode_streams(params, cache, streams, num_streams)
    kept = jax.vmap(lambda q, w, n: propose.select_candidates(q, w, n, num_keep))(
        sequences, weights, streams.num_tokens)
    return cache, Candidates(*kept)

  def _decode_streams(self, params, cache, streams: Streams, num_streams):
    """Decodes num_streams proposal streams per row side by side.

    Stream 0 is greedy, stream a >= 1 samples with counters (purpose, sim, codes[r, a],
    t, token). Row r decodes num_tokens[r] tokens (the loop runs the longest). Stream a's
    token t sits at slot stream_base + a*L + t, position start_position[r] + t.
    Returns (cache, sequences [R, A, L], weights [R, A])."""
    cfg, layout = self.cfg, self.layout
    num_rows = streams.first_logits.shape[0]
    max_tokens = cfg.max_tokens_per_node
    slots = jnp.arange(layout.num_slots)
    stream_slots = layout.stream_base + jnp.arange(num_streams)[:, None] * max_tokens

    def choose(logits, t):
      return jax.vmap(lambda lg, sd, sm, code: propose.step_tokens(
          lg, cfg.propose_temperature, cfg.sample_top, sd, streams.purpose, sm, code, t))(
              logits, streams.seeds, streams.sim, streams.codes)

    first = streams.first_logits
    tokens, weights = choose(jnp.broadcast_to(first[:, None, :],
                                              (num_rows, num_streams, first.shape[-1])), 0)
    sequences = jnp.zeros((num_rows, num_streams, max_tokens), jnp.int32).at[:, :, 0].set(tokens)

    def body(carry):
      t, cache, sequences, weights, tokens = carry
      write = jnp.broadcast_to(stream_slots[:, 0] + t - 1, (num_rows, num_streams))
      own = (slots[None, :] >= stream_slots) & (slots[None, :] <= stream_slots + t - 1)
      mask = streams.context[:, None, :] | own[None]
      positions = jnp.broadcast_to(streams.start_position[:, None] + t - 1,
                                   (num_rows, num_streams))
      logits, _, cache = self.model.forward(params, tokens, positions, cache, write, mask)
      new_tokens, new_probs = choose(logits, t)
      live = (t < streams.num_tokens)[:, None]
      sequences = sequences.at[:, :, t].set(jnp.where(live, new_tokens, 0))
      weights = jnp.where(live, weights * new_probs, weights)
      return t + 1, cache, sequences, weights, new_tokens

    _, cache, sequences, weights, _ = jax.lax.while_loop(
        lambda carry: carry[0] < jnp.max(streams.num_tokens), body,
        (jnp.int32(1), cache, sequences, weights, tokens))
    return cache, sequences, weights

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
