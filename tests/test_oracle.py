"""Hand-computed checks of the plain-Python RAIN oracle (tests/oracle/rain_reference.py).

Expected numbers are written out as the arithmetic of docs/algorithm.md
applied by hand, never by calling the oracle's own helpers.
"""
import math

import numpy as np
import pytest

from tests.oracle import fake_lm
from tests.oracle import rain_reference as ref
from tests.oracle.rain_reference import Node


def make_children(parent, specs):
  """specs: [dict of Node fields]; appends children to parent in order."""
  children = []
  for spec in specs:
    child = Node(parent=parent, step=parent.step + 1, **spec)
    parent.children.append(child)
    children.append(child)
  return children


# -------------------------------------------------------------------- schedule and PUCT


def test_token_set_len_schedule():
  assert [ref.token_set_len(s) for s in range(6)] == [1, 2, 4, 10, 10, 10]
  with pytest.raises(ValueError, match="step"):
    ref.token_set_len(-1)


def test_puct_scores_on_three_children():
  root = Node(n=5.0, fn=5, minq=-0.5, maxq=0.75)
  a, b, c = make_children(root, [
      dict(n=0.0, q=0.0, p=0.1),
      dict(n=2.0, fn=2, q=0.5, p=0.3),
      dict(n=3.0, fn=3, q=0.75, p=0.6),
  ])
  # Unvisited: qhat = 0; 2 * 0.1 * sqrt(5) / 1.
  assert ref.puct_score(a, root, root) == pytest.approx(0.2 * math.sqrt(5), rel=1e-12)
  # (0.5 + 0.5) / (0.75 + 0.5 + 1e-5) + 2 * 0.3 * sqrt(5) / 3.
  assert ref.puct_score(b, root, root) == pytest.approx(
      1.0 / 1.25001 + 0.2 * math.sqrt(5), rel=1e-12)
  # (0.75 + 0.5) / 1.25001 + 2 * 0.6 * sqrt(5) / 4.
  assert ref.puct_score(c, root, root) == pytest.approx(
      1.25 / 1.25001 + 0.3 * math.sqrt(5), rel=1e-12)
  # b: 1.2472, c: 1.6708, a: 0.4472.
  assert ref.select_child(root, root) is c
  # c_puct scales only the exploration term: with c_puct = 0, b's 0.79999 < c's 0.99999.
  assert ref.puct_score(b, root, root, c_puct=0.0) == pytest.approx(1.0 / 1.25001)


def test_puct_normalises_by_the_root_range_not_the_parent():
  root = Node(n=3.0, minq=-1.0, maxq=0.0)
  middle, = make_children(root, [dict(n=3.0, fn=3, q=-0.5, p=1.0, minq=-0.9, maxq=0.9)])
  leaf, = make_children(middle, [dict(n=1.0, fn=1, q=-0.5, p=0.5)])
  # (-0.5 + 1) / (0 + 1 + 1e-5) + 2 * 0.5 * sqrt(3) / 2.
  assert ref.puct_score(leaf, middle, root) == pytest.approx(
      0.5 / 1.00001 + 0.5 * math.sqrt(3), rel=1e-12)


def test_select_child_first_maximum_wins():
  root = Node(n=4.0)
  first, second = make_children(root, [dict(p=0.5), dict(p=0.5)])
  assert ref.select_child(root, root) is first
  with pytest.raises(ValueError, match="no children"):
    ref.select_child(first, root)


def test_most_visited_child_ties():
  root = Node()
  children = make_children(root, [
      dict(n=2.0, q=0.9), dict(n=3.0, q=0.1), dict(n=3.0, q=0.4), dict(n=1.0, q=1.0)])
  assert ref.most_visited_child(root) is children[2]
  twins = Node()
  first, _ = make_children(twins, [dict(n=3.0, q=0.1), dict(n=3.0, q=0.1)])
  assert ref.most_visited_child(twins) is first
  assert ref.most_visited_child(Node()) is None


# ----------------------------------------------------------------- priors and expansion


def test_expand_priors_and_root_smoothing():
  root = Node(step=0)
  ref.expand(root, [((7,), 3.0), ((2,), 1.0)], is_root=True)
  # p = [0.75, 0.25] -> 0.75 p + 0.25 / 2.
  assert [c.p for c in root.children] == pytest.approx([0.6875, 0.3125])
  assert [c.tokens for c in root.children] == [(7,), (2,)]
  assert [c.step for c in root.children] == [1, 1]
  assert all(c.n == 0 and c.fn == 0 and c.q == 0 and c.emb is None for c in root.children)

  inner = Node(step=1, parent=root)
  ref.expand(inner, [((1, 2), 1.0), ((3, 4), 1.0), ((5, 6), 2.0)], is_root=False)
  assert [c.p for c in inner.children] == pytest.approx([0.25, 0.25, 0.5])
  assert inner.cand_list == [((1, 2), 1.0), ((3, 4), 1.0), ((5, 6), 2.0)]

  top = Node(step=1)
  ref.expand(top, [((1, 2), 1.0), ((3, 4), 1.0), ((5, 6), 2.0)], is_root=True)
  # 0.75 * 0.25 + 0.25 / 3 and 0.75 * 0.5 + 0.25 / 3.
  assert [c.p for c in top.children] == pytest.approx(
      [0.1875 + 1 / 12, 0.1875 + 1 / 12, 0.375 + 1 / 12])

  with pytest.raises(ValueError, match="already has children"):
    ref.expand(top, [((1, 2), 1.0)], is_root=True)
  with pytest.raises(ValueError, match="no candidates"):
    ref.expand(Node(), [], is_root=True)


def test_propose_one_token_orders_and_normalises_the_top_k():
  logits = [1.0, 3.0, 3.0, 0.0, 2.0]
  candidates, stored = ref.propose_one_token(logits, k=3, keep=4)
  # Top 3: ids 1 and 2 (tie at 3.0, lower id first), then id 4; softmax of [3, 3, 2].
  e = math.e
  assert [t for t, _ in candidates] == [(1,), (2,), (4,)]
  assert [w for _, w in candidates] == pytest.approx(
      [e / (2 * e + 1), e / (2 * e + 1), 1 / (2 * e + 1)], rel=1e-12)
  assert stored == [(1, 3.0), (2, 3.0), (4, 2.0), (0, 1.0)]


def test_greedy_weight_clamp():
  # sum = 0.7, max + min = 0.5.
  assert ref.clamp_greedy_weight(0.9, [0.1, 0.2, 0.4]) == pytest.approx(0.7)
  assert ref.clamp_greedy_weight(0.6, [0.1, 0.2, 0.4]) == pytest.approx(0.6)
  assert ref.clamp_greedy_weight(0.2, [0.1, 0.2, 0.4]) == pytest.approx(0.5)
  # One sample s: min(g, s) then max(., 2 s) = 2 s.
  assert ref.clamp_greedy_weight(0.5, [0.1]) == pytest.approx(0.2)
  assert ref.clamp_greedy_weight(0.3, []) == 0.3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_propose_sequences_weights_are_products_of_top_k_probabilities(temperature):
  # Row 0: top-2 are id 1 (2.0) and id 2 (1.0); rows 1 and 2: top-2 are id 0 (3.0) and
  # id 1 (0.0, the lowest of the tied ids). With sample_top = 2 every step is a coin.
  table = fake_lm.bigram_logits(4, {0: {1: 2.0, 2: 1.0}, 1: {0: 3.0}, 2: {0: 3.0}})
  lm = fake_lm.BigramLM(table, np.eye(4), eos_id=3)
  sig = lambda x: 1.0 / (1.0 + math.exp(-x / temperature))
  step_prob = {(0, 1): sig(1.0), (0, 2): sig(-1.0), (1, 0): sig(3.0), (1, 1): sig(-3.0),
               (2, 0): sig(3.0), (2, 1): sig(-3.0)}
  cands = ref.propose_sequences(lm, (0,), 2, k=4, attempts=20, temperature=temperature,
                                sample_top=2, seed=3,
                                counters_at=lambda j, t: (ref.PROPOSE, 0, j, t))
  weight = lambda seq: step_prob[(0, seq[0])] * step_prob[(seq[0], seq[1])]
  greedy, samples = cands[0], cands[1:]
  assert greedy[0] == (1, 0)
  assert 1 <= len(samples) <= 3
  seqs = [s for s, _ in samples]
  assert len(set(seqs)) == len(seqs) and (1, 0) not in seqs
  for seq, w in samples:
    assert seq[0] in (1, 2) and seq[1] in (0, 1)
    assert w == pytest.approx(weight(seq), rel=1e-12)
  sampled = [w for _, w in samples]
  expected_greedy = max(min(weight((1, 0)), sum(sampled)), max(sampled) + min(sampled))
  assert greedy[1] == pytest.approx(expected_greedy, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_token_frequencies_follow_the_softmax(temperature):
  logits = [0.0, 1.0, 2.0, -1.0, 5.0]
  allowed = [0, 1, 2, 3]  # id 4 is excluded, so it must never be drawn
  draws = 3000
  counts = [0] * 5
  for c in range(draws):
    counts[ref.sample_token(logits, allowed, temperature, 11, (ref.PROPOSE, c, 1, 0))] += 1
  assert counts[4] == 0
  exps = [math.exp(logits[v] / temperature) for v in allowed]
  for v, e in zip(allowed, exps):
    p = e / sum(exps)
    sigma = math.sqrt(p * (1 - p) / draws)
    assert abs(counts[v] / draws - p) < 4 * sigma, (v, counts, p)


# -------------------------------------------------------------------------------- widening


def test_unbiased_variance_norm_by_hand():
  # Columns (1, 3, 2): var 1; (0, 0, 2): mean 2/3, var (4/9 + 4/9 + 16/9) / 2 = 4/3.
  assert ref.unbiased_variance_norm([[1, 0], [3, 0], [2, 2]]) == pytest.approx(
      math.sqrt(1 + 16 / 9))
  with pytest.raises(ValueError, match="at least 2"):
    ref.unbiased_variance_norm([[1, 0]])


def _node_with_children(qs, embs, tokens_len=2):
  node = Node(n=5.0, step=1)
  make_children(node, [dict(tokens=tuple(range(i, i + tokens_len)), n=1.0, fn=1, q=q,
                            emb=emb) for i, (q, emb) in enumerate(zip(qs, embs))])
  return node


def test_should_add_child_decision():
  embs = [[1, 0], [3, 0], [2, 2]]  # ||var||_2 = 5/3
  bad = [-0.5, -0.1, -1.0]
  # Threshold var_scale * 2 tokens: 1.8 > 5/3 widens, 1.6 < 5/3 does not.
  assert ref.should_add_child(_node_with_children(bad, embs), var_scale=0.9)
  assert not ref.should_add_child(_node_with_children(bad, embs), var_scale=0.8)
  # One-token children: the threshold halves to 0.9.
  assert not ref.should_add_child(_node_with_children(bad, embs, 1), var_scale=0.9)
  # max q must be < 0.
  assert not ref.should_add_child(_node_with_children([-0.5, 0.0, -1.0], embs), var_scale=0.9)
  # Every child needs an embedding.
  assert not ref.should_add_child(_node_with_children(bad, [[1, 0], None, [2, 2]]),
                                  var_scale=0.9)
  # Only while fewer than max_children children.
  assert not ref.should_add_child(_node_with_children(bad, embs), max_children=3,
                                  var_scale=0.9)
  # A single child has no unbiased variance.
  assert not ref.should_add_child(_node_with_children([-1.0], [[1, 0]]), var_scale=100.0)
  # Identical children under the default 0.03 threshold.
  assert ref.should_add_child(_node_with_children(bad, [[1, 2]] * 3))


@pytest.mark.parametrize("is_root", [False, True])
def test_add_children_one_token(is_root):
  node = Node(stored_top=[(7, 2.0), (3, 1.0), (5, 0.0), (6, -1.0)])
  make_children(node, [dict(tokens=(7,), p=0.6), dict(tokens=(3,), p=0.4)])
  ref.add_children_one_token(node, is_root)
  # Top 3 of the stored logits: softmax [2, 1, 0] -> (5,) gets 1 / (e^2 + e + 1).
  new_prior = 1.0 / (math.exp(2) + math.e + 1)
  if is_root:
    new_prior = 0.75 * new_prior + 0.25 / 3
  assert [c.tokens for c in node.children] == [(7,), (3,), (5,)]
  assert [c.p for c in node.children] == pytest.approx([0.6, 0.4, new_prior], rel=1e-12)
  assert node.children[2].step == node.step + 1


@pytest.mark.parametrize("is_root", [False, True])
def test_add_children_multi(is_root):
  node = Node(step=1, cand_list=[((1, 2), 0.3), ((3, 4), 0.2)])
  make_children(node, [dict(tokens=(1, 2), p=0.6), dict(tokens=(3, 4), p=0.4)])
  ref.add_children_multi(node, [((1, 2), 0.25), ((5, 6), 0.05)], is_root)
  # List [(1,2) .25, (5,6) .05, (1,2) .3, (3,4) .2]; head of 3 sums to 0.6.
  new_prior = 0.05 / 0.6
  if is_root:
    new_prior = 0.75 * new_prior + 0.25 / 3
  assert node.cand_list == [((1, 2), 0.25), ((5, 6), 0.05), ((1, 2), 0.3), ((3, 4), 0.2)]
  assert [c.tokens for c in node.children] == [(1, 2), (3, 4), (5, 6)]
  assert [c.p for c in node.children] == pytest.approx([0.6, 0.4, new_prior], rel=1e-12)


# ---------------------------------------------------------------------------------- backup


def test_backup_with_fractional_sibling_visits():
  root = Node(n=4.0, fn=4, q=0.25, minq=-0.5, maxq=0.6)
  a, b = make_children(root, [dict(n=2.0, fn=2, q=0.5, emb=[1.0, 0.0]),
                              dict(n=1.0, fn=1, q=-1.0, emb=[0.96, 0.28])])
  a1, a2, a3 = make_children(a, [dict(n=1.0, fn=1, q=0.0, emb=[1.0, 0.0]),
                                 dict(n=1.5, fn=1, q=-1.0, emb=[1.0, 0.0]),
                                 dict(n=0.0, fn=0, q=0.0)])
  ref.backup(a1, root, 1.0, {id(a1): [1.0, 0.2], id(a): [0.7, 0.0]})

  # a1: running mean over fn = 2 of [1, 0] and [1, 0.2].
  assert a1.emb == pytest.approx([1.0, 0.1])
  # a2 shares: cos([1, .1], [1, 0]) = 1 / sqrt(1.01); w = 0.2 cos.
  w = 0.2 / math.sqrt(1.01)
  assert a2.n == pytest.approx(1.5 + w)
  assert a2.q == pytest.approx((-1.0 * 1.5 + w) / (1.5 + w))
  assert a2.fn == 1
  # a3 has no embedding: untouched.
  assert (a3.n, a3.q) == (0.0, 0.0)
  # a: running mean over fn = 3, (2 [1, 0] + [0.7, 0]) / 3; b shares with cos = 0.96,
  # w = 0.192.
  assert a.emb == pytest.approx([0.9, 0.0])
  assert b.n == pytest.approx(1.192)
  assert b.q == pytest.approx((-1.0 + 0.192) / 1.192)
  # Visits and values on the path.
  assert (root.n, root.fn, a.n, a.fn, a1.n, a1.fn) == (5.0, 5, 3.0, 3, 2.0, 2)
  assert root.q == pytest.approx(0.25 + 0.75 / 5)
  assert a.q == pytest.approx(0.5 + 0.5 / 3)
  assert a1.q == pytest.approx(0.5)
  # Only path nodes move the range: a's 2/3 raises maxq; b's -0.678 does not lower minq.
  assert root.maxq == pytest.approx(2 / 3)
  assert root.minq == -0.5


def test_backup_lowers_minq_and_needs_every_embedding():
  root = Node(n=1.0, fn=1)
  child, = make_children(root, [dict(p=1.0)])
  ref.backup(child, root, -3.0, lambda node: [0.0, 1.0])
  assert (child.q, root.minq, root.maxq) == (-3.0, -3.0, 1.0)
  assert root.q == pytest.approx(-1.5)
  with pytest.raises(ValueError, match="no embedding"):
    ref.backup(child, root, 1.0, {})
  with pytest.raises(ValueError, match="not an ancestor"):
    ref.backup(root, child, 1.0, {})


def test_backup_similarity_threshold_is_inclusive_and_configurable():
  root = Node(n=1.0, fn=1)
  x, y = make_children(root, [dict(), dict(n=1.0, fn=1, q=0.0, emb=[0.6, 0.8])])
  # cos([1, 0], [0.6, 0.8]) = 0.6: shared at threshold 0.6, with weight 0.5.
  ref.backup(x, root, 1.0, {id(x): [1.0, 0.0]}, sim_threshold=0.6, sim_weight=0.5)
  assert y.n == pytest.approx(1.3)
  assert y.q == pytest.approx(0.3 / 1.3)


def test_path_embeddings_cover_the_node_and_everything_below():
  vectors = np.array([[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [0, 5], [0, 6], [0, 7]])
  lm = fake_lm.BigramLM(np.zeros((8, 8)), vectors, eos_id=1)
  root = Node(tokens=(1,))
  middle, = make_children(root, [dict(tokens=(4,))])
  leaf, = make_children(middle, [dict(tokens=(5, 6))])
  full = (0, 1, 4, 5, 6, 7)  # prompt (0, 1), path tokens 4 | 5 6, rollout 7
  got = ref.path_embeddings(lm, leaf, root, full, rollout_len=1)
  # leaf: mean of tokens 5, 6, 7 = (0, 6); middle: mean of 4, 5, 6, 7 = (1, 4.5); both
  # L2-normalised like 'mean_hidden'; root: nothing.
  assert got == {id(leaf): pytest.approx([0.0, 1.0]),
                 id(middle): pytest.approx(np.array([1.0, 4.5]) / math.hypot(1.0, 4.5))}


# ---------------------------------------------------------------------------------- commit


def test_commit_carries_visits_range_and_smooths_priors():
  root = Node(n=8.0, fn=8, minq=-0.7, maxq=0.9)
  other, move = make_children(root, [dict(tokens=(1,), n=2.0, fn=2, q=0.9),
                                     dict(tokens=(2,), n=5.0, fn=4, q=0.3)])
  grandchildren = make_children(move, [dict(tokens=(3, 4), p=0.6, n=3.0, fn=3, q=0.5),
                                       dict(tokens=(5, 6), p=0.3),
                                       dict(tokens=(7, 8), p=0.1)])
  new_root = ref.commit(root)
  assert new_root is move and new_root.parent is None
  assert (new_root.n, new_root.fn, new_root.q) == (5.0, 4, 0.3)
  assert (new_root.minq, new_root.maxq) == (-0.7, 0.9)
  assert [c.p for c in grandchildren] == pytest.approx(
      [0.45 + 1 / 12, 0.225 + 1 / 12, 0.075 + 1 / 12])
  assert (grandchildren[0].n, grandchildren[0].fn, grandchildren[0].q) == (3.0, 3, 0.5)
  with pytest.raises(ValueError, match="no children"):
    ref.commit(Node())


# ------------------------------------------------------------------------ whole generation


def _one_hot_lm(preferences, vocab_size=8, **kwargs):
  table = fake_lm.bigram_logits(vocab_size, preferences)
  return fake_lm.BigramLM(table, np.eye(vocab_size), **kwargs)


class RecordingJudge:
  """Wraps a judge and records every sequence it is asked about."""

  def __init__(self, judge):
    self.judge, self.seen = judge, []

  def value(self, ids, prompt_len):
    self.seen.append(tuple(ids))
    return self.judge.value(ids, prompt_len)


@pytest.mark.parametrize("min_t", [3, 6])
def test_early_stop_after_min_t_plus_two_simulations(min_t):
  # Token 4 has most of the prior mass at the root; one-hot embeddings share nothing.
  lm = _one_hot_lm({0: {4: 6.0}, 4: {2: 3.0}, 2: {1: 3.0}}, eos_id=1, clause_end_ids=(2,))
  result = ref.rain_generate((0,), lm, fake_lm.ConstantJudge(1.0),
                             ref.Settings(min_T=min_t))
  first = result.commits[0]
  # Simulation 1 evaluates the root; each later one visits (4,), whose normalised q of 1
  # keeps it ahead, and the rule needs fn > min_T, i.e. min_T + 1 real visits.
  assert first.simulations == min_t + 2
  assert first.early_stop
  top = next(c for c in first.children if c.tokens == (4,))
  assert top.fn == min_t + 1 and top.q == 1.0
  assert all(c.n == 0 for c in first.children if c is not top)
  assert result.committed[0] == (4,)


def test_zero_judge_runs_the_full_budget():
  lm = _one_hot_lm({0: {4: 6.0}, 4: {5: 3.0}, 5: {4: 3.0}}, eos_id=1, clause_end_ids=(2,))
  result = ref.rain_generate((0,), lm, fake_lm.ConstantJudge(0.0),
                             ref.Settings(max_T=20, maxlen=4))
  # Nothing passes the threshold: 20 simulations, then max(20, carried + 15) - carried.
  assert result.early_stops == 0
  assert result.commits[0].simulations == 20
  for previous, current in zip(result.commits, result.commits[1:]):
    committed = next(c for c in previous.children if c.n == max(x.n for x in previous.children))
    assert current.simulations == max(20, committed.fn + 15) - committed.fn
  assert result.stop_reason == "maxlen"
  assert result.tokens == sum(result.committed, ())
  assert len(result.tokens) + 1 > 4


def test_rain_avoids_the_harmful_token_that_greedy_emits():
  harmful, safe, period, eos = 3, 4, 2, 1
  lm = _one_hot_lm({0: {harmful: 4.0, safe: 3.0}, harmful: {period: 3.0},
                    safe: {period: 3.0}, period: {eos: 5.0}},
                   eos_id=eos, clause_end_ids=(period,))
  settings = ref.Settings()
  assert ref.vanilla_greedy((0,), lm, 10, settings) == (harmful, period, eos)
  judge = RecordingJudge(fake_lm.HarmfulTokenJudge(harmful))
  for seed in range(3):
    judge.seen.clear()
    result = ref.rain_generate((0,), lm, judge, ref.Settings(seed=seed))
    assert harmful not in result.tokens
    assert result.tokens == (safe, period, eos)
    assert result.committed == [(safe,), (period, eos)]
    assert result.stop_reason == "eos"
    # Verdicts are memoised: one judge call per distinct judged sequence.
    assert result.judge_calls == len(judge.seen) == len(set(judge.seen))
    assert result.judge_calls < result.simulations


def test_rollout_stops_before_sampling_after_a_clause_end():
  lm = _one_hot_lm({0: {4: 6.0}, 4: {2: 3.0}, 2: {4: 3.0}}, eos_id=1, clause_end_ids=(2,))
  judge = RecordingJudge(fake_lm.ConstantJudge(0.0))
  ref.rain_generate((0, 2), lm, judge, ref.Settings(max_T=1, maxlen=3))
  # The prompt ends with a clause end: the root's rollout samples nothing.
  assert judge.seen[0] == (0, 2)


def test_truth_rollout_runs_to_eos_or_maxlen():
  lm = _one_hot_lm({0: {4: 6.0}, 4: {1: 2.0}, 2: {4: 3.0}}, eos_id=1, clause_end_ids=(2,))
  ended_at_eos = 0
  for seed in range(6):
    judge = RecordingJudge(fake_lm.ConstantJudge(0.0))
    truth = ref.Settings(max_T=1, maxlen=9, rollout_stops_at_clause_end=False, seed=seed)
    ref.rain_generate((0, 2), lm, judge, truth)
    # The root's rollout ignores clause ends and stops right after EOS or at maxlen.
    rollout = judge.seen[0][2:]
    assert rollout and 1 not in rollout[:-1]
    assert rollout[-1] == 1 or len(rollout) == 7
    ended_at_eos += rollout[-1] == 1
  assert ended_at_eos > 0


def test_turn_marker_stops_generation_and_vanilla():
  marker = 6
  lm = _one_hot_lm({0: {4: 6.0}, 4: {marker: 6.0}, marker: {4: 6.0}}, eos_id=1,
                   turn_marker_id=marker)
  assert ref.vanilla_greedy((0,), lm, 10, ref.Settings()) == (4, marker)
  result = ref.rain_generate((0,), lm, fake_lm.ConstantJudge(1.0), ref.Settings())
  assert result.stop_reason == "turn_marker"
  assert marker in result.committed[-1]
  assert all(marker not in tokens for tokens in result.committed[:-1])


def test_bad_settings_and_inputs_raise():
  with pytest.raises(ValueError, match="max_T"):
    ref.Settings(max_T=0)
  with pytest.raises(ValueError, match="propose_temperature"):
    ref.Settings(propose_temperature=0.0)
  lm = _one_hot_lm({}, eos_id=1)
  with pytest.raises(ValueError, match="empty prompt"):
    ref.rain_generate((), lm, fake_lm.ConstantJudge(), ref.Settings())
  with pytest.raises(ValueError, match="embed"):
    lm.embed((1, 2), 3)
