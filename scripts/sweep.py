"""Sweeps: expand a grid of settings into flagfiles, then run them here or on TPU VMs.

  python3 scripts/sweep.py --out=out/sweeps/tiny --grid=configs/sweeps/smollm2_tiny.json \\
      --run=local
  python3 scripts/sweep.py --out=out/sweeps/maxT --set=num_examples=2 --set=method=both \\
      --axis=max_T=2,4 --axis=seed=0,1 --run=local
  python3 scripts/sweep.py --out=out/sweeps/paper --checkpoint_root=/ckpt \\
      --axis=flagfile=configs/paper/hh-llama-30b.flags,configs/paper/hh-llama-65b.flags \\
      --run=print --tpu_names=rain-a,rain-b --zone=us-central2-b --hosts_per_tpu=2

Run from the repository root (paths in the flagfiles are relative to it, as
`python -m rain_jax.run` reads them).

Grid. A JSON file (--grid) and/or command-line flags:
  {"name": "maxT",
   "flagfiles": ["configs/demo.flags"],        # included first in every run (optional)
   "set": {"num_examples": 2, "method": "both"},   # flags shared by every run
   "axes": {"task": ["hh", {"label": "custom",
                            "flags": {"task": "custom", "prompt_file": "p.jsonl"}}],
            "max_T": [2, 4]}}
An axis value is a flag value (`--<axis>=<value>`; the axis `flagfile` includes a
flagfile) or {"label": ..., "flags": {...}} setting several flags. `--set=name=value`
adds shared flags and `--axis=name=v1,v2` adds (or replaces) an axis. The runs are the
product of the axes, in the order given; each gets `<out>/flags/<run>.flags` (shared
flags, then its axis values, then `--output=<out>/results/<run>.jsonl`) and
`<out>/manifest.json` lists them with their settings (scripts/report.py reads it).

Weights. With --checkpoint_root, a run whose flags name a registry `--model` without
downloadable weights and give no weight flag gets `--checkpoint=<root>/<weights>` (or
`--hf_dir=` with --checkpoint_format=hf), where <weights> is the model name, or the name
a flagfile gives in a `# weights: NAME` comment (configs/paper/ use it).

Running. --run=local runs the flagfiles one after another here
(`python -m rain_jax.run --flagfile=...`); a run already finished resumes as a no-op.
--run=print prints the shell commands for Cloud TPU VMs (nothing is executed):
copy the sweep folder to every worker, launch, and collect the results.

Shards on TPU VMs. Each TPU VM named in --tpu_names is one shard of every run
(`--shard_index=<position in --tpu_names> --num_shards=<count>`, output
`<run>.shard<i>-of-<n>.jsonl`). The shard index belongs to a TPU VM, not to a host:
the hosts of a multi-host TPU VM (--hosts_per_tpu > 1, e.g. v4-16 for a 65B model) form
one JAX job (`--distributed`, `--worker=all`) whose processes must all feed the same
prompts into the same global batch, so they share one shard. Taking the shard from the
host's worker number (the `agent-worker-number` metadata JAX uses as its process id)
would be right only for hosts that each hold a whole model copy, which a multi-host
slice does not allow without splitting it; use several single-host TPU VMs for that.
Every process of a multi-host job writes the same records to its own disk (step 3
fetches worker 0's); they resume in lockstep only if their files agree, so after a
crash copy worker 0's results file to the other workers before relaunching.
"""
import itertools
import json
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from models import registry  # noqa: E402  (after the path set-up)
from rain_jax import flag_table, results  # noqa: E402

FLAGS = flags.FLAGS

WEIGHT_FLAGS = flag_table.WEIGHT_FLAGS
WEIGHTS_COMMENT = re.compile(r'^#\s*weights:\s*(\S+)\s*$')


class SpecError(ValueError):
  """A malformed grid spec or flag."""


def parse_assignment(text: str, what: str):
  """'name=value' -> (name, value); SpecError naming `what` otherwise."""
  name, sep, value = text.partition('=')
  if not sep or not name:
    raise SpecError(f'{what} must look like name=value, got {text!r}')
  return name.lstrip('-'), value


def flag_text(name: str, value) -> str:
  """The flagfile line setting `name` to `value` (booleans as --name / --noname)."""
  if isinstance(value, bool):
    return f'--{name}' if value else f'--no{name}'
  return f'--{name}={value}'


def axis_value(axis: str, value) -> dict:
  """{'label': str, 'flags': {name: value}} from a grid axis value."""
  if isinstance(value, dict):
    if set(value) != {'label', 'flags'} or not isinstance(value['flags'], dict):
      raise SpecError(f'axis {axis!r}: an object value needs exactly "label" and "flags" '
                      f'(a dict), got {sorted(value)}')
    return {'label': str(value['label']), 'flags': dict(value['flags'])}
  if isinstance(value, (list, type(None))):
    raise SpecError(f'axis {axis!r}: values are flag values or {{"label", "flags"}} '
                    f'objects, got {value!r}')
  if axis == 'flagfile':
    return {'label': os.path.splitext(os.path.basename(str(value)))[0],
            'flags': {'flagfile': value}}
  label = str(value).lower() if isinstance(value, bool) else str(value)
  return {'label': label, 'flags': {axis: value}}


def load_spec(grid_path, axis_flags, set_flags, name=None, default_name='sweep'):
  """The grid spec from the JSON file and the --axis/--set flags (those take precedence).

  The name is `name`, else the grid's, else `default_name`.

  Returns {'name', 'flagfiles': [path], 'set': {flag: value}, 'axes': {axis: [value]}},
  with every axis value as {'label', 'flags'}.
  """
  spec = {}
  if grid_path:
    try:
      with open(grid_path, encoding='utf-8') as f:
        spec = json.load(f)
    except FileNotFoundError:
      raise SpecError(f'--grid: {grid_path} does not exist') from None
    except json.JSONDecodeError as e:
      raise SpecError(f'--grid: {grid_path} is not valid JSON ({e})') from None
    unknown = set(spec) - {'name', 'flagfiles', 'set', 'axes'} if isinstance(spec, dict) else {}
    if not isinstance(spec, dict) or unknown:
      raise SpecError(f'--grid: {grid_path} must be an object with keys name, flagfiles, '
                      f'set, axes; unknown: {sorted(unknown)}')
  shared = dict(spec.get('set', {}))
  for text in set_flags:
    key, value = parse_assignment(text, '--set')
    shared[key] = value
  axes = dict(spec.get('axes', {}))
  for text in axis_flags:
    key, values = parse_assignment(text, '--axis')
    axes[key] = [v for v in values.split(',') if v]
  for axis, values in axes.items():
    if not isinstance(values, list) or not values:
      raise SpecError(f'axis {axis!r} needs a non-empty list of values')
    axes[axis] = [axis_value(axis, v) for v in values]
    labels = [v['label'] for v in axes[axis]]
    if len(set(labels)) != len(labels):
      raise SpecError(f'axis {axis!r} has repeated labels: {labels}')
  flagfiles = list(spec.get('flagfiles', []))
  for path in flagfiles + [v['flags']['flagfile'] for v in axes.get('flagfile', [])]:
    if not os.path.isfile(path):
      raise SpecError(f'flagfile {path} does not exist')
  return {'name': name or spec.get('name') or default_name, 'flagfiles': flagfiles,
          'set': shared, 'axes': axes}


def read_flagfile(path: str, seen=()) -> tuple:
  """({flag: value} a flagfile sets, nested flagfiles included; `# weights:` name or None).

  Follows absl's format: one --flag per line, '#' comments, later lines win.
  """
  if path in seen:
    raise SpecError(f'flagfile {path} includes itself')
  values, weights = {}, None
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.strip()
      match = WEIGHTS_COMMENT.match(line)
      if match:
        weights = match.group(1)
      if not line.startswith('--'):
        continue
      name, sep, value = line[2:].partition('=')
      if name == 'flagfile':
        nested, nested_weights = read_flagfile(value, seen + (path,))
        values.update(nested)
        weights = nested_weights or weights
      elif sep:
        values[name] = value
      elif name.startswith('no'):
        values[name[2:]] = False
      else:
        values[name] = True
  return values, weights


def effective_flags(flag_list):
  """({flag: value}, weights name or None) after expanding the flagfiles in `flag_list`.

  flag_list: [(name, value)] in order.
  """
  values, weights = {}, None
  for name, value in flag_list:
    if name == 'flagfile':
      nested, nested_weights = read_flagfile(value)
      values.update(nested)
      weights = nested_weights or weights
    else:
      values[name] = value
  return values, weights


def weight_flag(values: dict, weights_name, checkpoint_root, checkpoint_format):
  """(flag, path) to add for a registry model with no weight source, or None."""
  if not checkpoint_root or any(values.get(f) for f in WEIGHT_FLAGS):
    return None
  model = values.get('model')
  if not model:
    return None
  if registry.registry_entry(str(model)).fetches_weights:
    return None
  flag = 'checkpoint' if checkpoint_format == 'orbax' else 'hf_dir'
  return flag, os.path.join(checkpoint_root, weights_name or str(model))


def safe_name(text: str) -> str:
  """A file-name-safe version of a run label."""
  return re.sub(r'[^A-Za-z0-9_.-]+', '-', text).strip('-') or 'run'


def expand(spec, out, checkpoint_root=None, checkpoint_format='orbax'):
  """Runs of the grid: [{'name', 'settings', 'flags': [(name, value)], 'flagfile',
  'output'}], one per point of the product of the axes."""
  axes = spec['axes']
  runs = []
  for point in itertools.product(*axes.values()) if axes else [()]:
    settings = {axis: value['label'] for axis, value in zip(axes, point)}
    parts = [label if axis == 'flagfile' else f'{axis}-{label}'
             for axis, label in settings.items()]
    name = safe_name('__'.join(parts) if parts else spec['name'])
    flag_list = [('flagfile', path) for path in spec['flagfiles']]
    flag_list += list(spec['set'].items())
    for value in point:
      flag_list += list(value['flags'].items())
    values, weights_name = effective_flags(flag_list)
    extra = weight_flag(values, weights_name, checkpoint_root, checkpoint_format)
    if extra:
      flag_list.append(extra)
    output = os.path.join(out, 'results', name + '.jsonl')
    flag_list.append(('output', output))
    runs.append({'name': name, 'settings': settings, 'flags': flag_list,
                 'flagfile': os.path.join(out, 'flags', name + '.flags'), 'output': output,
                 'model': str(values.get('model', '')), 'task': str(values.get('task', ''))})
  names = [run['name'] for run in runs]
  if len(set(names)) != len(names):
    raise SpecError(f'two runs would share a name: {names}')
  return runs


def write_sweep(spec, runs, out):
  """Writes the runs' flagfiles and `<out>/manifest.json`; returns the manifest."""
  os.makedirs(os.path.join(out, 'flags'), exist_ok=True)
  for run in runs:
    header = ', '.join(f'{a}={v}' for a, v in run['settings'].items()) or 'no axes'
    lines = [f'# scripts/sweep.py, sweep {spec["name"]!r}, run {run["name"]}: {header}']
    lines += [flag_text(name, value) for name, value in run['flags']]
    with open(run['flagfile'], 'w', encoding='utf-8') as f:
      f.write('\n'.join(lines) + '\n')
  manifest = {
      'name': spec['name'],
      'axes': {axis: [v['label'] for v in values] for axis, values in spec['axes'].items()},
      'runs': [{k: run[k] for k in ('name', 'settings', 'flagfile', 'output', 'model', 'task')}
               for run in runs],
  }
  results.write_json_atomic(os.path.join(out, 'manifest.json'), manifest)
  return manifest


def run_local(runs, python=sys.executable):
  """Runs each flagfile in turn with `python -m rain_jax.run`; returns failed run names."""
  failed = []
  for number, run in enumerate(runs, 1):
    print(f'[sweep {number}/{len(runs)}] {run["name"]}', file=sys.stderr, flush=True)
    result = subprocess.run([python, '-m', 'rain_jax.run', f'--flagfile={run["flagfile"]}'],
                            cwd=REPO, check=False)
    if result.returncode != 0:
      print(f'[sweep] {run["name"]} failed with exit status {result.returncode}',
            file=sys.stderr, flush=True)
      failed.append(run['name'])
  return failed


def shard_output(output: str, index: int, count: int) -> str:
  """`<stem>.shard<i>-of-<n>.jsonl` for shard i of n of the results file `output`."""
  stem, ext = os.path.splitext(output)
  return f'{stem}.shard{index}-of-{count}{ext}'


def tpu_commands(runs, out, tpu_names, zone, hosts_per_tpu, remote_dir, python):
  """Shell commands that copy the sweep to the TPU VMs, run it, and fetch the results."""
  if not tpu_names:
    raise SpecError('--run=print needs --tpu_names (one TPU VM per shard)')
  if not zone:
    raise SpecError('--run=print needs --zone')
  if os.path.isabs(out):
    raise SpecError(f'--run=print needs --out relative to the repository root (the '
                    f'workers hold the repository at ~/{remote_dir}), got {out}')
  if hosts_per_tpu < 1:
    raise SpecError(f'--hosts_per_tpu must be >= 1, got {hosts_per_tpu}')
  q = shlex.quote
  count = len(tpu_names)
  distributed = ' --distributed' if hosts_per_tpu > 1 else ''
  parent = f'{remote_dir}/{os.path.dirname(os.path.normpath(out)) or "."}'
  lines = ['# 0. Once per TPU VM and new commit: scripts/tpu_vm_setup.sh NAME ZONE',
           '# 1. Copy the sweep folder to every worker of every TPU VM.']
  for tpu in tpu_names:
    lines.append(f'gcloud compute tpus tpu-vm ssh {q(tpu)} --zone={q(zone)} --worker=all '
                 f'--command={q("mkdir -p " + parent)}')
    lines.append(f'gcloud compute tpus tpu-vm scp --recurse {q(out)} {q(tpu + ":" + parent)}'
                 f' --zone={q(zone)} --worker=all')
  lines.append(f'# 2. Run, all TPU VMs at once, each the runs in turn: TPU VM i is shard i '
               f'of {count}' + (f'; its {hosts_per_tpu} hosts form one JAX job' if distributed
                                else '') + '. Rerun to resume after a failure.')
  for index, tpu in enumerate(tpu_names):
    commands = [f'{python} -m rain_jax.run --flagfile={q(run["flagfile"])}{distributed} '
                f'--shard_index={index} --num_shards={count} '
                f'--output={q(shard_output(run["output"], index, count))}' for run in runs]
    remote = f'cd {remote_dir} || exit 1' + ''.join(f' ; {c}' for c in commands)
    lines.append(f'gcloud compute tpus tpu-vm ssh {q(tpu)} --zone={q(zone)} --worker=all '
                 f'--command={q(remote)} &')
  lines.append('wait')
  lines.append('# 3. Fetch the results (worker 0 of each TPU VM holds its shard).')
  results_dir = os.path.join(out, 'results')
  for tpu in tpu_names:
    lines.append(f'gcloud compute tpus tpu-vm scp --recurse '
                 f'{q(f"{tpu}:{remote_dir}/{results_dir}")} {q(out + "/")} --zone={q(zone)} '
                 f'--worker=0')
  return lines


def define_flags():
  """Defines the command-line flags (only when run as a script)."""
  flags.DEFINE_string('out', None, 'Sweep folder: flags/, results/ and manifest.json.')
  flags.DEFINE_string('grid', None, 'JSON grid spec (see the module docstring).')
  flags.DEFINE_multi_string('axis', [], 'name=v1,v2,...: an axis of flag values.')
  flags.DEFINE_multi_string('set', [], 'name=value: a flag shared by every run.')
  flags.DEFINE_string('name', None, 'Sweep name (default: the grid\'s, or the folder name).')
  flags.DEFINE_string('checkpoint_root', None, 'Folder holding one weights folder per model.')
  flags.DEFINE_enum('checkpoint_format', 'orbax', ['orbax', 'hf'], 'What the folders under '
                    '--checkpoint_root hold: orbax checkpoints (--checkpoint) or HF '
                    'safetensors (--hf_dir).')
  flags.DEFINE_enum('run', 'none', ['none', 'local', 'print'], 'none: only write flagfiles; '
                    'local: run them here in turn; print: print TPU VM commands.')
  flags.DEFINE_list('tpu_names', [], 'print: TPU VMs, one shard each.')
  flags.DEFINE_string('zone', None, 'print: the TPU VMs\' zone.')
  flags.DEFINE_integer('hosts_per_tpu', 1, 'print: hosts per TPU VM (> 1: --distributed).')
  flags.DEFINE_string('remote_dir', 'rain_jax', 'print: the repository on the workers '
                      '(relative to the home folder; scripts/tpu_vm_setup.sh puts it there).')
  flags.DEFINE_string('python', 'python3', 'print: the workers\' Python.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.out:
    raise app.UsageError('--out is required')
  try:
    spec = load_spec(FLAGS.grid, FLAGS.axis, FLAGS.set, FLAGS.name,
                     default_name=os.path.basename(os.path.normpath(FLAGS.out)))
    runs = expand(spec, FLAGS.out, FLAGS.checkpoint_root, FLAGS.checkpoint_format)
    commands = (tpu_commands(runs, FLAGS.out, FLAGS.tpu_names, FLAGS.zone,
                             FLAGS.hosts_per_tpu, FLAGS.remote_dir, FLAGS.python)
                if FLAGS.run == 'print' else None)
  except (SpecError, ValueError, OSError) as e:
    print(f'sweep.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  write_sweep(spec, runs, FLAGS.out)
  print(f'sweep.py: {len(runs)} runs in {os.path.join(FLAGS.out, "manifest.json")}',
        file=sys.stderr)
  if commands:
    print('\n'.join(commands))
  if FLAGS.run == 'local':
    failed = run_local(runs)
    if failed:
      print(f'sweep.py: {len(failed)} of {len(runs)} runs failed: {", ".join(failed)}',
            file=sys.stderr)
      sys.exit(1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
