"""`python -m rain_jax.run --method=both --dump_tree` end to end, in a subprocess, on a
tiny random HF LLaMA checkpoint (the production RAIN path: flags -> RainRunner ->
Searcher -> records): the session's shared tiny run (tests/tiny_run.py), whose summary
and tree pictures tests/test_summary.py and tests/test_report_trees.py check.

The tree dump is checked against what the tree decided: at every commit the committed
token set is the dumped root child the commit rule picks (most visits n, ties to the
larger q, then the first), so the dumped sets, concatenated, are the answer; the dumped
simulations add up to the search's count; every child's text decodes its tokens; n is
never below fn (similarity sharing only adds visits).
"""
import os

import numpy as np
import pytest

from models.tokenizer import load_tokenizer
from tests import tiny_run
from tests.record_compare import split_floats
from tests.tiny_run import LLAMA_TOKENIZER, MAX_T


def rain_records(output):
  return [r for r in tiny_run.read_records(output) if r['method'] == 'rain']


@pytest.fixture(scope='module')
def rain_run(tmp_path_factory, tiny_llama_32k_dir):
  """The RAIN records of the session's tiny run (two custom prompts, --dump_tree)."""
  output, _ = tiny_run.shared_run(tmp_path_factory, tiny_llama_32k_dir)
  return rain_records(output)


def committed_child(children):
  """The child the commit rule picks: most visits n, ties to larger q, then the first."""
  best = None
  for child in children:
    if best is None or (child['n'], child['q']) > (best['n'], best['q']):
      best = child
  return best


def test_tree_dump_matches_the_committed_answer(rain_run):
  tok = load_tokenizer(LLAMA_TOKENIZER)
  assert sorted(r['id'] for r in rain_run) == ['bread', 'sky']
  for record in rain_run:
    assert record['method'] == 'rain' and record['stop_reason'] != 'no_children'
    dump, search = record['tree_dump'], record['search']
    assert len(dump) == search['committed_sets'] >= 1
    answer = []
    for step in dump:
      assert step['children'], 'a commit needs at least one root child'
      for child in step['children']:
        assert child['text'] == tok.decode(child['tokens'])
        assert child['n'] >= child['fn'] >= 0
      answer += committed_child(step['children'])['tokens']
    assert answer == record['response_ids']
    assert sum(step['simulations'] for step in dump) == search['simulations']
    # Each outer step runs at least max(max_T, 15) - carried visits unless it stops
    # early; the first step carries none.
    assert dump[0]['simulations'] >= max(MAX_T, 15) or search['early_stops'] > 0


# Fields of a record that depend on the run's timing, not on its search.
TIMING = ('seconds', 'batch_seconds', 'compile_seconds')


@pytest.mark.slow   # the engine-level oracle test of a judge model is tests/test_judge_model.py
def test_a_judge_model_with_the_policy_weights_equals_self_judging(
    rain_run, tmp_path_factory, tiny_llama_32k_dir):
  """--judge_hf_dir naming the policy's own checkpoint: a second model (its own
  parameters, caches and calls) with the same weights gives the self-judging run's
  records: every token, count and decision; the tree statistics' floats to 1e-5 (the
  self-judging search runs policy and judge feeds in one call, the judge model in calls
  of their own)."""
  output, _ = tiny_run.run_cli(tmp_path_factory.mktemp('cli_judge_model'),
                              tiny_llama_32k_dir, f'--judge_hf_dir={tiny_llama_32k_dir}')
  judged = rain_records(output)
  assert [r['judge_model'] for r in judged] == [os.path.basename(tiny_llama_32k_dir)] * 2
  assert all('judge_model' not in r for r in rain_run)
  by_id = {r['id']: r for r in rain_run}
  for record in judged:
    ours, theirs = [], []
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING + ('judge_model',)}
    assert split_floats(strip(record), ours) == split_floats(strip(by_id[record['id']]), theirs)
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
