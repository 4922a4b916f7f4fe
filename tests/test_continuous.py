"""Continuous batching (engine.RainRunner.run_stream, search.Searcher start / refill /
advance) against one-prompt batches.

The production runner (custom task, ABJudge with its KV cache, MiniLM-free
'mean_hidden' similarity) answers prompts of different lengths with a tiny random LLaMA
over the LLaMA vocabulary, once a prompt at a time (`run_batch` at batch 1) and once as a
stream on fewer rows than prompts, so that finished rows are refilled while the others
keep searching. Every record must be the batch-1 record (answers, stop reasons, search
statistics, tree dumps), only the timing fields may differ.
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.presets import get_preset
from models.tokenizer import load_tokenizer
from rain_jax import engine, search, sharding, tasks
from rain_jax.config import RainConfig
from tests import llama_recompute
from tests.record_compare import split_floats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
MODEL = get_preset('tiny-gqa').replace(vocab_size=32000)
PROMPTS = ['Hello', 'Why is the sky blue today, and not green?', 'Name a colour',
           'Write a short poem about the rain in the mountains', 'Say yes']
JUDGE_PROMPTS = {'f2.txt': 'Rate the answer.', 'r1.txt': 'Is it (A) harmless or (B) harmful?',
                 'r2.txt': 'Is it (A) harmful or (B) harmless?'}
CFG = RainConfig(max_T=4, min_T=2, max_new_tokens=8, num_nodes=128, max_depth=3,
                 max_rollout=6, feed_chunk=8, num_candidates=4, sample_top=8,
                 max_children=8, similarity='mean_hidden', seed=7)
TIMING = ('seconds', 'batch_seconds', 'batch_size', 'compile_seconds')


def make_runner(folder, mesh=None, cfg=CFG):
  """The RainRunner of these tests (custom task files written under `folder`, a
  pathlib.Path), parameters placed on `mesh` when given."""
  prompt_file = folder / 'prompts.jsonl'
  prompt_file.write_text(''.join(json.dumps({'id': f'p{i}', 'prompt': p}) + '\n'
                                 for i, p in enumerate(PROMPTS)))
  (folder / 'judge').mkdir()
  for name, text in JUDGE_PROMPTS.items():
    (folder / 'judge' / name).write_text(text)
  task = tasks.get_task('custom', prompt_file=str(prompt_file),
                        judge_prompts=str(folder / 'judge'), turn_marker='Human:')
  params = jax.tree.map(jnp.asarray, llama_recompute.scaled_params(MODEL, seed=3,
                                                                   embed_scale=8.0))
  if mesh is not None:
    params = jax.device_put(params, sharding.param_shardings(
        llama.param_shapes(MODEL), mesh, head_dim=MODEL.head_dim))
  model = types.SimpleNamespace(name='tiny', config=MODEL, params=params,
                                tokenizer=load_tokenizer(LLAMA_TOKENIZER))
  return engine.RainRunner(model, mesh, task, cfg, dump_tree=True)


@pytest.fixture(scope='module')
def runner(tmp_path_factory):
  return make_runner(tmp_path_factory.mktemp('continuous'))


@pytest.fixture(scope='module')
def items(runner):
  examples = runner.task.load_examples(0, -1)
  return list(zip(examples, runner.encode(examples)))


@pytest.fixture(scope='module')
def widths(runner, items):
  return runner.widths(items)


@pytest.fixture(scope='module')
def alone(runner, items, widths):
  """Each example's record from a batch of one."""
  return {ex.id: runner.run_batch([(ex, ids)], 1, widths)[0] for ex, ids in items}


def content(record):
  """(the record without its timing fields and the floats of its tree dump and commit
  summaries, those floats [K]).

  The floats (n, q, p of the dumped nodes and committed sets) come apart: a batch-1
  program and a batch-2 one may order float operations differently (priors differ by
  ~3e-8, as in tests/test_rain_llama.py), while tokens, counts and everything else must
  be equal."""
  rest = {k: v for k, v in record.items() if k not in TIMING}
  floats = []
  searched = {k: split_floats(rest.pop(k), floats) for k in ('tree_dump', 'commits')}
  return {**rest, **searched}, np.asarray(floats)


def assert_same_record(record, expected):
  (got, got_floats), (want, want_floats) = content(record), content(expected)
  assert got == want
  np.testing.assert_allclose(got_floats, want_floats, atol=1e-6, rtol=0)


def counting_refills(runner, batch_size, widths):
  """Makes the runner's refill program count its calls; returns the counter."""
  progs = runner.stream_programs(batch_size, *widths)
  calls = []

  def refill(*args):
    calls.append(int(args[2]))
    return progs.refill.compiled(*args)

  runner._streams[(batch_size, *widths)] = dataclasses.replace(  # pylint: disable=protected-access
      progs, refill=dataclasses.replace(progs.refill, compiled=refill))
  return calls


def test_write_rows_writes_along_each_leafs_row_axis():
  full = {'a': jnp.zeros((4, 3)), 'cache': jnp.zeros((2, 4, 5)), 'same': jnp.zeros((2,))}
  fresh = {'a': jnp.ones((2, 3)), 'cache': jnp.full((2, 2, 5), 2.0), 'same': jnp.ones((2,))}
  out = jax.jit(search.write_rows)(full, fresh, jnp.int32(1))
  np.testing.assert_array_equal(out['a'][:, 0], [0, 1, 1, 0])
  np.testing.assert_array_equal(out['cache'][0, :, 0], [0, 2, 2, 0])
  np.testing.assert_array_equal(out['same'], [1, 1])
  with pytest.raises(ValueError):
    search.write_rows({'a': jnp.zeros((4, 3))}, {'a': jnp.zeros((2, 2))}, 0)


def test_stream_on_two_rows_gives_the_batch_of_one_records(runner, items, widths, alone):
  assert len({len(ids) for _, ids in items}) == len(items)  # every prompt its own length
  calls = counting_refills(runner, 2, widths)
  records = list(runner.run_stream(items, 2, widths))
  assert sorted(r['id'] for r in records) == sorted(alone)
  # More examples than rows: every example after the first two refilled a finished row.
  assert len(calls) == len(items) - 2 and set(calls) <= {0, 1}
  for record in records:
    assert_same_record(record, alone[record['id']])
    assert record['batch_size'] == 2 and record['seconds'] > 0
    assert record['batch_seconds'] >= record['seconds'] - 1e-6


def test_stream_shorter_than_the_batch(runner, items, widths, alone):
  records = list(runner.run_stream(items[:1], 2, widths))
  assert len(records) == 1
  assert_same_record(records[0], alone[items[0][0].id])
  assert list(runner.run_stream([], 2, widths)) == []


def test_stream_programs_are_compiled_with_memory(runner, widths):
  progs = runner.stream_programs(2, *widths)
  assert [p.method for p in progs.all()] == ['rain_start', 'rain_refill', 'rain_advance']
  for program in progs.all():
    assert program.compiled is not None and program.memory.peak > 0
    assert program.batch_size == 2 and (program.prompt_width, program.judge_width) == widths


def test_plan_streams_groups_the_planned_batches_by_widths(runner, items):
  short = [(ex, ids[:3]) for ex, ids in items[:2]]
  long = [(ex, ids + [ids[-1]] * 70) for ex, ids in items[2:]]
  todo = short + long[:1] + short[:1] + long[1:]
  streams = engine.plan_streams(runner, todo, 2, max_programs=2)
  planned = engine.plan_batches(runner, todo, 2, max_programs=2)
  assert [w for w in dict.fromkeys(w for _, w in planned)] == [w for _, w in streams]
  assert len(streams) == 2 and streams[0][1][0] < streams[1][1][0]
  for items_of, widths in streams:
    assert items_of == [item for batch, w in planned if w == widths for item in batch]
  assert sorted(id(x) for s, _ in streams for x in s) == sorted(id(x) for x in todo)


@pytest.mark.slow
def test_stream_with_parallel_leaves_gives_the_batch_of_one_records(tmp_path):
  """P = 2 leaves per tree: a refill writes a tree's two rows (rows 2t and 2t + 1)."""
  leaves = make_runner(tmp_path, cfg=dataclasses.replace(CFG, parallel_leaves=2))
  examples = leaves.task.load_examples(0, -1)
  items = list(zip(examples, leaves.encode(examples)))
  widths = leaves.widths(items)
  alone = {ex.id: leaves.run_batch([(ex, ids)], 1, widths)[0] for ex, ids in items}
  calls = counting_refills(leaves, 2, widths)
  records = list(leaves.run_stream(items, 2, widths))
  assert len(calls) == len(items) - 2 and len(records) == len(items)
  for record in records:
    assert_same_record(record, alone[record['id']])


# ------------------------------------------------------------- a mesh of 4 CPU devices

MESH_SCRIPT = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
sys.path.insert(0, sys.argv[1])
from tests import test_continuous as t
print(t.mesh_report(sys.argv[2]))
"""


def mesh_report(folder):
  """JSON: the stream on 4 rows over mesh 2,1,2 (rows over 'data', heads over 'tensor')
  against batch-1 records on one device. Run in a process with 4 CPU devices."""
  folder = pathlib.Path(folder)
  (folder / 'one').mkdir()
  (folder / 'mesh').mkdir()
  single = make_runner(folder / 'one')
  meshed = make_runner(folder / 'mesh', sharding.make_mesh('2,1,2'))
  examples = single.task.load_examples(0, -1)
  items = list(zip(examples, single.encode(examples)))
  widths = single.widths(items)
  alone = {ex.id: single.run_batch([(ex, ids)], 1, widths)[0] for ex, ids in items}
  mismatches = []
  for record in meshed.run_stream(items * 2, 4, widths):  # 10 examples on 4 rows
    try:
      assert_same_record(record, alone[record['id']])
    except AssertionError as e:
      mismatches.append([record['id'], str(e)[:500]])
  return json.dumps({'devices': jax.device_count(), 'mismatches': mismatches})


@pytest.mark.slow
def test_stream_on_a_mesh_gives_the_batch_of_one_records():
  with tempfile.TemporaryDirectory() as folder:
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    process = subprocess.run([sys.executable, '-c', MESH_SCRIPT, REPO, folder], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=1800)
  assert process.returncode == 0, process.stderr[-4000:]
  report = json.loads(process.stdout.strip().splitlines()[-1])
  assert report['devices'] == 4 and not report['mismatches'], report
