"""scripts/timeline.py (the labelled model-call timeline) and the bench's use of it."""
import json
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')
sys.path.insert(0, SCRIPTS)
import bench  # pylint: disable=wrong-import-position
import timeline  # pylint: disable=wrong-import-position


def test_summary_of_hand_made_stamps():
  """Each call is charged the time since the one before; prefill and commit passes do
  not count as search calls; the first committed set ends at row 0's first commit."""
  rec = timeline.Recorder()
  stamps = [(10.0, 'prefill', 256), (10.5, 'path', 32), (10.6, 'rollout+proposals', 12),
            (10.7, 'rollout+proposals', 2), (11.0, 'judge', 50), (11.4, 'path', 32),
            (11.7, 'judge', 50), (11.8, 'commit', 20), (12.0, 'path', 32),
            (12.3, 'judge', 50)]
  rec.calls = list(stamps)
  rec.commits = [(11.75, [1], [2])]
  records = [{'search': {'simulations': 3, 'committed_sets': 1}, 'response_ids': [5]}]
  got = timeline.summarize(rec, records)
  assert got['simulations'] == 3 and got['committed_sets'] == 1
  assert got['model_calls'] == 10
  assert got['calls_per_simulation'] == pytest.approx(8 / 3)   # 10 - prefill - commit
  assert got['seconds'] == pytest.approx(2.3)
  assert got['seconds_per_simulation'] == pytest.approx(2.3 / 3)
  path, judge = got['phases']['path'], got['phases']['judge']
  assert path['calls'] == 3 and path['seconds'] == pytest.approx(0.5 + 0.4 + 0.2)
  assert judge['calls'] == 3 and judge['seconds'] == pytest.approx(0.3 + 0.3 + 0.3)
  assert judge['tokens_per_call'] == 50
  assert got['phases']['rollout+proposals']['tokens_per_call'] == 7
  assert sum(p['seconds'] for p in got['phases'].values()) == pytest.approx(2.3)
  first = got['first_committed_set']
  assert first['seconds'] == pytest.approx(1.75) and first['simulations'] == 2
  assert first['calls'] == 6 and first['calls_per_simulation'] == 3
  assert first['tokens_per_simulation'] == pytest.approx((32 + 12 + 2 + 50 + 32 + 50) / 2)
  assert got['tokens_per_simulation'] == pytest.approx((3 * 32 + 12 + 2 + 3 * 50) / 3)
  assert got['answers'] == [[5]]


def test_cost_model_recovers_a_linear_cost():
  """Calls that cost exactly 40 ms + 3 ms per token give back those numbers; prefill and
  commit passes (priced differently here) are left out of the fit."""
  rec, t = [(0.0, 'prefill', 256)], 0.0
  for phase, tokens in [('path', 16), ('commit', 20), ('rollout+proposals', 11),
                        ('judge', 58), ('rollout+proposals', 2), ('path', 30)]:
    t += 1.0 if phase == 'commit' else 0.040 + 0.003 * tokens
    rec.append((t, phase, tokens))
  fit = timeline.fit_call_cost(rec)
  assert fit['ms_per_call'] == pytest.approx(40.0) and fit['ms_per_token'] == pytest.approx(3.0)
  assert fit['calls_fitted'] == 5
  assert timeline.fit_call_cost([(0.0, 'path', 8), (0.1, 'path', 8)]) is None


def test_bad_overrides_are_refused_naming_them(capsys):
  assert timeline.parse_overrides('max_T=20,similarity=none,c_puct=1.5') == {
      'max_T': 20, 'similarity': 'none', 'c_puct': 1.5}
  for bad in ('max_T', 'nonsense=3'):
    with pytest.raises(ValueError, match='KEY=VALUE'):
      timeline.parse_overrides(bad)
  assert timeline.main(['--rain=bogus=1']) == 1
  assert 'bogus=1' in capsys.readouterr().err


@pytest.mark.slow
def test_rain_suite_reports_calls_per_simulation_by_phase(capsys):
  """The bench's rain suite on a tiny random model: the stamped run gives the same
  answers as the timed one (bench asserts it), and its phases add up."""
  assert bench.main(['--suite=rain', '--preset=tiny-gqa',
                     '--preset_override=vocab_size=32000,max_seq_len=2048',
                     '--dtype=float32', '--batch_sizes=1', '--rain_new_tokens=3',
                     '--rain_max_T=15', '--rain_max_rollout=4', '--rain_runs=1',
                     '--rain_vanilla=false']) == 0
  report = json.loads(capsys.readouterr().out)
  row = report['results'][0]['rain']
  phases = row['phases']
  assert {'path', 'rollout+proposals', 'judge'} <= set(phases)
  search_calls = sum(p['calls_per_simulation'] for name, p in phases.items()
                     if name not in ('prefill', 'commit'))
  assert row['calls_per_simulation'] == pytest.approx(search_calls)
  assert phases['judge']['calls_per_simulation'] == pytest.approx(1.0)
  assert sum(p['share_of_time'] for p in phases.values()) == pytest.approx(1.0)
  assert row['projected_accelerator_seconds_per_committed_set'] == pytest.approx(
      row['calls_per_committed_set'] * report['settings']['rain_call_ms'] / 1000)
