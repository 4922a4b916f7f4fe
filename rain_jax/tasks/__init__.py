"""Tasks: where prompts come from, how they are framed, and how answers are cut."""
from rain_jax.tasks.base import Example, Task
from rain_jax.tasks.custom import CustomTask
from rain_jax.tasks.hh import HHTask

TASKS = {'hh': HHTask, 'custom': CustomTask}


def get_task(name: str, **options) -> Task:
  """The task called `name`, built with its options (e.g. prompt_file for custom)."""
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; known: {", ".join(sorted(TASKS))}')
  return TASKS[name](**options)
