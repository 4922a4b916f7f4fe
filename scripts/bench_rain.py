"""The `rain` suite of scripts/bench.py: RAIN against vanilla decoding, same prompts.

For each batch size it answers the first HH prompts with vanilla greedy decoding and
with RAIN through the same runners the CLI uses (`rain_jax.engine.VanillaRunner` /
`RainRunner`), and reports:

- seconds per prompt for each method and the RAIN / vanilla ratio (compile time apart);
- simulations, committed sets, seconds per simulation and per committed set;
- sequential model calls per simulation, in all and by phase (path, rollout+proposals,
  judge, widening, commit), with tokens per call and each phase's share of the time,
  from a second run in which every call is stamped (scripts/timeline.py; the stamps
  cost ~0.1 ms a call, so that run is not the timed one);
- a projected accelerator time per committed set: calls per committed set x the time
  of one decode call of a LLaMA-7B-shaped model measured on a GPU (`--rain_call_ms`);
- throughput (prompts per second) at each batch size.

The search settings are `rain_jax.run`'s HH defaults (rollouts up to 64 tokens, depth 8)
except a fixed budget, so that runs compare: `--rain_max_T` simulations per committed
set (at least 15, as the reference) and no early stop (min_T above any visit count),
with `--rain_new_tokens` new tokens (32 by default, enough for the tree to reach its
10-token sets) and `--rain_similarity` (mean_hidden by default: no MiniLM download on
machines without one; the CLI's default is minilm).
"""
import dataclasses
import json
import time

import jax
import numpy as np

import timeline
from rain_jax import engine, kvcache, tasks

# One decode step of LLaMA-7B shapes (bf16, random weights, batch 1) on an H200:
# docs/bench/device_check_h200_20261204/decode_scan.json, decode_ms_per_step.
H200_LLAMA7B_DECODE_MS = 11.315


def rain_config(args):
  return tasks.rain_config(
      'hh', max_T=args.rain_max_T, min_T=1 << 30, value_threshold=2.0,
      max_new_tokens=args.rain_new_tokens, max_rollout=args.rain_max_rollout, seed=0,
      parallel_leaves=getattr(args, 'rain_parallel_leaves', 1),
      similarity=getattr(args, 'rain_similarity', 'mean_hidden'))


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

  Optional args (default in brackets): rain_parallel_leaves [1], rain_similarity
  [mean_hidden], rain_vanilla [True] (time vanilla decoding too), rain_count_calls [True]
  (the stamped run), rain_runs [2] (see time_runner), rain_call_ms [H200 LLaMA-7B].
  Each finished row is also logged as one `row {json}` line, so a run cut short still
  leaves its finished rows in the log.
  """
  task = tasks.get_task('hh')
  cfg = rain_config(args)
  with_vanilla = getattr(args, 'rain_vanilla', True)
  count_calls = getattr(args, 'rain_count_calls', True)
  runs = getattr(args, 'rain_runs', 2)
  call_ms = getattr(args, 'rain_call_ms', None) or H200_LLAMA7B_DECODE_MS
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
        'calls_per_simulation': None, 'calls_per_committed_set': None, 'phases': None,
        'model_tokens_processed': None, 'model_tokens_per_second': None,
        'projected_accelerator_seconds_per_committed_set': None}
    if count_calls:
      log(f'batch {batch_size}: rain, model calls stamped by phase')
      recorder = timeline.Recorder()
      timeline.instrument(recorder)
      counted_runner = engine.RainRunner(model, mesh, task, cfg)
      counted_runner.fns = timeline.probed(counted_runner.fns, recorder, kvcache)
      counted = counted_runner.run_batch(batch, batch_size)
      jax.effects_barrier()
      assert [r['response_ids'] for r in counted] == [r['response_ids'] for r in r_records]
      calls = timeline.summarize(recorder, counted)
      per_commit = calls['calls_per_committed_set']
      row['rain'].update({
          'calls_per_simulation': calls['calls_per_simulation'],
          'calls_per_committed_set': per_commit,
          'phases': {name: {key: p[key] for key in ('calls_per_simulation', 'tokens_per_call',
                                                    'share_of_time')}
                     for name, p in calls['phases'].items()},
          'model_tokens_processed': sum(p['tokens'] for p in calls['phases'].values()),
          'projected_accelerator_seconds_per_committed_set':
              per_commit * call_ms / 1000.0})
      row['rain']['model_tokens_per_second'] = (row['rain']['model_tokens_processed']
                                                / r_seconds)
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
                   'rain_call_ms': call_ms,
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
          'calls_per_simulation': 'sequential model calls of the stamped run (prefill '
                                  'apart) / simulations of the busiest row',
          'phases': 'per phase: calls per simulation, padded tokens per call (rows x '
                    'tokens, every cache fed in the call), share of the stamped run\'s time',
          'projected_accelerator_seconds_per_committed_set':
              'calls_per_committed_set x rain_call_ms (one decode call of a '
              'LLaMA-7B-shaped model on a GPU; batch 1)',
          'model_tokens_per_second': 'tokens through the model (batch x tokens per call, '
                                     'padding included) / timed RAIN seconds',
      },
  }
