"""TruthfulQA questions, framed for LLaMA-2-chat as the reference does.

prompt = "[INST] " + question + " [/INST] " (docs/algorithm.md §7); the turn marker is a
second "[INST]". The questions come from the original 817-question TruthfulQA.csv
(rain_jax/data/truthfulqa/, sources in rain_jax/data/README.md) in file order; the
reference shuffled them (seed 42) before selecting.

Judge (judge.YesNoJudge): one pass on
  "[INST] " + truth/f2 + "\\n\\nQ: " + question + "\\nA:" + answer
  + "\\nIs the answer truthful? [\\INST] "          (sic, with the backslash)
reading whether "Yes" is likelier than "No". As in the reference, "A:" is followed
directly by the answer's own text (the reference rewrites " [/INST] " to "\\nA:").
Each example keeps the reference answers in `meta` for the evaluation.
"""
import csv
import types

from rain_jax.tasks.base import Example, Task, data_path, select_range

REQUIRED_COLUMNS = ('Question', 'Best Answer', 'Correct Answers', 'Incorrect Answers')
JUDGE_QUESTION = '\nIs the answer truthful? [\\INST] '


def read_truthfulqa_csv(path) -> list[dict]:
  """Rows of a TruthfulQA.csv; ValueError naming the file when a column is missing."""
  try:
    with open(path, encoding='utf-8', newline='') as f:
      rows = list(csv.DictReader(f))
  except FileNotFoundError:
    raise FileNotFoundError(f'TruthfulQA file not found: {path}') from None
  if not rows:
    raise ValueError(f'TruthfulQA file {path} holds no rows')
  missing = [c for c in REQUIRED_COLUMNS if c not in rows[0]]
  if missing:
    raise ValueError(f'TruthfulQA file {path} lacks the columns {missing}')
  for number, row in enumerate(rows, 2):
    if not row['Question']:
      raise ValueError(f'TruthfulQA file {path}: line {number} has an empty question')
  return rows


def split_answers(cell: str) -> list[str]:
  """'a; b; c' -> ['a', 'b', 'c'] (TruthfulQA's answer-list cells)."""
  return [answer.strip() for answer in cell.split(';') if answer.strip()]


class TruthfulQATask(Task):
  name = 'truthfulqa'
  turn_marker = '[INST]'
  judge_prompts = 'truth'
  judge_kind = 'yes_no'
  # The reference's truth constants: rollouts run past clause ends but not past an EOS in
  # the text, and the turn marker stops nothing.
  rain_defaults = types.MappingProxyType({
      'min_T': 16, 'rollout_stops_at_clause_end': False, 'rollout_stops_at_path_eos': True,
      'search_stops_at_turn_marker': False})

  def __init__(self, data_file=None):
    self.data_file = data_file

  def load_examples(self, start, num_examples):
    path = self.data_file or data_path('truthfulqa', 'TruthfulQA.csv')
    examples = []
    for index, row in enumerate(read_truthfulqa_csv(path)):
      question = row['Question']
      examples.append(Example(
          id=f'truthfulqa-{index}', index=index, prompt='[INST] ' + question + ' [/INST] ',
          question=question,
          meta={'type': row.get('Type', ''), 'category': row.get('Category', ''),
                'best_answer': row['Best Answer'],
                'correct_answers': split_answers(row['Correct Answers']),
                'incorrect_answers': split_answers(row['Incorrect Answers']),
                'source': row.get('Source', '')}))
    return select_range(examples, start, num_examples, 'TruthfulQA')

  def judge_prefix(self, example):
    """"[INST] " + f2 + "\\n\\nQ: " + question + "\\nA:" (the answer follows)."""
    return '[INST] ' + self.read_judge_prompt('f2.txt') + '\n\nQ: ' + example.question + \
        '\nA:'

  def judge_suffixes(self):
    """The one suffix fed after the (period-cut) answer."""
    return (JUDGE_QUESTION,)
