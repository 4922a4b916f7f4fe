"""Command line: answer a task's prompts with vanilla decoding and/or RAIN.

  python -m rain_jax.run --flagfile=configs/demo.flags

Writes one JSON line per (prompt, method) to --output, appending; prompts already
answered there are skipped, so a killed run (even by kill -9) resumes where it stopped,
and `<output>.config.json` records the flags, code commit and versions of every session
(rain_jax/results.py). --shard_index/--num_shards split the chosen examples between
independent jobs by dataset index modulo the number of shards.

Multi-process (--distributed, or --coordinator_address/--num_processes/--process_id):
the processes form one JAX job over all their devices (rain_jax/distributed.py). What
the output holds (config check, answered prompts) is read by process 0 alone and shared,
process 0 alone writes the results and sidecar, and any process's failure ends all of
them with one line naming the process and its host. Every input is checked before
the output file is touched: a bad flag or file gives a one-line error and exit status 1,
and no output. Progress bars with ETA go to stderr.
"""
import os
import sys
import time

from absl import app, flags, logging

from rain_jax import flag_table

FLAGS = flags.FLAGS
# Every flag is declared once, with its default, help text and roles, in
# rain_jax/flag_table.py.
flag_table.define_flags(FLAGS)

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
  if '://' in path:
    return  # an object store URL: written through etils.epath (rain_jax/results.py)
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


def rain_config_from_flags(flag_values=FLAGS):
  """RainConfig: the task's reference constants, then any RAIN flag the user set."""
  from rain_jax import tasks
  return tasks.rain_config(flag_values.task, **flag_table.rain_overrides(flag_values))


def chosen_examples(flag_values=FLAGS):
  """(task, the examples this process answers) as the task and selection flags say."""
  from rain_jax import results, tasks
  task = tasks.get_task(flag_values.task, **tasks.task_options(
      flag_values.task, flag_values.flag_values_dict()))
  examples = results.shard_examples(
      task.load_examples(flag_values.start, flag_values.num_examples),
      flag_values.shard_index, flag_values.num_shards)
  return task, examples


def make_runners(model, mesh, task, flag_values=FLAGS, judge_model=None):
  """engine.make_runners with the method, decoding and search the flags say (and RAIN's
  judge model, if any: `describe_judge`)."""
  from rain_jax import engine, generate
  sampling = generate.SamplingParams(temperature=flag_values.temperature,
                                     top_k=flag_values.top_k, top_p=flag_values.top_p)
  return engine.make_runners(model, mesh, task, flag_values.method,
                             max_new_tokens=flag_values.max_new_tokens, sampling=sampling,
                             seed=flag_values.seed,
                             rain_config=rain_config_from_flags(flag_values),
                             dump_tree=flag_values.dump_tree, judge_model=judge_model)


def describe_judge(policy, flag_values=FLAGS):
  """The judge model the --judge_* flags name (weights not loaded), or None (the policy
  judges itself). InputError for a judge without RAIN or with another tokenizer."""
  from rain_jax import loading
  judge = loading.describe_judge_model(
      policy, model=flag_values.judge_model, checkpoint=flag_values.judge_checkpoint,
      hf_dir=flag_values.judge_hf_dir, gguf_path=flag_values.judge_gguf,
      tokenizer=flag_values.judge_tokenizer, dtype=flag_values.dtype,
      scan_layers=flag_values.scan_layers, policy_tokenizer=flag_values.tokenizer)
  if judge is not None and flag_values.method == 'vanilla':
    raise InputError('a judge model (--judge_*) serves RAIN only: use --method=rain or both')
  return judge


def streams(method, flag_values=FLAGS):
  """True when `method`'s prompts run as continuous-batching streams."""
  return method == 'rain' and flag_values.continuous_batching


def plan_runs(runners, examples, encoded, done, flag_values=FLAGS):
  """{method: [(examples, widths)]} for the (example, method) pairs not in `done`, within
  the run's --max_programs (engine.program_budget): batches (engine.plan_batches), or
  for RAIN with --continuous_batching one stream per width (engine.plan_streams)."""
  from rain_jax import engine
  budget = engine.program_budget(runners, flag_values.max_programs)
  plans = {}
  for method, runner in runners.items():
    todo = [(ex, ids) for ex, ids in zip(examples, encoded) if (ex.id, method) not in done]
    plan = engine.plan_streams if streams(method, flag_values) else engine.plan_batches
    plans[method] = plan(runner, todo, flag_values.batch_size, budget[method])
  return plans


def method_programs(runner, method, batch_size, widths, flag_values=FLAGS):
  """The compiled programs `method` runs its prompts of `widths` with, batch_size rows."""
  if streams(method, flag_values):
    return runner.stream_programs(batch_size, *widths).all()
  return (runner.program(batch_size, *widths),)


def answer(runner, method, items, widths, flag_values=FLAGS):
  """The records of `items` ((Example, prompt ids) fitting `widths`), as each is ready."""
  if streams(method, flag_values):
    yield from runner.run_stream(items, flag_values.batch_size, widths)
  else:
    yield from runner.run_batch(items, flag_values.batch_size, widths)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    _run()
  except (InputError, ValueError, FileNotFoundError) as e:
    _exit_with_error(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if not _multi_process():
      raise
    # The traceback for this host's log; the peers hear one line and stop too. A collective
    # that failed because a peer died is reported as that peer's loss.
    logging.exception('rain_jax.run failed')
    from rain_jax import distributed
    distributed.fail_or_blame(
        f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}')
  from rain_jax import distributed
  distributed.finish()


def _multi_process():
  from rain_jax import distributed
  return distributed.is_initialized() and distributed.process_count() > 1


def _exit_with_error(message):
  """One line on stderr and exit status 1; in a multi-process job every process stops."""
  if _multi_process():
    from rain_jax import distributed
    # Tells the peers; does not return. A peer's death can surface here too (a collective
    # torn down under a decision process 0 shares): then the line names that peer.
    distributed.fail_or_blame(message)
  print(f'rain_jax.run: error: {message}', file=sys.stderr)
  sys.exit(1)


def _start_distributed():
  """Joins the multi-process job when --distributed or its coordinates ask for it."""
  from rain_jax import distributed
  coordinates = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if not FLAGS.distributed and all(c is None for c in coordinates):
    return
  if FLAGS.peer_timeout_seconds <= 0:
    raise InputError(f'--peer_timeout_seconds must be > 0, got {FLAGS.peer_timeout_seconds}')
  try:
    distributed.initialize(*coordinates, peer_timeout_seconds=FLAGS.peer_timeout_seconds,
                           program='rain_jax.run')
  except distributed.DistributedError as e:
    raise InputError(str(e)) from None


def _run():
  # Imports here so that --help and flag errors do not pay for JAX start-up.
  from rain_jax import sharding
  sharding.prefer_serial_cpu_scheduler()  # before JAX starts its backends
  import jax
  from rain_jax import distributed, loading, programs, progress, results

  _check_flags()
  _start_distributed()
  compilation_cache = FLAGS.compilation_cache
  if compilation_cache is None:
    from models import registry
    compilation_cache = os.path.join(registry.cache_dir(), 'xla')
  if compilation_cache:
    compilation_cache = distributed.process_cache_dir(os.path.expanduser(compilation_cache))
  if compilation_cache:
    jax.config.update('jax_compilation_cache_dir', compilation_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  task, examples = chosen_examples()
  if not examples:
    logging.info('shard %d of %d holds none of the chosen examples; nothing to do',
                 FLAGS.shard_index, FLAGS.num_shards)
    return
  # Whatever is read from the output is read by process 0 alone and shared (its decision
  # is every process's), so the processes of a job always agree on the work.
  writes = distributed.is_coordinator()
  distributed.from_process_zero(lambda: results.check_config(
      FLAGS.output, run_flag_values(), FLAGS.allow_config_change))
  mesh = sharding.make_mesh(FLAGS.mesh)
  no_source = not (FLAGS.checkpoint or FLAGS.hf_dir or FLAGS.gguf)
  model_name = FLAGS.model or (DEFAULT_MODEL if no_source else None)
  model = loading.describe_model(model=model_name, checkpoint=FLAGS.checkpoint,
                                 hf_dir=FLAGS.hf_dir, gguf_path=FLAGS.gguf,
                                 tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype,
                                 scan_layers=FLAGS.scan_layers)
  judge_model = describe_judge(model)
  runners = make_runners(model, mesh, task, judge_model=judge_model)
  # Every input is checked (prompt lengths included) before the output is touched.
  encoded = next(iter(runners.values())).encode(examples)
  done = _shared_keys(distributed.from_process_zero(
      lambda: _key_list(results.done_keys(FLAGS.output))))
  plans = plan_runs(runners, examples, encoded, done)
  # Compile every program the run needs and check that it fits, before loading weights.
  limit = (int(FLAGS.device_memory_gib * programs.GIB) if FLAGS.device_memory_gib
           else programs.device_memory_bytes(mesh.devices.flat))
  for method, plan in plans.items():
    for widths in dict.fromkeys(w for _, w in plan):
      for program in method_programs(runners[method], method, FLAGS.batch_size, widths):
        logging.info('%s compiled in %.1f s: %s', program.describe(),
                     program.compile_seconds, program.memory.as_gib())
        problem = programs.fit_error(program, limit)
        if problem:
          raise InputError(problem)
  # Compiling takes unequal times (one process may find a program in the cache): meet
  # before the first collective (placing the weights) so that none waits on another.
  distributed.barrier('compiled')
  placement = next(iter(runners.values())).placement  # shared by the runners
  model.params = placement.place(loading.load_params(model, placement.shardings),
                                 donate=True)
  if judge_model is not None:
    where = runners['rain'].judge_placement
    judge_model.params = where.place(loading.load_params(judge_model, where.shardings),
                                     donate=True)
  writer = None

  def open_output():
    """Process 0: takes the output (its lock), records this session, lists what is done."""
    nonlocal writer
    writer = results.open_writer(FLAGS.output)
    results.record_session(FLAGS.output, run_flag_values(), results.session_record(
        run_flag_values(), model.name, sum(x.size for x in jax.tree.leaves(model.params)),
        processes=[distributed.host_of(i) for i in range(jax.process_count())]))
    return _key_list(results.done_keys(FLAGS.output))

  # Another run may have answered some since the plan was made.
  done = _shared_keys(distributed.from_process_zero(open_output))
  try:
    for method, runner in runners.items():
      todo = [([(ex, ids) for ex, ids in batch if (ex.id, method) not in done], widths)
              for batch, widths in plans[method]]
      todo = [(batch, widths) for batch, widths in todo if batch]
      remaining = sum(len(batch) for batch, _ in todo)
      with progress.Progress(method, len(examples), len(examples) - remaining,
                             enabled=writes) as bar:
        for batch, widths in todo:
          t0 = time.time()
          for record in answer(runner, method, batch, widths):
            record['model'] = model.name
            if judge_model is not None and method == 'rain':
              record['judge_model'] = judge_model.name
            if writer:
              writer.write(record)
            bar.write(f"[{method} {record['id']}] {record['response'][:200]!r}")
            bar.add([record])
          logging.info('%s: %d prompts in %.1f s', method, len(batch), time.time() - t0)
  finally:
    if writer:
      writer.close()
  if writes and FLAGS.summary:
    _write_summary(examples, runners)


def _write_summary(examples, methods):
  """Process 0, at the end: the summary (rain_jax/summary.py) of the records of the
  chosen examples, answered by this session or an earlier one, on stderr and in
  `<output>.summary.md`. A results file it cannot read costs the summary, not the run."""
  from rain_jax import results, summary
  keys = [(str(ex.id), method) for ex in examples for method in methods]
  try:
    records = summary.latest_records(results.read_records(FLAGS.output), keys)
    if not records:
      return
    text = summary.summarize(records, results.read_config(FLAGS.output), output=FLAGS.output)
    path = summary.write_summary(FLAGS.output, text)
  except (ValueError, OSError) as e:
    print(f'rain_jax.run: warning: no summary: {e}', file=sys.stderr)
    return
  print(text, file=sys.stderr, flush=True)
  logging.info('summary written to %s', path)


def _key_list(keys):
  """Sorted [[id, method]] of a set of (id, method) keys (JSON for from_process_zero)."""
  return sorted([str(i), str(m)] for i, m in keys)


def _shared_keys(key_list):
  return {(i, m) for i, m in key_list}


if __name__ == '__main__':
  app.run(main)
