"""The RAIN search: simulations and commits as `lax.while_loop`s inside one jitted call.

One call generates the answers of a batch of B prompts. Each prompt has its own tree,
budget and stopping; the trees advance in lockstep (one simulation per tree per tick)
and finished trees are masked out. For continuous batching the same ticks run over a
state the caller keeps on the devices: `start_fn` fills every tree, `advance_fn` ticks
until some tree finishes, `refill_fn` starts one tree afresh on a new prompt
(docs/engine.md §6). The semantics are docs/algorithm.md's (reference
mode); docs/engine.md lists where array capacities bound what the reference leaves
unbounded, and docs/architecture.md walks one simulation through the code.

This module keeps the trees and the loops. Every model call goes through the
Evaluator (rain_jax/evaluator.py), which owns the policy and judge caches at row level.
In reference mode a row is a tree; with cfg.parallel_leaves = P > 1 (virtual loss, not
the reference) each tree's P leaves of a tick are P rows (`LeafRows`), and the tree-level
steps run once per leaf.

Shapes: B trees, R = B * P rows, N tree nodes, C max children, L max tokens per node,
D max depth, M = max_new_tokens (commit records).
"""
import dataclasses

import flax
import jax
import jax.numpy as jnp

from rain_jax import kvcache, sharding
from rain_jax import tree as tree_lib
from rain_jax.config import RainConfig
from rain_jax.evaluator import Evaluator, Leaves, RowState, WideningQuery
from rain_jax.stopping import (EOS, MAX_NEW_TOKENS, NO_CHILDREN, RUNNING, TURN_MARKER,
                               SearchTables)

STAT_NAMES = ('simulations', 'committed_sets', 'judge_calls', 'early_stops',
              'rollout_truncations', 'depth_limited', 'max_depth', 'nodes_used',
              'positive_judgements', 'negative_judgements')
# Children of each root child recorded at a commit (G = min(C, this)): the level the
# tree pictures draw below the committed path (scripts/tree_pictures.py).
GRANDCHILDREN_RECORDED = 10


@flax.struct.dataclass
class CommitRecord:
  """The root's children at every commit: tokens [B, M, C, L] (-1 padded), stats
  [B, M, C, 4] (n, fn, q, p), sims [B, M] (simulations of each outer step), early
  [B, M] (the step ended by the early-stop rule), chosen [B, M] (the committed child's
  column in tokens/stats; -1 where nothing was committed), and the level below:
  grand_tokens [B, M, C, G, L], grand_stats [B, M, C, G, 4], the G most visited
  children of each root child (tree.root_grandchildren, G = grandchildren_kept(C))."""
  tokens: jax.Array
  stats: jax.Array
  sims: jax.Array
  early: jax.Array
  chosen: jax.Array
  grand_tokens: jax.Array
  grand_stats: jax.Array


def grandchildren_kept(max_children: int) -> int:
  """G: children recorded below each root child at a commit."""
  return min(max_children, GRANDCHILDREN_RECORDED)


@flax.struct.dataclass
class TreeState:
  """Tree level [B]: the tree, the simulation counters and the stopping state.

  sim: simulations so far (the noise counter); step_sims: simulations in the current
  outer step; step_budget: max(max_T, done + 15) - done; early: the early-stop rule held
  after the last simulation; stop_reason: index into stopping.STOP_REASONS; stats:
  {STAT_NAMES: [B] int32}."""
  tree: tree_lib.Tree
  sim: jax.Array
  step_sims: jax.Array
  step_budget: jax.Array
  early: jax.Array
  done: jax.Array
  stop_reason: jax.Array
  stats: dict
  record: CommitRecord


@flax.struct.dataclass
class SearchState:
  trees: TreeState
  rows: RowState


@dataclasses.dataclass(frozen=True)
class LeafRows:
  """Trees [B, ...] <-> rows [B * P, ...]: tree b's P leaves are rows b*P .. b*P+P-1."""
  leaves: int

  def spread(self, x):
    """[B, ...] -> [B * P, ...], each tree's value on its P rows."""
    return jnp.repeat(x, self.leaves, axis=0)

  def first(self, x):
    """[B * P, ...] -> [B, ...], each tree's first row."""
    return x[::self.leaves]

  def unflatten(self, x):
    """[B * P, ...] -> [B, P, ...]."""
    return x.reshape((-1, self.leaves) + x.shape[1:])


def init_trees(cfg: RainConfig, embed_dim: int, batch: int, mesh=None) -> TreeState:
  """The empty tree state of `batch` trees with node embeddings of width embed_dim (rows
  over the batch axes of `mesh`, when given)."""
  m, c, g = cfg.max_new_tokens, cfg.max_children, grandchildren_kept(cfg.max_children)
  tree = jax.vmap(lambda _: tree_lib.init_tree(
      cfg.num_nodes, cfg.max_children, cfg.max_tokens_per_node, embed_dim))(jnp.arange(batch))
  zeros = jnp.zeros((batch,), jnp.int32)
  return sharding.constrain_rows(TreeState(
      tree=tree, sim=zeros, step_sims=zeros,
      step_budget=jnp.full((batch,), max(cfg.max_T, 15), jnp.int32),
      early=jnp.zeros((batch,), bool), done=jnp.zeros((batch,), bool), stop_reason=zeros,
      stats={name: zeros for name in STAT_NAMES},
      record=CommitRecord(
          tokens=jnp.zeros((batch, m, c, cfg.max_tokens_per_node), jnp.int32),
          stats=jnp.zeros((batch, m, c, 4), jnp.float32),
          sims=jnp.zeros((batch, m), jnp.int32), early=jnp.zeros((batch, m), bool),
          chosen=jnp.full((batch, m), -1, jnp.int32),
          grand_tokens=jnp.zeros((batch, m, c, g, cfg.max_tokens_per_node), jnp.int32),
          grand_stats=jnp.zeros((batch, m, c, g, 4), jnp.float32))), mesh)


def write_rows(full, fresh, start):
  """`full` with the rows of `fresh` written from row `start` (int or int32 scalar) on.

  Both are pytrees of the same structure whose leaves differ only in their number of
  rows; a leaf's row axis is the one axis where the two shapes differ (the batch axis of
  [L, R, KVH, S, D] caches is 1, of most leaves 0). A leaf of equal shapes (R equal on
  both sides) is taken whole from `fresh`."""
  def put(old, new):
    differ = [i for i, (a, b) in enumerate(zip(old.shape, new.shape)) if a != b]
    if old.ndim != new.ndim or len(differ) > 1:
      raise ValueError(f'cannot write rows of shape {new.shape} into {old.shape}')
    if not differ:
      return new.astype(old.dtype)
    return jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), start, differ[0])
  return jax.tree.map(put, full, fresh)


def _select_rows(mask, new, old):
  """Per-row choice between two pytrees with a leading batch axis."""
  def pick(a, b):
    return jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)


def _describe_leaf(tree, path, depth, path_cap):
  """Per tree and leaf: (path tokens [P_cap], path length, offsets [D+1], leaf tokens
  [L], leaf token count, children's token-set length, leaf already has children)."""
  tokens, length, offsets = tree_lib.path_tokens(tree, path, depth, path_cap)
  leaf = path[depth]
  return (tokens, length, offsets, tree.tokens[leaf], tree.num_tokens[leaf],
          tree_lib.token_set_len(tree.step[leaf]), tree.num_children[leaf] > 0)


class Searcher:
  """Builds the jitted generation for one (model, judge, config, prompt width).

  With cfg.parallel_leaves = P > 1 each tick selects P leaves per tree one after
  another, each selection seeing a virtual loss (a visit of value -1) on the paths chosen
  before it, evaluates them side by side as P rows per prompt (each row holds its own
  copy of the prompt's trunk), then expands and backs them up in order. Commits and
  budgets count P simulations per tick, so a step can run up to P - 1 simulations past
  its budget.
  """

  def __init__(self, model: kvcache.ModelFns, judge, cfg: RainConfig, prompt_width: int,
               embedder=None, mesh=None, separate_judge=False):
    """judge: a rain_jax.judge.Judge whose layout (if any) matches this search's (see
    kvcache.judge_layout); embedder, separate_judge: see evaluator.Evaluator (with a
    separate judge the parameters are (policy, judge)); mesh: when given, the tree
    state (trees, counters, commit records) is constrained to rows over the mesh's batch
    axes. `generate` is the search jitted as it is; `generate_fn` the same function for
    callers that jit it with their own shardings and layouts (engine.RainRunner)."""
    self.cfg = cfg
    self.mesh = mesh
    self.layout = kvcache.policy_layout(cfg, prompt_width)
    self.evaluator = Evaluator(model, judge, cfg, self.layout, embedder,
                               separate_judge=separate_judge)
    self.rows = LeafRows(cfg.parallel_leaves)
    self.generate_fn = self._generate
    self.generate = jax.jit(self._generate)
    # Continuous batching (engine.RainRunner.run_stream): start / refill / advance.
    self.start_fn, self.refill_fn, self.advance_fn = self._start, self._refill, self._advance

  def _init_state(self, params, prompt_tokens, prompt_lens, seeds, judge_inputs):
    spread = self.rows.spread
    rows = self.evaluator.init_rows(params, spread(prompt_tokens), spread(prompt_lens),
                                    spread(seeds), jax.tree.map(spread, judge_inputs))
    return SearchState(trees=init_trees(self.cfg, self.evaluator.embed_dim,
                                        prompt_tokens.shape[0], self.mesh), rows=rows)

  # ---- commit (§2)

  def _commit(self, params, tables, st, mask):
    """Commits the most visited child of the root for trees in `mask` [B]."""
    cfg, ts, tree = self.cfg, st.trees, st.trees.tree
    child = jax.vmap(tree_lib.most_visited_child)(tree, tree.root)
    ok = mask & (child >= 0)
    safe = jnp.maximum(child, 0)
    trees = jnp.arange(child.shape[0])
    tokens, lens = tree.tokens[trees, safe], tree.num_tokens[trees, safe]
    at = (trees, jnp.minimum(ts.stats['committed_sets'], cfg.max_new_tokens - 1))
    kid_tokens, kid_stats = jax.vmap(tree_lib.root_children)(tree)
    grand_tokens, grand_stats = jax.vmap(tree_lib.root_grandchildren, in_axes=(0, None))(
        tree, grandchildren_kept(cfg.max_children))
    column = jnp.argmax(tree.children[trees, tree.root] == child[:, None], axis=1)
    rec, kept = ts.record, ok[:, None, None, None]
    record = CommitRecord(
        tokens=rec.tokens.at[at].set(jnp.where(ok[:, None, None], kid_tokens, -1)),
        stats=rec.stats.at[at].set(jnp.where(ok[:, None, None], kid_stats, 0.0)),
        sims=rec.sims.at[at].set(jnp.where(ok, ts.step_sims, 0)),
        early=rec.early.at[at].set(ok & ts.early),
        chosen=rec.chosen.at[at].set(jnp.where(ok, column, -1).astype(jnp.int32)),
        grand_tokens=rec.grand_tokens.at[at].set(jnp.where(kept, grand_tokens, -1)),
        grand_stats=rec.grand_stats.at[at].set(jnp.where(kept, grand_stats, 0.0)))
    new_tree = _select_rows(ok, jax.vmap(tree_lib.commit)(tree, safe), tree)
    spread = self.rows.spread
    rows, stops = self.evaluator.commit(params, tables, st.rows, spread(tokens), spread(lens),
                                        spread(ok))
    eos, marker, too_long = (self.rows.first(x) for x in
                             (stops.eos, stops.turn_marker, stops.max_new_tokens))
    reason = jnp.where(mask & (child < 0), NO_CHILDREN,
                       jnp.where(ok & marker, TURN_MARKER,
                                 jnp.where(ok & too_long, MAX_NEW_TOKENS,
                                           jnp.where(ok & eos, EOS, RUNNING))))
    carried = new_tree.real_visits[trees, new_tree.root]
    stats = dict(ts.stats)
    stats['nodes_used'] = jnp.maximum(stats['nodes_used'], jnp.sum(tree.used, axis=1))
    stats['committed_sets'] = stats['committed_sets'] + ok
    stats['early_stops'] = stats['early_stops'] + (ok & ts.early)
    return SearchState(rows=rows, trees=ts.replace(
        tree=new_tree, step_sims=jnp.where(mask, 0, ts.step_sims),
        step_budget=jnp.where(mask, jnp.maximum(cfg.max_T - carried, 15), ts.step_budget),
        early=jnp.where(mask, False, ts.early), done=ts.done | (reason != RUNNING),
        stop_reason=jnp.where(mask & (reason != RUNNING), reason, ts.stop_reason),
        stats=stats, record=record))

  # ---- selection (§3, §5)

  def _widen(self, params, tree, rows, place, need, sim):
    """Widening at the node of place = (node [B], path [B, D+1], depth [B]) for trees in
    `need` [B]; returns (tree, rows).

    Multi-token widening proposes on every row with its tree's path and keeps each
    tree's first row's candidates (with P = 1 rows and trees coincide)."""
    node, path, depth = place
    trees = jnp.arange(node.shape[0])
    first_child = jnp.maximum(tree.children[trees, node, 0], 0)
    one_token = tree.num_tokens[trees, first_child] == 1
    widened = jax.vmap(tree_lib.add_children_one_token)(tree, node)
    tree = _select_rows(need & one_token, widened, tree)
    multi = need & ~one_token

    def widen_multi(operands):
      tree, rows = operands
      path_buf, path_len, _ = jax.vmap(tree_lib.path_tokens, in_axes=(0, 0, 0, None))(
          tree, path, depth, self.layout.path_cap)
      query = WideningQuery(
          path_tokens=path_buf, path_len=path_len, top_ids=tree.stored_top_ids[trees, node],
          top_logits=tree.stored_top_logits[trees, node], step=tree.step[trees, node],
          sim=sim)
      rows, cands = self.evaluator.widen(params, rows, jax.tree.map(self.rows.spread, query))
      cands = jax.tree.map(self.rows.first, cands)
      new_tree = jax.vmap(tree_lib.add_children_multi)(tree, node, cands.tokens, cands.lens,
                                                        cands.weights, cands.valid)
      return _select_rows(multi, new_tree, tree), rows

    return jax.lax.cond(jnp.any(multi), widen_multi, lambda x: x, (tree, rows))

  def _select(self, params, tree, rows, active, sim):
    """Descends from the root, widening on the way: (tree, rows, path [B, D+1],
    depth [B]); sim [B] is the widening's noise counter."""
    cfg = self.cfg
    trees = jnp.arange(active.shape[0])
    path = jnp.full((active.shape[0], cfg.max_depth + 1), -1, jnp.int32).at[:, 0].set(tree.root)

    def descending(tree, node, depth):
      return active & (tree.num_children[trees, node] > 0) & (depth < cfg.max_depth)

    def body(carry):
      tree, rows, node, path, depth = carry
      going = descending(tree, node, depth)
      need = going & jax.vmap(tree_lib.should_add_child, in_axes=(0, 0, None, None))(
          tree, node, cfg.max_children, cfg.var_scale)
      tree, rows = jax.lax.cond(
          jnp.any(need),
          lambda ops: self._widen(params, ops[0], ops[1], (node, path, depth), need, sim),
          lambda ops: ops, (tree, rows))
      child = jax.vmap(tree_lib.select_child, in_axes=(0, 0, None))(tree, node, cfg.c_puct)
      node = jnp.where(going, child, node)
      depth = depth + going
      path = path.at[trees, depth].set(jnp.where(going, node, path[trees, depth]))
      return tree, rows, node, path, depth

    tree, rows, _, path, depth = jax.lax.while_loop(
        lambda c: jnp.any(descending(c[0], c[2], c[4])), body,
        (tree, rows, tree.root, path, jnp.zeros_like(trees)))
    return tree, rows, path, depth

  def _select_leaves(self, params, st, active):
    """P leaves per tree, each selection under virtual loss from the earlier ones.
    Returns (tree with any widening but no virtual loss, rows, paths [B, P, D+1],
    depths [B, P])."""
    tree, rows, paths, depths = st.trees.tree, st.rows, [], []
    for p in range(self.rows.leaves):
      tree, rows, path, depth = self._select(params, tree, rows, active, st.trees.sim + p)
      paths.append(path)
      depths.append(depth)
      if p + 1 < self.rows.leaves:
        tree = jax.vmap(tree_lib.virtual_loss)(tree, path, depth + 1, active)
    if self.rows.leaves > 1:  # drop the virtual losses, keep structural changes (widening)
      before = st.trees.tree
      tree = tree.replace(visits=jnp.where(before.used, before.visits, tree.visits),
                          value=jnp.where(before.used, before.value, tree.value))
    return tree, rows, jnp.stack(paths, 1), jnp.stack(depths, 1)

  # ---- one simulation (§3 to §6)

  def _simulate(self, params, tables, st, active, embed_params):
    """One tick: P simulations per tree in `active` [B] (P = 1: reference §3 exactly)."""
    cfg, ts, leaf_rows = self.cfg, st.trees, self.rows
    tree, rows, paths, depths = self._select_leaves(params, st, active)
    described = jax.vmap(jax.vmap(_describe_leaf, in_axes=(None, 0, 0, None)),
                         in_axes=(0, 0, 0, None))(tree, paths, depths, self.layout.path_cap)
    flat = [x.reshape((-1,) + x.shape[2:]) for x in described]      # [B, P, ...] -> [R, ...]
    active_rows = leaf_rows.spread(active)
    leaf_index = jnp.arange(active_rows.shape[0]) % leaf_rows.leaves
    leaves = Leaves(*flat[:6], depth_limited=flat[6] & active_rows, active=active_rows,
                    sim=leaf_rows.spread(ts.sim) + leaf_index)
    rows, res = self.evaluator.evaluate(params, tables, rows, leaves, embed_params)
    res = jax.tree.map(leaf_rows.unflatten, res)
    trees = jnp.arange(active.shape[0])
    for p in range(leaf_rows.leaves):
      node, pick = paths[trees, p, depths[:, p]], (lambda x, p=p: x[:, p])
      fresh = pick(res.expand) & (tree.num_children[trees, node] == 0)  # expanded once
      c = res.candidates
      expanded = jax.vmap(tree_lib.expand)(tree, node, pick(c.tokens), pick(c.lens),
                                           pick(c.weights), pick(c.valid), pick(res.top_ids),
                                           pick(res.top_logits))
      tree = _select_rows(fresh, expanded, tree)
      backed = jax.vmap(tree_lib.backup, in_axes=(0, 0, 0, 0, 0, None, None, None))(
          tree, paths[:, p], depths[:, p] + 1, pick(res.value), pick(res.embeddings),
          cfg.sim_threshold, cfg.sim_weight, cfg.similarity != 'none')
      tree = _select_rows(active, backed, tree)
    # Early-stop rule (§2): the most visited child has fn > min_T and q > Vt.
    best = jax.vmap(tree_lib.most_visited_child)(tree, tree.root)
    safe = jnp.maximum(best, 0)
    early = (best >= 0) & (tree.real_visits[trees, safe] > cfg.min_T) & \
        (tree.value[trees, safe] > cfg.value_threshold)
    ran = active * leaf_rows.leaves
    depth_limited = leaf_rows.unflatten(leaves.depth_limited)
    stats = dict(ts.stats)
    stats['simulations'] = stats['simulations'] + ran
    stats['judge_calls'] = stats['judge_calls'] + ran
    judged = jnp.where(active[:, None], res.value, 0.0)             # [B, P]
    stats['positive_judgements'] = stats['positive_judgements'] + jnp.sum(judged > 0, axis=1)
    stats['negative_judgements'] = stats['negative_judgements'] + jnp.sum(judged < 0, axis=1)
    stats['rollout_truncations'] = stats['rollout_truncations'] + \
        jnp.sum(res.truncated & active[:, None], axis=1)
    stats['depth_limited'] = stats['depth_limited'] + jnp.sum(depth_limited, axis=1)
    stats['max_depth'] = jnp.maximum(stats['max_depth'],
                                     jnp.max(jnp.where(active[:, None], depths, 0), axis=1))
    return SearchState(rows=rows, trees=ts.replace(
        tree=tree, sim=ts.sim + ran, step_sims=ts.step_sims + ran,
        early=jnp.where(active, early, ts.early), stats=stats))

  # ---- the whole generation

  def _tick(self, params, tables, st, embed_params):
    """One tick: commit the trees whose outer step is over, then one simulation (P
    leaves) for every tree not done."""
    ts = st.trees
    need = ~ts.done & (ts.early | (ts.step_sims >= ts.step_budget))
    st = jax.lax.cond(jnp.any(need), lambda s: self._commit(params, tables, s, need),
                      lambda s: s, st)
    active = ~st.trees.done
    st = jax.lax.cond(jnp.any(active),
                      lambda s: self._simulate(params, tables, s, active, embed_params),
                      lambda s: s, st)
    return st.replace(trees=sharding.constrain_rows(st.trees, self.mesh))

  def _outputs(self, st):
    """The per-tree results of a state, a dict of [B, ...] arrays (see `_generate`)."""
    ts = st.trees
    return dict(answer=self.rows.first(st.rows.answer),
                answer_len=self.rows.first(st.rows.answer_len), stop_reason=ts.stop_reason,
                stats=ts.stats, dump_tokens=ts.record.tokens, dump_stats=ts.record.stats,
                dump_sims=ts.record.sims, dump_early=ts.record.early,
                dump_chosen=ts.record.chosen, dump_grand_tokens=ts.record.grand_tokens,
                dump_grand_stats=ts.record.grand_stats, overflow=ts.tree.overflow,
                widenings=ts.tree.widenings, shared_updates=ts.tree.shared_updates,
                done=ts.done)

  def _generate(self, params, tables: SearchTables, prompt_tokens, prompt_lens, seeds,
                judge_inputs, embed_params=None):
    """RAIN answers for a batch of B prompts.

    prompt_tokens [B, W] right-padded, prompt_lens [B], seeds [B] uint32, judge_inputs:
    the judge's per-prompt inputs ([B, ...] leaves), embed_params: the embedder's
    parameters ('minilm'; None otherwise). Returns a dict of [B, ...] arrays:
    answer [B, A_cap], answer_len, stop_reason, stats {name: [B]}, dump_tokens/stats/sims/
    early/chosen/grand_tokens/grand_stats (the CommitRecord: root children and the level
    below at each commit), overflow (tree children that did not fit), widenings
    (children added by widening), shared_updates (sibling value shares), done (all
    True here)."""
    st = self._init_state(params, prompt_tokens, prompt_lens, seeds, judge_inputs)
    st = jax.lax.while_loop(lambda st: jnp.any(~st.trees.done),
                            lambda st: self._tick(params, tables, st, embed_params), st)
    return self._outputs(st)

  # ---- continuous batching: the same ticks over a state the caller keeps and refills

  def _start(self, params, prompt_tokens, prompt_lens, seeds, judge_inputs, filled):
    """A search state for B trees (arguments as `_generate`); trees where filled [B] is
    False start done: empty rows that no tick touches until `_refill` gives them a
    prompt."""
    st = self._init_state(params, prompt_tokens, prompt_lens, seeds, judge_inputs)
    return st.replace(trees=st.trees.replace(done=st.trees.done | ~filled))

  def _refill(self, params, st, tree, prompt_tokens, prompt_lens, seeds, judge_inputs):
    """`st` with tree `tree` (int32 scalar) and its P rows started afresh on one new
    prompt: prompt_tokens [1, W], prompt_lens [1], seeds [1], judge_inputs [1, ...].
    The new tree's caches, tree, counters and records are exactly those `_init_state`
    gives a batch of that one prompt; the other trees are untouched."""
    fresh = self._init_state(params, prompt_tokens, prompt_lens, seeds, judge_inputs)
    trees = write_rows(st.trees, fresh.trees, tree)
    return SearchState(trees=sharding.constrain_rows(trees, self.mesh),
                       rows=write_rows(st.rows, fresh.rows, tree * self.rows.leaves))

  def _advance(self, params, tables: SearchTables, st, embed_params=None):
    """Ticks until a tree that was searching at the call finishes, or none searches.
    Returns (state, `_outputs` of it): `done` tells the caller which trees to read out
    (those it had filled and that are done now)."""
    entry_done = st.trees.done

    def going(st):
      done = st.trees.done
      return jnp.any(~done) & ~jnp.any(done & ~entry_done)

    st = jax.lax.while_loop(going, lambda st: self._tick(params, tables, st, embed_params),
                            st)
    return st, self._outputs(st)
