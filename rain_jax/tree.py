"""The RAIN search tree as fixed-size JAX arrays (one tree; `jax.vmap` over prompts).

Every function here takes and returns ONE tree with static shapes, so the search can
`jax.vmap` it over a batch of prompts and `jax.jit` the whole generation. The semantics
are those of docs/algorithm.md: §1 (node statistics), §3 (selection
and expansion), §5 (widening), §6 (backup with similarity sharing) and §2 (commit),
with the ordering facts of docs/engine.md §4 deciding every "first maximum wins" tie.

Shape letters: N node capacity, C max children per node (the reference's 20; it also
bounds the stored candidate lists, since widening reads at most #children + 1 <= C
entries), L max tokens per node (10), E embedding dimension, D path capacity.

Slots are never compacted: a commit frees the slots outside the kept subtree in place
and later expansions reuse the lowest free slots. Children that find no free slot (or no free
child column) are not created and are counted in `overflow`, never dropped silently.
"""
import jax
import jax.numpy as jnp
from flax import struct

ROOT_PRIOR_KEEP = 0.75
ROOT_PRIOR_UNIFORM = 0.25
QHAT_EPS = 1e-5
COSINE_EPS = 1e-8


@struct.dataclass
class Tree:
  """One RAIN search tree.

  Attributes:
    parent: [N] int32, parent slot; -1 for the root and for unused slots.
    children: [N, C] int32, child slots in the order they were added; -1 where empty.
    num_children: [N] int32.
    tokens: [N, L] int32, the node's token set (0 beyond `num_tokens`).
    num_tokens: [N] int32, 1..L for a non-root node.
    prior: [N] float32, p.
    visits: [N] float32, n (fractional through similarity sharing).
    real_visits: [N] int32, fn.
    value: [N] float32, q.
    embedding: [N, E] float32, running-mean embedding over real visits.
    has_embedding: [N] bool.
    step: [N] int32, depth counted from the first root of the generation.
    used: [N] bool, the slot holds a node of the current tree.
    stored_top_ids: [N, C] int32, top token ids at expansion in descending logit
      order (-1 where empty), read by one-token widening.
    stored_top_logits: [N, C] float32, their raw logits (-inf where empty).
    cand_tokens: [N, C, L] int32, the stored multi-token candidate list, greedy first.
    cand_lens: [N, C] int32.
    cand_weights: [N, C] float32, unnormalised candidate weights.
    num_cands: [N] int32, valid entries of the candidate list.
    root: () int32, slot of the current root.
    min_q: () float32, starts at -1, only ever decreases within a generation.
    max_q: () float32, starts at +1, only ever increases within a generation.
    overflow: () int32, children that could not be allocated.
    widenings: () int32, children added by widening (should_add_child, §5).
    shared_updates: () int32, sibling value shares made by backups (§6).
  """
  parent: jax.Array
  children: jax.Array
  num_children: jax.Array
  tokens: jax.Array
  num_tokens: jax.Array
  prior: jax.Array
  visits: jax.Array
  real_visits: jax.Array
  value: jax.Array
  embedding: jax.Array
  has_embedding: jax.Array
  step: jax.Array
  used: jax.Array
  stored_top_ids: jax.Array
  stored_top_logits: jax.Array
  cand_tokens: jax.Array
  cand_lens: jax.Array
  cand_weights: jax.Array
  num_cands: jax.Array
  root: jax.Array
  min_q: jax.Array
  max_q: jax.Array
  overflow: jax.Array
  widenings: jax.Array
  shared_updates: jax.Array

  # The static sizes N, C, L and E, read from the array shapes (ints).
  num_nodes = property(lambda self: self.parent.shape[-1])
  max_children = property(lambda self: self.children.shape[-1])
  max_tokens = property(lambda self: self.tokens.shape[-1])
  embed_dim = property(lambda self: self.embedding.shape[-1])


def init_tree(num_nodes, max_children, max_tokens, embed_dim, root_step=0) -> Tree:
  """An empty tree whose root (no tokens, no visits) sits in slot 0.

  Args:
    num_nodes: N, node capacity (>= 1).
    max_children: C, children per node and stored candidates per node (>= 1).
    max_tokens: L, tokens per node (>= 1).
    embed_dim: E (>= 1).
    root_step: the root's step (int or () int32 array).

  Returns:
    A Tree with the shapes listed on `Tree`.
  """
  for name, size in (('num_nodes', num_nodes), ('max_children', max_children),
                     ('max_tokens', max_tokens), ('embed_dim', embed_dim)):
    if not isinstance(size, int) or size < 1:
      raise ValueError(f'{name} must be a positive int, got {size!r}')
  n, c, l, e = num_nodes, max_children, max_tokens, embed_dim
  return Tree(
      parent=jnp.full((n,), -1, jnp.int32),
      children=jnp.full((n, c), -1, jnp.int32),
      num_children=jnp.zeros((n,), jnp.int32),
      tokens=jnp.zeros((n, l), jnp.int32),
      num_tokens=jnp.zeros((n,), jnp.int32),
      prior=jnp.zeros((n,), jnp.float32),
      visits=jnp.zeros((n,), jnp.float32),
      real_visits=jnp.zeros((n,), jnp.int32),
      value=jnp.zeros((n,), jnp.float32),
      embedding=jnp.zeros((n, e), jnp.float32),
      has_embedding=jnp.zeros((n,), bool),
      step=jnp.zeros((n,), jnp.int32).at[0].set(root_step),
      used=jnp.zeros((n,), bool).at[0].set(True),
      stored_top_ids=jnp.full((n, c), -1, jnp.int32),
      stored_top_logits=jnp.full((n, c), -jnp.inf, jnp.float32),
      cand_tokens=jnp.zeros((n, c, l), jnp.int32),
      cand_lens=jnp.zeros((n, c), jnp.int32),
      cand_weights=jnp.zeros((n, c), jnp.float32),
      num_cands=jnp.zeros((n,), jnp.int32),
      root=jnp.asarray(0, jnp.int32),
      min_q=jnp.asarray(-1.0, jnp.float32),
      max_q=jnp.asarray(1.0, jnp.float32),
      overflow=jnp.asarray(0, jnp.int32),
      widenings=jnp.asarray(0, jnp.int32),
      shared_updates=jnp.asarray(0, jnp.int32),
  )


def token_set_len(step):
  """Length of the token sets proposed at a node of this step.

  Step 0 -> 1 token, 1 -> 2, 2 -> 4, >= 3 -> 10 (reference §1).

  Args:
    step: int32 array of any shape.

  Returns:
    int32 array of the same shape.
  """
  step = jnp.asarray(step)
  return jnp.where(step <= 0, 1, jnp.where(step == 1, 2, jnp.where(step == 2, 4, 10)))


def _child_slots(tree, node):
  """Children of `node`: slots [C] int32 (-1 empty), valid [C] bool, safe slots [C]."""
  kids = tree.children[node]
  valid = kids >= 0
  return kids, valid, jnp.where(valid, kids, 0)


def _smooth_root_priors(priors, mask):
  """Root smoothing p <- 0.75 p + 0.25 / m over the m masked entries, renormalised.

  Args:
    priors: [M] float32.
    mask: [M] bool.

  Returns:
    [M] float32, zero outside the mask.
  """
  count = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
  mixed = jnp.where(mask, ROOT_PRIOR_KEEP * priors + ROOT_PRIOR_UNIFORM / count, 0.0)
  return _normalise(mixed, mask)


def _normalise(weights, mask):
  """weights / sum(weights over mask), zero outside the mask; [M] -> [M] float32."""
  masked = jnp.where(mask, weights, 0.0)
  total = jnp.sum(masked)
  return jnp.where(mask, masked / jnp.where(total > 0, total, 1.0), 0.0)


def _priors_from_weights(tree, node, weights, mask):
  """Normalised priors [M] of the masked entries, with root smoothing at the root."""
  priors = _normalise(weights, mask)
  return jnp.where(node == tree.root, _smooth_root_priors(priors, mask), priors)


def puct_scores(tree: Tree, node, c_puct) -> jax.Array:
  """PUCT scores of `node`'s children (reference §3); -inf where no child.

  score(c) = qhat + c_puct * c.p * sqrt(node.n) / (1 + c.n), with qhat = 0 when c.n == 0
  else (c.q - min_q) / (max_q - min_q + 1e-5).

  Args:
    tree: the tree.
    node: () int32, a used slot.
    c_puct: () float, the exploration constant (2 in the reference).

  Returns:
    [C] float32.
  """
  _, valid, safe = _child_slots(tree, node)
  n = tree.visits[safe]
  span = tree.max_q - tree.min_q + QHAT_EPS
  qhat = jnp.where(n == 0, 0.0, (tree.value[safe] - tree.min_q) / span)
  explore = c_puct * tree.prior[safe] * jnp.sqrt(tree.visits[node]) / (1.0 + n)
  return jnp.where(valid, qhat + explore, -jnp.inf)


def select_child(tree: Tree, node, c_puct) -> jax.Array:
  """The child slot with the highest PUCT score (first maximum wins); -1 if none.

  Args:
    tree: the tree.
    node: () int32, a used slot.
    c_puct: () float.

  Returns:
    () int32.
  """
  kids, valid, _ = _child_slots(tree, node)
  best = jnp.argmax(puct_scores(tree, node, c_puct))
  return jnp.where(jnp.any(valid), kids[best], -1).astype(jnp.int32)


def most_visited_child(tree: Tree, node) -> jax.Array:
  """The child of `node` (() int32, a used slot) with the largest n; ties -> larger q;
  then the first. () int32, -1 if `node` has no child."""
  kids, valid, safe = _child_slots(tree, node)
  n = jnp.where(valid, tree.visits[safe], -jnp.inf)
  most = valid & (n == jnp.max(n))
  best = jnp.argmax(jnp.where(most, tree.value[safe], -jnp.inf))
  return jnp.where(jnp.any(valid), kids[best], -1).astype(jnp.int32)


def _clear_slots(tree: Tree, mask) -> Tree:
  """Resets every per-node field of the masked slots [N] bool to the empty state."""
  def clear(field, empty):
    keep = mask.reshape(mask.shape + (1,) * (field.ndim - 1))
    return jnp.where(keep, jnp.asarray(empty, field.dtype), field)
  return tree.replace(
      parent=clear(tree.parent, -1),
      children=clear(tree.children, -1),
      num_children=clear(tree.num_children, 0),
      tokens=clear(tree.tokens, 0),
      num_tokens=clear(tree.num_tokens, 0),
      prior=clear(tree.prior, 0.0),
      visits=clear(tree.visits, 0.0),
      real_visits=clear(tree.real_visits, 0),
      value=clear(tree.value, 0.0),
      embedding=clear(tree.embedding, 0.0),
      has_embedding=clear(tree.has_embedding, False),
      step=clear(tree.step, 0),
      used=clear(tree.used, False),
      stored_top_ids=clear(tree.stored_top_ids, -1),
      stored_top_logits=clear(tree.stored_top_logits, -jnp.inf),
      cand_tokens=clear(tree.cand_tokens, 0),
      cand_lens=clear(tree.cand_lens, 0),
      cand_weights=clear(tree.cand_weights, 0.0),
      num_cands=clear(tree.num_cands, 0),
  )


def _add_children(tree: Tree, node, add, tokens, lens, priors) -> Tree:
  """Appends the entries marked in `add` (in order) as new children of `node`.

  Each new child takes the lowest free slot; entries beyond the free slots or the free
  child columns are not created and are counted in `overflow`.

  Args:
    tree: the tree.
    node: () int32, a used slot.
    add: [M] bool, entries to add.
    tokens: [M, L] int32.
    lens: [M] int32.
    priors: [M] float32.

  Returns:
    The updated tree.
  """
  num_entries = add.shape[0]
  n, c = tree.num_nodes, tree.max_children
  rank = jnp.cumsum(add) - 1
  room = jnp.minimum(jnp.sum(~tree.used), c - tree.num_children[node])
  fits = add & (rank < room)
  free_slots = jnp.nonzero(~tree.used, size=num_entries, fill_value=n)[0]
  slot = jnp.where(fits, free_slots[jnp.clip(rank, 0, num_entries - 1)], n)
  column = jnp.where(fits, tree.num_children[node] + rank, c)
  new_mask = jnp.zeros((n,), bool).at[slot].set(True, mode='drop')
  tree = _clear_slots(tree, new_mask)
  positions = jnp.arange(tree.max_tokens)
  clean_tokens = jnp.where(positions[None, :] < lens[:, None], tokens, 0)
  num_added = jnp.sum(fits).astype(jnp.int32)
  return tree.replace(
      parent=tree.parent.at[slot].set(node, mode='drop'),
      tokens=tree.tokens.at[slot].set(clean_tokens, mode='drop'),
      num_tokens=tree.num_tokens.at[slot].set(lens, mode='drop'),
      prior=tree.prior.at[slot].set(priors, mode='drop'),
      step=tree.step.at[slot].set(tree.step[node] + 1, mode='drop'),
      used=tree.used | new_mask,
      children=tree.children.at[node, column].set(slot, mode='drop'),
      num_children=tree.num_children.at[node].add(num_added),
      overflow=tree.overflow + jnp.sum(add).astype(jnp.int32) - num_added,
  )


def _same_sequences(tokens_a, lens_a, tokens_b, lens_b):
  """Pairwise token-set equality: [A, L], [A], [B, L], [B] -> [A, B] bool."""
  positions = jnp.arange(tokens_a.shape[-1])
  live = positions[None, None, :] < lens_a[:, None, None]
  same_tokens = (tokens_a[:, None, :] == tokens_b[None, :, :]) | ~live
  return (lens_a[:, None] == lens_b[None, :]) & jnp.all(same_tokens, axis=-1)


def _present_among_children(tree: Tree, node, tokens, lens):
  """Whether each token set [M, L] / [M] already is a child of `node`: [M] bool."""
  _, valid, safe = _child_slots(tree, node)
  same = _same_sequences(tokens, lens, tree.tokens[safe], tree.num_tokens[safe])
  return jnp.any(same & valid[None, :], axis=-1)


def _check_shape(name, array, shape):
  if tuple(array.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(array.shape)}')


def expand(tree: Tree, node, cand_tokens, cand_lens, cand_weights, cand_valid,
           top_ids, top_logits) -> Tree:
  """Expands a leaf with its proposed candidates (reference §3).

  Valid candidates become children in order (greedy first), with priors = weights /
  sum(weights), root-smoothed when `node` is the current root. The compacted candidate
  list and the top logits are stored on `node` for later widening. Candidates that do
  not fit (no free slot or child column) are counted in `overflow`.

  Args:
    tree: the tree.
    node: () int32, a used slot (normally without children).
    cand_tokens: [K, L] int32, K <= C.
    cand_lens: [K] int32.
    cand_weights: [K] float32, unnormalised weights.
    cand_valid: [K] bool.
    top_ids: [C] int32, top token ids in descending logit order (-1 where none).
    top_logits: [C] float32, their raw logits.

  Returns:
    The updated tree.
  """
  cand_tokens, cand_lens = jnp.asarray(cand_tokens), jnp.asarray(cand_lens)
  cand_weights, cand_valid = jnp.asarray(cand_weights), jnp.asarray(cand_valid, bool)
  top_ids, top_logits = jnp.asarray(top_ids), jnp.asarray(top_logits)
  k = cand_tokens.shape[0]
  c, l = tree.max_children, tree.max_tokens
  if k > c:
    raise ValueError(f'at most max_children={c} candidates, got {k}')
  _check_shape('cand_tokens', cand_tokens, (k, l))
  for name, array in (('cand_lens', cand_lens), ('cand_weights', cand_weights),
                      ('cand_valid', cand_valid)):
    _check_shape(name, array, (k,))
  _check_shape('top_ids', top_ids, (c,))
  _check_shape('top_logits', top_logits, (c,))
  priors = _priors_from_weights(tree, node, cand_weights, cand_valid)
  tree = _add_children(tree, node, cand_valid, cand_tokens, cand_lens, priors)
  order = jnp.nonzero(cand_valid, size=c, fill_value=k)[0]
  listed = order < k
  safe = jnp.where(listed, order, 0)
  return tree.replace(
      cand_tokens=tree.cand_tokens.at[node].set(
          jnp.where(listed[:, None], cand_tokens[safe], 0)),
      cand_lens=tree.cand_lens.at[node].set(jnp.where(listed, cand_lens[safe], 0)),
      cand_weights=tree.cand_weights.at[node].set(
          jnp.where(listed, cand_weights[safe], 0.0)),
      num_cands=tree.num_cands.at[node].set(jnp.sum(cand_valid).astype(jnp.int32)),
      stored_top_ids=tree.stored_top_ids.at[node].set(top_ids),
      stored_top_logits=tree.stored_top_logits.at[node].set(top_logits),
  )


def children_embedding_spread(tree: Tree, node) -> jax.Array:
  """||element-wise unbiased variance of the children's embeddings||_2 (reference §5).

  NaN with fewer than two children, where the unbiased variance is undefined (the
  reference's torch.var of one row is NaN too).

  Args:
    tree: the tree.
    node: () int32, a used slot.

  Returns:
    () float32.
  """
  _, valid, safe = _child_slots(tree, node)
  count = jnp.sum(valid)
  emb = tree.embedding[safe]
  mean = jnp.sum(jnp.where(valid[:, None], emb, 0.0), axis=0) / jnp.maximum(count, 1)
  sq_dev = jnp.where(valid[:, None], (emb - mean) ** 2, 0.0)
  variance = jnp.sum(sq_dev, axis=0) / jnp.maximum(count - 1, 1)
  return jnp.where(count >= 2, jnp.sqrt(jnp.sum(variance ** 2)), jnp.nan)


def should_add_child(tree: Tree, node, max_children, var_scale) -> jax.Array:
  """The widening test of reference §5.

  True iff `node` has fewer than max_children children, every child has an embedding,
  `children_embedding_spread` < var_scale * num_tokens(first child), and max child
  q < 0. A single child gives a NaN spread, so the comparison (hence the answer) is
  False, as in the reference; a leaf is never widened either.

  Args:
    tree: the tree.
    node: () int32, a used slot.
    max_children: () int, the children cap (20 in the reference).
    var_scale: () float (0.03 in the reference).

  Returns:
    () bool.
  """
  kids, valid, safe = _child_slots(tree, node)
  all_embedded = jnp.all(jnp.where(valid, tree.has_embedding[safe], True))
  max_q = jnp.max(jnp.where(valid, tree.value[safe], -jnp.inf))
  first_len = tree.num_tokens[jnp.maximum(kids[0], 0)]
  spread = children_embedding_spread(tree, node)
  return ((jnp.sum(valid) < max_children) & all_embedded
          & (spread < var_scale * first_len) & (max_q < 0))


def add_children_one_token(tree: Tree, node) -> Tree:
  """One-token widening (reference §5).

  Takes the top (#children + 1) stored tokens, softmaxes their stored logits
  (temperature 1), drops tokens whose probability is zero (as a one-token proposal
  does; float32 underflows at a logit gap of ~100 where float64 needs ~745), applies
  root smoothing at the root and appends the tokens not yet children, in ascending id
  (as the original's np.where does), with those priors; existing children keep theirs.

  Args:
    tree: the tree.
    node: () int32, a used slot expanded with one-token children.

  Returns:
    The updated tree.
  """
  c = tree.max_children
  ids = tree.stored_top_ids[node]
  taken = (jnp.arange(c) < tree.num_children[node] + 1) & (ids >= 0)
  logits = jnp.where(taken, tree.stored_top_logits[node], -jnp.inf)
  probs = jnp.where(taken, jax.nn.softmax(logits), 0.0)
  taken = taken & (probs > 0)
  priors = _priors_from_weights(tree, node, probs, taken)
  # The original adds the new tokens in ascending id (np.where over the vocabulary).
  order = jnp.argsort(jnp.where(taken, ids, jnp.iinfo(jnp.int32).max))
  ids, priors, taken = ids[order], priors[order], taken[order]
  tokens = jnp.zeros((c, tree.max_tokens), jnp.int32).at[:, 0].set(ids)
  lens = jnp.ones((c,), jnp.int32)
  add = taken & ~_present_among_children(tree, node, tokens, lens)
  return _count_widening(tree, _add_children(tree, node, add, tokens, lens, priors), node)


def _count_widening(before: Tree, after: Tree, node) -> Tree:
  """`after` with `widenings` raised by the children widening gave `node`."""
  added = after.num_children[node] - before.num_children[node]
  return after.replace(widenings=after.widenings + added)


def add_children_multi(tree: Tree, node, new_tokens, new_lens, new_weights,
                       new_valid) -> Tree:
  """Multi-token widening (reference §5).

  The valid new candidates (greedy, then sample) are prepended to the stored candidate
  list (kept on the node, truncated to C entries: widening never reads past entry
  #children + 1 <= C); its first (#children + 1) entries get priors = weights / sum
  (root smoothing at the root) and those not yet children (nor equal to an earlier
  entry) are appended; existing children keep their priors.

  Args:
    tree: the tree.
    node: () int32, a used slot expanded with multi-token children.
    new_tokens: [2, L] int32.
    new_lens: [2] int32.
    new_weights: [2] float32, unnormalised (greedy weight already clamped).
    new_valid: [2] bool.

  Returns:
    The updated tree.
  """
  new_tokens, new_lens = jnp.asarray(new_tokens), jnp.asarray(new_lens)
  new_weights, new_valid = jnp.asarray(new_weights), jnp.asarray(new_valid, bool)
  c, l = tree.max_children, tree.max_tokens
  _check_shape('new_tokens', new_tokens, (2, l))
  for name, array in (('new_lens', new_lens), ('new_weights', new_weights),
                      ('new_valid', new_valid)):
    _check_shape(name, array, (2,))
  tokens = jnp.concatenate([new_tokens, tree.cand_tokens[node]], axis=0)
  lens = jnp.concatenate([new_lens, tree.cand_lens[node]])
  weights = jnp.concatenate([new_weights, tree.cand_weights[node]])
  valid = jnp.concatenate([new_valid, jnp.arange(c) < tree.num_cands[node]])
  total = c + 2
  order = jnp.nonzero(valid, size=total, fill_value=0)[0]
  count = jnp.sum(valid)
  listed = jnp.arange(total) < count
  tokens = jnp.where(listed[:, None], tokens[order], 0)
  lens = jnp.where(listed, lens[order], 0)
  weights = jnp.where(listed, weights[order], 0.0)
  taken = listed & (jnp.arange(total) < tree.num_children[node] + 1)
  priors = _priors_from_weights(tree, node, weights, taken)
  same = _same_sequences(tokens, lens, tokens, lens)
  earlier = jnp.tril(jnp.ones((total, total), bool), k=-1)
  repeated = jnp.any(same & earlier & taken[None, :], axis=-1)
  add = taken & ~repeated & ~_present_among_children(tree, node, tokens, lens)
  tree = _count_widening(tree, _add_children(tree, node, add, tokens, lens, priors), node)
  return tree.replace(
      cand_tokens=tree.cand_tokens.at[node].set(tokens[:c]),
      cand_lens=tree.cand_lens.at[node].set(lens[:c]),
      cand_weights=tree.cand_weights.at[node].set(weights[:c]),
      num_cands=tree.num_cands.at[node].set(jnp.minimum(count, c).astype(jnp.int32)),
  )


def backup(tree: Tree, path, path_len, value, path_embeddings, sim_threshold,
           sim_weight, use_similarity) -> Tree:
  """Backs a value up the selected path with similarity sharing (reference §6).

  For every path node: n += 1, fn += 1. For a non-root path node: its embedding becomes
  the running mean over fn of the embeddings it received; then each sibling s (same
  parent, other slot) with cos = cosine(emb, s.emb) >= sim_threshold (cos = 0 when s has
  no embedding) gets w = sim_weight * cos, s.q = (s.q * s.n + w * g) / (s.n + w),
  s.n += w. Then q += (g - q) / n for every path node, and min_q / max_q take the new q
  of the non-root path nodes. The reference applies these root-first after the upward
  pass (each parent's q before its child's); the updates of different path nodes touch
  disjoint slots (siblings of a path node are never on the path), so they are applied
  at once.

  Args:
    tree: the tree.
    path: [D] int32, path[0] = root ... path[path_len - 1] = the evaluated node.
    path_len: () int32, 1..D.
    value: () float32, g.
    path_embeddings: [D, E] float32, the embedding node path[i] receives (ignored for
      the root and beyond path_len).
    sim_threshold: () float, cosine threshold (0.95 in the reference).
    sim_weight: () float, sharing weight (0.2 in the reference).
    use_similarity: () bool, whether siblings share the value at all.

  Returns:
    The updated tree.
  """
  path, path_embeddings = jnp.asarray(path), jnp.asarray(path_embeddings)
  d = path.shape[0]
  n = tree.num_nodes
  _check_shape('path_embeddings', path_embeddings, (d, tree.embed_dim))
  level = jnp.arange(d)
  on_path = level < path_len
  non_root = on_path & (level >= 1)
  safe = jnp.where(on_path, path, 0)
  target = jnp.where(on_path, path, n)
  g = jnp.asarray(value, jnp.float32)

  visits = tree.visits[safe] + 1.0
  real_visits = tree.real_visits[safe] + 1
  old_emb = tree.embedding[safe]
  emb = jnp.where(non_root[:, None],
                  old_emb + (path_embeddings - old_emb) / real_visits[:, None], old_emb)
  q = tree.value[safe] + (g - tree.value[safe]) / visits

  parents = jnp.where(non_root, tree.parent[safe], 0)
  sibs = tree.children[parents]
  sib_ok = (sibs >= 0) & (sibs != safe[:, None]) & non_root[:, None] & use_similarity
  sib_safe = jnp.where(sib_ok, sibs, 0)
  sib_emb = tree.embedding[sib_safe]
  dots = jnp.einsum('de,dce->dc', emb, sib_emb)
  norms = jnp.linalg.norm(emb, axis=-1)[:, None] * jnp.linalg.norm(sib_emb, axis=-1)
  cos = jnp.where(tree.has_embedding[sib_safe], dots / jnp.maximum(norms, COSINE_EPS),
                  0.0)
  share = sib_ok & (cos >= sim_threshold)
  w = sim_weight * cos
  sib_n = tree.visits[sib_safe]
  sib_q = (tree.value[sib_safe] * sib_n + w * g) / jnp.where(share, sib_n + w, 1.0)
  sib_target = jnp.where(share, sibs, n).reshape(-1)

  return tree.replace(
      visits=tree.visits.at[target].set(visits, mode='drop')
      .at[sib_target].set((sib_n + w).reshape(-1), mode='drop'),
      real_visits=tree.real_visits.at[target].set(real_visits, mode='drop'),
      value=tree.value.at[target].set(q, mode='drop')
      .at[sib_target].set(sib_q.reshape(-1), mode='drop'),
      embedding=tree.embedding.at[jnp.where(non_root, path, n)].set(emb, mode='drop'),
      has_embedding=tree.has_embedding.at[jnp.where(non_root, path, n)].set(
          True, mode='drop'),
      min_q=jnp.minimum(tree.min_q, jnp.min(jnp.where(non_root, q, jnp.inf))),
      max_q=jnp.maximum(tree.max_q, jnp.max(jnp.where(non_root, q, -jnp.inf))),
      shared_updates=tree.shared_updates + jnp.sum(share).astype(jnp.int32),
  )


def path_tokens(tree: Tree, path, depth, path_cap):
  """The tokens of the path below the root, concatenated.

  Args:
    tree: the tree.
    path: [D+1] int32, the selected path (path[0] the root; -1 beyond the leaf).
    depth: () int32, the leaf's depth (path[1..depth] contribute tokens).
    path_cap: P_cap (static int), the buffer width.

  Returns:
    tokens: [P_cap] int32 (0 beyond the path's tokens).
    length: () int32.
    offsets: [D+1] int32, where each path node's tokens start in `tokens`.
  """
  nodes = jnp.maximum(path, 0)
  k = jnp.arange(path.shape[0])
  lens = jnp.where((k >= 1) & (k <= depth), tree.num_tokens[nodes], 0)
  offsets = jnp.cumsum(lens) - lens
  t = jnp.arange(tree.max_tokens)
  dest = jnp.where(t[None, :] < lens[:, None], offsets[:, None] + t[None, :], path_cap)
  tokens = jnp.zeros((path_cap,), jnp.int32).at[dest].set(tree.tokens[nodes], mode='drop')
  return tokens, jnp.sum(lens), offsets


def node_children(tree: Tree, node):
  """The children of `node` (() int32: a used slot, or -1 for no node) in column order.

  Returns:
    tokens: [C, L] int32, each child's token set (-1 beyond it and for empty columns;
      all -1 when node is -1).
    stats: [C, 4] float32, (n, fn, q, p) of each child (0 for empty columns).
  """
  kids = jnp.where(node >= 0, tree.children[jnp.maximum(node, 0)], -1)
  has = kids >= 0
  safe = jnp.maximum(kids, 0)
  stats = jnp.stack([tree.visits[safe], tree.real_visits[safe].astype(jnp.float32),
                     tree.value[safe], tree.prior[safe]], axis=-1)
  live = jnp.arange(tree.max_tokens)[None, :] < tree.num_tokens[safe][:, None]
  return (jnp.where(has[:, None] & live, tree.tokens[safe], -1),
          jnp.where(has[:, None], stats, 0.0))


def root_children(tree: Tree):
  """The current root's children as the original dumps them before a commit:
  `node_children` of the root (tokens [C, L], stats [C, 4])."""
  return node_children(tree, tree.root)


def root_grandchildren(tree: Tree, keep: int):
  """The level below the root's children: for each root child column, the `keep` most
  visited children of that child, in descending n (ties: column order).

  Args:
    tree: the tree.
    keep: G, a static int in 1..C.

  Returns:
    tokens: [C, G, L] int32 (-1 padded as `node_children`; all -1 under an empty column
      and where a child has fewer than G children).
    stats: [C, G, 4] float32, (n, fn, q, p) (0 where tokens are all -1).
  """
  if not isinstance(keep, int) or not 1 <= keep <= tree.max_children:
    raise ValueError(f'keep must be an int in 1..{tree.max_children}, got {keep!r}')
  tokens, stats = jax.vmap(lambda node: node_children(tree, node))(
      tree.children[tree.root])                                  # [C, C, L], [C, C, 4]
  has = tokens[..., 0] >= 0
  order = jnp.argsort(jnp.where(has, -stats[..., 0], jnp.inf), axis=-1,
                      stable=True)[:, :keep]                     # [C, G]
  return (jnp.take_along_axis(tokens, order[..., None], axis=1),
          jnp.take_along_axis(stats, order[..., None], axis=1))


def virtual_loss(tree: Tree, path, path_len, active) -> Tree:
  """Selection-time virtual loss: one visit of value -1 on path[:path_len].

  Only `parallel_leaves > 1` uses it (not the reference), and the search restores the
  true statistics before any backup.

  Args:
    tree: the tree.
    path: [D] int32; path_len: () int32; active: () bool.

  Returns:
    The updated tree.
  """
  on = (jnp.arange(path.shape[0]) < path_len) & (path >= 0) & active
  idx = jnp.where(on, path, tree.num_nodes)
  n = tree.visits[jnp.minimum(idx, tree.num_nodes - 1)]
  q = tree.value[jnp.minimum(idx, tree.num_nodes - 1)]
  return tree.replace(visits=tree.visits.at[idx].set(n + 1.0, mode='drop'),
                      value=tree.value.at[idx].set((q * n - 1.0) / (n + 1.0), mode='drop'))


def subtree_mask(tree: Tree, node) -> jax.Array:
  """`node` and all its descendants, by pointer jumping.

  After k rounds, `reached[i]` says whether `node` is i or one of i's ancestors at
  distance < 2^k, so N.bit_length() + 1 rounds cover every depth.

  Args:
    tree: the tree.
    node: () int32, a used slot.

  Returns:
    [N] bool.
  """
  n = tree.num_nodes
  slots = jnp.arange(n)

  def jump(_, carry):
    reached, ancestor = carry
    has = ancestor >= 0
    safe = jnp.where(has, ancestor, 0)
    reached = reached | (has & reached[safe])
    return reached, jnp.where(has, ancestor[safe], -1)

  start = (slots == node, tree.parent)
  reached, _ = jax.lax.fori_loop(0, n.bit_length() + 1, jump, start)
  return reached & tree.used


def commit(tree: Tree, child) -> Tree:
  """Makes `child` (a child of the current root) the new root (reference §2).

  Every slot outside `child`'s subtree is freed in place (no compaction), `child`
  loses its parent, its children's priors are root-smoothed
  (p <- 0.75 p + 0.25 / #children, renormalised), and min_q / max_q carry over.

  Args:
    tree: the tree.
    child: () int32, a child of the current root.

  Returns:
    The updated tree.
  """
  child = jnp.asarray(child, jnp.int32)
  tree = _clear_slots(tree, ~subtree_mask(tree, child))
  _, valid, safe = _child_slots(tree, child)
  smoothed = _smooth_root_priors(tree.prior[safe], valid)
  kids = jnp.where(valid, tree.children[child], tree.num_nodes)
  return tree.replace(
      parent=tree.parent.at[child].set(-1),
      prior=tree.prior.at[kids].set(smoothed, mode='drop'),
      root=child,
  )
