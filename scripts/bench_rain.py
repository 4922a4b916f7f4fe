"""The `rain` suite of scripts/bench.py: RAIN against vanilla decoding, same prompts.

For each batch size it answers the first HH prompts with vanilla greedy decoding and
with RAIN (reference mode) through the same runners the CLI uses
(`rain_jax.engine.VanillaRunner` / `RainRunner`), and reports:

- seconds per prompt for each method and the RAIN / vanilla ratio (compile time apart);
- simulations, committed sets and simulations per committed set;
- forward passes per simulation and model tokens processed per second, from a second,
  counting run of RAIN in which every model call reports its shape through a host
  callback (that run is not timed: callbacks cost time);
- throughput (prompts per second) at each batch size.

The search budget is fixed so that runs compare: `--rain_max_T` simulations per
committed set (at least 15, as the reference) and no early stop (min_T above any
visit count), with `--rain_new_tokens` new tokens.
"""
import dataclasses
import json
import time

import jax
import numpy as np

from rain_jax import engine, kvcache, tasks
from rain_jax.config import RainConfig


@dataclasses.dataclass
class CallCounter:
  """Model calls and tokens (B * T per call, padding and masked rows included)."""
  calls: int = 0
  tokens: int = 0

  def add(self, tokens_in_call):
    self.calls += 1
    self.tokens += int(tokens_in_call)


def counting_fns(fns: kvcache.ModelFns, counter: CallCounter) -> kvcache.ModelFns:
  """ModelFns whose forward reports each call to `counter` through a host callback."""
  def forward(params, tokens, *args, **kwargs):
    jax.debug.callback(counter.add, tokens.size, ordered=False)
    return fns.forward(params, tokens, *args, **kwargs)
  return dataclasses.replace(fns, forward=forward)


def rain_config(args):
  return RainConfig(max_T=args.rain_max_T, min_T=1 << 30, value_threshold=2.0,
                    max_new_tokens=args.rain_new_tokens, max_rollout=args.rain_max_rollout,
                    max_depth=4, seed=0, parallel_leaves=getattr(args, 'rain_parallel_leaves', 1),
                    # Speed only: random weights, and no MiniLM download where it runs.
                    similarity='mean_hidden')


def time_runner(runner, batch, batch_size, runs=2):
  """(records, seconds, compile seconds). The first call compiles (lower + compile, timed
  apart by the runner); with runs=2 the seconds are those of a second, steady-state call,
  with runs=1 the runner's own timing of the first call's execution (compile excluded)."""
  records = runner.run_batch(batch, batch_size)
  compile_seconds = records[0]['compile_seconds']
  if runs < 2:
    return records, records[0]['batch_seconds'], compile_seconds
  t0 = time.perf_counter()
  records = runner.run_batch(batch, batch_size)
  return records, time.perf_counter() - t0, compile_seconds


def run_rain_suite(args, model, mesh, log):
  """Runs the suite on a loaded model (rain_jax.loading.LoadedModel); returns a dict.

  Optional args (default in brackets): rain_parallel_leaves [1], rain_vanilla [True]
  (time vanilla decoding too), rain_count_calls [True] (the counting run), rain_runs [2]
  (see time_runner). Each finished row is also logged as one `row {json}` line, so a run
  cut short still leaves its finished rows in the log.
  """
  task = tasks.get_task('hh')
  cfg = rain_config(args)
  with_vanilla = getattr(args, 'rain_vanilla', True)
  count_calls = getattr(args, 'rain_count_calls', True)
  runs = getattr(args, 'rain_runs', 2)
  results = []
  for batch_size in args.batch_sizes:
    examples = task.load_examples(0, batch_size)
    rain = engine.RainRunner(model, mesh, task, cfg)
    batch = list(zip(examples, rain.encode(examples)))
    row = {'batch_size': batch_size, 'parallel_leaves': cfg.parallel_leaves}
    v_seconds = None
    if with_vanilla:
      vanilla = engine.VanillaRunner(model, mesh, task, max_new_tokens=args.rain_new_tokens)
      log(f'batch {batch_size}: vanilla')
      v_records, v_seconds, v_compile = time_runner(vanilla, batch, batch_size, runs)
      row['vanilla'] = {'seconds_per_prompt': v_seconds / batch_size,
                        'batch_seconds': v_seconds, 'compile_seconds': v_compile,
                        'mean_new_tokens': float(np.mean([r['num_new_tokens']
                                                          for r in v_records]))}
    log(f'batch {batch_size}: rain (parallel_leaves={cfg.parallel_leaves})')
    r_records, r_seconds, r_compile = time_runner(rain, batch, batch_size, runs)
    sims = [r['search']['simulations'] for r in r_records]
    commits = [r['search']['committed_sets'] for r in r_records]
    row['rain'] = {
        'seconds_per_prompt': r_seconds / batch_size, 'batch_seconds': r_seconds,
        'compile_seconds': r_compile,
        'mean_new_tokens': float(np.mean([r['num_new_tokens'] for r in r_records])),
        'simulations_per_prompt': float(np.mean(sims)),
        'simulations_per_committed_set': float(np.sum(sims) / max(np.sum(commits), 1)),
        'seconds_per_simulation': r_seconds / max(max(sims), 1),
        'seconds_per_committed_set': r_seconds / max(max(commits), 1),
        'max_simulations': int(max(sims)), 'max_committed_sets': int(max(commits)),
        'forward_passes': None, 'forward_passes_per_simulation': None,
        'model_tokens_processed': None, 'model_tokens_per_second': None}
    if count_calls:
      log(f'batch {batch_size}: rain, counting model calls')
      counter = CallCounter()
      rain.fns = counting_fns(rain.fns, counter)
      rain._programs.clear()  # pylint: disable=protected-access
      rain._searchers.clear()  # pylint: disable=protected-access
      counted = rain.run_batch(batch, batch_size)
      jax.effects_barrier()
      assert [r['response_ids'] for r in counted] == [r['response_ids'] for r in r_records]
      row['rain'].update({
          'forward_passes': counter.calls,
          'forward_passes_per_simulation': counter.calls / max(max(sims), 1),
          'model_tokens_processed': counter.tokens,
          'model_tokens_per_second': counter.tokens / r_seconds})
    if v_seconds is not None:
      row['ratio_rain_over_vanilla_seconds'] = r_seconds / v_seconds
    row['throughput_prompts_per_second'] = {
        'vanilla': batch_size / v_seconds if v_seconds else None,
        'rain': batch_size / r_seconds}
    results.append(row)
    log(f'batch {batch_size}: rain {r_seconds:.2f} s'
        + (f', vanilla {v_seconds:.2f} s' if v_seconds is not None else ''))
    log('row ' + json.dumps(row))
  return {
      'settings': {'task': 'hh', 'rain_config': dataclasses.asdict(cfg),
                   'runs': runs, 'count_calls': count_calls, 'with_vanilla': with_vanilla,
                   'vanilla': 'greedy, same max_new_tokens',
                   'note': 'fixed budget: max(max_T, 15) simulations per committed set, '
                           'early stop disabled; RAIN commits whole token sets, so its '
                           'answers can be longer than vanilla\'s'},
      'results': results,
      'definitions': {
          'seconds_per_prompt': 'batch seconds / batch size (compile apart); with runs=2 '
                                'the second call, with runs=1 the first call\'s execution',
          'seconds_per_simulation': 'batch seconds / simulations of the busiest row '
                                    '(a simulation = one leaf expanded and judged)',
          'seconds_per_committed_set': 'batch seconds / committed sets of the busiest row',
          'forward_passes_per_simulation': 'sequential model calls of the counting run '
                                           '/ simulations of the busiest row',
          'model_tokens_per_second': 'tokens through the model (batch x tokens per call, '
                                     'padding included) / timed RAIN seconds',
      },
  }
