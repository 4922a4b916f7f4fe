"""Users' own prompts: a JSONL file of {"id": ..., "prompt": ...}, used verbatim."""
import json
import os

from rain_jax.tasks.base import Example, Task, select_range


def read_prompt_file(path: str) -> list[dict]:
  """Parses and validates a JSONL prompt file; errors name the file and the line."""
  if not path:
    raise ValueError('--task=custom needs --prompt_file (a JSONL of {"id", "prompt"})')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'prompt file not found: {path}')
  rows, seen = [], set()
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid JSON ({e.msg})') from None
      if not isinstance(row, dict) or 'id' not in row or 'prompt' not in row:
        raise ValueError(f'{path}:{number}: each line must be an object with "id" and '
                         f'"prompt"')
      if not isinstance(row['prompt'], str) or not row['prompt']:
        raise ValueError(f'{path}:{number}: "prompt" must be a non-empty string')
      if str(row['id']) in seen:
        raise ValueError(f'{path}:{number}: duplicate id {row["id"]!r}')
      seen.add(str(row['id']))
      rows.append(row)
  if not rows:
    raise ValueError(f'prompt file {path} holds no prompts')
  return rows


class CustomTask(Task):
  name = 'custom'

  def __init__(self, prompt_file=None, turn_marker=None):
    self.prompt_file = prompt_file
    self.turn_marker = turn_marker or None

  def load_examples(self, start, num_examples):
    rows = read_prompt_file(self.prompt_file)
    examples = [Example(id=str(row['id']), index=i, prompt=row['prompt'],
                        question=row['prompt']) for i, row in enumerate(rows)]
    return select_range(examples, start, num_examples, self.prompt_file)
