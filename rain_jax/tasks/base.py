"""The task interface shared by every task module."""
import abc
import dataclasses
import gzip
import json
import importlib.resources
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt: `id` is unique within the task, `prompt` is the exact model input text,
  `question` the part a reader needs (the prompt without few-shot prefixes), `meta` the
  task's fields an evaluation needs (e.g. TruthfulQA's reference answers)."""
  id: str
  index: int
  prompt: str
  question: str
  meta: dict = dataclasses.field(default_factory=dict, hash=False)


class Task(abc.ABC):
  """Base class: a task names its turn marker and its RAIN constants, and loads its
  examples."""
  name: str = ''
  # The reference's RAIN constants for the task (docs/algorithm.md §2, §3, §4): RainConfig
  # fields that tasks.rain_config sets before any flag. Every task declares its own, even
  # when borrowed from another task.
  rain_defaults: Mapping[str, Any]
  # Text that starts a new conversation turn; generation stops there and the answer is
  # cut before it. None: no marker.
  turn_marker: Optional[str] = None

  @abc.abstractmethod
  def load_examples(self, start: int, num_examples: int) -> list[Example]:
    """Examples [start, start + num_examples) in dataset order (-1: to the end)."""

  # Folder of rain_jax/data/prompts holding the judge prompts f2, r1, r2.
  judge_prompts: str = 'HH'
  # Which self-evaluation the task uses: 'ab' (judge.ABJudge, two option orders) or
  # 'yes_no' (judge.YesNoJudge, one pass reading "Yes" against "No").
  judge_kind: str = 'ab'

  def read_judge_prompt(self, name: str) -> str:
    """Exact text of the judge prompt file `name` (f2.txt, r1.txt or r2.txt)."""
    return read_data_text('prompts', self.judge_prompts, name)

  def conversation_start(self, example: Example) -> str:
    """The judged conversation's text before the answer: the prompt from its last turn
    marker on (the few-shot prefix removed), or the whole prompt without a marker."""
    if self.turn_marker and self.turn_marker in example.prompt:
      return example.prompt[example.prompt.rindex(self.turn_marker):]
    return example.prompt

  def judge_prefix(self, example: Example) -> str:
    """f2 + "\n\n" + conversation start (docs/algorithm.md §4.3)."""
    return self.read_judge_prompt('f2.txt') + '\n\n' + self.conversation_start(example)

  def judge_suffixes(self) -> tuple:
    """("\n" + r1, "\n" + r2): the two option orders."""
    return tuple('\n' + self.read_judge_prompt(name) for name in ('r1.txt', 'r2.txt'))

  def answer(self, generated_text: str) -> str:
    """The answer a reader sees: generated text cut before the turn marker, stripped."""
    if self.turn_marker and self.turn_marker in generated_text:
      generated_text = generated_text[:generated_text.index(self.turn_marker)]
    return generated_text.strip()


def read_data_text(*parts: str) -> str:
  """Text of a data file shipped in rain_jax/data, read as the original RAIN code reads its
  prompt files: UTF-8 in Python's text mode, so Windows line ends ("\r\n") and lone
  "\r" become "\n" (the prompt files are stored with CRLF; the model never sees "\r")."""
  return text_mode(data_path(*parts).read_bytes().decode('utf-8'))


def text_mode(text: str) -> str:
  """`text` as Python's text mode reads it: "\r\n" and lone "\r" become "\n"."""
  return text.replace('\r\n', '\n').replace('\r', '\n')


def data_path(*parts: str):
  return importlib.resources.files('rain_jax').joinpath('data', *parts)


def select_range(items: list, start: int, num_examples: int, what: str) -> list:
  """items[start : start + num_examples] with clear errors (num_examples -1: to the end)."""
  if start < 0:
    raise ValueError(f'--start must be >= 0, got {start}')
  if start >= len(items):
    raise ValueError(f'--start={start} is past the end of {what} ({len(items)} examples)')
  end = len(items) if num_examples < 0 else min(len(items), start + num_examples)
  return items[start:end]


def read_jsonl_gz(path, what: str) -> list:
  """Parsed lines of a gzipped JSONL file; errors name `what` (e.g. 'HH data file')."""
  try:
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      return [json.loads(line) for line in f if line.strip()]
  except FileNotFoundError:
    raise FileNotFoundError(f'{what} not found: {path}') from None
  except (OSError, json.JSONDecodeError, EOFError) as e:
    raise ValueError(f'{what} {path} is corrupt: {e}') from None
