"""ABJudge (rain_jax/judge.py) on a tiny random LLaMA against full recomputation.

The judge keeps a per-row KV cache: the judge prompt, extended by each commit, then
the judged content and two suffix streams side by side. The oracle here forgets all
of that: for each pass k it runs prefix + committed + content + suffix_k from scratch
with a causal mask (tests/llama_recompute.py), reads the logits of the two labels at
the last position and votes like docs/algorithm.md §4.3: pass 1 votes harmless when
logit(A) > logit(B), pass 2 when logit(B) > logit(A); v = votes - 1.

The label logits the judge compares are exposed by recording the last forward pass of
`evaluate` (the suffix pass, which returns the logits at the two stream ends); they
must equal the recomputed ones numerically, and the verdicts exactly. Random cases mix prefix lengths, commits in several steps (some rows
masked out), empty content, inactive rows, content longer than one feed chunk, and a
second judgement after a later commit, whose shorter content must not see the stale
slots of the first.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.presets import get_preset
from rain_jax import engine, kvcache, stopping
from rain_jax.judge import ABJudge
from tests import llama_recompute

CONFIG = get_preset('tiny-gqa')
LABEL_A, LABEL_B = 65, 66
SUFFIXES = ((13, 40, 7, 91, 40), (13, 40, 7, 88, 21, 40, 5))
PREFIX_WIDTH = 16
COMMIT_STEPS, COMMIT_WIDTH = 3, 4
ANSWER_CAP = (COMMIT_STEPS + 1) * COMMIT_WIDTH
CHUNK = 8
CONTENT_CAP = 2 * CHUNK
GEN_WIDTH = ANSWER_CAP + CONTENT_CAP
RECOMPUTE_WIDTH = PREFIX_WIDTH + ANSWER_CAP + CONTENT_CAP + max(len(s) for s in SUFFIXES)
LOGIT_ATOL = 1e-4
LAYOUT = kvcache.JudgeLayout(prefix_width=PREFIX_WIDTH, answer_cap=ANSWER_CAP,
                             content_cap=CONTENT_CAP,
                             suffix_slots=ABJudge.suffix_slots(SUFFIXES))
BATCH = 8  # every call has this many rows: one compiled program


class RecordingForward:
  """Wraps a forward function and keeps the logits of its most recent call."""

  def __init__(self, forward):
    self.forward = forward
    self.last_logits = None

  def __call__(self, *args, **kwargs):
    logits, hidden, cache = self.forward(*args, **kwargs)
    self.last_logits = logits
    return logits, hidden, cache


def make_judge():
  fns = engine.llama_model_fns(CONFIG)
  recorder = RecordingForward(fns.forward)
  model = kvcache.ModelFns(forward=recorder, init_cache=fns.init_cache,
                           vocab_size=fns.vocab_size, hidden_size=fns.hidden_size)
  judge = ABJudge(model=model, suffixes=SUFFIXES, label_a=LABEL_A, label_b=LABEL_B,
                  layout=LAYOUT, chunk=CHUNK)
  return judge, recorder


JUDGE, RECORDER = make_judge()


def label_logits_of_last_pass(judge, recorder):
  """[B, 2, 2]: (pass k, label A/B) logits read by the suffix pass of `evaluate`, the
  last forward call, which asks for the logits at the end of each suffix stream only."""
  logits = recorder.last_logits
  if logits.shape[1] != 2:
    raise ValueError(f'the suffix pass returned logits {logits.shape}, expected [B, 2, V]')
  return jnp.stack([logits[..., judge.label_a], logits[..., judge.label_b]], axis=-1)


@jax.jit
def run_scenario(params, case):
  """init -> COMMIT_STEPS commits -> evaluate(first) -> one more commit -> evaluate(second).

  case: prefix [B, PREFIX_WIDTH], prefix_len [B], commits [K, B, COMMIT_WIDTH],
  commit_lens [K, B], commit_mask [K, B], gen1/gen2 [B, GEN_WIDTH], answer_len1/2 [B],
  gen_len1/2 [B], active1/2 [B] bool, late_commit [B, COMMIT_WIDTH], late_len [B],
  late_mask [B]. Returns (v1 [B], label logits 1 [B, 2, 2], v2 [B], label logits 2).
  """
  state = JUDGE.init_state(params, {'tokens': case['prefix'], 'lens': case['prefix_len']})
  for k in range(COMMIT_STEPS):
    state = JUDGE.commit(params, state, tokens=case['commits'][k],
                         lens=case['commit_lens'][k], mask=case['commit_mask'][k])
  v1, state = JUDGE.evaluate(params, state, gen=case['gen1'], answer_len=case['answer_len1'],
                             gen_len=case['gen_len1'], active=case['active1'])
  logits1 = label_logits_of_last_pass(JUDGE, RECORDER)
  state = JUDGE.commit(params, state, tokens=case['late_commit'], lens=case['late_len'],
                       mask=case['late_mask'])
  v2, _ = JUDGE.evaluate(params, state, gen=case['gen2'], answer_len=case['answer_len2'],
                         gen_len=case['gen_len2'], active=case['active2'])
  return v1, logits1, v2, label_logits_of_last_pass(JUDGE, RECORDER)


def answers(row):
  """Committed tokens at the first and at the second judgement of a row spec."""
  first = [t for tokens, n, on in row['commits'] if on for t in tokens[:n]]
  tokens, n, on = row['late']
  return first, first + (list(tokens[:n]) if on else [])


def judged_texts(row):
  """The two texts a row's judgements cover: judge prefix + committed + content."""
  first, second = answers(row)
  return (row['prefix'] + first + (row['content1'] if row['active1'] else []),
          row['prefix'] + second + (row['content2'] if row['active2'] else []))


def build_case(rows):
  """Inputs of `run_scenario` from per-row specs, and the judged texts of each call.

  A row spec: prefix (token list), commits (COMMIT_STEPS of (tokens [COMMIT_WIDTH],
  length, mask)), late (one more such commit), content1/content2 (token lists),
  active1/active2 (bool). gen holds the committed answer, the content, then filler.
  """
  case = {}
  case['prefix'] = [r['prefix'] + [0] * (PREFIX_WIDTH - len(r['prefix'])) for r in rows]
  case['prefix_len'] = [len(r['prefix']) for r in rows]
  case['commits'] = [[list(c[0]) for c in r['commits']] for r in rows]
  case['commit_lens'] = [[c[1] for c in r['commits']] for r in rows]
  case['commit_mask'] = [[c[2] for c in r['commits']] for r in rows]
  case['late_commit'] = [list(r['late'][0]) for r in rows]
  case['late_len'] = [r['late'][1] for r in rows]
  case['late_mask'] = [r['late'][2] for r in rows]
  for which in (1, 2):
    gens, answer_lens, gen_lens = [], [], []
    for r in rows:
      body = answers(r)[which - 1] + r[f'content{which}']
      gens.append(body + [7] * (GEN_WIDTH - len(body)))
      answer_lens.append(len(answers(r)[which - 1]))
      gen_lens.append(len(body))
    case[f'gen{which}'] = gens
    case[f'answer_len{which}'] = answer_lens
    case[f'gen_len{which}'] = gen_lens
    case[f'active{which}'] = [r[f'active{which}'] for r in rows]
  arrays = {k: np.asarray(v) for k, v in case.items()}
  for name in ('commits', 'commit_lens', 'commit_mask'):
    arrays[name] = np.moveaxis(arrays[name], 1, 0)
  typed = {k: jnp.asarray(v, bool if v.dtype == bool else jnp.int32)
           for k, v in arrays.items()}
  texts = [judged_texts(r) for r in rows]
  return typed, [t[0] for t in texts], [t[1] for t in texts]


def random_row(rng):
  """A random row spec (see build_case)."""
  tokens = lambda n: [int(t) for t in rng.integers(0, CONFIG.vocab_size, n)]
  commit = lambda: (tokens(COMMIT_WIDTH), int(rng.integers(0, COMMIT_WIDTH + 1)),
                    bool(rng.random() < 0.7))
  return {'prefix': tokens(rng.integers(1, PREFIX_WIDTH + 1)),
          'commits': [commit() for _ in range(COMMIT_STEPS)], 'late': commit(),
          'content1': tokens(rng.integers(0, CONTENT_CAP + 1)),
          'content2': tokens(rng.integers(0, CONTENT_CAP + 1)),
          'active1': bool(rng.random() < 0.85), 'active2': bool(rng.random() < 0.85)}


def recomputed_label_logits(params, texts):
  """[N, 2, 2]: logits of (label A, label B) after text + suffix_k, from scratch."""
  rows = [list(text) + list(suffix) for text in texts for suffix in SUFFIXES]
  logits = llama_recompute.last_logits(CONFIG, params, rows, RECOMPUTE_WIDTH)
  return logits[:, [LABEL_A, LABEL_B]].reshape(len(texts), 2, 2)


def verdicts(label_logits):
  """v [N] = votes - 1 from label logits [N, 2 passes, 2 labels]."""
  votes = ((label_logits[:, 0, 0] > label_logits[:, 0, 1]).astype(int)
           + (label_logits[:, 1, 1] > label_logits[:, 1, 0]).astype(int))
  return (votes - 1).astype(np.float32)


@pytest.fixture(scope='module')
def params():
  return llama_recompute.scaled_params(CONFIG, seed=0, embed_scale=8.0)


def check_against_recomputation(params, case, texts1, texts2):
  """Runs the scenario, compares with recomputation; returns the verdicts seen."""
  v1, logits1, v2, logits2 = jax.device_get(run_scenario(params, case))
  seen = []
  for v, logits, texts in ((v1, logits1, texts1), (v2, logits2, texts2)):
    expected = recomputed_label_logits(params, texts)
    np.testing.assert_allclose(logits, expected, atol=LOGIT_ATOL, rtol=0)
    gaps = np.abs(expected[..., 0] - expected[..., 1])
    assert np.min(gaps) > 10 * LOGIT_ATOL, 'a near tie would make the verdict arbitrary'
    np.testing.assert_array_equal(v, verdicts(expected))
    np.testing.assert_array_equal(v, verdicts(logits))
    seen += list(v)
  return seen


def test_hand_built_rows_match_recomputation(params):
  """Full-width prefix with three commits and a later one; a masked-out commit step and
  empty content; a one-token prefix with no commits and content of two full chunks;
  content of one token more than a chunk after an empty first judgement; inactive rows
  (judged without their content); random rows fill the batch."""
  rng = np.random.default_rng(1)
  t = lambda n: [int(x) for x in rng.integers(0, CONFIG.vocab_size, n)]
  w = COMMIT_WIDTH
  rows = [
      dict(prefix=t(16), commits=[(t(w), 4, True), (t(w), 1, True), (t(w), 3, True)],
           late=(t(w), 4, True), content1=t(5), content2=t(2), active1=True, active2=True),
      dict(prefix=t(9), commits=[(t(w), 2, False), (t(w), 4, True), (t(w), 0, True)],
           late=(t(w), 1, True), content1=[], content2=[], active1=True, active2=True),
      dict(prefix=t(1), commits=[(t(w), 0, True), (t(w), 2, False), (t(w), 4, False)],
           late=(t(w), 3, False), content1=t(16), content2=t(16), active1=True,
           active2=True),
      dict(prefix=t(12), commits=[(t(w), 3, True), (t(w), 0, True), (t(w), 4, True)],
           late=(t(w), 2, True), content1=[], content2=t(9), active1=True, active2=True),
      dict(prefix=t(4), commits=[(t(w), 1, True), (t(w), 2, True), (t(w), 3, True)],
           late=(t(w), 4, True), content1=t(11), content2=t(6), active1=False,
           active2=False),
  ]
  rows += [random_row(rng) for _ in range(BATCH - len(rows))]
  check_against_recomputation(params, *build_case(rows))


def test_random_cases_match_recomputation_and_cover_every_verdict(params):
  rng = np.random.default_rng(3)
  seen = []
  for _ in range(4):
    rows = [random_row(rng) for _ in range(BATCH)]
    seen += check_against_recomputation(params, *build_case(rows))
  counts = {v: seen.count(v) for v in (-1.0, 0.0, 1.0)}
  assert all(counts.values()), f'verdict counts over {len(seen)} cases: {counts}'


@pytest.mark.parametrize('kwargs, message', [
    (dict(suffixes=((1, 2),)), 'two non-empty suffixes'),
    (dict(suffixes=((1, 2), ())), 'two non-empty suffixes'),
    (dict(layout=dataclasses.replace(LAYOUT, content_cap=12)), 'must be a multiple of chunk'),
    (dict(layout=dataclasses.replace(LAYOUT, suffix_slots=ABJudge.suffix_slots(SUFFIXES) - 1)),
     'suffix slots'),
])
def test_bad_judge_settings_raise(kwargs, message):
  settings = dict(model=engine.llama_model_fns(CONFIG), suffixes=SUFFIXES, label_a=LABEL_A,
                  label_b=LABEL_B, layout=LAYOUT, chunk=CHUNK)
  settings.update(kwargs)
  with pytest.raises(ValueError, match=message):
    ABJudge(**settings)


def test_judged_text_is_cut_before_a_new_turn_marker():
  """The original judges its decoded text cut before a new turn marker
  (text[:marker]); the judge must read content + marker + anything after it exactly as
  it reads the content alone (issue 7, item 3). The marker here is two tokens long and
  starts inside the uncommitted content; one row has no marker (nothing is cut)."""
  marker = (77, 78)
  stops = np.full((1, 2), -1, np.int32)
  stops[0] = marker
  fns = engine.llama_model_fns(CONFIG)
  recorder = RecordingForward(fns.forward)
  model = kvcache.ModelFns(forward=recorder, init_cache=fns.init_cache,
                           vocab_size=fns.vocab_size, hidden_size=fns.hidden_size)
  judge = ABJudge(model=model, suffixes=SUFFIXES, label_a=LABEL_A, label_b=LABEL_B,
                  layout=LAYOUT, chunk=CHUNK, stop_sequences=stops)
  params = llama_recompute.scaled_params(CONFIG, seed=3, embed_scale=1.0)
  rng = np.random.default_rng(0)
  batch = 2
  prefix = jnp.asarray(rng.integers(3, 70, (batch, PREFIX_WIDTH)), jnp.int32)
  answer_len = jnp.asarray([2, 0], jnp.int32)
  content = [int(t) for t in rng.integers(3, 70, 5)]
  junk = [int(t) for t in rng.integers(3, 70, 4)]
  with_marker = content + list(marker) + junk
  gen_cut = np.zeros((batch, GEN_WIDTH), np.int32)
  gen_full = np.zeros((batch, GEN_WIDTH), np.int32)
  gen_cut[0, 2:2 + len(content)] = content
  gen_full[0, 2:2 + len(with_marker)] = with_marker
  gen_cut[1, :len(content)] = gen_full[1, :len(content)] = content   # no marker
  len_cut = jnp.asarray([2 + len(content), len(content)], jnp.int32)
  len_full = jnp.asarray([2 + len(with_marker), len(content)], jnp.int32)
  active = jnp.ones((batch,), bool)

  @jax.jit
  def judge_once(gen, gen_len):
    state = judge.init_state(params, {'tokens': prefix, 'lens': jnp.full((batch,),
                                                                         PREFIX_WIDTH)})
    state = judge.commit(params, state, tokens=jnp.asarray(gen_cut[:, :2]), lens=answer_len,
                         mask=jnp.ones((batch,), bool))
    v, _ = judge.evaluate(params, state, gen=gen, answer_len=answer_len, gen_len=gen_len,
                          active=active)
    return v, label_logits_of_last_pass(judge, recorder)

  v_cut, logits_cut = judge_once(jnp.asarray(gen_cut), len_cut)
  v_full, logits_full = judge_once(jnp.asarray(gen_full), len_full)
  np.testing.assert_array_equal(v_full, v_cut)
  np.testing.assert_allclose(logits_full, logits_cut, atol=1e-6)
  cut = stopping.text_before_stop_sequence(jnp.asarray(gen_full), len_full, jnp.asarray(stops))
  assert list(np.asarray(cut)) == [2 + len(content), len(content)]
