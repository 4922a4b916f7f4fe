"""The task interface shared by every task module."""
import abc
import dataclasses
import importlib.resources
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt: `id` is unique within the task, `prompt` is the exact model input text,
  `question` the part a reader needs (the prompt without few-shot prefixes)."""
  id: str
  index: int
  prompt: str
  question: str


class Task(abc.ABC):
  """Base class: a task names its turn marker and loads its examples."""
  name: str = ''
  # Text that starts a new conversation turn; generation stops there and the answer is
  # cut before it. None: no marker.
  turn_marker: Optional[str] = None

  @abc.abstractmethod
  def load_examples(self, start: int, num_examples: int) -> list[Example]:
    """Examples [start, start + num_examples) in dataset order (-1: to the end)."""

  def answer(self, generated_text: str) -> str:
    """The answer a reader sees: generated text cut before the turn marker, stripped."""
    if self.turn_marker and self.turn_marker in generated_text:
      generated_text = generated_text[:generated_text.index(self.turn_marker)]
    return generated_text.strip()


def read_data_text(*parts: str) -> str:
  """Exact text of a data file shipped in rain_jax/data (bytes decoded as UTF-8)."""
  return data_path(*parts).read_bytes().decode('utf-8')


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
