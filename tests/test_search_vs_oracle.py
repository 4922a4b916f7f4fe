"""The JAX search against the plain-Python oracle, driving the same scripted fakes.

Both sides draw every random number from the same counters (docs/engine.md §3), so
they must commit exactly the same token sets, run the same simulations per commit and
leave the same statistics on the root's children.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rain_jax import search, stopping
from rain_jax.config import RainConfig
from tests import fake_jax
from tests.oracle import fake_lm
from tests.oracle import rain_reference as ref

MAX_NEW = 12
_SEARCHERS = {}


def _searcher(lm, prompt_width, **overrides):
  fns, _ = fake_jax.bigram_model(lm)
  settings = dict(max_T=16, min_T=3, max_new_tokens=MAX_NEW, num_nodes=512, max_depth=8,
                  max_rollout=48, similarity='mean_hidden')
  cfg = RainConfig(**{**settings, **overrides})
  key = (lm.vocab_size, lm.embedding_table.shape[1], prompt_width, cfg, lm.turn_marker_id)
  if key not in _SEARCHERS:
    judge = fake_jax.ScriptedJudge(fake_jax.tables_for(lm).stop_sequences)
    _SEARCHERS[key] = search.Searcher(fns, judge, cfg, prompt_width)
  return _SEARCHERS[key], cfg


def run_jax(lm, prompts, judge_kwargs, seeds, **overrides):
  width = max(len(p) for p in prompts)
  searcher, cfg = _searcher(lm, width, **overrides)
  _, params = fake_jax.bigram_model(lm)
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  out = searcher.generate(params, fake_jax.tables_for(lm), jnp.asarray(tokens),
                          jnp.asarray([len(p) for p in prompts], jnp.int32),
                          jnp.asarray(seeds, jnp.uint32),
                          fake_jax.judge_inputs(batch=len(prompts), **judge_kwargs))
  return jax.device_get(out), cfg


def run_oracle(lm, prompt, judge_kwargs, seed, cfg):
  judge = (fake_lm.ConstantJudge(judge_kwargs['constant']) if 'constant' in judge_kwargs
           else fake_lm.HarmfulTokenJudge(judge_kwargs['harmful']))
  settings = ref.Settings(max_T=cfg.max_T, min_T=cfg.min_T, maxlen=len(prompt) + MAX_NEW - 1,
                          seed=seed, propose_temperature=cfg.propose_temperature,
                          sample_attempts_factor=cfg.sample_attempts_factor,
                          rollout_stops_at_clause_end=cfg.rollout_stops_at_clause_end,
                          terminal_eos_in_path=cfg.terminal_eos_in_path,
                          rollout_stops_at_path_eos=cfg.rollout_stops_at_path_eos,
                          search_stops_at_turn_marker=cfg.search_stops_at_turn_marker)
  return ref.rain_generate(tuple(prompt), lm, judge, settings)


ORACLE_TO_JAX_REASON = {'eos': 'eos', 'turn_marker': 'turn_marker', 'maxlen': 'max_new_tokens',
                        'no_children': 'no_children'}


def assert_same(out, row, result):
  n = out['answer_len'][row]
  assert tuple(out['answer'][row, :n]) == tuple(result.tokens)
  assert stopping.STOP_REASONS[out['stop_reason'][row]] == ORACLE_TO_JAX_REASON[result.stop_reason]
  commits = out['stats']['committed_sets'][row]
  assert commits == len(result.commits)
  assert out['stats']['simulations'][row] == result.simulations
  assert out['stats']['early_stops'][row] == result.early_stops
  for i, commit in enumerate(result.commits):
    assert out['dump_sims'][row, i] == commit.simulations
    assert bool(out['dump_early'][row, i]) == commit.early_stop
    chosen = out['dump_chosen'][row, i]
    assert tuple(out['dump_tokens'][row, i, chosen, :len(result.committed[i])]) == \
        tuple(result.committed[i])
    kids = out['dump_tokens'][row, i]
    stats = out['dump_stats'][row, i]
    assert int(np.sum(kids[:, 0] >= 0)) == len(commit.children)
    for j, child in enumerate(commit.children):
      assert tuple(kids[j, :len(child.tokens)]) == child.tokens
      np.testing.assert_allclose(stats[j], [child.n, child.fn, child.q, child.p],
                                 rtol=2e-5, atol=2e-5)


# More seeds: -m slow (the default suite keeps one, for its ten-minute budget).
@pytest.mark.parametrize('lm_seed', [0] + [pytest.param(s, marks=pytest.mark.slow) for s in (1, 2)])
def test_random_bigram_with_harmful_token_judge(lm_seed):
  lm = fake_lm.random_bigram_lm(16, 8, seed=lm_seed, eos_id=1, clause_end_ids=(2,),
                                logit_scale=1.5)
  prompt = [3, 4, 6]
  out, cfg = run_jax(lm, [prompt], {'harmful': 5}, [lm_seed])
  assert_same(out, 0, run_oracle(lm, prompt, {'harmful': 5}, lm_seed, cfg))


def test_constant_judge_runs_the_full_budget_each_step():
  lm = fake_lm.random_bigram_lm(16, 8, seed=7, eos_id=1, clause_end_ids=(2,),
                                logit_scale=1.5)
  prompt = [3, 9]
  out, cfg = run_jax(lm, [prompt], {'constant': 0.0}, [3])
  result = run_oracle(lm, prompt, {'constant': 0.0}, 3, cfg)
  assert_same(out, 0, result)
  assert result.commits[0].simulations == cfg.max_T
  assert result.early_stops == 0
  assert out['stats']['positive_judgements'][0] == out['stats']['negative_judgements'][0] == 0


def test_widening_on_alike_bad_children_matches_oracle():
  """All tokens share one vector and the judge says -1: every visited node with two or
  more children is widened (one-token at the root, multi-token below)."""
  rng = np.random.default_rng(11)
  logits = rng.normal(0, 1.5, (16, 16)).astype(np.float32)
  lm = fake_lm.BigramLM(logits, np.ones((16, 8), np.float32), eos_id=1, clause_end_ids=(2,))
  prompt = [3, 4]
  out, cfg = run_jax(lm, [prompt], {'constant': -1.0}, [5], max_T=12)
  result = run_oracle(lm, prompt, {'constant': -1.0}, 5, cfg)
  assert_same(out, 0, result)
  assert max(len(c.children) for c in result.commits) > cfg.num_candidates  # widened
  assert out['stats']['negative_judgements'][0] == result.simulations
  assert out['stats']['positive_judgements'][0] == 0


def test_rain_avoids_harmful_token_that_greedy_emits():
  # Greedy path from token 3: 3 -> 5 (harmful) -> 2 (clause end) ...; 3 -> 6 is close.
  prefs = {3: {5: 3.0, 6: 2.5, 7: 1.0}, 5: {2: 3.0}, 6: {2: 3.0}, 7: {2: 3.0},
           2: {1: 4.0}}
  lm = fake_lm.BigramLM(fake_lm.bigram_logits(12, prefs), np.eye(12, 8, dtype=np.float32),
                        eos_id=1, clause_end_ids=(2,))
  prompt = [4, 3]
  assert 5 in ref.vanilla_greedy(tuple(prompt), lm, MAX_NEW, ref.Settings())
  out, cfg = run_jax(lm, [prompt], {'harmful': 5}, [0])
  answer = list(out['answer'][0, :out['answer_len'][0]])
  assert 5 not in answer
  assert_same(out, 0, run_oracle(lm, prompt, {'harmful': 5}, 0, cfg))


def test_batch_equals_rows_one_by_one_and_oracle():
  lm = fake_lm.random_bigram_lm(16, 8, seed=4, eos_id=1, clause_end_ids=(2,),
                                logit_scale=1.5, turn_marker_id=9)
  prompts = [[3, 4, 6], [7, 8], [10, 11, 12]]
  seeds = [1, 2, 3]
  batched, cfg = run_jax(lm, prompts, {'harmful': 5}, seeds)
  for row, (prompt, seed) in enumerate(zip(prompts, seeds)):
    assert_same(batched, row, run_oracle(lm, prompt, {'harmful': 5}, seed, cfg))


@pytest.mark.slow
def test_tree_capacity_overflow_is_counted_and_search_degrades_gracefully():
  """A tree too small for the search: children that do not fit are counted, the run
  finishes, and every committed set is a real child of the root it left."""
  lm = fake_lm.random_bigram_lm(16, 8, seed=5, eos_id=1, clause_end_ids=(2,),
                                logit_scale=1.5)
  small, _ = run_jax(lm, [[3, 4, 6]], {'constant': 0.0}, [0], num_nodes=24)
  assert small['overflow'][0] > 0
  assert stopping.STOP_REASONS[small['stop_reason'][0]] != 'running'
  assert small['answer_len'][0] > 0
  roomy, _ = run_jax(lm, [[3, 4, 6]], {'constant': 0.0}, [0], num_nodes=2048)
  assert roomy['overflow'][0] == 0


class RecordingJudge(fake_jax.ScriptedJudge):
  """ScriptedJudge that also records, per call, the judged rows' first uncommitted
  token (the first token of the selected path, or of the rollout when the path is
  empty; -1 for no text) and whether the row was active."""

  def __init__(self, stop_sequences, calls):
    super().__init__(stop_sequences)
    self.calls = calls

  def evaluate(self, params, state, *, gen, answer_len, gen_len, active):
    first = jnp.take_along_axis(gen, answer_len[:, None], axis=1)[:, 0]
    jax.debug.callback(lambda f, a: self.calls.append((np.asarray(f), np.asarray(a))),
                       jnp.where(answer_len < gen_len, first, -1), active, ordered=True)
    return super().evaluate(params, state, gen=gen, answer_len=answer_len, gen_len=gen_len,
                            active=active)


def test_parallel_leaves_select_distinct_paths_under_virtual_loss():
  """P = 4 leaves per tick under virtual loss (not the reference). The first tick finds
  only the unexpanded root; on the second, every tree's four selections must take four
  different root children of equal prior, since each sees the virtual losses of the
  ones before it (plain PUCT on unchanged statistics would pick the first four times). The search
  still avoids the harmful token and runs P simulations per tick."""
  prefs = {3: {5: 3.0, 6: 3.0, 7: 3.0, 8: 3.0}, 5: {2: 3.0}, 6: {2: 3.0}, 7: {2: 3.0},
           8: {2: 3.0}, 2: {1: 4.0}}
  lm = fake_lm.BigramLM(fake_lm.bigram_logits(12, prefs), np.eye(12, 8, dtype=np.float32),
                        eos_id=1, clause_end_ids=(2,))
  fns, params = fake_jax.bigram_model(lm)
  cfg = RainConfig(max_T=16, min_T=3, max_new_tokens=MAX_NEW, num_nodes=512, max_depth=8,
                   max_rollout=48, similarity='mean_hidden', parallel_leaves=4)
  calls = []
  judge = RecordingJudge(fake_jax.tables_for(lm).stop_sequences, calls)
  prompts = np.asarray([[4, 3], [4, 3]], np.int32)
  out = jax.device_get(search.Searcher(fns, judge, cfg, 2).generate(
      params, fake_jax.tables_for(lm), jnp.asarray(prompts), jnp.asarray([2, 2], jnp.int32),
      jnp.asarray([0, 1], jnp.uint32), fake_jax.judge_inputs(batch=2, harmful=5)))
  assert calls[0][1].all()      # tick 1: the unexpanded root, 4 times (then its rollouts)
  first_tokens, active = calls[1]
  assert active.all()
  for tree in range(2):
    chosen = first_tokens[4 * tree:4 * tree + 4]
    assert len(set(chosen.tolist())) == 4 and (chosen >= 0).all(), chosen
  for row in range(2):
    answer = list(out['answer'][row, :out['answer_len'][row]])
    assert answer and 5 not in answer
    assert out['stats']['simulations'][row] % 4 == 0


# ------------------------------------------- the original's per-task rules (issue 7)


def test_one_token_children_come_in_ascending_id_order():
  """The original collects one-token candidates with np.where over the vocabulary, so
  the root's children are in ascending id whatever their logits (item 4)."""
  lm = fake_lm.random_bigram_lm(16, 8, seed=3, eos_id=1, clause_end_ids=(2,),
                                logit_scale=1.5)
  prompt = [3, 4, 6]
  out, cfg = run_jax(lm, [prompt], {'constant': 0.0}, [0])
  ids = out['dump_tokens'][0, 0, :, 0]
  ids = ids[ids >= 0]
  top10 = np.argsort(-lm.logits_table[6], kind='stable')[:cfg.num_candidates]
  assert list(ids) == sorted(top10)          # the top-10 tokens, by id
  assert list(ids) != list(top10)            # not by logit
  assert_same(out, 0, run_oracle(lm, prompt, {'constant': 0.0}, 0, cfg))


def test_adv_one_token_priors_use_temperature_two():
  """adv proposes at temperature 2 (the original's group_getp default), one-token
  priors included (item 5): hand-computed root priors at the first commit."""
  lm = fake_lm.random_bigram_lm(16, 8, seed=8, eos_id=1, clause_end_ids=(2,),
                                logit_scale=1.5)
  prompt = [3, 4, 6]
  adv = dict(propose_temperature=2.0, sample_attempts_factor=2, min_T=5,
             terminal_eos_in_path=True)
  out, cfg = run_jax(lm, [prompt], {'constant': 0.0}, [0], **adv)
  z = lm.logits_table[6].astype(np.float64)
  top = np.sort(np.argsort(-z, kind='stable')[:10])
  p = np.exp(z[top] / 2.0 - np.max(z[top] / 2.0))
  p = 0.75 * p / p.sum() + 0.25 / 10                       # root smoothing
  ids = out['dump_tokens'][0, 0, :10, 0]
  assert list(ids) == list(top)
  np.testing.assert_allclose(out['dump_stats'][0, 0, :10, 3], p / p.sum(), rtol=1e-5)
  assert_same(out, 0, run_oracle(lm, prompt, {'constant': 0.0}, 0, cfg))


TASK_RULES = {
    'hh': dict(),
    'adv': dict(propose_temperature=2.0, sample_attempts_factor=2, min_T=5,
                terminal_eos_in_path=True),
    'truth': dict(min_T=16, rollout_stops_at_clause_end=False,
                  rollout_stops_at_path_eos=True, search_stops_at_turn_marker=False),
}


@pytest.mark.parametrize('task', sorted(TASK_RULES))
# More seeds: -m slow (the default suite keeps one, for its ten-minute budget).
@pytest.mark.parametrize('lm_seed', [20, pytest.param(21, marks=pytest.mark.slow)])
def test_stopping_rules_of_each_task_match_the_oracle(task, lm_seed):
  """EOS and the turn marker are likely, answers short: the rollout stop (len > maxlen;
  HH/adv only after a sampled EOS, truth on any EOS in the text), the terminal test
  (HH/truth: EOS in the leaf's set, adv: anywhere), the judge's cut before the turn
  marker, and truth ignoring markers must all agree with the oracle (items 3, 7)."""
  rng = np.random.default_rng(lm_seed)
  logits = rng.normal(0.0, 1.0, (16, 16)).astype(np.float32)
  logits[:, 1] += 1.5     # EOS
  logits[:, 9] += 1.5     # turn marker
  lm = fake_lm.BigramLM(logits, rng.normal(0, 1, (16, 8)).astype(np.float32), eos_id=1,
                        clause_end_ids=(2,), turn_marker_id=9)
  prompt = [3, 4, 6]
  out, cfg = run_jax(lm, [prompt], {'harmful': 5}, [lm_seed], max_T=15, **TASK_RULES[task])
  assert_same(out, 0, run_oracle(lm, prompt, {'harmful': 5}, lm_seed, cfg))
