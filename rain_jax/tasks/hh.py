"""Anthropic HH, harmless-base test split, framed as the RAIN reference frames it.

prompt = f1 + "\\n" + question, where question is the transcript's first human turn cut
right after "Assistant:" with "\\n\\n" replaced by "\\n" (docs/algorithm.md §7). The
reference read HH red-team-attempts, which cannot be had here; harmless-base test is the
nearest substitute (rain_jax/data/README.md).
"""
import types

from rain_jax.tasks.base import (Example, Task, data_path,
                                    read_data_text, read_jsonl_gz, select_range)

ASSISTANT = 'Assistant:'


def first_turn_question(transcript: str) -> str:
  """'\\n\\nHuman: q\\n\\nAssistant: a ...' -> '\\nHuman: q\\nAssistant:'."""
  cut = transcript.find(ASSISTANT)
  if cut < 0:
    raise ValueError(f'HH transcript has no {ASSISTANT!r}: {transcript[:80]!r}')
  return transcript[:cut + len(ASSISTANT)].replace('\n\n', '\n')


class HHTask(Task):
  name = 'hh'
  turn_marker = 'Human:'
  # The reference's HH constants; RainConfig's defaults are these already.
  rain_defaults = types.MappingProxyType({'min_T': 6})

  def __init__(self, data_file=None):
    self.data_file = data_file

  def few_shot_prefix(self) -> str:
    return read_data_text('prompts', 'HH', 'f1.txt')

  def load_examples(self, start, num_examples):
    rows = _read_jsonl_gz(self.data_file or data_path('hh', 'harmless-base-test.jsonl.gz'))
    prefix = self.few_shot_prefix()
    examples = []
    for index, row in enumerate(rows):
      question = first_turn_question(row['chosen'])
      examples.append(Example(id=f'hh-{index}', index=index,
                              prompt=prefix + '\n' + question, question=question))
    return select_range(examples, start, num_examples, 'the HH harmless-base test set')


def _read_jsonl_gz(path):
  rows = read_jsonl_gz(path, 'HH data file')
  for i, row in enumerate(rows):
    if not isinstance(row, dict) or 'chosen' not in row:
      raise ValueError(f'HH data file {path}: line {i + 1} has no "chosen" field')
  return rows
