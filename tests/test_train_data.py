"""Training data from result files (rain_jax/train_data.py): token choice, pairs, split,
padding and batch order, checked by hand-computed values."""
import json

import numpy as np
import pytest

from rain_jax import train_data


class WordTokenizer:
  """Token = 10 + index of the word in a fixed list; BOS 1, EOS 2."""
  adds_bos = True
  eos_id = 2
  words = ['Human:', 'how', 'do', 'I', 'bake', 'bread?', 'Assistant:', 'why', 'sky', 'blue?']

  def encode(self, text, add_bos=True):
    return ([1] if add_bos else []) + [10 + self.words.index(w) for w in text.split()]


TOKENIZER = WordTokenizer()
VOCAB = 64
PROMPTS = {'q0': 'Human: how do I bake bread? Assistant:', 'q1': 'Human: why sky blue? Assistant:',
           'q2': 'Human: how do I bake bread? Assistant:'}


def record(rid, method, response_ids, task='hh', prompt=None):
  prompt = prompt or PROMPTS[rid]
  return {'id': rid, 'task': task, 'method': method, 'prompt': prompt, 'response': 'x',
          'response_ids': response_ids, 'prompt_tokens': len(TOKENIZER.encode(prompt))}


def write(path, records):
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(path)


def test_answer_keeps_tokens_through_the_first_eos_only():
  assert train_data.answer_ids([5, 6, 2, 7, 2], eos_id=2) == (5, 6, 2)
  assert train_data.answer_ids([5, 6, 7], eos_id=2) == (5, 6, 7)  # cut by the budget


def test_sft_examples_are_prompt_tokens_and_rain_answers(tmp_path):
  path = write(tmp_path / 'r.jsonl', [record('q0', 'rain', [30, 31, 2, 40]),
                                      record('q0', 'vanilla', [30, 32]),
                                      record('q1', 'rain', [33])])
  examples = train_data.build_examples(train_data.read_records([path]), 'sft', TOKENIZER,
                                       VOCAB)
  assert [e.id for e in examples] == ['q0', 'q1']
  assert examples[0].chosen.prompt == (1, 10, 11, 12, 13, 14, 15, 16)
  assert examples[0].chosen.answer == (30, 31, 2)
  assert examples[0].rejected is None


def test_dpo_pairs_only_where_the_answers_differ(tmp_path):
  path = write(tmp_path / 'r.jsonl', [
      record('q0', 'rain', [30, 31]), record('q0', 'vanilla', [30, 32]),
      record('q1', 'rain', [33]), record('q1', 'vanilla', [33]),      # equal: no pair
      record('q2', 'rain', [34])])                                       # no vanilla: no pair
  examples = train_data.build_examples(train_data.read_records([path]), 'dpo', TOKENIZER,
                                       VOCAB)
  assert [(e.id, e.chosen.answer, e.rejected.answer) for e in examples] == [
      ('q0', (30, 31), (30, 32))]


def test_judge_scores_filter_pairs(tmp_path):
  records = [record('q0', 'rain', [30]), record('q0', 'vanilla', [31]),
             record('q2', 'rain', [32]), record('q2', 'vanilla', [33])]
  scores = {('q0', 'rain'): 0.9, ('q0', 'vanilla'): 0.2, ('q2', 'rain'): 0.4,
            ('q2', 'vanilla'): 0.5}
  kept = train_data.build_examples(records, 'dpo', TOKENIZER, VOCAB, scores)
  assert [e.id for e in kept] == ['q0']
  with pytest.raises(train_data.DataError, match='judge does not prefer'):
    train_data.build_examples(records, 'dpo', TOKENIZER, VOCAB, scores, min_score_margin=0.8)


@pytest.mark.parametrize('records, objective, message', [
    ([record('q0', 'vanilla', [30])], 'sft', 'no RAIN answers'),
    ([record('q0', 'rain', [30]), record('q0', 'vanilla', [30])], 'dpo', 'answers are equal'),
    ([record('q0', 'rain', [30]), record('q1', 'vanilla', [31])], 'dpo', 'no prompt with both'),
    ([record('q0', 'rain', [999])], 'sft', 'outside the vocabulary'),
])
def test_data_that_makes_no_examples_is_an_error(records, objective, message):
  with pytest.raises(train_data.DataError, match=message):
    train_data.build_examples(records, objective, TOKENIZER, VOCAB)


def test_bad_files_are_errors(tmp_path):
  not_jsonl = tmp_path / 'notes.txt'
  not_jsonl.write_text('this is not JSON\n')
  with pytest.raises(train_data.DataError, match='notes.txt'):
    train_data.read_records([str(not_jsonl)])
  no_ids = write(tmp_path / 'other.jsonl', [{'id': 'a', 'task': 'hh', 'method': 'rain',
                                             'response': 'x'}])
  with pytest.raises(train_data.DataError, match='not a rain_jax.run results file'):
    train_data.read_records([no_ids])
  mixed = write(tmp_path / 'mixed.jsonl', [record('q0', 'rain', [30]),
                                           record('q1', 'rain', [30], task='adv')])
  with pytest.raises(train_data.DataError, match='several tasks'):
    train_data.read_records([mixed])
  hh = write(tmp_path / 'hh.jsonl', [record('q0', 'rain', [30])])
  with pytest.raises(train_data.DataError, match="task 'hh', not of --task=truthfulqa"):
    train_data.read_records([hh], task='truthfulqa')
  with pytest.raises(train_data.DataError, match='does not exist|not found'):
    train_data.read_records([str(tmp_path / 'missing.jsonl')])


def test_another_tokenizer_is_refused(tmp_path):
  bad = record('q0', 'rain', [30])
  bad['prompt_tokens'] += 3
  with pytest.raises(train_data.DataError, match='another tokenizer'):
    train_data.build_examples([bad], 'sft', TOKENIZER, VOCAB)


def test_heldout_split_depends_on_the_id_alone():
  ids = [f'hh-{i}' for i in range(2000)]
  held = {i for i in ids if train_data.is_heldout(i, 0.1)}
  assert 150 < len(held) < 250
  # The same ids are held out whatever else is present, and a larger fraction only adds.
  assert held == {i for i in ids[::-1] if train_data.is_heldout(i, 0.1)}
  assert held <= {i for i in ids if train_data.is_heldout(i, 0.2)}
  examples = [train_data.Example(i, train_data.Sequence((1,), (2,))) for i in ids[:50]]
  train, heldout = train_data.split(examples, 0.1)
  assert {e.id for e in heldout} == {i for i in ids[:50] if i in held}
  assert len(train) + len(heldout) == 50


def test_rows_are_padded_with_answer_positions():
  seq = train_data.Sequence(prompt=(1, 10, 11), answer=(30, 31))
  short = train_data.Sequence(prompt=(1, 12), answer=(32,))
  rows = train_data.encode_rows([seq, short], width=8, answer_width=3)
  np.testing.assert_array_equal(rows['tokens'], [[1, 10, 11, 30, 31, 0, 0, 0],
                                                 [1, 12, 32, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['lengths'], [5, 3])
  # Position p - 1 + j predicts answer token j.
  np.testing.assert_array_equal(rows['logits_index'], [[2, 3, 3], [1, 1, 1]])
  np.testing.assert_array_equal(rows['targets'], [[30, 31, 0], [32, 0, 0]])
  np.testing.assert_array_equal(rows['weights'], [[1, 1, 0], [1, 0, 0]])
  examples = [train_data.Example('a', seq, short)]
  assert train_data.widths(examples, 'dpo', bucket=4) == (8, 2)
  dpo = train_data.encode_examples(examples, 'dpo', 8, 3)
  np.testing.assert_array_equal(dpo['tokens'], rows['tokens'])  # chosen rows, then rejected


def test_batch_order_is_epochs_of_permutations_and_resumable():
  steps = [train_data.batch_order(10, 4, s, seed=3) for s in range(5)]
  stream = np.concatenate(steps)
  assert sorted(stream[:10]) == list(range(10))       # epoch 0 covers every example once
  assert sorted(stream[10:20]) == list(range(10))     # and so does epoch 1
  assert not np.array_equal(stream[:10], stream[10:20])
  np.testing.assert_array_equal(train_data.batch_order(10, 4, 3, seed=3), steps[3])
  assert not np.array_equal(train_data.batch_order(10, 4, 0, seed=4), steps[0])
  assert len(train_data.batch_order(3, 8, 0, seed=0)) == 8  # batch larger than the data
