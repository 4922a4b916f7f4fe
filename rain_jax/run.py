"""Command line: answer a task's prompts with vanilla decoding and/or RAIN.

  python -m rain_jax.run --flagfile=configs/demo.flags

Writes one JSON line per (prompt, method) to --output, appending; prompts already
answered there are skipped, so a killed run resumes where it stopped. Every input is
checked before the output file is touched: a bad flag or file gives a one-line error
and exit status 1, and no output.
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
flags.DEFINE_string('task', 'hh', 'Task: hh or custom.')
flags.DEFINE_string('prompt_file', None, 'custom: JSONL of {"id", "prompt"}, used verbatim.')
flags.DEFINE_string('turn_marker', None, 'custom: text that ends an answer (optional).')
flags.DEFINE_integer('start', 0, 'First example index.')
flags.DEFINE_integer('num_examples', 5, 'How many examples (-1: all).')
# Decoding.
flags.DEFINE_enum('method', 'vanilla', ['vanilla'], 'Decoding method.')
flags.DEFINE_integer('max_new_tokens', 128, 'New tokens per answer at most.')
flags.DEFINE_integer('batch_size', 8, 'Prompts decoded together.')
flags.DEFINE_integer('seed', 0, 'Run seed (mixed with each example index).')
flags.DEFINE_float('temperature', 0.0, 'Vanilla sampling temperature; 0 = greedy.')
flags.DEFINE_integer('top_k', 0, 'Vanilla top-k (0 = off).')
flags.DEFINE_float('top_p', 1.0, 'Vanilla nucleus top-p (1 = off).')
# Output.
flags.DEFINE_string('output', 'out/results.jsonl', 'JSONL results file (appended).')
flags.DEFINE_string('compilation_cache', os.path.join('~', '.cache', 'rain_jax', 'xla'),
                    'Persistent XLA compilation cache folder ("" = off).')

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
  from rain_jax import engine, loading, results, sharding, tasks

  _check_flags()
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  sharding.initialize_distributed(FLAGS.distributed)
  task_options = {}
  if FLAGS.task == 'custom':
    task_options = dict(prompt_file=FLAGS.prompt_file, turn_marker=FLAGS.turn_marker)
  task = tasks.get_task(FLAGS.task, **task_options)
  examples = task.load_examples(FLAGS.start, FLAGS.num_examples)
  mesh = sharding.make_mesh(FLAGS.mesh)
  no_source = not (FLAGS.checkpoint or FLAGS.hf_dir or FLAGS.gguf)
  model_name = FLAGS.model or (DEFAULT_MODEL if no_source else None)
  model = loading.load_model(model=model_name, checkpoint=FLAGS.checkpoint,
                             hf_dir=FLAGS.hf_dir, gguf_path=FLAGS.gguf,
                             tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype,
                             scan_layers=FLAGS.scan_layers, mesh=mesh)
  runner = engine.VanillaRunner(model, mesh, task,
                                max_new_tokens=FLAGS.max_new_tokens,
                                temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                top_p=FLAGS.top_p, seed=FLAGS.seed)
  encoded = runner.encode(examples)  # raises on prompts longer than the context
  done = results.done_keys(FLAGS.output)
  todo = [(ex, ids) for ex, ids in zip(examples, encoded) if (ex.id, 'vanilla') not in done]
  if len(todo) < len(examples):
    logging.info('%d of %d prompts already answered in %s', len(examples) - len(todo),
                 len(examples), FLAGS.output)
  with results.ResultWriter(FLAGS.output) as writer:
    for start in range(0, len(todo), FLAGS.batch_size):
      batch = todo[start:start + FLAGS.batch_size]
      t0 = time.time()
      for record in runner.run_batch(batch, FLAGS.batch_size):
        record['model'] = model.name
        writer.write(record)
        print(f"[{record['id']}] {record['response'][:200]!r}", file=sys.stderr)
      logging.info('batch of %d in %.1f s', len(batch), time.time() - t0)


if __name__ == '__main__':
  app.run(main)
