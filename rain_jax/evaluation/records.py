"""Reading results files (JSONL written by `python -m rain_jax.run`) for evaluation."""
import collections
import os

from rain_jax.results import read_jsonl_objects

REQUIRED_FIELDS = {'id': (str, int), 'task': (str,), 'method': (str,), 'response': (str,)}


def read_results(path: str) -> list[dict]:
  """Records of one results file, each checked for the fields every metric reads.

  Raises FileNotFoundError for a missing file and ValueError naming the file and line
  for a directory, bad JSON, a non-object line or a missing / mistyped field.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f'results file not found: {path}')
  if os.path.isdir(path):
    raise ValueError(f'results path {path} is a directory, not a JSONL file')
  records = []
  for number, record in read_jsonl_objects(path):
    for field, types in REQUIRED_FIELDS.items():
      if not isinstance(record.get(field), types) or isinstance(record.get(field), bool):
        raise ValueError(f'{path}:{number}: field {field!r} is missing or not a '
                         f'{" or ".join(t.__name__ for t in types)}')
    record['id'] = str(record['id'])
    records.append(record)
  return records


def load_results(paths: list[str]) -> list[dict]:
  """Records of several results files, in order; ValueError when the files hold no
  record or the same (task, method, id) twice."""
  if not paths:
    raise ValueError('no results file given')
  records, seen = [], {}
  for path in paths:
    for record in read_results(path):
      key = (record['task'], record['method'], record['id'])
      if key in seen:
        raise ValueError(f'{path}: record {key} appears twice (also in {seen[key]})')
      seen[key] = path
      records.append(record)
  if not records:
    raise ValueError(f'the results files {", ".join(paths)} hold no records')
  return records


def group_by_task_method(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
  """{(task, method): records} with keys sorted."""
  groups = collections.defaultdict(list)
  for record in records:
    groups[(record['task'], record['method'])].append(record)
  return dict(sorted(groups.items()))


def only_task(records: list[dict], task: str, metric: str) -> list[dict]:
  """The records of `task`; ValueError when there are none (the metric needs them)."""
  chosen = [r for r in records if r['task'] == task]
  if not chosen:
    found = sorted({r['task'] for r in records})
    raise ValueError(f'--metric={metric} needs records of task {task!r}; the results hold '
                     f'tasks {found}')
  return chosen
