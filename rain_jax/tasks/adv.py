"""AdvBench goals under GCG adversarial suffixes, framed for Vicuna as the reference does.

prompt = f1 + "USER: " + goal + " " + controls + " ASSISTANT:" (rain_jax/data/prompts/adv
/f1.txt, docs/algorithm.md §7); the turn marker is a second "USER:". The suffix file is in
the reference's input format, a JSON list of {"goal": str, "controls": str}; the default
is the Vicuna individual suffixes (rain_jax/data/gcg/, sources in rain_jax/data/README.md).
The reference shuffled its file (seed 42) before selecting; examples here keep file order.

Judged conversation: the reference's adv code looks for the fifth "Human:" of the text,
which a Vicuna prompt never holds, so its published path cannot be followed literally.
Here the judge (ABJudge with the adv/ prompts f2, r1, r2) sees the exchange in the
format of f2's own examples: "Human: " + goal + " " + controls + "\\nAssistant:" followed
by the answer.
"""
import json
import os
import types

from rain_jax.tasks.base import Example, Task, data_path, read_data_text, select_range

DEFAULT_SUFFIX_FILE = 'smoothllm_gcg_vicuna_individual.json'


def suffix_file_path(suffix_file: str):
  """The suffix file: a name of a file shipped in rain_jax/data/gcg, or a path."""
  shipped = data_path('gcg', suffix_file)
  if shipped.is_file():
    return shipped
  if os.path.isfile(suffix_file):
    return suffix_file
  names = sorted(p.name for p in data_path('gcg').iterdir() if p.name.endswith('.json'))
  raise FileNotFoundError(f'GCG suffix file not found: {suffix_file} (not a path, nor one '
                          f'of the shipped files: {", ".join(names)})')


def read_suffix_file(path) -> list[dict]:
  """Parses a suffix file: a non-empty JSON list of {"goal": str, "controls": str}.

  Raises ValueError naming the file (and the entry) when it is malformed.
  """
  try:
    with open(path, encoding='utf-8') as f:
      entries = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'GCG suffix file {path} is not valid JSON ({e.msg}, line {e.lineno})'
                     ) from None
  if not isinstance(entries, list) or not entries:
    raise ValueError(f'GCG suffix file {path} must hold a non-empty JSON list of '
                     f'{{"goal", "controls"}} objects')
  for number, entry in enumerate(entries):
    if not isinstance(entry, dict):
      raise ValueError(f'GCG suffix file {path}: entry {number} is not an object')
    for key in ('goal', 'controls'):
      if not isinstance(entry.get(key), str):
        raise ValueError(f'GCG suffix file {path}: entry {number} needs a string {key!r}')
  return entries


class AdvTask(Task):
  name = 'adv'
  turn_marker = 'USER:'
  judge_prompts = 'adv'
  # The reference's adv constants: hotter proposals, twice the sampling attempts, and a
  # leaf is terminal when EOS is anywhere in its text.
  rain_defaults = types.MappingProxyType({
      'min_T': 5, 'propose_temperature': 2.0, 'sample_attempts_factor': 2,
      'terminal_eos_in_path': True})

  def __init__(self, suffix_file=None):
    self.suffix_file = suffix_file or DEFAULT_SUFFIX_FILE

  def few_shot_prefix(self) -> str:
    return read_data_text('prompts', 'adv', 'f1.txt')

  def load_examples(self, start, num_examples):
    path = suffix_file_path(self.suffix_file)
    entries = read_suffix_file(path)
    prefix = self.few_shot_prefix()
    examples = []
    for index, entry in enumerate(entries):
      question = entry['goal'] + ' ' + entry['controls']
      examples.append(Example(
          id=f'adv-{index}', index=index,
          prompt=prefix + 'USER: ' + question + ' ASSISTANT:', question=question,
          meta={'goal': entry['goal'], 'controls': entry['controls'],
                'suffix_file': os.path.basename(str(path))}))
    return select_range(examples, start, num_examples, f'the GCG suffix file {path}')

  def conversation_start(self, example):
    """"Human: goal controls\\nAssistant:" (the format of adv/f2.txt's examples)."""
    return 'Human: ' + example.question + '\nAssistant:'
