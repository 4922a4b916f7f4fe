"""Differential tests: rain_jax.tree against the plain-Python oracle, step by step.

Random oracle trees (seeded numpy: random shapes, integer and fractional visits, q,
priors, embeddings with near-duplicate sibling families so that sharing and widening
trigger, statistics copied between siblings so that ties happen) are encoded into Tree
arrays under a random slot layout. Each step (selection, most-visited child, expansion,
widening test and both widening kinds, backup with similarity sharing, commit) runs on
both sides; the array tree is then decoded from its root and compared node by node
with the oracle tree: structure, tokens, steps and integer counts exactly, floats to
1e-6. Every float fed to either side is float32-representable, and after each compared
step both sides are put back on the same float32 values, so float64-vs-float32
rounding never accumulates into a different decision.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rain_jax import tree as T
from tests.oracle import rain_reference as R

N, C, L, E, D = 96, 20, 10, 8, 24
VOCAB = 200
C_PUCT, MAX_CHILDREN, VAR_SCALE = 2.0, 20, 0.03
TOL = {'rtol': 1e-6, 'atol': 1e-6}

_puct_scores = jax.jit(T.puct_scores)
_select_child = jax.jit(T.select_child)
_most_visited_child = jax.jit(T.most_visited_child)
_expand = jax.jit(T.expand)
_spread = jax.jit(T.children_embedding_spread)
_should_add_child = jax.jit(T.should_add_child)
_add_one_token = jax.jit(T.add_children_one_token)
_add_multi = jax.jit(T.add_children_multi)
_backup = jax.jit(T.backup)
_commit = jax.jit(T.commit)


def f32(x):
  return float(np.float32(x))


def _f32_list(values):
  return [f32(v) for v in values]


def _walk(root):
  """Oracle nodes in depth-first pre-order, children in stored order."""
  order, stack = [], [root]
  while stack:
    node = stack.pop()
    order.append(node)
    stack.extend(reversed(node.children))
  return order


# ----------------------------------------------------------------- random oracle trees


def _random_tokens(rng, length):
  return tuple(int(t) for t in rng.integers(0, VOCAB, size=length))


def _random_stored_top(rng):
  """20 (id, logit) pairs in descending logit order, ties by lower id; some ties."""
  logits = np.round(rng.normal(0.0, 2.0, size=C), 1).astype(np.float32)
  ids = rng.choice(VOCAB, size=C, replace=False)
  order = sorted(range(C), key=lambda j: (-logits[j], ids[j]))
  return [(int(ids[j]), float(logits[j])) for j in order]


def _add_family(rng, node, count):
  """Gives `node` `count` children with the token-set length of its step."""
  length = R.token_set_len(node.step)
  positions = list(range(count))
  if rng.random() < 0.3:            # one listed token set is not a child
    positions = sorted(rng.choice(count + 1, size=count, replace=False).tolist())
  if length == 1:
    node.stored_top = _random_stored_top(rng)
    listed = [(token,) for token, _ in node.stored_top]
  else:
    listed = []
    while len(listed) < count + 1 + int(rng.integers(0, 2)):
      seq = _random_tokens(rng, length)
      if seq not in listed:
        listed.append(seq)
    node.cand_list = [(seq, f32(rng.uniform(0.01, 1.0))) for seq in listed]
    if rng.random() < 0.3:
      node.cand_list.append(node.cand_list[0])
  for seq in [listed[j] for j in positions]:
    node.children.append(R.Node(tokens=seq, parent=node, step=node.step + 1))


def _fill_family_stats(rng, family):
  """Visits, q, priors and embeddings for one sibling family."""
  near = rng.random() < 0.6
  all_negative = rng.random() < 0.4
  base = rng.normal(size=E)
  priors = rng.dirichlet(np.ones(len(family)))
  for child, prior in zip(family, priors):
    child.p = f32(prior)
    if all_negative or rng.random() < 0.8:
      child.fn = int(rng.integers(1, 7))
      extra = rng.uniform(0.0, 1.0) if rng.random() < 0.3 else 0.0
      child.n = f32(child.fn + f32(extra))
      child.q = f32(rng.uniform(-1.0, 0.0) if all_negative else rng.uniform(-1.0, 1.0))
      vector = base + 1e-3 * rng.normal(size=E) if near else rng.normal(size=E)
      child.emb = _f32_list(vector)
  if len(family) >= 2 and rng.random() < 0.3:
    first, second = family[0], family[1]
    second.n, second.fn, second.q, second.p = first.n, first.fn, first.q, first.p
    second.emb = None if first.emb is None else list(first.emb)


def _random_tree(rng, max_nodes=40):
  root = R.Node(tokens=(), step=int(rng.integers(0, 4)))
  root.minq = f32(-1.0 - rng.uniform(0.0, 0.3)) if rng.random() < 0.5 else -1.0
  root.maxq = f32(1.0 + rng.uniform(0.0, 0.3)) if rng.random() < 0.5 else 1.0
  queue, count = [root], 1
  while queue:
    node = queue.pop(0)
    width = int(rng.choice([0, 1, 2, 3, 4, 6])) if node.step - root.step < 4 else 0
    width = min(max(width, 2) if node is root else width, max_nodes - count)
    if width:
      _add_family(rng, node, width)
      _fill_family_stats(rng, node.children)
      count += width
      queue.extend(node.children)
  root.fn = sum(c.fn for c in root.children) + int(rng.integers(0, 3))
  root.n = f32(root.fn + sum(c.n - c.fn for c in root.children))
  root.q = f32(rng.uniform(-1.0, 1.0))
  return root


# -------------------------------------------------------------- encoding and decoding


def _random_layout(rng, root):
  slots = rng.permutation(N)
  return {id(node): int(s) for node, s in zip(_walk(root), slots)}


def _encode(root, slot_of):
  """Oracle tree -> Tree with node `x` in slot `slot_of[id(x)]`."""
  empty = T.init_tree(N, C, L, E)
  a = {f.name: np.array(getattr(empty, f.name)) for f in dataclasses.fields(empty)}
  a['used'][:] = False
  a['step'][:] = 0
  for node in _walk(root):
    s = slot_of[id(node)]
    a['used'][s] = True
    a['parent'][s] = -1 if node is root else slot_of[id(node.parent)]
    kids = [slot_of[id(c)] for c in node.children]
    a['children'][s, :len(kids)] = kids
    a['num_children'][s] = len(kids)
    a['tokens'][s, :len(node.tokens)] = node.tokens
    a['num_tokens'][s] = len(node.tokens)
    a['prior'][s], a['visits'][s], a['value'][s] = node.p, node.n, node.q
    a['real_visits'][s], a['step'][s] = node.fn, node.step
    if node.emb is not None:
      a['embedding'][s], a['has_embedding'][s] = node.emb, True
    for j, (token, logit) in enumerate((node.stored_top or [])[:C]):
      a['stored_top_ids'][s, j], a['stored_top_logits'][s, j] = token, logit
    cands = (node.cand_list or [])[:C]
    for j, (seq, weight) in enumerate(cands):
      a['cand_tokens'][s, j, :len(seq)] = seq
      a['cand_lens'][s, j], a['cand_weights'][s, j] = len(seq), weight
    a['num_cands'][s] = len(cands)
  a['root'] = np.int32(slot_of[id(root)])
  a['min_q'], a['max_q'] = np.float32(root.minq), np.float32(root.maxq)
  return T.Tree(**{name: jnp.asarray(value) for name, value in a.items()})


def _assert_same(root, tree):
  """Decodes `tree` from its root and compares it with the oracle tree.

  Returns:
    {id(oracle node): slot} for every node of the tree.
  """
  a = jax.tree_util.tree_map(np.asarray, tree)
  nodes, slots, stack = _walk(root), [], [int(a.root)]
  while stack:
    s = stack.pop()
    slots.append(s)
    stack.extend(reversed(a.children[s, :a.num_children[s]].tolist()))
  assert len(slots) == len(nodes)
  assert sorted(slots) == np.flatnonzero(a.used).tolist()      # nothing lost or leaked
  assert a.parent[a.root] == -1 and int(a.overflow) == 0
  for node, s in zip(nodes, slots):
    where = f'node {node.tokens} in slot {s}'
    num = int(a.num_children[s])
    assert num == len(node.children), where
    assert (a.children[s, num:] == -1).all(), where
    assert (a.parent[a.children[s, :num]] == s).all(), where
    assert tuple(a.tokens[s, :a.num_tokens[s]].tolist()) == tuple(node.tokens), where
    assert (int(a.step[s]), int(a.real_visits[s])) == (node.step, node.fn), where
    np.testing.assert_allclose([a.visits[s], a.value[s], a.prior[s]],
                               [node.n, node.q, node.p], err_msg=where, **TOL)
    assert bool(a.has_embedding[s]) == (node.emb is not None), where
    if node.emb is not None:
      np.testing.assert_allclose(a.embedding[s], node.emb, err_msg=where, **TOL)
    if node.stored_top is not None:
      top = node.stored_top[:C]
      assert a.stored_top_ids[s, :len(top)].tolist() == [t for t, _ in top], where
      np.testing.assert_allclose(a.stored_top_logits[s, :len(top)],
                                 [z for _, z in top], err_msg=where, **TOL)
    if node.cand_list is not None:
      cands = node.cand_list[:C]
      assert int(a.num_cands[s]) == len(cands), where
      for j, (seq, weight) in enumerate(cands):
        assert tuple(a.cand_tokens[s, j, :a.cand_lens[s, j]].tolist()) == seq, where
        np.testing.assert_allclose(a.cand_weights[s, j], weight, err_msg=where, **TOL)
  np.testing.assert_allclose([a.min_q, a.max_q], [root.minq, root.maxq], **TOL)
  return {id(node): s for node, s in zip(nodes, slots)}


def _resync(root, tree, slot_of):
  """Rounds the oracle's floats to float32 and writes them into `tree` as well."""
  index = {'visits': [], 'value': [], 'prior': [], 'embedding': []}
  slots = []
  for node in _walk(root):
    node.n, node.q, node.p = f32(node.n), f32(node.q), f32(node.p)
    slots.append(slot_of[id(node)])
    index['visits'].append(node.n)
    index['value'].append(node.q)
    index['prior'].append(node.p)
    if node.emb is not None:
      node.emb = _f32_list(node.emb)
    emb = node.emb if node.emb is not None else np.asarray(tree.embedding[slots[-1]])
    index['embedding'].append(emb)
  root.minq, root.maxq = f32(root.minq), f32(root.maxq)
  slots = np.asarray(slots)
  updates = {name: getattr(tree, name).at[slots].set(jnp.asarray(values, jnp.float32))
             for name, values in index.items()}
  return tree.replace(min_q=jnp.float32(root.minq), max_q=jnp.float32(root.maxq),
                      **updates)


# ------------------------------------------------------------------------ the steps


def _check_selection(root, tree, slot_of):
  """PUCT scores, selected and most visited child at every inner node."""
  ties = 0
  for node in _walk(root):
    if not node.children:
      continue
    s, num = slot_of[id(node)], len(node.children)
    want = [R.puct_score(c, node, root, C_PUCT) for c in node.children]
    got = np.asarray(_puct_scores(tree, s, C_PUCT))
    np.testing.assert_allclose(got[:num], want, **TOL)
    assert np.isneginf(got[num:]).all()
    ties += len(set(want)) < num
    chosen = R.select_child(node, root, C_PUCT)
    assert int(_select_child(tree, s, C_PUCT)) == slot_of[id(chosen)]
    most = R.most_visited_child(node)
    assert int(_most_visited_child(tree, s)) == slot_of[id(most)]
  return ties


def _expand_step(rng, root, tree, slot_of):
  leaves = [n for n in _walk(root) if not n.children]
  leaf = leaves[int(rng.integers(len(leaves)))]
  length = R.token_set_len(leaf.step)
  if length == 1:
    logits = np.round(rng.normal(0.0, 3.0, size=VOCAB), 1).astype(np.float32)
    cands, stored_top = R.propose_one_token([float(z) for z in logits], k=10, keep=C)
  else:
    seqs = {_random_tokens(rng, length) for _ in range(int(rng.integers(1, 11)))}
    cands = [(seq, f32(rng.uniform(0.01, 1.0))) for seq in sorted(seqs)]
    stored_top = None
  tokens, lens = np.zeros((C, L), np.int32), np.zeros((C,), np.int32)
  weights, valid = np.zeros((C,), np.float32), np.zeros((C,), bool)
  for j, (seq, weight) in enumerate(cands):
    tokens[j, :len(seq)], lens[j], weights[j], valid[j] = seq, len(seq), weight, True
  top_ids, top_logits = np.full((C,), -1, np.int32), np.full((C,), -np.inf, np.float32)
  for j, (token, logit) in enumerate(stored_top or []):
    top_ids[j], top_logits[j] = token, logit
  R.expand(leaf, cands, leaf is root, stored_top)
  return _expand(tree, slot_of[id(leaf)], tokens, lens, weights, valid, top_ids,
                 top_logits)


def _widen_step(rng, root, tree, slot_of):
  """Compares the widening test at an inner node, then widens it on both sides."""
  inner = [n for n in _walk(root) if 2 <= len(n.children) <= C - 2]
  if not inner:
    return tree, False
  node = inner[int(rng.integers(len(inner)))]
  s = slot_of[id(node)]
  if all(c.emb is not None for c in node.children):
    want = R.unbiased_variance_norm([c.emb for c in node.children])
    np.testing.assert_allclose(float(_spread(tree, s)), want, rtol=1e-5, atol=1e-9)
  decision = R.should_add_child(node, MAX_CHILDREN, VAR_SCALE)
  assert bool(_should_add_child(tree, s, MAX_CHILDREN, VAR_SCALE)) == decision
  if len(node.children[0].tokens) == 1:
    R.add_children_one_token(node, node is root)
    return _add_one_token(tree, s), decision
  length = len(node.children[0].tokens)
  greedy = _random_tokens(rng, length)
  if rng.random() < 0.5:                  # the usual case: greedy is already a child
    greedy = node.children[0].tokens
  new = [(greedy, f32(rng.uniform(0.01, 1.0)))]
  if rng.random() < 0.7:
    sample = _random_tokens(rng, length)
    if rng.random() < 0.4:
      sample = node.cand_list[int(rng.integers(len(node.cand_list)))][0]
    if sample != greedy:
      new.append((sample, f32(rng.uniform(0.01, 1.0))))
  tokens, lens = np.zeros((2, L), np.int32), np.zeros((2,), np.int32)
  weights, valid = np.zeros((2,), np.float32), np.zeros((2,), bool)
  for j, (seq, weight) in enumerate(new):
    tokens[j, :len(seq)], lens[j], weights[j], valid[j] = seq, len(seq), weight, True
  R.add_children_multi(node, new, node is root)
  return _add_multi(tree, s, tokens, lens, weights, valid), decision


def _received_embedding(rng, node):
  siblings = [c for c in (node.parent.children if node.parent else []) if c.emb]
  if node.emb is not None:
    vector = np.asarray(node.emb) + 1e-3 * rng.normal(size=E)
  elif siblings and rng.random() < 0.7:
    vector = np.asarray(siblings[0].emb) + 1e-3 * rng.normal(size=E)
  else:
    vector = rng.normal(size=E)
  return _f32_list(vector)


def _backup_step(rng, root, tree, slot_of):
  """Backs a value up from a random node; returns (tree, #siblings that shared)."""
  nodes = _walk(root)
  node = nodes[int(rng.integers(len(nodes)))]
  path_nodes = list(reversed(R.path_to_root(node, root)))
  assert len(path_nodes) <= D
  embeddings = {id(n): _received_embedding(rng, n) for n in path_nodes[1:]}
  # Judge values are -1, 0, +1; soft values beyond [-1, 1] also move the root's range.
  value = [-1.0, 0.0, 1.0, f32(rng.uniform(-2.0, 2.0))][int(rng.integers(4))]
  threshold = [0.95, 0.95, 0.5, 2.0][int(rng.integers(4))]
  weight = 0.2 if rng.random() < 0.7 else f32(rng.uniform(0.05, 0.5))
  use_similarity = threshold != 2.0 or rng.random() < 0.5
  jax_threshold = 0.95 if threshold == 2.0 and not use_similarity else threshold
  path = np.full((D,), -1, np.int32)
  path_emb = np.zeros((D, E), np.float32)
  for i, n in enumerate(path_nodes):
    path[i] = slot_of[id(n)]
    if i:
      path_emb[i] = embeddings[id(n)]
  on_path = {id(n) for n in path_nodes}
  before = {id(n): n.n for n in nodes if id(n) not in on_path}
  R.backup(node, root, value, embeddings, sim_threshold=threshold, sim_weight=weight)
  shared = sum(n.n != before[id(n)] for n in nodes if id(n) in before)
  tree = _backup(tree, path, len(path_nodes), value, path_emb, jax_threshold, weight,
                 use_similarity)
  return tree, shared


def _commit_step(root, tree, slot_of):
  new_root = R.commit(root)
  child = _most_visited_child(tree, slot_of[id(root)])
  assert int(child) == slot_of[id(new_root)]
  return new_root, _commit(tree, child)


def _start(seed):
  rng = np.random.default_rng(seed)
  root = _random_tree(rng)
  slot_of = _random_layout(rng, root)
  tree = _encode(root, slot_of)
  assert _assert_same(root, tree) == slot_of
  return rng, root, tree, slot_of


# ------------------------------------------------------------------------- the tests


def test_encode_decode_round_trip_catches_a_difference():
  _, root, tree, _ = _start(100)
  root.children[0].q += 0.01
  with pytest.raises(AssertionError):
    _assert_same(root, tree)


def test_selection_and_most_visited_match_oracle():
  ties = 0
  for seed in range(25):
    _, root, tree, slot_of = _start(seed)
    ties += _check_selection(root, tree, slot_of)
  assert ties >= 5


def test_expand_matches_oracle():
  expanded_root = 0
  for seed in range(25):
    rng, root, tree, slot_of = _start(1000 + seed)
    if seed % 5 == 0:
      root.children, root.stored_top, root.cand_list = [], None, None
      tree = _encode(root, slot_of)
      expanded_root += 1
    for _ in range(2):
      tree = _expand_step(rng, root, tree, slot_of)
      slot_of = _assert_same(root, tree)
      _check_selection(root, tree, slot_of)
  assert expanded_root == 5


def test_widening_matches_oracle():
  decisions = []
  for seed in range(30):
    rng, root, tree, slot_of = _start(2000 + seed)
    for _ in range(2):
      tree, decision = _widen_step(rng, root, tree, slot_of)
      decisions.append(decision)
      slot_of = _assert_same(root, tree)
      tree = _resync(root, tree, slot_of)
  assert 5 <= sum(decisions) < len(decisions)


def test_backup_matches_oracle():
  shared = 0
  for seed in range(30):
    rng, root, tree, slot_of = _start(3000 + seed)
    for _ in range(3):
      tree, count = _backup_step(rng, root, tree, slot_of)
      shared += count
      _assert_same(root, tree)
      tree = _resync(root, tree, slot_of)
      _check_selection(root, tree, slot_of)
  assert shared >= 10


def test_commit_matches_oracle():
  for seed in range(20):
    rng, root, tree, slot_of = _start(4000 + seed)
    root, tree = _commit_step(root, tree, slot_of)
    slot_of = _assert_same(root, tree)
    tree = _expand_step(rng, root, tree, slot_of)          # into freed slots
    _assert_same(root, tree)


def test_random_episodes_match_oracle():
  """Long mixed sequences of steps on one tree, compared after every step."""
  for seed in range(8):
    rng, root, tree, slot_of = _start(5000 + seed)
    for _ in range(10):
      action = rng.choice(['expand', 'widen', 'backup', 'backup', 'commit'])
      if action == 'commit' and root.children:
        root, tree = _commit_step(root, tree, slot_of)
      elif action == 'expand' and len(_walk(root)) + C <= N:
        tree = _expand_step(rng, root, tree, slot_of)
      elif action == 'widen':
        tree, _ = _widen_step(rng, root, tree, slot_of)
      else:
        tree, _ = _backup_step(rng, root, tree, slot_of)
      slot_of = _assert_same(root, tree)
      tree = _resync(root, tree, slot_of)
      _check_selection(root, tree, slot_of)
