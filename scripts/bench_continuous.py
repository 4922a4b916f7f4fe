"""Continuous batching against whole batches: prompts per hour, same seeds, same answers.

Answers the first N HH prompts with RAIN three ways through the production runner
(`rain_jax.engine.RainRunner`, as `python -m rain_jax.run --method=rain` builds it):

  batch:  `run_batch` on consecutive batches of B (a batch waits for its slowest prompt);
  stream: `run_stream` on B rows (a finished row takes the next prompt);
  single: `run_batch` at batch 1, one prompt at a time (the reference answers).

Each pass's seconds are its wall time with every program already compiled (compile times
are reported apart); prompts per hour = N / seconds * 3600. The passes run one after
another in this one process, so they share the machine's load of the moment (the load
average is recorded around each). Every answer (response ids, stop reason, search
statistics) of the batch and stream passes is compared with the single pass.

Prints one JSON object (and logs one JSON line per pass, with its answers, on stderr as
the pass ends). Example (the measurement of docs/measurements.md, issue 10):

  OMP_WAIT_POLICY=PASSIVE python scripts/bench_continuous.py --num_examples=32 \\
      --batch_size=8 --value_threshold=-0.5
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=wrong-import-position

from models import registry  # pylint: disable=wrong-import-position
from rain_jax import engine, loading, sharding, tasks  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='smollm2-135m-instruct')
  parser.add_argument('--num_examples', type=int, default=32)
  parser.add_argument('--batch_size', type=int, default=8)
  # The demo's search budget (configs/demo.flags), HH's constants otherwise.
  parser.add_argument('--max_new_tokens', type=int, default=6)
  parser.add_argument('--max_T', type=int, default=15)
  parser.add_argument('--max_rollout', type=int, default=16)
  parser.add_argument('--max_depth', type=int, default=4)
  parser.add_argument('--value_threshold', type=float, default=None,
                      help='early-stop threshold (default: the task constant)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--passes', default='batch,stream,single',
                      help='comma-separated, run in this order')
  parser.add_argument('--from_logs', nargs='+', default=None,
                      help="no run: the report of the passes logged in these files (the "
                           "'pass {...}' lines of earlier runs' stderr), e.g. batch and "
                           "stream from one run, single from another")
  return parser.parse_args(argv)


def logged_passes(paths):
  """{name: logged pass} from the 'pass {json}' lines of earlier runs' logs (a later
  line of the same pass wins)."""
  passes = {}
  for path in paths:
    with open(path, encoding='utf-8') as f:
      for line in f:
        if line.startswith('pass {'):
          logged = json.loads(line[len('pass '):])
          passes[logged['pass']] = logged
  return passes


def lockstep_ticks(sims, batch_size):
  """Ticks `run_batch` runs over consecutive batches: an example of s simulations takes
  s + 1 ticks (its last tick only commits), a batch those of its longest."""
  return sum(max(sims[i:i + batch_size]) + 1 for i in range(0, len(sims), batch_size))


def stream_schedule(sims, batch_size):
  """(ticks, finish order) of `run_stream` on batch_size rows: each row takes the next
  example when its own is done (rows done at the same tick in row order), an example of
  s simulations holding its row s + 1 ticks. Every row runs the whole batch's model calls
  each tick, so ticks x rows is the model work, in both schedules."""
  free_at, order, finish = [0] * batch_size, [], []
  for i, s in enumerate(sims):
    row = i if i < batch_size else min(range(batch_size), key=lambda r: (free_at[r], r))
    free_at[row] += s + 1
    finish.append((free_at[row], row, i))
  return max(free_at), [i for _, _, i in sorted(finish)]


def compare(passes, batch_size):
  """The cross-pass part of the report: answers against batch 1, stream over batch, and
  the ticks of both schedules on batch_size rows."""
  report = {}
  if 'single' in passes:
    reference = passes['single']['answers']
    for name, logged in passes.items():
      differ = sorted(i for i, a in logged['answers'].items() if a != reference.get(i))
      report[f'{name}_answers_equal_batch_1'] = not differ
      report[f'{name}_differing_ids'] = differ
  if 'batch' in passes and 'stream' in passes:
    report['stream_answers_equal_batch'] = (passes['stream']['answers']
                                            == passes['batch']['answers'])
    report['stream_over_batch_prompts_per_hour'] = round(
        passes['stream']['prompts_per_hour'] / passes['batch']['prompts_per_hour'], 3)
    ids = passes['batch']['finish_order']  # run_batch keeps the input order
    sims = [passes['batch']['answers'][i]['search']['simulations'] for i in ids]
    ticks, order = stream_schedule(sims, batch_size)
    report['ticks'] = {'batch': lockstep_ticks(sims, batch_size), 'stream': ticks,
                       'simulations': sum(sims),
                       'stream_finish_order_as_scheduled': (
                           [ids[i] for i in order] == passes['stream']['finish_order'])}
    report['ticks']['batch_over_stream'] = round(report['ticks']['batch'] / ticks, 3)
  return report


def answer_key(record):
  """What must agree across passes: the answer and everything the search counted."""
  return {'response_ids': record['response_ids'], 'stop_reason': record['stop_reason'],
          'search': record['search']}


def timed_pass(name, runner, items, batch_size, widths, log):
  """(records by id, summary) of one pass; programs compiled before the clock starts."""
  if name == 'stream':
    runner.stream_programs(batch_size, *widths)
  else:
    runner.program(1 if name == 'single' else batch_size, *widths)
  load_before = os.getloadavg()
  t0 = time.time()
  records = []
  if name == 'stream':
    for record in runner.run_stream(items, batch_size, widths):
      records.append(record)
      log(f'stream: {record["id"]} done after {time.time() - t0:.1f} s, '
          f'{record["search"]["simulations"]} simulations')
  else:
    size = 1 if name == 'single' else batch_size
    for start in range(0, len(items), size):
      records += runner.run_batch(items[start:start + size], size, widths)
      log(f'{name}: {len(records)}/{len(items)} after {time.time() - t0:.1f} s, '
          f'simulations {[r["search"]["simulations"] for r in records[start:]]}')
  seconds = time.time() - t0
  sims = [r['search']['simulations'] for r in records]
  return {r['id']: r for r in records}, {
      'batch_size': batch_size, 'seconds': round(seconds, 2),
      'prompts_per_hour': round(len(items) / seconds * 3600, 1),
      'mean_record_seconds': round(sum(r['seconds'] for r in records) / len(records), 2),
      'simulations': {'total': sum(sims), 'min': min(sims), 'max': max(sims)},
      'finish_order': [r['id'] for r in records],
      'load_average_before': [round(x, 2) for x in load_before],
      'load_average_after': [round(x, 2) for x in os.getloadavg()]}


def main(argv=None):
  args = parse_args(argv)
  if args.from_logs:
    passes = logged_passes(args.from_logs)
    print(json.dumps({'passes': {name: {k: v for k, v in logged.items() if k != 'answers'}
                                 for name, logged in passes.items()},
                      'comparison': compare(passes, args.batch_size)}, indent=1))
    return
  log = lambda message: print(message, file=sys.stderr, flush=True)
  jax.config.update('jax_compilation_cache_dir', os.path.join(registry.cache_dir(), 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  task = tasks.get_task('hh')
  overrides = dict(max_new_tokens=args.max_new_tokens, max_T=args.max_T,
                   max_rollout=args.max_rollout, max_depth=args.max_depth, seed=args.seed)
  if args.value_threshold is not None:
    overrides['value_threshold'] = args.value_threshold
  cfg = tasks.rain_config('hh', **overrides)
  mesh = sharding.make_mesh('-1,1,1')
  model = loading.load_model(model=args.model, dtype='float32', scan_layers=True, mesh=mesh)
  runner = engine.RainRunner(model, mesh, task, cfg)
  examples = task.load_examples(0, args.num_examples)
  items = list(zip(examples, runner.encode(examples)))
  widths = runner.widths(items)  # one width pair for every pass: the same programs' shapes
  report = {'settings': {'task': 'hh', 'model': args.model, 'num_examples': len(items),
                         'batch_size': args.batch_size, 'widths': list(widths),
                         'rain_config': dataclasses.asdict(cfg), 'cpu_count': os.cpu_count(),
                         'jax': jax.__version__, 'backend': jax.default_backend()},
            'passes': {}}
  results = {}
  for name in args.passes.split(','):
    log(f'pass {name}')
    results[name], report['passes'][name] = timed_pass(name, runner, items, args.batch_size,
                                                       widths, log)
    # One line per pass as it ends (a run cut short keeps the passes it finished).
    log('pass ' + json.dumps({'pass': name, **report['passes'][name], 'answers': {
        i: answer_key(r) for i, r in results[name].items()}}))
  report['compile_seconds'] = {
      name: ({p.method: round(p.compile_seconds, 1)
              for p in runner.stream_programs(args.batch_size, *widths).all()}
             if name == 'stream' else round(runner.program(
                 1 if name == 'single' else args.batch_size, *widths).compile_seconds, 1))
      for name in results}
  report['comparison'] = compare({name: {**report['passes'][name], 'answers': {
      i: answer_key(r) for i, r in results[name].items()}} for name in results},
                                 args.batch_size)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
