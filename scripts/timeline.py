"""Timeline of a RAIN run: a time stamp on every model call, labelled by phase.

  python scripts/timeline.py --num_examples=1 --max_new_tokens=32      # HH, SmolLM2
  python scripts/timeline.py --rain=parallel_leaves=4 --calls_out=calls.jsonl
  python scripts/timeline.py --baseline_rev=fa48669                    # before / after

Runs `rain_jax.engine.RainRunner` (what `python -m rain_jax.run` runs) on the first
examples of a task with the task's reference settings (`tasks.rain_config`) changed only
by --max_new_tokens and --rain overrides, and wraps the model so that every call, as
it finishes, reports its phase and its size through a host callback. Phases are the
engine's labels (`rain_jax.kvcache.phase`: prefill, path, rollout+proposals, judge,
widening, commit); each call is charged the time since the call before it, so
work between calls (tree updates, sampling) counts in the next call's phase. Commits
are stamped too, which gives the time to the first committed set.

Prints one JSON object: calls, padded tokens and seconds per phase, per simulation and
per committed set, the time to the first committed set, and `cost_model`: the
least-squares fit seconds = a + b * padded tokens over the search calls (what one more
call and one more token cost on this machine). With --baseline_rev the
same measurement first runs on that git revision (a temporary worktree on the same
machine, in a subprocess) and both land in one report with their ratios. Code before
the phase labels (issue 12) is labelled here by wrapping its Evaluator's methods.

The callbacks cost ~0.1 ms per call against tens of ms per SmolLM2 call on a CPU; the
run is compiled first and only execution is stamped.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

PHASES_BEFORE_LABELS = {   # pre-issue-12 Evaluator methods -> phase
    'init_rows': 'prefill', '_feed_path': 'path', '_rollout': 'rollout',
    '_leaf_candidates': 'proposals', 'widen': 'widening', 'commit': 'commit'}


class Recorder:
  """Model calls (end time, phase, tokens = rows x tokens per row) and commits."""

  def __init__(self):
    self.calls = []
    self.commits = []

  def call(self, phase, tokens, _done):
    self.calls.append((time.perf_counter(), phase, int(tokens)))

  def commit(self, committed, step_sims):
    self.commits.append((time.perf_counter(), np.asarray(committed).tolist(),
                         np.asarray(step_sims).tolist()))


_LABELS = ['other']


@contextlib.contextmanager
def _label(name):
  _LABELS.append(name)
  try:
    yield
  finally:
    _LABELS.pop()


def current_phase(kvcache):
  """The engine's own label where it has them, else this script's."""
  if hasattr(kvcache, 'current_phase'):
    return kvcache.current_phase()
  return _LABELS[-1]


def _done_marker(outputs):
  """A small array that exists only once the call has finished: a logit if any, else a
  hidden value (a feed that reads no logits)."""
  logits, hidden = outputs[0], outputs[1]
  if logits.size:
    return logits.reshape(-1)[:1]
  return hidden.reshape(-1)[:1]


def probed(fns, recorder, kvcache):
  """ModelFns whose every call reports (phase, tokens) to `recorder` when it ends."""
  def report(num_tokens, outputs):
    jax.debug.callback(functools.partial(recorder.call, current_phase(kvcache)),
                       num_tokens, _done_marker(outputs))

  def forward(params, tokens, *args, **kwargs):
    out = fns.forward(params, tokens, *args, **kwargs)
    report(tokens.size, out)
    return out

  changes = {'forward': forward}
  if getattr(fns, 'forward_many', None) is not None:
    def forward_many(params, feeds):
      outs = fns.forward_many(params, feeds)
      report(sum(f.tokens.size for f in feeds), outs[0])
      return outs
    changes['forward_many'] = forward_many
  return dataclasses.replace(fns, **changes)


_ACTIVE = []   # the recorder commits are stamped into (instrument's latest)


def instrument(recorder):
  """Stamps commits (search.Searcher._commit) into `recorder` and, in code without phase
  labels, labels the Evaluator's calls (patched once per process; later calls only move
  the commit stamps to their recorder). Returns the kvcache module in use."""
  from rain_jax import evaluator, judge, kvcache, search  # pylint: disable=import-outside-toplevel
  first = not _ACTIVE
  _ACTIVE[:] = [recorder]
  if not first:
    return kvcache
  commit = search.Searcher._commit  # pylint: disable=protected-access

  def stamped_commit(self, params, tables, st, mask):
    step_sims = st.trees.step_sims
    st = commit(self, params, tables, st, mask)
    jax.debug.callback(lambda c, s: _ACTIVE[0].commit(c, s), st.trees.stats['committed_sets'],
                       step_sims)
    return st
  search.Searcher._commit = stamped_commit  # pylint: disable=protected-access
  if not hasattr(kvcache, 'phase'):
    def labelled(method, name):
      @functools.wraps(method)
      def wrapper(*args, **kwargs):
        with _label(name):
          return method(*args, **kwargs)
      return wrapper
    for method, name in PHASES_BEFORE_LABELS.items():
      setattr(evaluator.Evaluator, method, labelled(getattr(evaluator.Evaluator, method), name))
    for cls in (judge.ABJudge, judge.YesNoJudge):
      cls.evaluate = labelled(cls.evaluate, 'judge')
      cls.commit = labelled(cls.commit, 'commit')
  return kvcache


def parse_overrides(text):
  """'a=1,b=x' -> {'a': 1, 'b': 'x'} with RainConfig's field types."""
  from rain_jax.config import RainConfig  # pylint: disable=import-outside-toplevel
  types = {f.name: f.type for f in dataclasses.fields(RainConfig)}
  out = {}
  for item in filter(None, (text or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in types:
      raise ValueError(f'--rain: {item!r} is not KEY=VALUE with KEY a RainConfig field')
    kind = {'int': int, 'float': float, 'bool': lambda v: v.lower() in ('1', 'true'),
            'str': str}[types[key] if isinstance(types[key], str) else types[key].__name__]
    out[key] = kind(value)
  return out


def fit_call_cost(calls):
  """Least-squares cost of one search call (prefill and commit left out): seconds =
  a + b * tokens over consecutive stamps [(end time, phase, tokens)], each call charged
  the time since the one before. Returns {'ms_per_call': a, 'ms_per_token': b,
  'calls_fitted': n}, or None with fewer than two distinct call sizes."""
  rows = [(tokens, end - prev) for (prev, _, _), (end, phase, tokens) in zip(calls, calls[1:])
          if phase not in ('prefill', 'commit')]
  if len({tokens for tokens, _ in rows}) < 2:
    return None
  tokens = np.array([t for t, _ in rows], np.float64)
  seconds = np.array([s for _, s in rows], np.float64)
  design = np.stack([np.ones_like(tokens), tokens], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, seconds, rcond=None)
  return {'ms_per_call': 1e3 * a, 'ms_per_token': 1e3 * b, 'calls_fitted': len(rows)}


def summarize(recorder, records):
  """The report of one run from its stamps and records."""
  calls = recorder.calls
  sims = max(r['search']['simulations'] for r in records)
  commits = max(r['search']['committed_sets'] for r in records)
  start = calls[0][0]
  phases = {}
  for (prev, _, _), (end, phase, tokens) in zip(calls, calls[1:]):
    p = phases.setdefault(phase, {'calls': 0, 'tokens': 0, 'seconds': 0.0})
    p['calls'] += 1
    p['tokens'] += tokens
    p['seconds'] += end - prev
  total = calls[-1][0] - start
  search_calls = sum(p['calls'] for name, p in phases.items()
                     if name not in ('prefill', 'commit'))
  for p in phases.values():
    p['calls_per_simulation'] = p['calls'] / sims
    p['tokens_per_call'] = p['tokens'] / p['calls']
    p['share_of_time'] = p['seconds'] / total
  first = None
  if recorder.commits:   # the first commit of row 0 (its own stamps follow it)
    end, _, step_sims = recorder.commits[0]
    before = [c for c in calls[1:] if c[0] <= end and c[1] not in ('prefill', 'commit')]
    first = {'seconds': end - start, 'simulations': step_sims[0],
             'calls': len(before), 'calls_per_simulation': len(before) / step_sims[0],
             'tokens_per_simulation': sum(c[2] for c in before) / step_sims[0],
             'seconds_per_simulation': (end - start) / step_sims[0]}
  return {
      'simulations': sims, 'committed_sets': commits,
      'model_calls': len(calls), 'calls_per_simulation': search_calls / sims,
      'calls_per_committed_set': search_calls / max(commits, 1),
      'seconds': total, 'seconds_per_simulation': total / sims,
      'seconds_per_committed_set': total / max(commits, 1),
      'first_committed_set_seconds': first and first['seconds'],
      'first_committed_set': first,
      'phases': dict(sorted(phases.items(), key=lambda kv: -kv[1]['seconds'])),
      'tokens_per_simulation': sum(p['tokens'] for name, p in phases.items()
                                   if name not in ('prefill', 'commit')) / sims,
      'cost_model': fit_call_cost(calls),
      'answers': [r['response_ids'] for r in records],
  }


def run_here(args):
  """One instrumented run in this process: the summary dict."""
  from rain_jax import engine, loading, sharding, tasks  # pylint: disable=import-outside-toplevel
  import rain_jax  # pylint: disable=import-outside-toplevel
  recorder = Recorder()
  kvcache = instrument(recorder)
  overrides = parse_overrides(args.rain)
  overrides['max_new_tokens'] = args.max_new_tokens
  cfg = tasks.rain_config(args.task, **overrides)
  model = loading.load_model(model=args.model, dtype=args.dtype,
                             scan_layers=args.scan_layers)
  mesh = sharding.make_mesh('1,1,1', jax.devices()[:1])
  task = tasks.get_task(args.task)
  runner = engine.RainRunner(model, mesh, task, cfg)
  runner.fns = probed(runner.fns, recorder, kvcache)
  examples = task.load_examples(args.start, args.num_examples)
  batch = list(zip(examples, runner.encode(examples)))
  batch_size = args.batch_size or len(batch)
  records = runner.run_batch(batch, batch_size)
  jax.effects_barrier()
  report = summarize(recorder, records)
  report['compile_seconds'] = records[0]['compile_seconds']
  report['batch_seconds'] = records[0]['batch_seconds']
  report['source'] = os.path.dirname(os.path.dirname(os.path.abspath(rain_jax.__file__)))
  report['rain_config'] = dataclasses.asdict(cfg)
  report['scan_layers'] = args.scan_layers
  if args.calls_out:
    with open(args.calls_out, 'w', encoding='utf-8') as f:
      for t, phase, tokens in recorder.calls:
        f.write(json.dumps({'t': t - recorder.calls[0][0], 'phase': phase,
                            'tokens': tokens}) + '\n')
  return report


def run_baseline(args, argv):
  """The same measurement on git revision args.baseline_rev (worktree + subprocess)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as tmp:
    tree = os.path.join(tmp, 'baseline')
    subprocess.run(['git', '-C', repo, 'worktree', 'add', '--detach', tree,
                    args.baseline_rev], check=True, capture_output=True)
    try:
      rest = [a for a in argv if not a.startswith('--baseline_rev')]
      env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get('PYTHONPATH', ''))
      out = subprocess.run([sys.executable, os.path.abspath(__file__), *rest], env=env,
                           check=True, stdout=subprocess.PIPE, text=True, cwd=tree)
      return json.loads(out.stdout)
    finally:
      subprocess.run(['git', '-C', repo, 'worktree', 'remove', '--force', tree], check=False,
                     capture_output=True)


def build_parser():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--model', default='smollm2-135m-instruct', help='registry model')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--scan_layers', type=lambda v: v.lower() in ('1', 'true'),
                      default=True, help='as rain_jax.run\'s --scan_layers (default true)')
  parser.add_argument('--task', default='hh')
  parser.add_argument('--start', type=int, default=0)
  parser.add_argument('--num_examples', type=int, default=1)
  parser.add_argument('--batch_size', type=int, default=0, help='default: num_examples')
  parser.add_argument('--max_new_tokens', type=int, default=32)
  parser.add_argument('--rain', default='', help='RainConfig overrides, KEY=VALUE,...')
  parser.add_argument('--calls_out', default='', help='JSONL of every call (t, phase, tokens)')
  parser.add_argument('--baseline_rev', default='',
                      help='also measure this git revision first, same settings')
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = build_parser().parse_args(argv)
  try:
    parse_overrides(args.rain)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  report = {}
  if args.baseline_rev:
    report['baseline'] = {'revision': args.baseline_rev, **run_baseline(args, argv)}
  current = run_here(args)
  if not args.baseline_rev:
    print(json.dumps(current, indent=1))
    return 0
  report['current'] = current
  base = report['baseline']
  report['ratios_baseline_over_current'] = {
      key: base[key] / current[key] for key in
      ('calls_per_simulation', 'seconds_per_simulation', 'seconds_per_committed_set',
       'first_committed_set_seconds') if base.get(key) and current.get(key)}
  report['same_answers'] = base['answers'] == current['answers']
  print(json.dumps(report, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
