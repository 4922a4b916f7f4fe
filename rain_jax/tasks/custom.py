"""Users' own prompts: a JSONL file of {"id": ..., "prompt": ...}.

Each prompt is used verbatim, or put into `prompt_template` at its "{prompt}"
placeholder (the template's backslash escapes \\n, \\t and \\\\ read as a newline, a
tab and a backslash, so a one-line flag can hold a multi-line frame). `turn_marker` ends
an answer; the judge reads f2/r1/r2 from `judge_prompts`: a folder name under
rain_jax/data/prompts (default HH) or a path to a folder holding those three files.
"""
import os

from rain_jax.results import read_jsonl_objects
from rain_jax.tasks.base import Example, Task, data_path, select_range, text_mode
from rain_jax.tasks.hh import HHTask

PLACEHOLDER = '{prompt}'
JUDGE_PROMPT_FILES = ('f2.txt', 'r1.txt', 'r2.txt')
_ESCAPES = {'n': '\n', 't': '\t', '\\': '\\'}


def unescape_template(template: str) -> str:
  """Reads \\n, \\t and \\\\ in `template` as newline, tab and backslash; any other
  backslash sequence is an error."""
  out, i = [], 0
  while i < len(template):
    char = template[i]
    if char == '\\':
      follow = template[i + 1:i + 2]
      if follow not in _ESCAPES:
        raise ValueError(f'--prompt_template: unknown escape \\{follow} at character {i} '
                         '(use \\n, \\t or \\\\)')
      out.append(_ESCAPES[follow])
      i += 2
    else:
      out.append(char)
      i += 1
  return ''.join(out)


def check_template(template: str) -> str:
  """The unescaped template; ValueError unless it holds "{prompt}" exactly once."""
  text = unescape_template(template)
  if text.count(PLACEHOLDER) != 1:
    raise ValueError(f'--prompt_template must contain {PLACEHOLDER} exactly once, got '
                     f'{template!r}')
  return text


def judge_prompt_folder(judge_prompts: str):
  """The folder holding f2.txt, r1.txt, r2.txt: a shipped prompt folder's name or a path.

  Raises FileNotFoundError naming the folder and the missing files.
  """
  shipped = data_path('prompts', judge_prompts)
  folder = shipped if shipped.is_dir() else judge_prompts
  if not os.path.isdir(str(folder)):
    names = sorted(p.name for p in data_path('prompts').iterdir() if p.is_dir())
    raise FileNotFoundError(f'--judge_prompts {judge_prompts!r} is neither a folder nor one '
                            f'of the shipped prompt folders: {", ".join(names)}')
  missing = [n for n in JUDGE_PROMPT_FILES if not os.path.isfile(os.path.join(str(folder), n))]
  if missing:
    raise FileNotFoundError(f'judge prompt folder {folder} lacks {", ".join(missing)}')
  return folder


def read_prompt_file(path: str) -> list[dict]:
  """Parses and validates a JSONL prompt file; errors name the file and the line."""
  if not path:
    raise ValueError('--task=custom needs --prompt_file (a JSONL of {"id", "prompt"})')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'prompt file not found: {path}')
  rows, seen = [], set()
  for number, row in read_jsonl_objects(path):
    if 'id' not in row or 'prompt' not in row:
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
  # Users' prompts are judged like HH's (ABJudge; HH's judge prompts unless
  # --judge_prompts), so they take HH's constants, the reference's general setting; any
  # of them can be changed by flag.
  rain_defaults = HHTask.rain_defaults

  def __init__(self, prompt_file=None, turn_marker=None, prompt_template=None,
               judge_prompts=None):
    self.prompt_file = prompt_file
    self.turn_marker = turn_marker or None
    self.template = check_template(prompt_template) if prompt_template else PLACEHOLDER
    self.judge_prompts = judge_prompts or Task.judge_prompts
    self.judge_folder = judge_prompt_folder(self.judge_prompts)

  def read_judge_prompt(self, name):
    """The file's text read like the shipped prompts (text mode: CRLF -> LF)."""
    with open(os.path.join(str(self.judge_folder), name), 'rb') as f:
      return text_mode(f.read().decode('utf-8'))

  def load_examples(self, start, num_examples):
    rows = read_prompt_file(self.prompt_file)
    examples = [Example(id=str(row['id']), index=i,
                        prompt=self.template.replace(PLACEHOLDER, row['prompt']),
                        question=row['prompt']) for i, row in enumerate(rows)]
    return select_range(examples, start, num_examples, self.prompt_file)
