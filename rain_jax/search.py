"""The RAIN search: simulations and commits as `lax.while_loop`s inside one jitted call.

One call generates the answers of a batch of B prompts. Each row has its own tree,
budget and stopping; the rows advance in lockstep (one simulation per row per tick) and
finished rows are masked out. The semantics are docs/algorithm.md's (reference mode);
docs/engine.md lists where array capacities bound what the reference leaves unbounded.

Policy cache layout, per row (S slots):
  [trunk: prompt + committed answer][path: tokens of the selected path below the root]
  [rollout][A proposal streams of L slots each]
The trunk is prefilled once and extended on each commit; nothing in the trunk is ever
recomputed. The selected path is fed again each simulation (in chunks, one forward
pass for a path of up to `feed_chunk` tokens): that costs the same number of sequential
passes as reading stored per-node keys/values, and keeps the cache O(path) rather than
O(tree), with no slot pool to overflow.

Shapes: B rows, V vocabulary, H hidden size, N tree nodes, C max children, L max
tokens per node, D max depth, R max rollout, A proposal streams, G generated buffer.
"""
import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

from rain_jax import noise, propose
from rain_jax import tree as tree_lib
from rain_jax.config import RainConfig

STOP_REASONS = ('running', 'eos', 'turn_marker', 'max_new_tokens', 'no_children')
RUNNING, EOS, TURN_MARKER, MAX_NEW_TOKENS, NO_CHILDREN = range(5)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelFns:
  """How the search calls a language model (hashable by identity: a static jit arg).

  forward(params, tokens [B,T], positions [B,T], cache, write_index [B] or [B,T],
          mask [B,T,S], logits_index=None [B,K]) -> (logits [B,T,V] f32 (or [B,K,V] at
          logits_index), hidden [B,T,H], cache)
  init_cache(batch, slots) -> cache
  """
  forward: Callable
  init_cache: Callable
  vocab_size: int
  hidden_size: int


@flax.struct.dataclass
class SearchTables:
  """Token facts from the tokenizer: clause_end [V] bool, stop_sequences [M, W] int32
  (right-aligned, -1 padded; a generated text ending with one holds a turn marker),
  eos_id () int32."""
  clause_end: jax.Array
  stop_sequences: jax.Array
  eos_id: jax.Array


@flax.struct.dataclass
class SearchState:
  # Tree level ([B]) unless marked [R]: row level, B * parallel_leaves rows.
  tree: tree_lib.Tree
  cache: Any                  # [R] policy cache
  judge: Any                  # [R] judge state
  seeds: jax.Array            # [B] uint32 per-prompt noise seeds
  trunk_len: jax.Array        # [R] tokens in the policy trunk (prompt + answer)
  maxlen: jax.Array           # [R] reference maxlen, capped by prompt + max_new - 1
  root_logits: jax.Array      # [R, V] next-token logits after the trunk
  answer: jax.Array           # [R, A_cap] committed tokens
  answer_len: jax.Array       # [R]
  last_token: jax.Array       # [R] last token of prompt + answer
  sim: jax.Array              # [B] simulations so far (noise counter)
  step_sims: jax.Array        # [B] simulations in the current outer step
  step_budget: jax.Array      # [B] max(max_T, done + 15) - done
  early: jax.Array            # [B] bool, the early-stop rule held after the last simulation
  done: jax.Array             # [B] bool
  stop_reason: jax.Array      # [B] int32 index into STOP_REASONS
  stats: dict                 # [B] int32 counters
  dump_tokens: jax.Array      # [B, M, C, L] root children at each commit
  dump_stats: jax.Array       # [B, M, C, 4] (n, fn, q, p)
  dump_sims: jax.Array        # [B, M] simulations of each outer step


STAT_NAMES = ('simulations', 'committed_sets', 'judge_calls', 'early_stops',
              'rollout_truncations', 'depth_limited', 'max_depth', 'nodes_used')


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static sizes of the policy cache regions (see the module docstring)."""
  cfg: RainConfig
  prompt_width: int

  @property
  def answer_cap(self):
    return self.cfg.max_new_tokens + self.cfg.max_tokens_per_node

  @property
  def trunk_cap(self):
    return self.prompt_width + self.answer_cap

  @property
  def path_cap(self):
    chunk = self.cfg.feed_chunk
    return -(-self.cfg.max_depth * self.cfg.max_tokens_per_node // chunk) * chunk

  @property
  def num_streams(self):
    return max(self.cfg.sample_attempts, self.cfg.widen_attempts) + 1

  @property
  def path_base(self):
    return self.trunk_cap

  @property
  def rollout_base(self):
    return self.path_base + self.path_cap

  @property
  def stream_base(self):
    return self.rollout_base + self.cfg.max_rollout

  @property
  def num_slots(self):
    return self.stream_base + self.num_streams * self.cfg.max_tokens_per_node

  @property
  def gen_cap(self):
    """Generated buffer: answer + path + rollout."""
    return self.answer_cap + self.path_cap + self.cfg.max_rollout


# ------------------------------------------------------------------------- small helpers


def _rows(x):
  return jnp.arange(x.shape[0])


def slot_range_mask(num_slots, start, length):
  """[B, S] bool: slots start .. start+length-1 (start: int or [B]; length [B])."""
  s = jnp.arange(num_slots)[None, :]
  start = jnp.broadcast_to(jnp.asarray(start), length.shape)[:, None]
  return (s >= start) & (s < start + length[:, None])


def stop_sequence_matches(gen, end, stop_sequences):
  """[B, M] bool: gen[b, :end[b]+1] ends with stop sequence m (end may be -1; an
  all-padding sequence never matches). stop_sequences [M, W] right-aligned, -1 padded."""
  width = stop_sequences.shape[1]
  idx = end[:, None] - width + 1 + jnp.arange(width)[None, :]
  window = jnp.where(idx >= 0, jnp.take_along_axis(gen, jnp.clip(idx, 0), axis=1), -2)
  real = stop_sequences >= 0
  match = jnp.all(~real[None] | (window[:, None, :] == stop_sequences[None]), axis=-1)
  return match & jnp.any(real, axis=-1)[None] & (end >= 0)[:, None]


def window_matches(gen, end, stop_sequences):
  """[B] bool: gen[b, :end[b]+1] ends with one of the stop sequences (end may be -1)."""
  return jnp.any(stop_sequence_matches(gen, end, stop_sequences), axis=-1)


def contains_stop_sequence(gen, length, stop_sequences):
  """[B] bool: a stop sequence ends somewhere in gen[b, :length[b]]."""
  return text_before_stop_sequence(gen, length, stop_sequences) < length


def text_before_stop_sequence(gen, length, stop_sequences):
  """[B] int32: length of gen[b, :length[b]] cut before the first stop sequence in it.

  The original judges the conversation cut before a new turn marker (text[:marker]);
  in token space the cut falls before the first token of the earliest matching stop
  sequence (length[b] when none matches). gen [B, G] int32, length [B],
  stop_sequences [M, W] right-aligned, -1 padded.
  """
  seq_len = jnp.sum(stop_sequences >= 0, axis=1)                            # [M]

  def start_of_match_ending_at(e):
    end = jnp.full(gen.shape[:1], e)
    match = stop_sequence_matches(gen, end, stop_sequences) & (e < length)[:, None]
    return jnp.min(jnp.where(match, e - seq_len[None] + 1, gen.shape[1]), axis=1)

  first = jnp.min(jax.vmap(start_of_match_ending_at, out_axes=1)(jnp.arange(gen.shape[1])),
                  axis=1)
  return jnp.minimum(length, first).astype(jnp.int32)


def _select_rows(mask, new, old):
  """Per-row choice between two pytrees with a leading batch axis."""
  def pick(a, b):
    m = mask.reshape(mask.shape + (1,) * (a.ndim - 1))
    return jnp.where(m, a, b)
  return jax.tree.map(pick, new, old)


def feed_tokens(model, params, cache, tokens, lengths, base, start_pos, context, chunk):
  """Feeds tokens [B, X] (row b's first lengths[b] real) at slots base[b] + j, in chunks.

  Token j of row b sits at position start_pos[b] + j and attends `context` [B, S] plus
  the fed slots up to itself. base: int or [B]. Returns (cache, hidden [B, X, H],
  logits [B, V] at each row's last real token; zeros where lengths[b] == 0). X must be
  a multiple of chunk. Padding tokens write slots past the real ones, which no mask
  includes until they are written again.
  """
  batch, width = tokens.shape
  num_slots = context.shape[1]
  slot_ids = jnp.arange(num_slots)
  base = jnp.broadcast_to(jnp.asarray(base, jnp.int32), (batch,))
  hidden = jnp.zeros((batch, width, model.hidden_size), jnp.float32)
  last_logits = jnp.zeros((batch, model.vocab_size), jnp.float32)
  num_chunks = -(-jnp.max(lengths) // chunk)

  def body(carry):
    c, cache, hidden, last_logits = carry
    idx = c * chunk + jnp.arange(chunk)
    toks = jax.lax.dynamic_slice_in_dim(tokens, c * chunk, chunk, axis=1)
    positions = start_pos[:, None] + idx[None, :]
    write = base[:, None] + idx[None, :]                                   # [B, T]
    fed = ((slot_ids[None, None, :] >= base[:, None, None])
           & (slot_ids[None, None, :] <= write[:, :, None]))               # [B, T, S]
    mask = context[:, None, :] | fed
    last = lengths - 1 - c * chunk
    here = (last >= 0) & (last < chunk)
    logits, h, cache = model.forward(params, toks, positions, cache, write, mask,
                                     logits_index=jnp.clip(last, 0, chunk - 1)[:, None])
    hidden = jax.lax.dynamic_update_slice_in_dim(hidden, h.astype(jnp.float32), c * chunk,
                                                 axis=1)
    picked = logits[:, 0]
    last_logits = jnp.where(here[:, None], picked, last_logits)
    return c + 1, cache, hidden, last_logits

  _, cache, hidden, last_logits = jax.lax.while_loop(
      lambda carry: carry[0] < num_chunks, body, (jnp.int32(0), cache, hidden, last_logits))
  return cache, hidden, last_logits


# --------------------------------------------------------------------------- proposals


def decode_streams(model, params, cache, layout, first_logits, num_streams, lengths,
                   context, start_pos, seed, purpose, sim, attempt_code, temperature):
  """Decodes `num_streams` proposal streams per row from first_logits [B, V].

  Stream 0 is greedy, stream a >= 1 samples with counters (purpose, sim, attempt_code[b,a],
  t, token). Each row decodes lengths[b] tokens (the loop runs the longest). Stream a's
  token t sits at slot stream_base + a*L + t, position start_pos[b] + t.
  Returns (cache, sequences [B, A, L], weights [B, A]).
  """
  cfg = layout.cfg
  batch = first_logits.shape[0]
  max_tokens = cfg.max_tokens_per_node
  slots = jnp.arange(layout.num_slots)
  stream_slots = layout.stream_base + jnp.arange(num_streams)[:, None] * max_tokens

  def choose(logits, t):
    return jax.vmap(lambda lg, sd, sm, code: propose.step_tokens(
        lg, temperature, cfg.sample_top, sd, purpose, sm, code, t))(
            logits, seed, sim, attempt_code)

  tokens, probs = choose(jnp.broadcast_to(first_logits[:, None, :],
                                          (batch, num_streams, first_logits.shape[-1])), 0)
  sequences = jnp.zeros((batch, num_streams, max_tokens), jnp.int32).at[:, :, 0].set(tokens)
  weights = probs

  def body(carry):
    t, cache, sequences, weights, tokens = carry
    write = jnp.broadcast_to(stream_slots[:, 0] + t - 1, (batch, num_streams))
    own = (slots[None, :] >= stream_slots) & (slots[None, :] <= stream_slots + t - 1)  # [A,S]
    mask = context[:, None, :] | own[None]
    positions = jnp.broadcast_to(start_pos[:, None] + t - 1, (batch, num_streams))
    logits, _, cache = model.forward(params, tokens, positions, cache, write, mask)
    new_tokens, new_probs = choose(logits, t)
    live = (t < lengths)[:, None]
    sequences = sequences.at[:, :, t].set(jnp.where(live, new_tokens, 0))
    weights = jnp.where(live, weights * new_probs, weights)
    return t + 1, cache, sequences, weights, new_tokens

  _, cache, sequences, weights, _ = jax.lax.while_loop(
      lambda carry: carry[0] < jnp.max(lengths), body,
      (jnp.int32(1), cache, sequences, weights, tokens))
  return cache, sequences, weights


# ------------------------------------------------------------------------------ search


def virtual_loss(tree, path, path_len, active):
  """Selection-time virtual loss: one visit of value -1 on path[:path_len] (one tree).

  path [D] int32, path_len () int32, active () bool. Only `parallel_leaves > 1` uses
  it, and the search restores the true statistics before any backup."""
  on = (jnp.arange(path.shape[0]) < path_len) & (path >= 0) & active
  idx = jnp.where(on, path, tree.num_nodes)
  n = tree.visits[jnp.minimum(idx, tree.num_nodes - 1)]
  q = tree.value[jnp.minimum(idx, tree.num_nodes - 1)]
  return tree.replace(visits=tree.visits.at[idx].set(n + 1.0, mode='drop'),
                      value=tree.value.at[idx].set((q * n - 1.0) / (n + 1.0), mode='drop'))


@flax.struct.dataclass
class RowView:
  """Per-row inputs of the model-calling steps: trunk_len, maxlen, last_token,
  answer_len, seeds, sim [R]; root_logits [R, V]; answer [R, A_cap]. Rows are the
  prompts (reference mode) or prompt x parallel leaf (R = B * P)."""
  trunk_len: jax.Array
  maxlen: jax.Array
  root_logits: jax.Array
  last_token: jax.Array
  answer: jax.Array
  answer_len: jax.Array
  seeds: jax.Array
  sim: jax.Array


class Searcher:
  """Builds the jitted generation for one (model, judge, config, prompt width).

  With cfg.parallel_leaves = P > 1 (virtual loss, not the reference), each tick selects
  P leaves per tree one after another, each selection seeing a virtual loss (a visit of
  value -1) on the paths chosen before it, evaluates them side by side as P rows per
  prompt (each row holds its own copy of the prompt's trunk), then expands and backs
  them up in order. Commits and budgets count P simulations per tick, so a step can
  run up to P - 1 simulations past its budget.
  """

  def __init__(self, model: ModelFns, judge, cfg: RainConfig, prompt_width: int,
               embedder=None):
    """embedder: what `cfg.similarity == 'minilm'` embeds with: an object with `dim` and
    `path_embeddings(embed_params, gen [R, G], gen_len [R], starts [R, K]) -> [R, K,
    dim]` (rain_jax.similarity.MiniLMEmbedder); unused otherwise."""
    if cfg.similarity == 'minilm' and embedder is None:
      raise ValueError("similarity='minilm' needs an embedder "
                       "(rain_jax.similarity.MiniLMEmbedder)")
    self.model = model
    self.judge = judge
    self.embedder = embedder
    self.cfg = cfg
    self.leaves = cfg.parallel_leaves
    self.layout = Layout(cfg, prompt_width)
    self.generate = jax.jit(self._generate)

  @property
  def embed_dim(self):
    """E: the width of the node embeddings (1 when similarity is off)."""
    if self.cfg.similarity == 'minilm':
      return self.embedder.dim
    return self.model.hidden_size if self.cfg.similarity == 'mean_hidden' else 1

  def _rep(self, x):
    """Tree-level [B, ...] -> row-level [B * P, ...] (each tree's value on its P rows)."""
    return jnp.repeat(x, self.leaves, axis=0)

  def _first(self, x):
    """Row-level [B * P, ...] -> tree-level [B, ...] (the first row of each tree)."""
    return x[::self.leaves]

  def _row_view(self, st, sim):
    return RowView(trunk_len=st.trunk_len, maxlen=st.maxlen, root_logits=st.root_logits,
                   last_token=st.last_token, answer=st.answer, answer_len=st.answer_len,
                   seeds=self._rep(st.seeds), sim=sim)

  # ---- setup

  def _init_state(self, params, prompt_tokens, prompt_lens, seeds, judge_inputs):
    cfg, layout, model = self.cfg, self.layout, self.model
    batch = prompt_tokens.shape[0]
    rows = batch * self.leaves
    prompt_tokens, prompt_lens = self._rep(prompt_tokens), self._rep(prompt_lens)
    judge_inputs = jax.tree.map(self._rep, judge_inputs)
    cache = model.init_cache(rows, layout.num_slots)
    context = jnp.zeros((rows, layout.num_slots), bool)
    cache, _, root_logits = feed_tokens(
        model, params, cache, prompt_tokens, prompt_lens, 0,
        jnp.zeros((rows,), jnp.int32), context, prompt_tokens.shape[1])
    tree = jax.vmap(lambda _: tree_lib.init_tree(cfg.num_nodes, cfg.max_children,
                                                 cfg.max_tokens_per_node,
                                                 self.embed_dim))(jnp.arange(batch))
    zeros = jnp.zeros((batch,), jnp.int32)
    m = cfg.max_new_tokens
    return SearchState(
        tree=tree, cache=cache, judge=self.judge.init_state(params, judge_inputs),
        seeds=seeds, trunk_len=prompt_lens,
        maxlen=jnp.minimum(cfg.maxlen, prompt_lens + cfg.max_new_tokens - 1),
        root_logits=root_logits,
        answer=jnp.zeros((rows, layout.answer_cap), jnp.int32),
        answer_len=jnp.zeros((rows,), jnp.int32),
        last_token=jnp.take_along_axis(prompt_tokens, (prompt_lens - 1)[:, None], 1)[:, 0],
        sim=zeros, step_sims=zeros,
        step_budget=jnp.full((batch,), max(cfg.max_T, 15), jnp.int32),
        early=jnp.zeros((batch,), bool), done=jnp.zeros((batch,), bool),
        stop_reason=zeros, stats={name: zeros for name in STAT_NAMES},
        dump_tokens=jnp.zeros((batch, m, cfg.max_children, cfg.max_tokens_per_node),
                              jnp.int32),
        dump_stats=jnp.zeros((batch, m, cfg.max_children, 4), jnp.float32),
        dump_sims=jnp.zeros((batch, m), jnp.int32))

  # ---- commit

  def _commit(self, params, tables, st, mask):
    """Commits the most visited child of the root for trees in `mask` (reference §2)."""
    cfg, layout = self.cfg, self.layout
    tree = st.tree
    root = tree.root
    child = jax.vmap(tree_lib.most_visited_child)(tree, root)
    no_child = mask & (child < 0)
    ok = mask & (child >= 0)
    safe = jnp.maximum(child, 0)
    trees = _rows(child)
    tokens = tree.tokens[trees, safe]                                  # [B, L]
    lens = jnp.where(ok, tree.num_tokens[trees, safe], 0)
    # Dump the root's children before the commit.
    commit_idx = jnp.minimum(st.stats['committed_sets'], cfg.max_new_tokens - 1)
    kids = tree.children[trees, root]                                  # [B, C]
    kid_safe = jnp.maximum(kids, 0)
    has = kids >= 0
    kid_stats = jnp.stack([tree.visits[trees[:, None], kid_safe],
                           tree.real_visits[trees[:, None], kid_safe].astype(jnp.float32),
                           tree.value[trees[:, None], kid_safe],
                           tree.prior[trees[:, None], kid_safe]], axis=-1)
    kid_live = (jnp.arange(cfg.max_tokens_per_node)[None, None, :]
                < tree.num_tokens[trees[:, None], kid_safe][..., None])
    dump_tokens = st.dump_tokens.at[trees, commit_idx].set(
        jnp.where((ok[:, None] & has)[..., None] & kid_live,
                  tree.tokens[trees[:, None], kid_safe], -1))
    dump_stats = st.dump_stats.at[trees, commit_idx].set(
        jnp.where((ok[:, None] & has)[..., None], kid_stats, 0.0))
    dump_sims = st.dump_sims.at[trees, commit_idx].set(jnp.where(ok, st.step_sims, 0))
    new_tree = _select_rows(ok, jax.vmap(tree_lib.commit)(tree, safe), tree)
    # Extend every row's trunk (policy and judge) with the committed tokens.
    tokens_r, lens_r, ok_r = self._rep(tokens), self._rep(lens), self._rep(ok)
    rows = _rows(lens_r)
    cache, logits = self._feed_trunk(params, st.cache, tokens_r, lens_r, st.trunk_len)
    judge_state = self.judge.commit(params, st.judge, tokens_r, lens_r, ok_r)
    pos = st.answer_len[:, None] + jnp.arange(cfg.max_tokens_per_node)[None, :]
    live = jnp.arange(cfg.max_tokens_per_node)[None, :] < lens_r[:, None]
    answer = st.answer.at[rows[:, None], jnp.where(live, pos, layout.answer_cap)].set(
        tokens_r, mode='drop')
    answer_len = st.answer_len + lens_r
    last_token = jnp.where(ok_r, tokens_r[rows, jnp.maximum(lens_r - 1, 0)], st.last_token)
    # Stop checks after the commit (every row of a tree holds the same answer).
    has_eos = jnp.any(live & (tokens_r == tables.eos_id), axis=1)
    has_marker = contains_stop_sequence(answer, answer_len, tables.stop_sequences) & \
        cfg.search_stops_at_turn_marker
    too_long = answer_len >= cfg.max_new_tokens
    has_eos, has_marker, too_long = (self._first(x) for x in (has_eos, has_marker, too_long))
    reason = jnp.where(no_child, NO_CHILDREN,
                       jnp.where(ok & has_marker, TURN_MARKER,
                                 jnp.where(ok & too_long, MAX_NEW_TOKENS,
                                           jnp.where(ok & has_eos, EOS, RUNNING))))
    done = st.done | (reason != RUNNING)
    carried = new_tree.real_visits[trees, new_tree.root]
    stats = dict(st.stats)
    stats['nodes_used'] = jnp.maximum(stats['nodes_used'], jnp.sum(tree.used, axis=1))
    stats['committed_sets'] = stats['committed_sets'] + ok
    stats['early_stops'] = stats['early_stops'] + (ok & st.early)
    return st.replace(
        tree=new_tree, cache=cache, judge=judge_state,
        trunk_len=st.trunk_len + lens_r,
        root_logits=jnp.where(ok_r[:, None], logits, st.root_logits),
        answer=answer, answer_len=answer_len, last_token=last_token,
        step_sims=jnp.where(mask, 0, st.step_sims),
        step_budget=jnp.where(mask, jnp.maximum(cfg.max_T - carried, 15), st.step_budget),
        early=jnp.where(mask, False, st.early),
        done=done, stop_reason=jnp.where(mask & (reason != RUNNING), reason, st.stop_reason),
        stats=stats, dump_tokens=dump_tokens, dump_stats=dump_stats, dump_sims=dump_sims)

  def _feed_trunk(self, params, cache, tokens, lens, trunk_len):
    """Appends tokens [R, L] (lens[r] real) to the policy trunk; logits after them."""
    context = slot_range_mask(self.layout.num_slots, 0, trunk_len)
    cache, _, logits = feed_tokens(self.model, params, cache, tokens, lens, trunk_len,
                                   trunk_len, context, self.cfg.max_tokens_per_node)
    return cache, logits

  # ---- model-calling steps on rows

  def _path_tokens(self, tree, tree_idx, path, depth):
    """Concatenated token sets of path[1..depth] of tree tree_idx[r]: tokens [R, P_cap],
    length [R], and the offset [R, D+1] where each path node's tokens start."""
    layout, cfg = self.layout, self.cfg
    nodes = jnp.maximum(path, 0)                                       # [R, D+1]
    t_idx = tree_idx[:, None]
    on_path = (jnp.arange(path.shape[1])[None, :] >= 1) & \
        (jnp.arange(path.shape[1])[None, :] <= depth[:, None])
    lens = jnp.where(on_path, tree.num_tokens[t_idx, nodes], 0)        # [R, D+1]
    offsets = jnp.cumsum(lens, axis=1) - lens
    t = jnp.arange(cfg.max_tokens_per_node)
    dest = jnp.where(t[None, None, :] < lens[..., None], offsets[..., None] + t,
                     layout.path_cap)
    src = tree.tokens[t_idx, nodes]                                    # [R, D+1, L]
    buf = jnp.zeros((depth.shape[0], layout.path_cap), jnp.int32)
    buf = buf.at[_rows(depth)[:, None, None], dest].set(src, mode='drop')
    return buf, jnp.sum(lens, axis=1), offsets

  def _feed_path(self, params, cache, view, path_buf, path_len):
    """Feeds the selected path after the trunk: (cache, hidden [R, P_cap, H], logits
    [R, V] after the path (the root's logits where the path is empty))."""
    layout = self.layout
    context = slot_range_mask(layout.num_slots, 0, view.trunk_len)
    cache, hidden, logits = feed_tokens(self.model, params, cache, path_buf, path_len,
                                        layout.path_base, view.trunk_len, context,
                                        self.cfg.feed_chunk)
    logits = jnp.where((path_len > 0)[:, None], logits, view.root_logits)
    return cache, hidden, logits

  def _context_after_path(self, view, path_len):
    layout = self.layout
    return (slot_range_mask(layout.num_slots, 0, view.trunk_len)
            | slot_range_mask(layout.num_slots, layout.path_base, path_len))

  def _propose(self, params, cache, view, first_logits, path_len, lengths, num_streams,
               num_keep, purpose, attempt_code):
    """Multi-token candidates after the path: (cache, tokens [R,K,L], lens, weights, valid)."""
    cfg = self.cfg
    context = self._context_after_path(view, path_len)
    cache, seqs, weights = decode_streams(
        self.model, params, cache, self.layout, first_logits, num_streams, lengths, context,
        view.trunk_len + path_len, view.seeds, purpose, view.sim, attempt_code,
        cfg.propose_temperature)
    cands = jax.vmap(lambda q, w, n: propose.select_candidates(q, w, n, num_keep))(
        seqs, weights, lengths)
    return (cache,) + cands

  # ---- selection (tree level)

  def _widen(self, params, view, tree, cache, node, path, depth, need):
    """Widening at `node` [B] for trees in `need` (reference §5); returns (tree, cache).

    Multi-token widening proposes on every row (R = B * P) with its tree's path and
    keeps the first row's candidates; with P = 1 rows and trees coincide."""
    cfg = self.cfg
    trees = _rows(node)
    first_child = jnp.maximum(tree.children[trees, node, 0], 0)
    one_token = tree.num_tokens[trees, first_child] == 1
    widened = jax.vmap(tree_lib.add_children_one_token)(tree, node)
    tree = _select_rows(need & one_token, widened, tree)
    multi = need & ~one_token

    def widen_multi(operands):
      tree, cache = operands
      rep = self._rep
      tree_idx = rep(trees)
      path_buf, path_len, _ = self._path_tokens(tree, tree_idx, rep(path), rep(depth))
      cache, _, _ = self._feed_path(params, cache, view, path_buf, path_len)
      first = jax.vmap(lambda i, v: propose.dense_from_top(i, v, self.model.vocab_size))(
          rep(tree.stored_top_ids[trees, node]), rep(tree.stored_top_logits[trees, node]))
      step = rep(tree.step[trees, node])
      streams = cfg.widen_attempts + 1
      code = 64 * step[:, None] + jnp.arange(streams)[None, :]
      cache, toks, lens, weights, valid = self._propose(
          params, cache, view, first, path_len, tree_lib.token_set_len(step), streams, 2,
          noise.WIDEN, code)
      toks, lens, weights, valid = (self._first(x) for x in (toks, lens, weights, valid))
      new_tree = jax.vmap(tree_lib.add_children_multi)(tree, node, toks, lens, weights, valid)
      return _select_rows(multi, new_tree, tree), cache

    return jax.lax.cond(jnp.any(multi), widen_multi, lambda x: x, (tree, cache))

  def _select(self, params, tree, cache, view, active):
    """Descends from the root (widening on the way): (tree, cache, leaf [B],
    path [B, D+1], depth [B]). `view` holds the rows the widening proposals run on."""
    cfg = self.cfg
    batch = active.shape[0]
    path = jnp.full((batch, cfg.max_depth + 1), -1, jnp.int32).at[:, 0].set(tree.root)

    def descending(tree, node, depth):
      return active & (tree.num_children[_rows(node), node] > 0) & (depth < cfg.max_depth)

    def body(carry):
      tree, cache, node, path, depth = carry
      going = descending(tree, node, depth)
      need = going & jax.vmap(tree_lib.should_add_child, in_axes=(0, 0, None, None))(
          tree, node, cfg.max_children, cfg.var_scale)
      tree, cache = jax.lax.cond(
          jnp.any(need),
          lambda ops: self._widen(params, view, ops[0], ops[1], node, path, depth, need),
          lambda ops: ops, (tree, cache))
      child = jax.vmap(tree_lib.select_child, in_axes=(0, 0, None))(tree, node, cfg.c_puct)
      node = jnp.where(going, child, node)
      depth = depth + going
      path = path.at[_rows(node), depth].set(jnp.where(going, node, path[_rows(node), depth]))
      return tree, cache, node, path, depth

    def cond(carry):
      tree, _, node, _, depth = carry
      return jnp.any(descending(tree, node, depth))

    zeros = jnp.zeros((batch,), jnp.int32)
    return jax.lax.while_loop(cond, body, (tree, cache, tree.root, path, zeros))

  def _select_leaves(self, params, st, active):
    """P leaves per tree, each selection under virtual loss from the earlier ones.

    Returns (tree with any widening, cache, leaves [B, P], paths [B, P, D+1],
    depths [B, P]). The returned tree carries no virtual loss."""
    tree, cache = st.tree, st.cache
    leaves, paths, depths = [], [], []
    for p in range(self.leaves):
      view = self._row_view(st, self._rep(st.sim + p))
      tree, cache, leaf, path, depth = self._select(params, tree, cache, view, active)
      leaves.append(leaf)
      paths.append(path)
      depths.append(depth)
      if p + 1 < self.leaves:
        tree = jax.vmap(virtual_loss)(tree, path, depth + 1, active)
    if self.leaves > 1:  # drop the virtual losses, keep structural changes (widening)
      tree = tree.replace(visits=jnp.where(st.tree.used, st.tree.visits, tree.visits),
                          value=jnp.where(st.tree.used, st.tree.value, tree.value))
    return tree, cache, jnp.stack(leaves, 1), jnp.stack(paths, 1), jnp.stack(depths, 1)

  # ---- one simulation

  def _rollout(self, params, tables, view, cache, logits, gen, gen_len, path_len, active,
               eos_seen, marker_seen):
    """Samples rollouts (§4.1) on rows. eos_seen, marker_seen [R]: whether the text
    before the rollout (answer + path) holds EOS / a turn marker.

    As the original: before each sample the rollout stops when the text is longer than
    maxlen, holds a new turn marker (unless the task ignores markers), ends a clause
    (unless truth), or holds EOS: any EOS for truth, only a sampled one for HH and adv.
    Returns (cache, gen, gen_len [R], rollout hidden sum [R, H], truncated [R])."""
    cfg, layout = self.cfg, self.layout
    batch = active.shape[0]
    context = self._context_after_path(view, path_len)
    rows = _rows(active)
    last = jnp.where(gen_len > 0, gen[rows, jnp.maximum(gen_len - 1, 0)], view.last_token)

    def wants_more(eos_seen, marker_seen, last, r):
      text_len = view.trunk_len + path_len + r
      stop = (text_len > view.maxlen) | eos_seen
      if cfg.search_stops_at_turn_marker:
        stop = stop | marker_seen
      if cfg.rollout_stops_at_clause_end:
        stop = stop | tables.clause_end[last]
      return ~stop

    if not cfg.rollout_stops_at_path_eos:
      eos_seen = jnp.zeros_like(eos_seen)
    more = active & wants_more(eos_seen, marker_seen, last, jnp.zeros_like(gen_len))
    zeros = jnp.zeros((batch,), jnp.int32)
    state = (cache, logits, gen, gen_len, zeros, more, eos_seen, marker_seen,
             jnp.zeros((batch, self.model.hidden_size), jnp.float32),
             jnp.zeros((batch,), bool))

    def body(state):
      cache, logits, gen, gen_len, r, rolling, eos_seen, marker_seen, hsum, trunc = state
      token = jax.vmap(propose.rollout_token)(logits, view.seeds, view.sim, r)
      gen = gen.at[rows, jnp.where(rolling, gen_len, gen.shape[1])].set(token, mode='drop')
      write = layout.rollout_base + jnp.minimum(r, cfg.max_rollout - 1)
      own = slot_range_mask(layout.num_slots, layout.rollout_base, r + 1)
      position = view.trunk_len + path_len + r
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

  def _node_embeddings(self, embed_params, gen, full_len, answer_len, offsets, path_len,
                       path_hidden, rollout_hidden):
    """[R, D+1, E]: the embedding each path node receives in backup (§6): of the text
    from the node's first token to the end of the rollout. offsets [R, D+1]: where each
    path node's tokens start within the path; path_hidden [R, P_cap, H] and
    rollout_hidden [R, H] (a sum) serve 'mean_hidden'."""
    cfg, layout = self.cfg, self.layout
    if cfg.similarity == 'none':
      return jnp.zeros(offsets.shape + (1,), jnp.float32)
    if cfg.similarity == 'minilm':
      starts = jnp.where(offsets < path_len[:, None], answer_len[:, None] + offsets, -1)
      return self.embedder.path_embeddings(embed_params, gen, full_len, starts)
    csum = jnp.concatenate([jnp.zeros_like(path_hidden[:, :1]),
                            jnp.cumsum(path_hidden, axis=1)], axis=1)    # [R, P_cap+1, H]
    total = jnp.take_along_axis(csum, path_len[:, None, None], axis=1)[:, 0]
    before = jnp.take_along_axis(csum, jnp.minimum(offsets, layout.path_cap)[..., None],
                                 axis=1)
    mean = total[:, None] - before + rollout_hidden[:, None]
    norm = jnp.linalg.norm(mean, axis=-1, keepdims=True)
    return mean / jnp.maximum(norm, 1e-12)

  def _evaluate_leaves(self, params, tables, st, tree, cache, leaf, path, depth, active,
                       embed_params):
    """Path feed, rollout, judgement and proposals for every row (one leaf per row).

    leaf, depth, active: [R]; path [R, D+1]. Returns (cache, judge state, dict of
    per-row results)."""
    cfg, layout = self.cfg, self.layout
    num_rows = leaf.shape[0]
    rows = _rows(leaf)
    tree_idx = rows // self.leaves
    view = self._row_view(st, self._rep(st.sim) + rows % self.leaves)
    path_buf, path_len, offsets = self._path_tokens(tree, tree_idx, path, depth)
    cache, path_hidden, leaf_logits = self._feed_path(params, cache, view, path_buf, path_len)
    # Generated text so far: answer + path.
    gen = jnp.zeros((num_rows, layout.gen_cap), jnp.int32)
    gen = jax.lax.dynamic_update_slice_in_dim(gen, st.answer, 0, axis=1)
    dest = st.answer_len[:, None] + jnp.arange(layout.path_cap)[None, :]
    dest = jnp.where(jnp.arange(layout.path_cap)[None, :] < path_len[:, None], dest,
                     layout.gen_cap)
    gen = gen.at[rows[:, None], dest].set(path_buf, mode='drop')
    gen_len = st.answer_len + path_len
    leaf_tokens = tree.tokens[tree_idx, leaf]
    leaf_live = jnp.arange(cfg.max_tokens_per_node)[None, :] < \
        tree.num_tokens[tree_idx, leaf][:, None]
    gen_live = jnp.arange(layout.gen_cap)[None, :] < gen_len[:, None]
    eos_seen = jnp.any(gen_live & (gen == tables.eos_id), axis=1)
    marker_seen = contains_stop_sequence(gen, gen_len, tables.stop_sequences)
    eos_in_leaf = jnp.any(leaf_live & (leaf_tokens == tables.eos_id), axis=1)
    terminal = ((st.trunk_len + path_len > st.maxlen)
                | (eos_seen if cfg.terminal_eos_in_path else eos_in_leaf)
                | (marker_seen & cfg.search_stops_at_turn_marker))
    depth_limited = active & (tree.num_children[tree_idx, leaf] > 0)
    # Self-evaluation.
    cache, gen, full_len, rollout_hidden, truncated = self._rollout(
        params, tables, view, cache, leaf_logits, gen, gen_len, path_len, active, eos_seen,
        marker_seen)
    value, judge_state = self.judge.evaluate(params, st.judge, gen, st.answer_len, full_len,
                                             active)
    # Proposals at the leaf.
    expand_rows = active & ~terminal & ~depth_limited
    lengths = tree_lib.token_set_len(tree.step[tree_idx, leaf])
    one = jax.vmap(propose.one_token_candidates, in_axes=(0, None, None, None))(
        leaf_logits, cfg.num_candidates, cfg.max_tokens_per_node, cfg.propose_temperature)
    top_ids, top_vals = propose.top_logits(leaf_logits, cfg.max_children)
    streams = cfg.sample_attempts + 1

    def multi(cache):
      code = jnp.broadcast_to(jnp.arange(streams), (num_rows, streams))
      return self._propose(params, cache, view, leaf_logits, path_len, lengths, streams,
                           cfg.num_candidates, noise.PROPOSE, code)

    def no_multi(cache):
      k, l = cfg.num_candidates, cfg.max_tokens_per_node
      return (cache, jnp.zeros((num_rows, k, l), jnp.int32),
              jnp.zeros((num_rows, k), jnp.int32), jnp.zeros((num_rows, k), jnp.float32),
              jnp.zeros((num_rows, k), bool))

    cache, m_tok, m_len, m_w, m_valid = jax.lax.cond(
        jnp.any(expand_rows & (lengths > 1)), multi, no_multi, cache)
    use_one = (lengths == 1)[:, None]
    candidates = (jnp.where(use_one[..., None], one[0], m_tok),
                  jnp.where(use_one, one[1], m_len), jnp.where(use_one, one[2], m_w),
                  jnp.where(use_one, one[3], m_valid))
    embeds = self._node_embeddings(embed_params, gen, full_len, st.answer_len, offsets,
                                   path_len, path_hidden, rollout_hidden)
    return cache, judge_state, dict(
        value=value, expand=expand_rows, candidates=candidates, top_ids=top_ids,
        top_vals=top_vals, embeds=embeds, truncated=truncated, depth_limited=depth_limited)

  def _simulate(self, params, tables, st, active, embed_params):
    """One tick: P simulations per tree in `active` (P = 1: reference §3 exactly)."""
    cfg, leaves = self.cfg, self.leaves
    trees = _rows(active)
    tree, cache, leaf, path, depth = self._select_leaves(params, st, active)
    flat = lambda x: x.reshape((-1,) + x.shape[2:])                    # [B, P, ...] -> [R, ...]
    active_r = self._rep(active)
    cache, judge_state, res = self._evaluate_leaves(
        params, tables, st, tree, cache, flat(leaf), flat(path), flat(depth), active_r,
        embed_params)
    unflat = lambda x: x.reshape((-1, leaves) + x.shape[1:])
    res = jax.tree.map(unflat, res)
    for p in range(leaves):
      pick = lambda x, p=p: x[:, p]
      node = leaf[:, p]
      # A leaf chosen twice in one tick is expanded once (the first time).
      fresh = pick(res['expand']) & (tree.num_children[trees, node] == 0)
      expanded = jax.vmap(tree_lib.expand)(tree, node, *(pick(c) for c in res['candidates']),
                                           pick(res['top_ids']), pick(res['top_vals']))
      tree = _select_rows(fresh, expanded, tree)
      backed = jax.vmap(tree_lib.backup, in_axes=(0, 0, 0, 0, 0, None, None, None))(
          tree, path[:, p], depth[:, p] + 1, pick(res['value']), pick(res['embeds']),
          cfg.sim_threshold, cfg.sim_weight, cfg.similarity != 'none')
      tree = _select_rows(active, backed, tree)
    # Early-stop rule (§2): the most visited child has fn > min_T and q > Vt.
    best = jax.vmap(tree_lib.most_visited_child)(tree, tree.root)
    safe = jnp.maximum(best, 0)
    early = (best >= 0) & (tree.real_visits[trees, safe] > cfg.min_T) & \
        (tree.value[trees, safe] > cfg.value_threshold)
    ran = active * leaves
    stats = dict(st.stats)
    stats['simulations'] = stats['simulations'] + ran
    stats['judge_calls'] = stats['judge_calls'] + ran
    stats['rollout_truncations'] = stats['rollout_truncations'] + \
        jnp.sum(res['truncated'] & active[:, None], axis=1)
    stats['depth_limited'] = stats['depth_limited'] + jnp.sum(res['depth_limited'], axis=1)
    stats['max_depth'] = jnp.maximum(stats['max_depth'],
                                     jnp.max(jnp.where(active[:, None], depth, 0), axis=1))
    return st.replace(
        tree=tree, cache=cache, judge=judge_state,
        sim=st.sim + ran, step_sims=st.step_sims + ran,
        early=jnp.where(active, early, st.early), stats=stats)

  # ---- the whole generation

  def _generate(self, params, tables, prompt_tokens, prompt_lens, seeds, judge_inputs,
                embed_params=None):
    """RAIN answers for a batch of B prompts.

    prompt_tokens [B, W] right-padded, prompt_lens [B], seeds [B] uint32, judge_inputs:
    the judge's per-prompt inputs ([B, ...] leaves), embed_params: the embedder's
    parameters ('minilm'; None otherwise). Returns a dict of [B, ...] arrays:
    answer [B, A_cap], answer_len, stop_reason, stats {name: [B]}, dump_tokens/stats/sims
    (root children at each commit), overflow (tree children that did not fit), widenings
    (children added by widening), shared_updates (sibling value shares)."""
    st = self._init_state(params, prompt_tokens, prompt_lens, seeds, judge_inputs)

    def body(st):
      need = ~st.done & (st.early | (st.step_sims >= st.step_budget))
      st = jax.lax.cond(jnp.any(need), lambda s: self._commit(params, tables, s, need),
                        lambda s: s, st)
      active = ~st.done
      return jax.lax.cond(jnp.any(active),
                          lambda s: self._simulate(params, tables, s, active, embed_params),
                          lambda s: s, st)

    st = jax.lax.while_loop(lambda st: jnp.any(~st.done), body, st)
    return dict(answer=self._first(st.answer), answer_len=self._first(st.answer_len),
                stop_reason=st.stop_reason, stats=st.stats, dump_tokens=st.dump_tokens,
                dump_stats=st.dump_stats, dump_sims=st.dump_sims, overflow=st.tree.overflow,
                widenings=st.tree.widenings, shared_updates=st.tree.shared_updates)
