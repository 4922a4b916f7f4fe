"""Hand-computed checks of rain_jax.tree (reference §2, §3, §5, §6)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rain_jax import tree as T
from tests import tree_queries as Q

N, C, L, E = 10, 4, 3, 2


def _candidates(seqs, weights, k=C):
  """Pads token sets into expand's [k, L] / [k] candidate arrays."""
  tokens = np.zeros((k, L), np.int32)
  lens = np.zeros((k,), np.int32)
  w = np.zeros((k,), np.float32)
  valid = np.zeros((k,), bool)
  for j, (seq, weight) in enumerate(zip(seqs, weights)):
    tokens[j, :len(seq)] = seq
    lens[j] = len(seq)
    w[j] = weight
    valid[j] = True
  return jnp.asarray(tokens), jnp.asarray(lens), jnp.asarray(w), jnp.asarray(valid)


def _no_top():
  return jnp.full((C,), -1, jnp.int32), jnp.full((C,), -jnp.inf, jnp.float32)


def _expand(tree, node, seqs, weights, top=None):
  top_ids, top_logits = _no_top() if top is None else top
  return T.expand(tree, node, *_candidates(seqs, weights), top_ids, top_logits)


def _set(tree, **fields):
  """fields: name -> {slot: value}."""
  updates = {}
  for name, values in fields.items():
    array = getattr(tree, name)
    for slot, value in values.items():
      array = array.at[slot].set(value)
    updates[name] = array
  return tree.replace(**updates)


def _at(array, slots):
  return np.asarray(array)[slots]


def _children(tree, node):
  kids = np.asarray(tree.children[node])
  return [int(k) for k in kids if k >= 0]


def test_init_tree_and_bad_sizes():
  tree = T.init_tree(5, C, L, E, root_step=3)
  assert np.asarray(tree.used).tolist() == [True, False, False, False, False]
  assert int(tree.step[0]) == 3 and int(tree.root) == 0
  assert float(tree.min_q) == -1.0 and float(tree.max_q) == 1.0
  with pytest.raises(ValueError, match='num_nodes'):
    T.init_tree(0, C, L, E)
  with pytest.raises(ValueError, match='embed_dim'):
    T.init_tree(4, C, L, 2.5)


def test_token_set_len():
  assert np.asarray(T.token_set_len(jnp.arange(6))).tolist() == [1, 2, 4, 10, 10, 10]


def test_expand_priors_root_smoothing_and_plain():
  tree = _expand(T.init_tree(N, C, L, E), 0, [[5], [6], [7]], [2.0, 1.0, 1.0])
  assert _children(tree, 0) == [1, 2, 3]
  # p = [.5, .25, .25]; 0.75 p + 0.25 / 3 already sums to 1.
  expected = [0.75 * 0.5 + 0.25 / 3, 0.75 * 0.25 + 0.25 / 3, 0.75 * 0.25 + 0.25 / 3]
  np.testing.assert_allclose(tree.prior[1:4], expected, rtol=1e-6)
  assert np.asarray(tree.step[1:4]).tolist() == [1, 1, 1]
  assert np.asarray(tree.parent[1:4]).tolist() == [0, 0, 0]
  # A non-root node gets plain normalised weights.
  tree = _expand(tree, 2, [[1, 2], [3, 4]], [0.3, 0.1])
  assert _children(tree, 2) == [4, 5]
  np.testing.assert_allclose(tree.prior[4:6], [0.75, 0.25], rtol=1e-6)
  assert np.asarray(tree.tokens[5]).tolist() == [3, 4, 0]
  assert int(tree.num_tokens[5]) == 2 and int(tree.step[5]) == 2
  assert int(tree.num_cands[2]) == 2
  np.testing.assert_allclose(tree.cand_weights[2, :2], [0.3, 0.1])


def test_expand_skips_invalid_candidates_and_stores_compacted_list():
  tokens, lens, weights, valid = _candidates([[1], [2], [3]], [0.5, 0.2, 0.3])
  valid = valid.at[1].set(False)
  tree = T.expand(T.init_tree(N, C, L, E).replace(root=jnp.int32(7)), 0, tokens, lens,
                  weights, valid, *_no_top())
  assert _children(tree, 0) == [1, 2]
  assert np.asarray(tree.tokens[1:3, 0]).tolist() == [1, 3]
  np.testing.assert_allclose(tree.prior[1:3], [0.625, 0.375], rtol=1e-6)
  assert int(tree.num_cands[0]) == 2
  assert np.asarray(tree.cand_tokens[0, :2, 0]).tolist() == [1, 3]


def test_expand_rejects_bad_shapes():
  tree = T.init_tree(N, C, L, E)
  tokens, lens, weights, valid = _candidates([[1]], [1.0])
  with pytest.raises(ValueError, match='cand_tokens'):
    T.expand(tree, 0, tokens[:, :2], lens, weights, valid, *_no_top())
  with pytest.raises(ValueError, match='top_ids'):
    T.expand(tree, 0, tokens, lens, weights, valid, jnp.zeros((3,), jnp.int32),
             jnp.zeros((C,)))
  big = jnp.zeros((C + 1, L), jnp.int32)
  with pytest.raises(ValueError, match='at most max_children'):
    T.expand(tree, 0, big, jnp.ones((C + 1,), jnp.int32), jnp.ones((C + 1,)),
             jnp.ones((C + 1,), bool), *_no_top())


def test_overflow_counted_when_slots_run_out():
  tree = _expand(T.init_tree(3, C, L, E), 0, [[1], [2], [3], [4]], [1, 1, 1, 1])
  assert _children(tree, 0) == [1, 2]
  assert int(tree.overflow) == 2
  assert np.asarray(tree.tokens[1:3, 0]).tolist() == [1, 2]
  # Priors stay those of the full candidate list (uniform over 4, smoothed).
  np.testing.assert_allclose(tree.prior[1:3], [0.25, 0.25], rtol=1e-6)
  assert Q.tree_stats(tree)['overflow'] == 2


def _scored_tree():
  """Root 0 (n=9) with children 1..3 and set statistics; min_q=-0.5, max_q=1.5."""
  tree = _expand(T.init_tree(N, C, L, E), 0, [[1], [2], [3]], [1, 1, 1])
  return _set(tree.replace(min_q=jnp.float32(-0.5), max_q=jnp.float32(1.5)),
              visits={0: 9.0, 1: 3.0, 2: 0.0, 3: 1.5},
              value={1: 0.5, 2: 0.7, 3: -0.25},
              prior={1: 0.2, 2: 0.5, 3: 0.3})


def test_puct_scores_min_max_normalised():
  scores = T.puct_scores(_scored_tree(), 0, 2.0)
  span = 1.5 - (-0.5) + 1e-5
  expected = [
      (0.5 + 0.5) / span + 2 * 0.2 * 3.0 / 4.0,
      0.0 + 2 * 0.5 * 3.0 / 1.0,            # n == 0: qhat = 0 whatever q is
      (-0.25 + 0.5) / span + 2 * 0.3 * 3.0 / 2.5,
      -math.inf,
  ]
  np.testing.assert_allclose(scores, expected, rtol=1e-6)
  assert int(T.select_child(_scored_tree(), 0, 2.0)) == 2


def test_select_child_first_maximum_wins():
  tree = _set(_scored_tree(), visits={1: 2.0, 2: 2.0, 3: 2.0},
              value={1: 0.1, 2: 0.3, 3: 0.3}, prior={1: 0.2, 2: 0.4, 3: 0.4})
  assert int(T.select_child(tree, 0, 2.0)) == 2
  assert int(T.select_child(tree, 1, 2.0)) == -1


def test_most_visited_child_ties():
  tree = _set(_scored_tree(), visits={1: 3.0, 2: 3.0, 3: 1.0},
              value={1: 0.1, 2: 0.2, 3: 0.9})
  assert int(T.most_visited_child(tree, 0)) == 2      # n tie -> larger q
  tree = _set(tree, value={1: 0.2})
  assert int(T.most_visited_child(tree, 0)) == 1      # full tie -> first
  tree = _set(tree, visits={3: 3.5})
  assert int(T.most_visited_child(tree, 0)) == 3      # fractional n counts
  assert int(T.most_visited_child(tree, 1)) == -1


def _two_children(emb_a, emb_b, q_a=-0.1, q_b=-0.2, seqs=([1], [2])):
  tree = _expand(T.init_tree(N, C, L, E), 0, list(seqs), [1, 1])
  return _set(tree, embedding={1: jnp.array(emb_a), 2: jnp.array(emb_b)},
              has_embedding={1: True, 2: True}, value={1: q_a, 2: q_b})


def test_should_add_child_variance_rule():
  # var (unbiased, 2 rows) = [0, 0.02^2 / 2] -> norm 2e-4 < 0.03.
  tree = _two_children([1.0, 0.0], [1.0, 0.02])
  assert bool(T.should_add_child(tree, 0, 20, 0.03))
  assert not bool(T.should_add_child(tree, 0, 2, 0.03))          # at the cap
  assert not bool(T.should_add_child(_set(tree, value={2: 0.0}), 0, 20, 0.03))
  assert not bool(T.should_add_child(_set(tree, has_embedding={2: False}), 0, 20, 0.03))
  # var = [0, 0.3^2 / 2] -> norm 0.045: above 0.03 * 1 token, below 0.03 * 2 tokens.
  wide = [1.0, 0.3]
  assert not bool(T.should_add_child(_two_children([1.0, 0.0], wide), 0, 20, 0.03))
  two_tokens = _two_children([1.0, 0.0], wide, seqs=([1, 2], [3, 4]))
  assert bool(T.should_add_child(two_tokens, 0, 20, 0.03))


def test_should_add_child_one_child_never_widens():
  tree = _expand(T.init_tree(N, C, L, E), 0, [[1]], [1.0])
  tree = _set(tree, embedding={1: jnp.array([1.0, 0.0])}, has_embedding={1: True},
              value={1: -0.9})
  assert not bool(T.should_add_child(tree, 0, 20, 0.03))
  assert not bool(T.should_add_child(tree, 1, 20, 0.03))          # a leaf


def test_add_children_one_token_at_root():
  logits = jnp.array([2.0, 1.0, 0.5, 0.0])
  top = (jnp.array([11, 12, 13, 14], jnp.int32), logits)
  tree = _expand(T.init_tree(N, C, L, E), 0, [[11], [12]], [0.7, 0.3], top=top)
  before = np.asarray(tree.prior[1:3])
  tree = T.add_children_one_token(tree, 0)
  assert _children(tree, 0) == [1, 2, 3]
  assert int(tree.tokens[3, 0]) == 13 and int(tree.num_tokens[3]) == 1
  p13 = math.exp(0.5) / (math.exp(2.0) + math.exp(1.0) + math.exp(0.5))
  np.testing.assert_allclose(tree.prior[3], 0.75 * p13 + 0.25 / 3, rtol=1e-6)
  np.testing.assert_array_equal(tree.prior[1:3], before)
  assert int(tree.step[3]) == 1


def test_add_children_one_token_drops_zero_probability():
  # exp(-300) underflows to 0 in float32: the third token is not a candidate.
  top = (jnp.array([11, 12, 13, 14], jnp.int32), jnp.array([2.0, 1.0, -298.0, -299.0]))
  tree = _expand(T.init_tree(N, C, L, E), 0, [[11], [12]], [0.7, 0.3], top=top)
  tree = T.add_children_one_token(tree, 1)                 # no stored logits: no-op
  assert _children(tree, 1) == []
  widened = T.add_children_one_token(tree, 0)
  assert _children(widened, 0) == [1, 2] and int(widened.overflow) == 0


def test_add_children_multi_prepends_and_appends():
  tree = _expand(T.init_tree(N, C, L, E), 0, [[9]], [1.0])
  tree = _expand(tree, 1, [[1, 2], [3, 4], [5, 6]], [0.4, 0.2, 0.1])
  before = np.asarray(tree.prior[2:5])
  new = _candidates([[1, 2], [7, 8]], [0.5, 0.25], k=2)
  tree = T.add_children_multi(tree, 1, *new)
  assert _children(tree, 1) == [2, 3, 4, 5]
  assert np.asarray(tree.tokens[5]).tolist() == [7, 8, 0]
  # First #children + 1 = 4 entries: (1,2) .5, (7,8) .25, (1,2) .4, (3,4) .2.
  np.testing.assert_allclose(tree.prior[5], 0.25 / 1.35, rtol=1e-6)
  np.testing.assert_array_equal(tree.prior[2:5], before)
  assert int(tree.num_cands[1]) == C
  assert np.asarray(tree.cand_tokens[1, :, 0]).tolist() == [1, 7, 1, 3]
  np.testing.assert_allclose(tree.cand_weights[1], [0.5, 0.25, 0.4, 0.2])


def test_add_children_multi_at_root_with_column_overflow():
  tree = _expand(T.init_tree(N, C, L, E), 0, [[1, 2], [3, 4], [5, 6]], [0.4, 0.2, 0.1])
  new_tokens, new_lens, new_weights, _ = _candidates([[7, 8], [9, 9]], [0.3, 0.1], k=2)
  tree = T.add_children_multi(tree, 0, new_tokens, new_lens, new_weights,
                              jnp.array([True, True]))
  # Entries (7,8) .3, (9,9) .1, (1,2) .4, (3,4) .2 -> both new ones wanted, one column.
  assert _children(tree, 0) == [1, 2, 3, 4]
  assert np.asarray(tree.tokens[4, :2]).tolist() == [7, 8]
  np.testing.assert_allclose(tree.prior[4], 0.75 * 0.3 + 0.25 / 4, rtol=1e-6)
  assert int(tree.overflow) == 1


def _two_level_tree():
  """0 -> (1, 2); 1 -> (3, 4), with set statistics and embeddings."""
  tree = _expand(T.init_tree(N, C, L, E), 0, [[1], [2]], [1, 1])
  tree = _expand(tree, 1, [[3, 4], [5, 6]], [1, 1])
  return _set(tree.replace(min_q=jnp.float32(-0.3), max_q=jnp.float32(-0.2)),
              visits={0: 3.0, 1: 2.0, 2: 1.0, 3: 1.0},
              real_visits={0: 3, 1: 2, 2: 1, 3: 1},
              value={0: 0.2, 1: 0.5, 2: -0.5, 3: 0.0},
              embedding={1: jnp.array([1.0, 0.0]), 2: jnp.array([0.96, 0.28]),
                         3: jnp.array([0.0, 1.0])},
              has_embedding={1: True, 2: True, 3: True})


def test_backup_two_levels_with_sharing():
  path_emb = jnp.array([[9.0, 9.0], [0.8, 0.6], [0.0, 2.0]])
  tree = T.backup(_two_level_tree(), jnp.array([0, 1, 3]), 3, -1.0, path_emb,
                  0.95, 0.2, True)
  np.testing.assert_allclose(_at(tree.visits, [0, 1, 3, 4]), [4.0, 3.0, 2.0, 0.0])
  assert _at(tree.real_visits, [0, 1, 2, 3]).tolist() == [4, 3, 1, 2]
  np.testing.assert_allclose(_at(tree.value, [0, 1, 3]), [0.2 - 1.2 / 4, 0.0, -0.5],
                             atol=1e-7)
  emb1 = np.array([1.0 - 0.2 / 3, 0.2])
  np.testing.assert_allclose(tree.embedding[1], emb1, rtol=1e-6)
  np.testing.assert_allclose(tree.embedding[3], [0.0, 1.5], rtol=1e-6)
  np.testing.assert_array_equal(tree.embedding[0], [0.0, 0.0])      # root: never
  # Sibling 2 of node 1 shares; sibling 4 of node 3 has no embedding (cos 0).
  cos = (emb1 @ np.array([0.96, 0.28])) / np.linalg.norm(emb1)
  w = 0.2 * cos
  np.testing.assert_allclose(tree.visits[2], 1.0 + w, rtol=1e-6)
  np.testing.assert_allclose(tree.value[2], (-0.5 - w) / (1.0 + w), rtol=1e-6)
  assert float(tree.value[4]) == 0.0
  np.testing.assert_allclose([tree.min_q, tree.max_q], [-0.5, 0.0], atol=1e-7)


def test_backup_without_similarity_and_short_path():
  path_emb = jnp.array([[0.0, 0.0], [0.8, 0.6], [5.0, 5.0]])
  tree = T.backup(_two_level_tree(), jnp.array([0, 1, 3]), 2, 1.0, path_emb,
                  0.95, 0.2, False)
  np.testing.assert_allclose(_at(tree.visits, [0, 1, 2, 3]), [4.0, 3.0, 1.0, 1.0])
  np.testing.assert_allclose(_at(tree.value, [0, 1, 2]), [0.4, 2.0 / 3, -0.5],
                             rtol=1e-6)
  np.testing.assert_array_equal(tree.embedding[3], [0.0, 1.0])
  np.testing.assert_allclose([tree.min_q, tree.max_q], [-0.3, 2.0 / 3], rtol=1e-6)


def _deep_tree():
  """0 -> (1, 2); 1 -> (3, 4); 2 -> (5,); 3 -> (6,), priors of 3, 4 = .6, .2."""
  tree = _expand(T.init_tree(N, C, L, E), 0, [[1], [2]], [1, 1])
  tree = _expand(tree, 1, [[3, 3], [4, 4]], [3, 1])
  tree = _expand(tree, 2, [[5, 5]], [1])
  tree = _expand(tree, 3, [[6, 6, 6]], [1])
  return _set(tree, prior={3: 0.6, 4: 0.2},
              visits={1: 5.0, 3: 2.0}, value={1: 0.4, 3: -0.1})


def test_paths_masks_and_depths():
  tree = _deep_tree()
  path, path_len = Q.path_to_root(tree, 6, 5)
  assert int(path_len) == 4 and np.asarray(path).tolist() == [0, 1, 3, 6, -1]
  path, path_len = Q.path_to_root(tree, 6, 2)
  assert int(path_len) == 4 and np.asarray(path).tolist() == [0, 1]
  assert np.flatnonzero(Q.ancestor_mask(tree, 6)).tolist() == [0, 1, 3, 6]
  assert np.asarray(Q.depths(tree)).tolist() == [0, 1, 1, 2, 2, 2, 3, -1, -1, -1]
  assert int(Q.node_depth(tree, 5)) == 2
  assert np.flatnonzero(T.subtree_mask(tree, 1)).tolist() == [1, 3, 4, 6]
  stats = Q.tree_stats(tree)
  assert (int(stats['num_used']), int(stats['max_depth'])) == (7, 3)


def test_commit_frees_non_subtree_and_smooths():
  tree = T.commit(_deep_tree(), 1)
  assert np.flatnonzero(tree.used).tolist() == [1, 3, 4, 6]
  assert int(tree.root) == 1 and int(tree.parent[1]) == -1
  for freed in (0, 2, 5):
    assert int(tree.parent[freed]) == -1 and int(tree.num_children[freed]) == 0
    assert float(tree.visits[freed]) == 0.0
  assert _children(tree, 1) == [3, 4]
  assert (float(tree.visits[1]), float(tree.value[1])) == (5.0, pytest.approx(0.4))
  mixed = np.array([0.75 * 0.6 + 0.125, 0.75 * 0.2 + 0.125])
  np.testing.assert_allclose(_at(tree.prior, [3, 4]), mixed / mixed.sum(), rtol=1e-6)
  assert float(tree.prior[6]) == 1.0                      # grandchildren untouched
  assert float(tree.min_q) == -1.0 and float(tree.max_q) == 1.0
  assert np.asarray(Q.ancestor_mask(tree, 6)).nonzero()[0].tolist() == [1, 3, 6]
  assert int(Q.tree_stats(tree)['max_depth']) == 2


def test_expand_after_commit_reuses_lowest_freed_slots():
  tree = T.commit(_deep_tree(), 1)
  tree = _expand(tree, 6, [[7] * 3, [8] * 3, [9] * 3, [1] * 3], [4, 3, 2, 1])
  assert _children(tree, 6) == [0, 2, 5, 7]
  assert _at(tree.parent, [0, 2, 5, 7]).tolist() == [6, 6, 6, 6]
  assert _at(tree.step, [0, 2, 5, 7]).tolist() == [4, 4, 4, 4]
  assert float(tree.visits[0]) == 0.0 and not bool(tree.has_embedding[0])
  np.testing.assert_allclose(_at(tree.prior, [0, 2, 5, 7]), [0.4, 0.3, 0.2, 0.1],
                             rtol=1e-6)
  assert int(tree.overflow) == 0
  # Only slots 8 and 9 remain: three more children overflow by one.
  tree = _expand(tree, 3, [[1, 1], [2, 2], [3, 3]], [1, 1, 1])
  assert _children(tree, 3) == [6, 8, 9] and int(tree.overflow) == 1


def _episode(tree, cand_weights, value, emb):
  """expand, select, two backups, widen, commit, expand and widen the new root."""
  top = (jnp.array([1, 2, 3, 4], jnp.int32), jnp.array([3.0, 2.0, 1.0, 0.0]))
  tokens, lens, _, valid = _candidates([[1], [2], [3]], [1, 1, 1])
  tree = T.expand(tree, 0, tokens, lens, cand_weights, valid, *top)
  selected = T.select_child(tree, 0, 2.0)
  path = jnp.stack([jnp.int32(0), selected, jnp.int32(-1)])
  embs = jnp.stack([emb, emb, emb])
  tree = T.backup(tree, path, 2, value, embs, 0.95, 0.2, True)
  tree = T.backup(tree, path.at[1].set(3), 2, -value, embs, 0.95, 0.2, True)
  widen = T.should_add_child(tree, 0, 20, 0.03)
  tree = T.add_children_one_token(tree, 0)
  tree = T.commit(tree, T.most_visited_child(tree, 0))
  tokens, lens, _, valid = _candidates([[5, 6], [7, 8]], [1, 1])
  tree = T.expand(tree, tree.root, tokens, lens, cand_weights, valid, *_no_top())
  new_tokens, new_lens, _, new_valid = _candidates([[5, 6], [9, 9]], [1, 1], k=2)
  tree = T.add_children_multi(tree, tree.root, new_tokens, new_lens, cand_weights[:2],
                              new_valid)
  leaf = tree.children[tree.root, 2]
  path, path_len = Q.path_to_root(tree, leaf, 3)
  return tree, (selected, widen, path, path_len, Q.ancestor_mask(tree, leaf))


def test_jit_vmap_matches_one_by_one():
  rng = np.random.default_rng(0)
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (3, C)), jnp.float32)
  values = jnp.array([1.0, -1.0, 0.0])
  embs = jnp.asarray(rng.normal(size=(3, E)), jnp.float32)
  trees = jax.tree_util.tree_map(lambda x: jnp.stack([x] * 3), T.init_tree(N, C, L, E))
  batched = jax.jit(jax.vmap(_episode))(trees, weights, values, embs)
  one_tree = jax.jit(_episode)
  for b in range(3):
    single = one_tree(T.init_tree(N, C, L, E), weights[b], values[b], embs[b])
    assert int(single[0].num_children[single[0].root]) == 3
    for got, want in zip(jax.tree_util.tree_leaves(batched),
                         jax.tree_util.tree_leaves(single)):
      np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-7)


def test_root_children_and_grandchildren_as_recorded():
  """0 -> (1, 2, 3); 1 -> (4, 5, 6): the root's children in column order, and below
  each the `keep` most visited children in descending n (ties: column order)."""
  tree = _expand(T.init_tree(N, C, L, E), 0, [[1], [2], [3]], [1, 1, 1])
  tree = _expand(tree, 1, [[4, 4], [5], [6, 6, 6]], [1, 1, 1])
  tree = _set(tree, visits={1: 5.0, 2: 1.0, 4: 1.0, 5: 2.5, 6: 1.0},
              real_visits={1: 5, 2: 1, 4: 1, 5: 2, 6: 1},
              value={1: 0.5, 2: -1.0, 4: 0.25, 5: -0.5, 6: 1.0})
  tokens, stats = T.root_children(tree)
  assert np.asarray(tokens)[:, 0].tolist() == [1, 2, 3, -1]
  np.testing.assert_allclose(np.asarray(stats)[:, :3], [[5, 5, 0.5], [1, 1, -1], [0, 0, 0],
                                                        [0, 0, 0]])
  grand_tokens, grand_stats = jax.jit(T.root_grandchildren, static_argnums=1)(tree, 2)
  assert grand_tokens.shape == (C, 2, L) and grand_stats.shape == (C, 2, 4)
  # Child 1's children by visits: 5 (2.5), then 4 and 6 tie at 1.0 -> 4 (first column).
  assert np.asarray(grand_tokens[0]).tolist() == [[5, -1, -1], [4, 4, -1]]
  np.testing.assert_allclose(grand_stats[0], [[2.5, 2, -0.5, tree.prior[5]],
                                              [1.0, 1, 0.25, tree.prior[4]]])
  # Children without children, and empty columns: nothing.
  assert (np.asarray(grand_tokens[1:]) == -1).all()
  assert (np.asarray(grand_stats[1:]) == 0).all()
  tokens, stats = T.node_children(tree, jnp.int32(-1))
  assert (np.asarray(tokens) == -1).all() and (np.asarray(stats) == 0).all()
  with pytest.raises(ValueError, match='keep'):
    T.root_grandchildren(tree, C + 1)
