"""Command line: answer a task's prompts with vanilla decoding and/or RAIN.

  python -m rain_jax.run --flagfile=configs/demo.flags

Writes one JSON line per (prompt, method) to --output, appending; prompts already
answered there are skipped, so a killed run (even by kill -9) resumes where it stopped,
and `<output>.config.json` records the flags, code commit and versions of every session
(rain_jax/results.py). --shard_index/--num_shards split the chosen examples between
processes by dataset index modulo the number of shards. Every input is checked before
the output file is touched: a bad flag or file gives a one-line error and exit status 1,
and no output. Progress bars with ETA go to stderr.
"""
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS

# Model.
flags.DEFINE_string('model', None, 'Registry name, e.g. smollm2-135m-instruct (the default '
                    'when no other weight source is given).')
flags.DEFINE_string('checkpoint', None, 'Orbax checkpoint written by '
                    'scripts/convert_checkpoint.py.')
flags.DEFINE_string('hf_dir', None, 'HF directory with config.json and *.safetensors.')
flags.DEFINE_string('gguf', None, 'A LLaMA-architecture GGUF file.')
flags.DEFINE_string('tokenizer', None, 'tokenizer.model / tokenizer.json / .gguf (when the '
                    'weights do not carry one).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Parameter and compute dtype.')
flags.DEFINE_bool('scan_layers', True, 'Scan over stacked layers (fast compiles; CPU) or '
                  'unroll them (faster decoding on GPU/TPU).')
flags.DEFINE_string('mesh', '-1,1,1', 'Device mesh data,fsdp,tensor; -1 = the rest.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() (multi-host).')
# Task.
flags.DEFINE_string('task', 'hh', 'Task: hh, adv, truthfulqa, sentiment or custom.')
flags.DEFINE_string('prompt_file', None, 'custom: JSONL of {"id", "prompt"}.')
flags.DEFINE_string('turn_marker', None, 'custom: text that ends an answer (optional).')
flags.DEFINE_string('prompt_template', None, 'custom: template with one {prompt} '
                    'placeholder (default: the prompt verbatim).')
flags.DEFINE_string('judge_prompts', None, 'custom: judge prompt folder (a name under '
                    'rain_jax/data/prompts, e.g. HH, or a path holding f2/r1/r2.txt).')
flags.DEFINE_string('suffix_file', None, 'adv: GCG suffix file ([{"goal", "controls"}]; '
                    'a name under rain_jax/data/gcg or a path).')
flags.DEFINE_enum('target_sentiment', None, ['positive', 'negative'],
                  'sentiment: the sentiment to steer continuations toward.')
flags.DEFINE_integer('start', 0, 'First example index.')
flags.DEFINE_integer('num_examples', 5, 'How many examples (-1: all).')
flags.DEFINE_integer('shard_index', 0, 'This process answers the chosen examples whose '
                     'dataset index modulo --num_shards is --shard_index.')
flags.DEFINE_integer('num_shards', 1, 'How many shards split the chosen examples.')
# Decoding.
flags.DEFINE_enum('method', 'vanilla', ['vanilla', 'rain', 'both'], 'Decoding method.')
flags.DEFINE_integer('max_new_tokens', 128, 'New tokens per answer at most.')
flags.DEFINE_integer('batch_size', 8, 'Prompts decoded together.')
flags.DEFINE_integer('seed', 0, 'Run seed (mixed with each example index).')
flags.DEFINE_float('temperature', 0.0, 'Vanilla sampling temperature; 0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'Vanilla top-k (0 = off).')
flags.DEFINE_float('top_p', 1.0, 'Vanilla nucleus top-p (1 = off).')
# RAIN (reference constants per task unless set; see rain_jax/config.py).
flags.DEFINE_integer('max_T', None, 'Simulations per committed set (reference 50).')
flags.DEFINE_integer('min_T', None, 'Early stop needs the best child to have fn > min_T.')
flags.DEFINE_float('value_threshold', None, 'Early stop needs the best child q > this (Vt).')
flags.DEFINE_float('c_puct', None, 'PUCT exploration constant (reference 2).')
flags.DEFINE_integer('num_candidates', None, 'Candidates per expansion (k, reference 10).')
flags.DEFINE_integer('max_children', None, 'Children per node at most (reference 20).')
flags.DEFINE_enum('similarity', 'minilm', ['minilm', 'mean_hidden', 'none'],
                  'Embedding behind similarity sharing and widening: all-MiniLM-L6-v2 on the '
                  'decoded text (the reference), the policy\'s mean final hidden state '
                  '(L2-normalised; not the reference), or none.')
flags.DEFINE_float('sim_threshold', None, 'Cosine threshold of similarity sharing (0.95).')
flags.DEFINE_float('sim_weight', None, 'Weight of similarity sharing (0.2).')
flags.DEFINE_enum('rain_mode', 'reference', ['reference'],
                  'reference: the original algorithm step for step.')
flags.DEFINE_integer('parallel_leaves', 1, 'Leaves judged per step (virtual loss); 1 = '
                     'reference.')
flags.DEFINE_integer('num_nodes', None, 'Tree capacity per prompt.')
flags.DEFINE_integer('max_depth', None, 'Selection depth cap below the root.')
flags.DEFINE_integer('max_rollout', None, 'Rollout length cap (tokens).')
flags.DEFINE_bool('dump_tree', False, 'Add the root children statistics at every commit '
                  'to each RAIN record ("tree_dump").')
# Output.
flags.DEFINE_string('output', 'out/results.jsonl', 'JSONL results file (appended; '
                    'one per process).')
flags.DEFINE_bool('allow_config_change', False, 'Append to an --output whose answers were '
                  'made with other settings (see <output>.config.json).')
flags.DEFINE_string('compilation_cache', None,
                    'Persistent XLA compilation cache folder (default: xla/ in the model '
                    'cache, $RAIN_JAX_CACHE or ~/.cache/rain_jax; "" = off).')

DEFAULT_MODEL = 'smollm2-135m-instruct'


class InputError(Exception):
  """A problem with the user's flags or files (reported as one line, exit 1)."""


def _check_flags():
  if FLAGS.max_new_tokens < 1:
    raise InputError(f'--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}')
  if FLAGS.batch_size < 1:
    raise InputError(f'--batch_size must be >= 1, got {FLAGS.batch_size}')
  if FLAGS.num_examples == 0 or FLAGS.num_examples < -1:
    raise InputError(f'--num_examples must be >= 1 or -1 (all), got {FLAGS.num_examples}')
  if FLAGS.num_shards < 1 or not 0 <= FLAGS.shard_index < FLAGS.num_shards:
    raise InputError(f'--shard_index must be in [0, --num_shards) and --num_shards >= 1, '
                     f'got --shard_index={FLAGS.shard_index} --num_shards={FLAGS.num_shards}')
  _check_output_location(FLAGS.output)


def _check_output_location(path):
  """InputError unless `path` names a file that exists or can be created."""
  if not path:
    raise InputError('--output must name a results file')
  if os.path.isdir(path):
    raise InputError(f'--output {path} is a directory, not a file')
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise InputError(f'--output {path}: {folder} is not a directory')


def run_flag_values():
  """{name: value} of every flag this module defines (what the config sidecar records)."""
  return {flag.name: flag.value for flag in FLAGS.get_flags_for_module(sys.modules[__name__])}


def rain_config_from_flags():
  """RainConfig: the task's reference constants, then any RAIN flag the user set."""
  from rain_jax import config
  names = ('max_T', 'min_T', 'value_threshold', 'c_puct', 'num_candidates', 'max_children',
           'sim_threshold', 'sim_weight', 'num_nodes', 'max_depth', 'max_rollout',
           'parallel_leaves')
  overrides = {n: getattr(FLAGS, n) for n in names if getattr(FLAGS, n) is not None}
  overrides.update(max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed,
                   similarity=FLAGS.similarity)
  return config.for_task(FLAGS.task, **overrides)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    _run()
  except (InputError, ValueError, FileNotFoundError) as e:
    print(f'rain_jax.run: error: {e}', file=sys.stderr)
    sys.exit(1)


def _run():
  # Imports here so that --help and flag errors do not pay for JAX start-up.
  import jax
  from rain_jax import engine, loading, progress, results, sharding, tasks

  _check_flags()
  compilation_cache = FLAGS.compilation_cache
  if compilation_cache is None:
    from models import registry
    compilation_cache = os.path.join(registry.cache_dir(), 'xla')
  if compilation_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(compilation_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  sharding.initialize_distributed(FLAGS.distributed)
  task = tasks.get_task(FLAGS.task, **tasks.task_options(FLAGS.task,
                                                         FLAGS.flag_values_dict()))
  examples = results.shard_examples(task.load_examples(FLAGS.start, FLAGS.num_examples),
                                    FLAGS.shard_index, FLAGS.num_shards)
  if not examples:
    logging.info('shard %d of %d holds none of the chosen examples; nothing to do',
                 FLAGS.shard_index, FLAGS.num_shards)
    return
  results.check_config(FLAGS.output, run_flag_values(), FLAGS.allow_config_change)
  mesh = sharding.make_mesh(FLAGS.mesh)
  no_source = not (FLAGS.checkpoint or FLAGS.hf_dir or FLAGS.gguf)
  model_name = FLAGS.model or (DEFAULT_MODEL if no_source else None)
  model = loading.load_model(model=model_name, checkpoint=FLAGS.checkpoint,
                             hf_dir=FLAGS.hf_dir, gguf_path=FLAGS.gguf,
                             tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype,
                             scan_layers=FLAGS.scan_layers, mesh=mesh)
  runners = {}
  if FLAGS.method in ('vanilla', 'both'):
    runners['vanilla'] = engine.VanillaRunner(model, mesh, task,
                                              max_new_tokens=FLAGS.max_new_tokens,
                                              temperature=FLAGS.temperature,
                                              top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                                              seed=FLAGS.seed)
  if FLAGS.method in ('rain', 'both'):
    runners['rain'] = engine.RainRunner(model, mesh, task, rain_config_from_flags(),
                                        dump_tree=FLAGS.dump_tree)
  # Every input is checked (prompt lengths included) before the output is touched.
  encoded = next(iter(runners.values())).encode(examples)
  with results.ResultWriter(FLAGS.output) as writer:
    results.record_session(FLAGS.output, run_flag_values(), results.session_record(
        run_flag_values(), model.name, sum(x.size for x in jax.tree.leaves(model.params))))
    done = results.done_keys(FLAGS.output)
    for method, runner in runners.items():
      todo = [(ex, ids) for ex, ids in zip(examples, encoded) if (ex.id, method) not in done]
      with progress.Progress(method, len(examples), len(examples) - len(todo)) as bar:
        for start in range(0, len(todo), FLAGS.batch_size):
          batch = todo[start:start + FLAGS.batch_size]
          t0 = time.time()
          records = runner.run_batch(batch, FLAGS.batch_size)
          for record in records:
            record['model'] = model.name
            writer.write(record)
            bar.write(f"[{method} {record['id']}] {record['response'][:200]!r}")
          bar.add(records)
          logging.info('%s: batch of %d in %.1f s', method, len(batch), time.time() - t0)


if __name__ == '__main__':
  app.run(main)
