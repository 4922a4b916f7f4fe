"""Tasks: where prompts come from, how they are framed, and how answers are cut."""
from typing import Mapping

from rain_jax import flag_table
from rain_jax.config import RainConfig
from rain_jax.tasks.adv import AdvTask
from rain_jax.tasks.base import Example, Task
from rain_jax.tasks.custom import CustomTask
from rain_jax.tasks.hh import HHTask
from rain_jax.tasks.sentiment import SentimentTask
from rain_jax.tasks.truthfulqa import TruthfulQATask

TASKS = {'hh': HHTask, 'adv': AdvTask, 'truthfulqa': TruthfulQATask,
         'sentiment': SentimentTask, 'custom': CustomTask}
# Other names of the same tasks (the paper calls TruthfulQA "truth").
TASK_ALIASES = {'truth': 'truthfulqa'}

# The command-line flags each task takes as constructor options (same names; declared in
# rain_jax/flag_table.py).
TASK_FLAGS = flag_table.TASK_FLAGS


def task_class(name: str) -> type:
  """The class of the task called `name`; ValueError naming the known tasks otherwise."""
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; known: {", ".join(sorted(TASKS))}')
  return TASKS[name]


def get_task(name: str, **options) -> Task:
  """The task called `name`, built with its options (e.g. prompt_file for custom)."""
  return task_class(name)(**options)


def rain_config(name: str, **overrides) -> RainConfig:
  """The reference constants of the task called `name` (its class's `rain_defaults`;
  "truth" names truthfulqa), then `overrides`. ValueError for an unknown task."""
  defaults = task_class(TASK_ALIASES.get(name, name)).rain_defaults
  return RainConfig(**{**defaults, **overrides})


def task_options(name: str, flag_values: Mapping) -> dict:
  """The options of task `name` among `flag_values` (flag name -> value), unset (None)
  flags left out so that the task's defaults apply."""
  return {flag: flag_values[flag] for flag in TASK_FLAGS.get(name, ())
          if flag_values.get(flag) is not None}
