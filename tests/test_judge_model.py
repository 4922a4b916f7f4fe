"""RAIN with a judge model apart from the policy (--judge_model; Evaluator's
separate_judge), on tiny random LLaMAs, against the plain-Python oracle.

The policy is tests/test_rain_llama.py's tiny-gqa (weights A); the judge is another
architecture, tiny-mha, with its own random weights B, reading the A/B self-evaluation
prompt (judge.ABJudge). The oracle (tests/oracle/rain_reference.py) runs the policy by
full recomputation, and judges every rollout by recomputing B on judge prefix + answer
+ path + rollout + suffix_k from scratch and voting as docs/algorithm.md §4.3. The
engine keeps the judge's own KV cache and, with a separate judge, makes one call per
model where the self-judging search fuses policy and judge feeds; it must commit the
same sets after the same simulations, with the same root-children statistics.

The CLI run whose judge model holds the policy's weights equals the self-judging run
(tests/test_cli_rain.py); bad judge flags: tests/test_cli.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.presets import get_preset
from rain_jax import engine, kvcache, search
from rain_jax.judge import ABJudge
from tests import llama_recompute
from tests.oracle import rain_reference as ref
from tests.test_rain_llama import (CFG, EMBED_SCALE, MODEL, PROMPT_WIDTH, PROMPTS, SEEDS,
                                   RecomputedLlama, assert_matches_oracle, oracle_settings,
                                   row_of, search_tables)

JUDGE_MODEL = get_preset('tiny-mha')
LABEL_A, LABEL_B = 65, 66
SUFFIXES = ((13, 40, 7, 91, 40), (13, 40, 7, 88, 21, 40, 5))
JUDGE_PREFIXES = ([9, 31, 44, 17, 60, 12], [9, 31, 44, 83], [9, 31, 44, 17, 60, 12, 25, 70])
JUDGE_WIDTH = 16
# The longest text the oracle judges: judge prefix + answer + path + rollout + suffix.
RECOMPUTE_WIDTH = (JUDGE_WIDTH + CFG.max_new_tokens + CFG.max_depth * CFG.max_tokens_per_node
                   + CFG.max_rollout + max(len(s) for s in SUFFIXES))
GAP_FLOOR = 1e-3   # label logits closer than this would make a verdict arbitrary


class RecomputedABJudge:
  """The oracle's judge: v = votes - 1 from the judge model's label logits after
  judge prefix + ids[prompt_len:] + suffix_k, each run from scratch. Keeps every gap
  |logit(A) - logit(B)| it read, and the verdicts."""

  def __init__(self, params, judge_prefix):
    self.params = params
    self.judge_prefix = list(judge_prefix)
    self.gaps, self.values = [], []

  def value(self, ids, prompt_len):
    text = self.judge_prefix + list(ids[prompt_len:])
    logits = llama_recompute.last_logits(JUDGE_MODEL, self.params,
                                         [text + list(s) for s in SUFFIXES], RECOMPUTE_WIDTH)
    a, b = logits[:, LABEL_A], logits[:, LABEL_B]
    self.gaps += [float(x) for x in np.abs(a - b)]
    value = float(int(a[0] > b[0]) + int(b[1] > a[1]) - 1)
    self.values.append(value)
    return value


@pytest.fixture(scope='module')
def policy_params():
  return llama_recompute.scaled_params(MODEL, seed=5, embed_scale=EMBED_SCALE)


@pytest.fixture(scope='module')
def judge_params():
  return llama_recompute.scaled_params(JUDGE_MODEL, seed=3, embed_scale=EMBED_SCALE)


def model_judge(policy_layout):
  """The A/B judge on the judge model's own functions and cache."""
  return ABJudge(model=engine.llama_model_fns(JUDGE_MODEL), suffixes=SUFFIXES,
                 label_a=LABEL_A, label_b=LABEL_B, chunk=CFG.feed_chunk,
                 layout=kvcache.judge_layout(CFG, policy_layout, prefix_width=JUDGE_WIDTH,
                                             suffix_slots=ABJudge.suffix_slots(SUFFIXES)),
                 stop_sequences=np.asarray(search_tables().stop_sequences))


@pytest.fixture(scope='module')
def engine_out(policy_params, judge_params):
  """One jitted generation of every prompt with the separate judge (outputs as numpy)."""
  layout = kvcache.policy_layout(CFG, PROMPT_WIDTH)
  searcher = search.Searcher(engine.llama_model_fns(MODEL), model_judge(layout), CFG,
                             PROMPT_WIDTH, separate_judge=True)
  tokens = llama_recompute.pad_rows(PROMPTS, PROMPT_WIDTH)
  judge_inputs = {'tokens': jnp.asarray(llama_recompute.pad_rows(JUDGE_PREFIXES, JUDGE_WIDTH)),
                  'lens': jnp.asarray([len(p) for p in JUDGE_PREFIXES], jnp.int32)}
  out = searcher.generate((policy_params, judge_params), search_tables(), jnp.asarray(tokens),
                          jnp.asarray([len(p) for p in PROMPTS], jnp.int32),
                          jnp.asarray(SEEDS, jnp.uint32), judge_inputs)
  return jax.device_get(out)


@pytest.fixture(scope='module')
def oracle_runs(policy_params, judge_params):
  """Per prompt: (the oracle's generation, its judge with the gaps and verdicts read)."""
  runs = []
  for prompt, judge_prefix, seed in zip(PROMPTS, JUDGE_PREFIXES, SEEDS):
    oracle_judge = RecomputedABJudge(judge_params, judge_prefix)
    result = ref.rain_generate(tuple(prompt), RecomputedLlama(MODEL, policy_params),
                               oracle_judge, oracle_settings(prompt, seed))
    runs.append((result, oracle_judge))
  return runs


@pytest.mark.parametrize('row', range(len(PROMPTS)))
def test_separate_judge_matches_oracle(engine_out, oracle_runs, row):
  result, oracle_judge = oracle_runs[row]
  assert min(oracle_judge.gaps) > GAP_FLOOR, 'a near tie would make a verdict arbitrary'
  assert_matches_oracle(row_of(engine_out, row), result)


def test_the_judge_model_separates_options(oracle_runs):
  """The verdicts read from the judge model are not all alike (else the comparison
  above could not tell the judge model's verdicts from a constant judge's)."""
  values = [v for _, oracle_judge in oracle_runs for v in oracle_judge.values]
  assert len(set(values)) >= 2, f'every verdict was {values[0]}'
