"""Training data from result files: SFT examples and preference pairs, split and batched.

Source: the JSONL records of `python -m rain_jax.run` (rain_jax/results.py), RAIN and
vanilla answers of the same prompts. Nothing is re-framed or re-tokenised differently:

- prompt tokens: the record's `prompt` (the exact model input text) encoded as the run
  encoded it (the tokenizer's BOS), checked against the record's `prompt_tokens`, so
  results made with another tokenizer are refused;
- answer tokens: the record's `response_ids` (every generated token) up to and including
  the first EOS. An answer cut at --max_new_tokens keeps no EOS, so training does not
  teach the model to stop where the run ran out of budget.

SFT examples: (prompt, RAIN answer). Preference pairs (Rafailov et al.): chosen = the
RAIN answer, rejected = the vanilla answer of the same prompt, only where the two token
sequences differ; with judge scores (scripts/evaluate.py --metric=harmless
--scores_out), only pairs whose RAIN answer the judge scores above the vanilla one by
more than a margin.

Held-out split by example id: an id is held out when the first 8 hex digits of its
SHA-256, read as a fraction of 2^32, fall below the held-out fraction. The split of an
id never depends on which other ids are present.

Batches: rows of prompt + answer, right-padded to one width. The loss reads the logits
at the K positions that predict answer tokens (`logits_index`), K = the longest answer;
shorter answers repeat their last index with weight 0.
"""
import dataclasses
import hashlib

import numpy as np

from rain_jax.evaluation import records as result_records

OBJECTIVES = ('sft', 'dpo')
RECORD_FIELDS = ('prompt', 'response_ids', 'prompt_tokens')


class DataError(ValueError):
  """Result files that cannot make training data (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Sequence:
  """One training row's content: prompt ids and answer ids (tuples of int)."""
  prompt: tuple
  answer: tuple


@dataclasses.dataclass(frozen=True)
class Example:
  """One training item: SFT uses `chosen` alone; DPO also `rejected` (same prompt)."""
  id: str
  chosen: Sequence
  rejected: Sequence | None = None


def answer_ids(response_ids, eos_id) -> tuple:
  """The generated tokens up to and including the first EOS (all when none)."""
  ids = [int(t) for t in response_ids]
  if eos_id is not None and eos_id in ids:
    ids = ids[:ids.index(eos_id) + 1]
  return tuple(ids)


def is_heldout(example_id: str, fraction: float) -> bool:
  """True when `example_id` belongs to the held-out split (see the module docstring)."""
  digest = hashlib.sha256(str(example_id).encode()).hexdigest()
  return int(digest[:8], 16) / 2 ** 32 < fraction


def read_records(paths, task=None) -> list[dict]:
  """The records of result files, checked: they parse, carry the fields training reads,
  hold one task (`task`, when given, must be it) and no (task, method, id) twice."""
  try:
    records = result_records.load_results(list(paths))
  except (ValueError, FileNotFoundError) as e:
    raise DataError(f'--data: {e}') from None
  for record in records:
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
      raise DataError(f'--data: record {record["id"]!r} ({record["method"]}) has no '
                      f'{missing}: not a rain_jax.run results file')
  tasks = sorted({r['task'] for r in records})
  if len(tasks) > 1:
    raise DataError(f'--data holds prompts of several tasks ({", ".join(tasks)}); train on '
                    f'one task at a time')
  if task is not None and tasks[0] != task:
    raise DataError(f'--data holds prompts of task {tasks[0]!r}, not of --task={task}')
  return records


def _sequence(record, tokenizer, vocab_size) -> Sequence:
  prompt = tuple(tokenizer.encode(record['prompt'], add_bos=tokenizer.adds_bos))
  if len(prompt) != record['prompt_tokens']:
    raise DataError(
        f'record {record["id"]!r} ({record["method"]}): its prompt encodes to {len(prompt)} '
        f'tokens here but to {record["prompt_tokens"]} in the run that answered it: the '
        f'results were made with another tokenizer')
  answer = answer_ids(record['response_ids'], tokenizer.eos_id)
  if any(not 0 <= t < vocab_size for t in answer):
    raise DataError(f'record {record["id"]!r} ({record["method"]}): response_ids outside '
                    f'the vocabulary of {vocab_size}: the results were made with another model')
  return Sequence(prompt, answer)


def _by_id(records, method):
  return {r['id']: r for r in records if r['method'] == method}


def build_examples(records, objective, tokenizer, vocab_size, scores=None,
                   min_score_margin=0.0) -> list[Example]:
  """Examples for `objective` ('sft' or 'dpo') from checked records, in id order.

  scores: optional {(id, method): judge score} (DPO: keep a pair only when
    score(rain) - score(vanilla) > min_score_margin; pairs without both scores dropped).
  Raises DataError when no example can be made, saying why."""
  if objective not in OBJECTIVES:
    raise ValueError(f'objective must be one of {OBJECTIVES}, got {objective!r}')
  rain = _by_id(records, 'rain')
  if not rain:
    raise DataError('--data holds no RAIN answers (method "rain"): nothing to learn from')
  examples = []
  if objective == 'sft':
    for rid in sorted(rain):
      answer = _sequence(rain[rid], tokenizer, vocab_size)
      if answer.answer:
        examples.append(Example(rid, answer))
  else:
    vanilla = _by_id(records, 'vanilla')
    shared = sorted(set(rain) & set(vanilla))
    if not shared:
      raise DataError('--objective=dpo needs RAIN and vanilla answers of the same prompts; '
                      f'--data has {len(rain)} RAIN and {len(vanilla)} vanilla answers and '
                      'no prompt with both')
    for rid in shared:
      chosen = _sequence(rain[rid], tokenizer, vocab_size)
      rejected = _sequence(vanilla[rid], tokenizer, vocab_size)
      if chosen.prompt != rejected.prompt:
        raise DataError(f'prompt {rid!r}: the RAIN and vanilla records hold different prompts')
      if chosen.answer == rejected.answer or not chosen.answer or not rejected.answer:
        continue
      if scores is not None:
        both = (scores.get((rid, 'rain')), scores.get((rid, 'vanilla')))
        if None in both or not both[0] - both[1] > min_score_margin:
          continue
      examples.append(Example(rid, chosen, rejected))
    if not examples:
      raise DataError(f'--objective=dpo: none of the {len(shared)} prompts with both answers '
                      'makes a pair (the RAIN and vanilla answers are equal'
                      + (', or the judge does not prefer RAIN\'s)' if scores else ')'))
  if not examples:
    raise DataError('--data: every RAIN answer is empty')
  return examples


def read_scores(path) -> dict:
  """{(id, method): score} from a scripts/evaluate.py --scores_out file."""
  from rain_jax.results import read_jsonl_objects
  scores = {}
  try:
    for number, row in read_jsonl_objects(path):
      if not all(k in row for k in ('id', 'method', 'score')):
        raise DataError(f'--pair_scores {path}:{number}: not a scores row (needs id, method, '
                        'score; scripts/evaluate.py --metric=harmless --scores_out)')
      scores[(str(row['id']), row['method'])] = float(row['score'])
  except FileNotFoundError:
    raise DataError(f'--pair_scores: {path} does not exist') from None
  return scores


def split(examples, heldout_fraction):
  """(train, held-out) by id (`is_heldout`). DataError when training gets nothing."""
  if not 0 <= heldout_fraction < 1:
    raise DataError(f'--heldout_fraction must be in [0, 1), got {heldout_fraction}')
  heldout = [e for e in examples if is_heldout(e.id, heldout_fraction)]
  train = [e for e in examples if not is_heldout(e.id, heldout_fraction)]
  if not train:
    raise DataError(f'all {len(examples)} examples fall in the held-out split; lower '
                    f'--heldout_fraction')
  return train, heldout


def digest(examples) -> str:
  """SHA-256 over the examples' ids and tokens: equal digests, equal training data."""
  h = hashlib.sha256()
  for e in examples:
    h.update(repr((e.id, e.chosen, e.rejected)).encode())
  return h.hexdigest()


def sequences(example: Example, objective: str) -> list:
  """The rows an example contributes: [chosen] (SFT) or [chosen, rejected] (DPO)."""
  return [example.chosen] if objective == 'sft' else [example.chosen, example.rejected]


def row_length(seq: Sequence) -> int:
  return len(seq.prompt) + len(seq.answer)


def widths(examples, objective, bucket=64) -> tuple:
  """(W, K): the padded row width (the longest prompt + answer, rounded up to `bucket`)
  and the answer width (the longest answer) that every batch of these examples uses."""
  rows = [s for e in examples for s in sequences(e, objective)]
  width = max(row_length(s) for s in rows)
  return -(-width // bucket) * bucket, max(len(s.answer) for s in rows)


def encode_rows(rows, width, answer_width):
  """Arrays of `rows` (Sequences), padded: tokens [N, W] int32, lengths [N] int32,
  logits_index [N, K] int32 (the position predicting each answer token), targets [N, K]
  int32 and weights [N, K] float32 (1 on real answer tokens)."""
  n = len(rows)
  tokens = np.zeros((n, width), np.int32)
  lengths = np.zeros((n,), np.int32)
  index = np.zeros((n, answer_width), np.int32)
  targets = np.zeros((n, answer_width), np.int32)
  weights = np.zeros((n, answer_width), np.float32)
  for i, seq in enumerate(rows):
    full = seq.prompt + seq.answer
    if len(full) > width or len(seq.answer) > answer_width:
      raise ValueError(f'row of {len(full)} tokens ({len(seq.answer)} answer) does not fit '
                       f'width {width} ({answer_width})')
    tokens[i, :len(full)] = full
    lengths[i] = len(full)
    a, p = len(seq.answer), len(seq.prompt)
    positions = np.arange(p - 1, p - 1 + a)
    index[i, :a] = positions
    index[i, a:] = positions[-1] if a else 0
    targets[i, :a] = seq.answer
    weights[i, :a] = 1.0
  return {'tokens': tokens, 'lengths': lengths, 'logits_index': index, 'targets': targets,
          'weights': weights}


def encode_examples(examples, objective, width, answer_width):
  """The batch arrays of `examples` (see `encode_rows`); DPO rows: the chosen rows of all
  examples, then their rejected rows ([2N, ...]: row i and row N + i are one pair)."""
  if objective == 'sft':
    rows = [e.chosen for e in examples]
  else:
    rows = [e.chosen for e in examples] + [e.rejected for e in examples]
  return encode_rows(rows, width, answer_width)


def batch_order(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the examples of optimizer step `step` (0-based): epochs of a fresh
  permutation each (numpy default_rng(seed, epoch)), read batch_size at a time as one
  stream, so every step is a function of (seed, step) alone and resumes exactly."""
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start + len(out), num_examples)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    out.extend(order[offset:offset + batch_size - len(out)].tolist())
  return np.asarray(out, np.int64)
