"""rain_jax/flag_table.py: one entry per flag of rain_jax.run, and the sets derived from it
equal to the lists the modules kept before the table (hard-coded here as the oracle)."""
import dataclasses
import sys

import pytest
from absl import flags

from rain_jax import config, flag_table, results, run, tasks

# The lists as they stood before the table (results.py, tasks/__init__.py, run.py,
# scripts/report.py, scripts/sweep.py).
OLD_SELECTION_FLAGS = {'start', 'num_examples', 'shard_index', 'num_shards', 'method'}
OLD_OPERATIONAL_FLAGS = {'output', 'allow_config_change', 'compilation_cache', 'batch_size',
                         'mesh', 'distributed', 'scan_layers', 'dump_tree',
                         # issue 9: how many programs a run compiles, the memory limit
                         'max_programs', 'device_memory_gib',
                         # issue 10: the multi-process job's coordinates
                         'coordinator_address', 'num_processes', 'process_id',
                         'peer_timeout_seconds',
                         # issue 10: continuous batching of RAIN prompts
                         'continuous_batching',
                         # issue 13: the end-of-run summary
                         'summary'}
OLD_TASK_FLAGS = {
    'adv': ('suffix_file',),
    'sentiment': ('target_sentiment',),
    'custom': ('prompt_file', 'turn_marker', 'prompt_template', 'judge_prompts'),
}
OLD_RAIN_FLAGS = {'max_T', 'min_T', 'value_threshold', 'c_puct', 'num_candidates',
                  'max_children', 'sim_threshold', 'sim_weight', 'num_nodes', 'max_depth',
                  'max_rollout', 'parallel_leaves', 'max_new_tokens', 'seed', 'similarity'}
OLD_IDENTITY_FLAGS = {'model', 'checkpoint', 'hf_dir', 'gguf', 'tokenizer', 'task',
                      'prompt_file', 'turn_marker'}
OLD_WEIGHT_FLAGS = ('checkpoint', 'hf_dir', 'gguf')
# The per-task constants config.TASK_DEFAULTS held (sentiment and custom fell back to HH).
OLD_TASK_DEFAULTS = {
    'hh': dict(min_T=6),
    'adv': dict(min_T=5, propose_temperature=2.0, sample_attempts_factor=2,
                terminal_eos_in_path=True),
    'truth': dict(min_T=16, rollout_stops_at_clause_end=False,
                  rollout_stops_at_path_eos=True, search_stops_at_turn_marker=False),
}


def _run_flags():
  """The absl flags rain_jax.run defines, by name."""
  return {f.name: f for f in flags.FLAGS.get_flags_for_module(sys.modules[run.__name__])}


def test_every_flag_of_run_has_exactly_one_entry_with_a_role():
  names = [flag.name for flag in flag_table.TABLE]
  assert len(names) == len(set(names))
  assert set(names) == set(_run_flags())
  assert set(run.run_flag_values()) == set(names)
  for flag in flag_table.TABLE:
    assert flag.role in flag_table.ROLES, flag.name
  assert (flag_table.ANSWER_FLAGS | flag_table.SELECTION_FLAGS
          | flag_table.OPERATIONAL_FLAGS) == set(names)


ABSL_TYPES = {'string': 'string', 'enum': 'string enum', 'bool': 'bool', 'integer': 'int',
              'float': 'float'}


def test_absl_definitions_follow_the_table():
  defined = _run_flags()
  for flag in flag_table.TABLE:
    absl_flag = defined[flag.name]
    assert absl_flag.flag_type() == ABSL_TYPES[flag.kind], flag.name
    assert absl_flag.default == flag.default, flag.name
    assert absl_flag.help.endswith(flag.help), flag.name  # absl prefixes enum values
    assert list(getattr(absl_flag.parser, 'enum_values', [])) == list(flag.enum_values)
  assert defined['similarity'].parser.enum_values == list(config.SIMILARITIES)


def test_rain_fields_exist_in_rain_config():
  fields = {field.name for field in dataclasses.fields(config.RainConfig)}
  assert set(flag_table.RAIN_FLAGS) <= fields
  assert set(flag_table.RAIN_FLAGS) == OLD_RAIN_FLAGS


def test_derived_sets_equal_the_old_lists():
  assert flag_table.SELECTION_FLAGS == OLD_SELECTION_FLAGS
  assert flag_table.OPERATIONAL_FLAGS == OLD_OPERATIONAL_FLAGS
  assert flag_table.TASK_FLAGS == OLD_TASK_FLAGS
  assert flag_table.IDENTITY_FLAGS == OLD_IDENTITY_FLAGS
  assert flag_table.WEIGHT_FLAGS == OLD_WEIGHT_FLAGS
  assert results.SELECTION_FLAGS == OLD_SELECTION_FLAGS
  assert results.OPERATIONAL_FLAGS == OLD_OPERATIONAL_FLAGS
  assert tasks.TASK_FLAGS == OLD_TASK_FLAGS
  assert set(flag_table.TASK_FLAGS) <= set(tasks.TASKS)


def test_rain_mode_is_gone():
  assert 'rain_mode' not in _run_flags()
  assert all(flag.name != 'rain_mode' for flag in flag_table.TABLE)


@pytest.mark.parametrize('task', sorted(tasks.TASKS))
def test_every_task_declares_its_rain_defaults(task):
  task_class = tasks.TASKS[task]
  assert 'rain_defaults' in vars(task_class)
  fields = {field.name for field in dataclasses.fields(config.RainConfig)}
  assert set(task_class.rain_defaults) <= fields


@pytest.mark.parametrize('task,old', [('hh', 'hh'), ('adv', 'adv'), ('truthfulqa', 'truth'),
                                      ('truth', 'truth'), ('sentiment', 'hh'),
                                      ('custom', 'hh')])
def test_for_task_gives_the_old_constants(task, old):
  assert tasks.rain_config(task) == config.RainConfig(**OLD_TASK_DEFAULTS[old])
  assert tasks.rain_config(task, max_T=3).max_T == 3


def test_for_task_refuses_an_unknown_task():
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.rain_config('nope')


@pytest.mark.parametrize('change', [dict(kind='text'), dict(role='other'),
                                    dict(kind='enum'), dict(enum_values=('a',))])
def test_malformed_entries_are_refused(change):
  entry = dict(name='x', kind='string', default=None, help='h')
  with pytest.raises(ValueError, match='flag x'):
    flag_table.Flag(**{**entry, **change})
