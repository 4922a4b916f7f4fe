"""Sweeps: expand a grid of settings into flagfiles, then run them here or on TPU VMs.

  python3 scripts/sweep.py --out=out/sweeps/tiny --grid=configs/sweeps/smollm2_tiny.json \\
      --run=local
  python3 scripts/sweep.py --out=out/sweeps/maxT --set=num_examples=2 --set=method=both \\
      --axis=max_T=2,4 --axis=seed=0,1 --run=local
  python3 scripts/sweep.py --out=out/sweeps/paper --checkpoint_root=gs://my-bucket/ckpt \\
      --axis=flagfile=configs/paper/hh-llama-30b.flags,configs/paper/hh-llama-65b.flags \\
      --run=print --tpu_names=rain-a,rain-b --zone=us-central2-b --accelerator_type=v4-32 \\
      --replicas_per_tpu=2

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
flags, then its axis values, then `--nosummary` unless the run's flags set --summary
(a sweep is quiet: no end-of-run summary), then `--output=<out>/results/<run>.jsonl`) and
`<out>/manifest.json` lists them with their settings (scripts/report.py reads it).

Weights. With --checkpoint_root, a run whose flags name a registry `--model` without
downloadable weights and give no weight flag gets `--checkpoint=<root>/<weights>` (or
`--hf_dir=` with --checkpoint_format=hf), where <weights> is the model name, or the name
a flagfile gives in a `# weights: NAME` comment (configs/paper/ use it).

Closing the loop. With a "train" object in the grid ({"objective": "sft", "steps": 100,
"lora_rank": 8, ...}: flags of `python -m rain_jax.train`) or `--train=name=value`, every
run (which must answer with --method=both) becomes a chain of three stages:
  generate   python -m rain_jax.run --flagfile=<out>/flags/<run>.flags (as without)
  train      python -m rain_jax.train --flagfile=<out>/flags/<run>.train.flags: the
             run's model flags (model, weights, tokenizer, dtype, mesh, ...), then the
             "train" flags, then --data=<the run's results> --output=<out>/train/<run>
  distilled  python -m rain_jax.run --flagfile=<out>/flags/<run>.distilled.flags: the
             run's flags with --method=vanilla, --checkpoint=<out>/train/<run>/model
             (a registry --model stays, so its tokenizer is used; an --hf_dir or --gguf
             source becomes the --tokenizer) and
             --output=<out>/results/<run>.distilled.jsonl
A stage starts only when the one before it succeeded, and each skips what is done (the
runs resume where their results end; rain_jax.train continues from its checkpoints and
returns at once when its model and summary.json exist). The "train" flag names and
values are checked by absl before anything runs. scripts/report.py shows the distilled
answers as the method distilled-vanilla next to the run's vanilla and RAIN rows. With
--run=print a chain needs one TPU VM of one host: rain_jax.train reads every answer of
its run, which only worker 0 of one TPU VM holds; the fetch step also copies each run's
training record (train_config.json, summary.json, metrics.jsonl; not the weights).

Running. --run=local runs the flagfiles one after another here
(`python -m rain_jax.run --flagfile=...`); a run already finished resumes as a no-op.
--run=print prints the shell commands for Cloud TPU VMs (nothing is executed): create
the TPU VMs, set them up, copy the sweep to every worker, launch, status, fetch the
results, stop, report. It is a guide to follow step by step, not a script to pipe into
a shell (one step stops the runs); --print_step=NAME prints one step's commands alone.

Slices, shards and replicas. Each TPU VM named in --tpu_names is a slice of
--accelerator_type (gcloud's name, e.g. v4-32, v5litepod-16, v5p-32, v6e-16; v5e-16 is
read as v5litepod-16): v4-N and v5p-N have N/2 chips (N counts TensorCores), v5e-N and
v6e-N have N chips; v4, v5p and v6e hosts hold 4 chips, v5e hosts 4 or 8 (its machine
type; slices of up to 4 v4/v5p or 8 v5e/v6e chips are one host). --hosts_per_tpu is
derived from the type, and when given must agree with it. All hosts of a slice form ONE
JAX job (`--distributed` when there are several), so every run's `--mesh` must cover
exactly the slice's chips (-1 takes the rest) or the sweep stops with the reason.
  * Across slices: TPU VM i is shard i of every run (`--shard_index=i --num_shards=n`,
    output `<run>.shard<i>-of-<n>.jsonl`): the examples whose index is i modulo n.
  * Within a slice: the mesh's data axis holds data-parallel copies of the model.
    --replicas_per_tpu=R sets every run's mesh to data=R (the run's -1 axis, else its
    tensor axis, shrinks to fit) and multiplies its --batch_size by R, so each copy
    decodes the batch, in the per-chip memory, that the flagfile planned (plan it with
    `python -m rain_jax.plan --topology=<type> --mesh=... --batch_size=...`).
  * Every run's global --batch_size must be a multiple of data x fsdp (the batch rows
    are split over both axes), else some chips would get no rows: the sweep refuses it.
So n slices answer n x batch_size prompts at a time, each slice's batch split over its
R copies.

On the workers, `<out>/launch/<tpu>.sh` (written by --run=print, copied in the copy step)
runs the runs in turn, detached from the SSH session with nohup and setsid: per host a
log `~/rain_jax_logs/<sweep>.<hostname>.log` and a pid file `~/rain_jax_logs/<sweep>.pid`
(its `start`, `status` and `stop` are what the launch, status and stop steps call).
Process 0 of each slice's job (worker 0) alone writes the results file and its
`.config.json` sidecar (the fetch step copies worker 0's), and decides which examples
remain; after a crash, a host failure (which ends every process of the job) or a stop,
the launch step again resumes every run where its results file ends.
"""
import dataclasses
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
from rain_jax import flag_table, results, sharding  # noqa: E402

FLAGS = flags.FLAGS

WEIGHT_FLAGS = flag_table.WEIGHT_FLAGS
WEIGHTS_COMMENT = re.compile(r'^#\s*weights:\s*(\S+)\s*$')
# The run's flags that the training stage takes over (rain_jax.train defines them too).
TRAIN_MODEL_FLAGS = flag_table.MODEL_FLAGS
# Flags of the training stage that the sweep sets itself.
TRAIN_STAGE_FLAGS = ('data', 'output')
DISTILLED_SUFFIX = '.distilled'
# What the fetch step copies of a training folder (rain_jax.train's records, no weights).
TRAIN_RECORDS = ('train_config.json', 'summary.json', 'metrics.jsonl')


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


def load_spec(grid_path, axis_flags, set_flags, name=None, default_name='sweep',
              train_flags=()):
  """The grid spec from the JSON file and the --axis/--set/--train flags (those take
  precedence).

  The name is `name`, else the grid's, else `default_name`.

  Returns {'name', 'flagfiles': [path], 'set': {flag: value}, 'axes': {axis: [value]},
  'train': {flag: value} or None}, with every axis value as {'label', 'flags'}; 'train'
  (the grid's "train" object and --train=name=value) is None without a training stage.
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
    unknown = (set(spec) - {'name', 'flagfiles', 'set', 'axes', 'train'}
               if isinstance(spec, dict) else {})
    if not isinstance(spec, dict) or unknown:
      raise SpecError(f'--grid: {grid_path} must be an object with keys name, flagfiles, '
                      f'set, axes, train; unknown: {sorted(unknown)}')
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
  train = spec.get('train')
  if train is not None and not isinstance(train, dict):
    raise SpecError(f'--grid: "train" must be an object of rain_jax.train flags, got '
                    f'{train!r}')
  if train_flags:
    train = dict(train or {})
    for text in train_flags:
      key, value = parse_assignment(text, '--train')
      train[key] = value
  if train is not None:
    train = {key.lstrip('-'): value for key, value in train.items()}
    fixed = [key for key in TRAIN_STAGE_FLAGS if key in train]
    if fixed:
      raise SpecError(f'the training stage\'s {", ".join("--" + k for k in fixed)} are '
                      f'set by the sweep (the run\'s results, <out>/train/<run>)')
  return {'name': name or spec.get('name') or default_name, 'flagfiles': flagfiles,
          'set': shared, 'axes': axes, 'train': train}


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
    if 'summary' not in values:  # quiet sweeps: no end-of-run summary unless asked for
      flag_list.append(('summary', False))
    extra = weight_flag(values, weights_name, checkpoint_root, checkpoint_format)
    if extra:
      flag_list.append(extra)
    output = os.path.join(out, 'results', name + '.jsonl')
    flag_list.append(('output', output))
    runs.append({'name': name, 'settings': settings, 'flags': flag_list,
                 'flagfile': os.path.join(out, 'flags', name + '.flags'), 'output': output,
                 'model': str(values.get('model', '')), 'task': str(values.get('task', '')),
                 'values': values})
  names = [run['name'] for run in runs]
  if len(set(names)) != len(names):
    raise SpecError(f'two runs would share a name: {names}')
  return runs


def distilled_flags(values: dict, checkpoint: str, output: str) -> list:
  """The distilled stage's flags: the run's `values` (flagfiles expanded) answering with
  --method=vanilla from the trained `checkpoint` into `output`.

  The weight source becomes --checkpoint; a registry --model stays (the registry gives
  the tokenizer), the default model is named when the run gave no source, and an
  --hf_dir or --gguf source without --tokenizer becomes the --tokenizer (both carry one).
  """
  model, tokenizer = values.get('model'), values.get('tokenizer')
  if not model and not any(values.get(f) for f in WEIGHT_FLAGS):
    model = registry.DEFAULT_MODEL
  if not model and not tokenizer:
    tokenizer = values.get('hf_dir') or values.get('gguf')
  flag_list = [('model', model)] if model else []
  flag_list += [('tokenizer', tokenizer)] if tokenizer else []
  dropped = set(WEIGHT_FLAGS) | {'model', 'tokenizer', 'method', 'output'}
  flag_list += [(name, value) for name, value in values.items() if name not in dropped]
  return flag_list + [('checkpoint', checkpoint), ('method', 'vanilla'), ('output', output)]


def add_chain(runs, train_flags: dict, out: str):
  """Gives every run a training stage and a distilled stage (see the module docstring):
  run['train'] and run['distilled'] = {'flagfile', 'flags', 'output'}.

  Call it after fit_runs (the stages take the run's final mesh and batch size). A run
  that does not answer with --method=both is a SpecError.
  """
  for run in runs:
    values, _ = effective_flags(run['flags'])
    method = str(values.get('method', flag_default('method')))
    if method != 'both':
      raise SpecError(f'run {run["name"]}: --method={method}; a run with a training stage '
                      f'needs --method=both (RAIN answers to train on, vanilla ones to '
                      f'compare the distilled answers with)')
    train_output = os.path.join(out, 'train', run['name'])
    model_flags = [(name, values[name]) for name in TRAIN_MODEL_FLAGS
                   if values.get(name) not in (None, '')]
    run['train'] = {
        'flagfile': os.path.join(out, 'flags', run['name'] + '.train.flags'),
        'flags': model_flags + list(train_flags.items()) + [('data', run['output']),
                                                            ('output', train_output)],
        'output': train_output}
    output = os.path.join(out, 'results', run['name'] + DISTILLED_SUFFIX + '.jsonl')
    run['distilled'] = {
        'flagfile': os.path.join(out, 'flags', run['name'] + DISTILLED_SUFFIX + '.flags'),
        'flags': distilled_flags(values, os.path.join(train_output, 'model'), output),
        'output': output}


TRAIN_FLAG_CHECK = r"""
import json, sys
from absl import flags
import rain_jax.train  # noqa: F401  (defines its flags)
for name, argv in json.load(sys.stdin):
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(['rain_jax.train'] + argv)
  except flags.Error as e:
    print(f'run {name}: the training stage: {e}')
    sys.exit(1)
"""


def check_train_flags(runs, python=sys.executable):
  """SpecError unless absl accepts every training stage's flags with rain_jax.train's
  definitions (read in a subprocess, as they clash with rain_jax.run's)."""
  todo = [[run['name'], [flag_text(n, v) for n, v in run['train']['flags']]]
          for run in runs if run.get('train')]
  if not todo:
    return
  result = subprocess.run([python, '-c', TRAIN_FLAG_CHECK], input=json.dumps(todo),
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  if result.returncode != 0:
    lines = (result.stdout.strip() or result.stderr.strip() or 'no output').splitlines()
    raise SpecError(lines[-1])


def stages(run):
  """[(stage, module, flagfile, output)] of a run in order: generate, then with a chain
  train (its output is a folder) and distilled."""
  found = [('generate', 'rain_jax.run', run['flagfile'], run['output'])]
  for stage, module in (('train', 'rain_jax.train'), ('distilled', 'rain_jax.run')):
    if run.get(stage):
      found.append((stage, module, run[stage]['flagfile'], run[stage]['output']))
  return found


def write_flagfile(path, header, flag_list):
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join([header] + [flag_text(n, v) for n, v in flag_list]) + '\n')


def write_sweep(spec, runs, out):
  """Writes the runs' flagfiles and `<out>/manifest.json`; returns the manifest."""
  os.makedirs(os.path.join(out, 'flags'), exist_ok=True)
  for run in runs:
    header = ', '.join(f'{a}={v}' for a, v in run['settings'].items()) or 'no axes'
    head = f'# scripts/sweep.py, sweep {spec["name"]!r}, run {run["name"]}'
    write_flagfile(run['flagfile'], f'{head}: {header}', run['flags'])
    for stage, module, flagfile, _ in stages(run)[1:]:
      write_flagfile(flagfile, f'{head}, {stage} stage (python -m {module}): {header}',
                     run[stage]['flags'])
  entries = []
  for run in runs:
    entry = {k: run[k] for k in ('name', 'settings', 'flagfile', 'output', 'model', 'task')}
    for stage, _, flagfile, output in stages(run)[1:]:
      entry.update({f'{stage}_flagfile': flagfile, f'{stage}_output': output})
    entries.append(entry)
  manifest = {
      'name': spec['name'],
      'axes': {axis: [v['label'] for v in values] for axis, values in spec['axes'].items()},
      'runs': entries,
  }
  if spec.get('train') is not None:
    manifest['train'] = spec['train']
  results.write_json_atomic(os.path.join(out, 'manifest.json'), manifest)
  return manifest


def run_local(runs, python=sys.executable):
  """Runs each run's stages in turn (`python -m rain_jax.run --flagfile=...`, and for a
  chain rain_jax.train and the distilled run); a failed stage ends its run's chain.
  Returns the failed runs' names (with the stage, for a chain)."""
  failed = []
  for number, run in enumerate(runs, 1):
    chain = stages(run)
    for stage, module, flagfile, _ in chain:
      label = run['name'] if len(chain) == 1 else f'{run["name"]} ({stage})'
      print(f'[sweep {number}/{len(runs)}] {label}', file=sys.stderr, flush=True)
      result = subprocess.run([python, '-m', module, f'--flagfile={flagfile}'], cwd=REPO,
                              check=False)
      if result.returncode != 0:
        print(f'[sweep] {label} failed with exit status {result.returncode}',
              file=sys.stderr, flush=True)
        failed.append(label)
        break
  return failed


# Cloud TPU slice kinds: gcloud's accelerator-type prefix, TensorCores per chip, chips
# per host of a multi-host slice (v5e: 4 or 8, by machine type; the first is assumed
# unless --hosts_per_tpu says otherwise), the most chips one host holds, and the TPU
# software version the Cloud TPU docs give for JAX ("TPU software versions").
SLICE_KINDS = {
    'v4': ('v4', 2, (4,), 4, 'tpu-ubuntu2204-base'),
    'v5p': ('v5p', 2, (4,), 4, 'v2-alpha-tpuv5'),
    'v5e': ('v5litepod', 1, (4, 8), 8, 'v2-alpha-tpuv5-lite'),
    'v6e': ('v6e', 1, (4,), 8, 'v2-alpha-tpuv6e'),
}
KIND_OF_PREFIX = {prefix: kind for kind, (prefix, *_) in SLICE_KINDS.items()}
KIND_OF_PREFIX['v5e'] = 'v5e'


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU VM: gcloud's accelerator type, its chips and hosts, its software version."""
  accelerator_type: str
  kind: str
  chips: int
  hosts: int
  version: str


def parse_slice(accelerator_type, hosts_per_tpu=None) -> Slice:
  """The slice of `accelerator_type` (v4-32, v5litepod-16 or v5e-16, v5p-32, v6e-16),
  with its hosts checked against --hosts_per_tpu (None: derived). SpecError otherwise."""
  if not accelerator_type:
    raise SpecError('--run=print needs --accelerator_type (the TPU VMs\' type, e.g. v4-32)')
  prefix, _, size = str(accelerator_type).rpartition('-')
  kind = KIND_OF_PREFIX.get(prefix)
  if kind is None or not size.isdigit() or int(size) < 1:
    raise SpecError(f'--accelerator_type={accelerator_type}: expected v4-N, v5p-N '
                    f'(N TensorCores), v5litepod-N (or v5e-N) or v6e-N (N chips)')
  gcloud_prefix, cores, per_host, host_max, version = SLICE_KINDS[kind]
  if int(size) % cores:
    raise SpecError(f'--accelerator_type={accelerator_type}: {prefix}-N counts '
                    f'TensorCores, {cores} per chip')
  chips = int(size) // cores
  if chips <= host_max:
    allowed = [1]
  else:
    allowed = [chips // n for n in per_host if chips % n == 0]
    if not allowed:
      raise SpecError(f'--accelerator_type={accelerator_type}: {chips} chips do not fill '
                      f'hosts of {" or ".join(map(str, per_host))} chips')
  name = f'{gcloud_prefix}-{size}'
  if hosts_per_tpu is None:
    hosts = allowed[0]
  elif hosts_per_tpu in allowed:
    hosts = hosts_per_tpu
  else:
    raise SpecError(
        f'--hosts_per_tpu={hosts_per_tpu} does not match --accelerator_type='
        f'{accelerator_type}: a {name} slice has {chips} chips on '
        f'{" or ".join(map(str, allowed))} host(s) ({kind} hosts hold '
        f'{" or ".join(map(str, per_host))} chips; up to {host_max} chips are one host)')
  return Slice(name, kind, chips, hosts, version)


def flag_default(name: str):
  """rain_jax.run's default for flag `name`."""
  return next(flag.default for flag in flag_table.TABLE if flag.name == name)


def fit_runs(runs, tpu_slice: Slice, replicas=None):
  """Checks (and with `replicas`, sets) every run's mesh and batch for the slice.

  Every run's mesh must cover the slice's chips; with `replicas` = R its data axis
  becomes R (its -1 axis, else its tensor axis, takes what is left) and its batch_size
  is multiplied by R. The global batch must be a multiple of data x fsdp. Writes the
  resolved --mesh and --batch_size into the run's flags (before --output) and returns
  {run name: (mesh sizes, batch_size)}. SpecError naming the run otherwise.
  """
  if replicas is not None and replicas < 1:
    raise SpecError(f'--replicas_per_tpu must be >= 1, got {replicas}')
  chips = tpu_slice.chips
  placed = {}
  for run in runs:
    values = run['values']
    mesh = str(values.get('mesh', flag_default('mesh')))
    batch_text = values.get('batch_size', flag_default('batch_size'))
    try:
      batch = int(batch_text)
    except (TypeError, ValueError):
      raise SpecError(f'run {run["name"]}: --batch_size={batch_text} is not an integer') \
          from None
    entries = [entry.strip() for entry in mesh.split(',')]
    if replicas is not None and len(entries) == 3:
      rest = entries[1:]
      if '-1' not in rest:
        rest[1] = '-1'  # the tensor axis shrinks to fit
      entries = [str(replicas)] + rest
      batch *= replicas
    try:
      sizes = sharding.parse_mesh_shape(','.join(entries), chips)
    except ValueError as e:
      how = (f' (--replicas_per_tpu={replicas} made it {",".join(entries)})'
             if replicas is not None else '')
      raise SpecError(f'run {run["name"]}: --mesh={mesh}{how} does not fit a '
                      f'{tpu_slice.accelerator_type} ({chips} chips, one JAX job): '
                      f'{e}') from None
    rows = sizes[0] * sizes[1]
    if batch < 1 or batch % rows:
      raise SpecError(f'run {run["name"]}: --batch_size={batch} is not a multiple of '
                      f'data x fsdp = {sizes[0]} x {sizes[1]} = {rows} on mesh '
                      f'{",".join(map(str, sizes))}: the batch rows are split over both '
                      f'axes, so some chips would get no rows')
    flags_out = list(run['flags'])  # absl: a later line wins over the flagfiles'
    at = len(flags_out) - 1 if flags_out and flags_out[-1][0] == 'output' else len(flags_out)
    flags_out[at:at] = [('mesh', ','.join(map(str, sizes))), ('batch_size', batch)]
    run['flags'] = flags_out
    placed[run['name']] = (sizes, batch)
  return placed


def shard_output(output: str, index: int, count: int) -> str:
  """`<stem>.shard<i>-of-<n>.jsonl` for shard i of n of the results file `output`."""
  stem, ext = os.path.splitext(output)
  return f'{stem}.shard{index}-of-{count}{ext}'


def launcher_path(out: str, tpu: str) -> str:
  """The launcher script of TPU VM `tpu` in the sweep folder."""
  return os.path.join(out, 'launch', safe_name(tpu) + '.sh')


LAUNCHER = r"""#!/usr/bin/env bash
# Written by scripts/sweep.py: sweep {sweep}, TPU VM {tpu} ({accelerator_type}, {hosts} host(s)),
# shard {index} of {count}: its runs in turn. Run on every worker of the TPU VM, from the
# repository root (the launch, status and stop steps of `scripts/sweep.py --run=print`),
# as `bash {path} ACTION`:
#   start   start the runs detached from the SSH session and return; refused while they
#           run. After a failure or a stop, start again: every run resumes where its
#           results file ends.
#   status  running or not, the log's last lines, records so far (worker 0 writes them)
#   stop    end the runs on this host (stop every worker of the TPU VM)
# Per host: log $HOME/rain_jax_logs/{sweep}.<hostname>.log, pid file
# $HOME/rain_jax_logs/{sweep}.pid (the process group of the runs).
set -u
host=$(hostname)
logs=$HOME/rain_jax_logs
log=$logs/{sweep}.$host.log
pidfile=$logs/{sweep}.pid
outputs=({outputs})

running() {{ [ -f "$pidfile" ] && kill -0 -- "-$(cat "$pidfile")" 2>/dev/null; }}
say() {{ echo "[sweep $(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"; }}

case ${{1:-}} in
  start)
    mkdir -p "$logs"
    if running; then
      echo "$host: already running (pid $(cat "$pidfile")), log $log" >&2
      exit 1
    fi
    nohup setsid bash "$0" run >> "$log" 2>&1 < /dev/null &
    echo "$host: started, log $log"
    ;;
  run)
    echo $$ > "$pidfile"
    failed=0
{runs}
    say "finished: $failed of {n} runs failed"
    rm -f "$pidfile"
    ;;
  status)
    if running; then state="running (pid $(cat "$pidfile"))"; else state="not running"; fi
    echo "$host: $state; $(grep -s '^\[sweep ' "$log" | tail -n 1)"
    tail -n {tail} "$log" 2>/dev/null | sed "s|^|$host:   |"
    for output in "${{outputs[@]}}"; do
      if [ -f "$output" ]; then echo "$host: $(wc -l < "$output") records in $output"; fi
    done
    ;;
  stop)
    if ! running; then echo "$host: not running"; rm -f "$pidfile"; exit 0; fi
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid"
    for _ in $(seq 30); do running || break; sleep 1; done
    if running; then kill -KILL -- "-$pid"; fi
    rm -f "$pidfile"
    say "stopped by the stop step" >> "$log"
    echo "$host: stopped (process group $pid)"
    ;;
  *)
    echo "usage: bash $0 start|status|stop" >&2
    exit 2
    ;;
esac
"""
RUN_BLOCK = """    say {what}' started'
    {command}
    rc=$?
    say {what}" ended, exit status $rc"
    if [ $rc -ne 0 ]; then failed=$((failed + 1)); fi"""
# A stage of a chain (generate, train, distilled) runs only when the one before succeeded.
STAGE_BLOCK = """    if [ $rc -eq 0 ]; then
      say {what}' started'
      {command}
      rc=$?
      say {what}" ended, exit status $rc"
    fi"""
STATUS_TAIL_LINES = 5


def stage_command(python, module, flagfile, run, output, index, count, distributed):
  """The launcher's command of one stage of `run` on shard `index` of `count`."""
  q = shlex.quote
  if module == 'rain_jax.train':  # trains on this shard's results file
    return (f'{python} -m rain_jax.train --flagfile={q(flagfile)} '
            f'--data={q(shard_output(run["output"], index, count))}')
  return (f'{python} -m {module} --flagfile={q(flagfile)}{distributed} '
          f'--shard_index={index} --num_shards={count} '
          f'--output={q(shard_output(output, index, count))}')


def check_chain_slices(tpu_names, tpu_slice: Slice):
  """SpecError unless a sweep with a training stage fits its TPU VMs: one, of one host
  (rain_jax.train reads every answer of its run on every host; only worker 0 of one TPU
  VM holds them)."""
  if len(tpu_names) > 1:
    raise SpecError(f'a sweep with a training stage runs on one TPU VM, not '
                    f'{len(tpu_names)}: training needs every answer of its run, and each '
                    f'TPU VM keeps its shard on its own worker 0')
  if tpu_slice.hosts > 1:
    raise SpecError(f'a sweep with a training stage needs a one-host slice, not '
                    f'{tpu_slice.accelerator_type} ({tpu_slice.hosts} hosts): only worker 0 '
                    f'holds the results that rain_jax.train reads on every host')


def launcher_script(runs, sweep_name, tpu, index, count, tpu_slice, python, out):
  """The bash script that runs TPU VM `tpu`'s shard of every run (see LAUNCHER)."""
  q = shlex.quote
  sweep = safe_name(sweep_name)
  distributed = ' --distributed' if tpu_slice.hosts > 1 else ''
  blocks = []
  for number, run in enumerate(runs, 1):
    chain = stages(run)
    what = f'run {number} of {len(runs)}: {run["name"]}'
    commands = [(stage, stage_command(python, module, flagfile, run, output, index, count,
                                      distributed))
                for stage, module, flagfile, output in chain]
    if len(chain) == 1:
      blocks.append(RUN_BLOCK.format(what=q(what), command=commands[0][1]))
      continue
    blocks.append('    rc=0')
    blocks += [STAGE_BLOCK.format(what=q(f'{what}, {stage}'), command=command)
               for stage, command in commands]
    blocks.append('    if [ $rc -ne 0 ]; then failed=$((failed + 1)); fi')
  outputs = ' '.join(q(shard_output(output, index, count))
                     for run in runs for stage, _, _, output in stages(run)
                     if stage != 'train')
  return LAUNCHER.format(sweep=sweep, tpu=tpu, accelerator_type=tpu_slice.accelerator_type,
                         hosts=tpu_slice.hosts, index=index, count=count,
                         path=launcher_path(out, tpu), outputs=outputs,
                         runs='\n'.join(blocks), n=len(runs), tail=STATUS_TAIL_LINES)


def write_launchers(runs, sweep_name, out, tpu_names, tpu_slice, python):
  """Writes `<out>/launch/<tpu>.sh` for every TPU VM; returns their paths."""
  os.makedirs(os.path.join(out, 'launch'), exist_ok=True)
  paths = []
  for index, tpu in enumerate(tpu_names):
    path = launcher_path(out, tpu)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(launcher_script(runs, sweep_name, tpu, index, len(tpu_names), tpu_slice,
                              python, out))
    os.chmod(path, 0o755)
    paths.append(path)
  return paths


STEPS = ('create', 'setup', 'copy', 'launch', 'status', 'fetch', 'stop', 'report')


def check_tpu_args(out, tpu_names, zone, remote_dir):
  """SpecError unless the TPU VM arguments of --run=print make sense."""
  if not tpu_names:
    raise SpecError('--run=print needs --tpu_names (one TPU VM per shard)')
  if len(set(tpu_names)) != len(tpu_names):
    raise SpecError(f'--tpu_names repeats a name: {tpu_names}')
  if len({safe_name(t) for t in tpu_names}) != len(tpu_names):
    raise SpecError(f'--tpu_names: two names would share a launcher file: {tpu_names}')
  if not zone:
    raise SpecError('--run=print needs --zone')
  if os.path.isabs(out):
    raise SpecError(f'--run=print needs --out relative to the repository root (the '
                    f'workers hold the repository at ~/{remote_dir}), got {out}')


def tpu_commands(runs, out, tpu_names, zone, tpu_slice, remote_dir, python,
                 steps=STEPS):
  """Shell commands, by step: create and set up the TPU VMs, copy the sweep to every
  worker, launch it detached, show its status, fetch the results, stop it, report.

  Returns [line]: a '# <step>. ...' comment heads each step's commands (in `steps`).
  The launch, status and stop steps call `<out>/launch/<tpu>.sh` (write_launchers).
  """
  check_tpu_args(out, tpu_names, zone, remote_dir)
  q = shlex.quote
  count = len(tpu_names)
  out = os.path.normpath(out)
  remote_out = f'{remote_dir}/{out}'
  zone_flag = f'--zone={q(zone)}'

  def ssh(tpu, command, worker='all'):
    return (f'gcloud compute tpus tpu-vm ssh {q(tpu)} {zone_flag} --worker={worker} '
            f'--command={q(command)}')

  def on_workers(tpu, action):
    return ssh(tpu, f'cd {q(remote_dir)} && bash {q(launcher_path(out, tpu))} {action}')

  job = (f'one JAX job over its {tpu_slice.hosts} hosts' if tpu_slice.hosts > 1
         else 'one host')
  chained = [run for run in runs if run.get('train')]
  sections = {
      'create': (f'Create the TPU VMs ({tpu_slice.accelerator_type}: {tpu_slice.chips} '
                 f'chips, {tpu_slice.hosts} host(s) each); delete them when done with '
                 f'gcloud compute tpus tpu-vm delete NAME --zone={zone}.',
                 [f'gcloud compute tpus tpu-vm create {q(tpu)} {zone_flag} '
                  f'--accelerator-type={tpu_slice.accelerator_type} '
                  f'--version={tpu_slice.version}' for tpu in tpu_names]),
      'setup': ('Install this commit (HEAD) and the pinned JAX/libtpu on every worker; '
                'again after each new commit.',
                [f'scripts/tpu_vm_setup.sh {q(tpu)} {q(zone)}'
                 + ('' if remote_dir == 'rain_jax' else f' {q(remote_dir)}')
                 for tpu in tpu_names]),
      'copy': ('Copy the sweep (manifest, flagfiles, launchers; not results) to every '
               'worker.',
               [line for tpu in tpu_names for line in (
                   ssh(tpu, f'mkdir -p {q(remote_out)}'),
                   f'gcloud compute tpus tpu-vm scp --recurse '
                   f'{q(os.path.join(out, "manifest.json"))} {q(os.path.join(out, "flags"))} '
                   f'{q(os.path.join(out, "launch"))} {q(tpu + ":" + remote_out)} '
                   f'{zone_flag} --worker=all')]),
      'launch': (f'Launch, detached (returns at once; the runs outlive the SSH session): '
                 f'TPU VM i is shard i of {count}, {job}. Per host the log is '
                 f'~/rain_jax_logs/<sweep>.<hostname>.log. After a failure or a stop, '
                 f'launch again: every run resumes where its results file ends'
                 + (' (a chain\'s training where its last checkpoint is)' if chained
                    else '') + '.',
                 [on_workers(tpu, 'start') for tpu in tpu_names]),
      'status': ('Status: per host, running or not, the last lines of its log, records '
                 'so far (worker 0 writes them).',
                 [on_workers(tpu, 'status') for tpu in tpu_names]),
      'fetch': ('Fetch the results (worker 0 of each TPU VM holds its shard) into '
                f'{out}/results/' + (
                    f', and each run\'s training record ({", ".join(TRAIN_RECORDS)}; '
                    f'not the weights) into {out}/train/<run>/ (summary.json once the '
                    f'training has ended)' if chained else '') + '.',
                [f'gcloud compute tpus tpu-vm scp --recurse '
                 f'{q(f"{tpu}:{remote_out}/results")} {q(out + "/")} {zone_flag} '
                 f'--worker=0' for tpu in tpu_names]
                + [line for tpu in tpu_names for run in chained for line in (
                    f'mkdir -p {q(os.path.join(out, "train", run["name"]))}',
                    'gcloud compute tpus tpu-vm scp ' + ' '.join(
                        q(f'{tpu}:{remote_out}/train/{run["name"]}/{name}')
                        for name in TRAIN_RECORDS)
                    + f' {q(os.path.join(out, "train", run["name"]) + "/")} {zone_flag} '
                    f'--worker=0')]),
      'stop': ('Stop the runs on every worker (the launch step resumes them).',
               [on_workers(tpu, 'stop') for tpu in tpu_names]),
      'report': ('Report, here, from the fetched results (and the manifest\'s settings).',
                 [f'python3 scripts/report.py --results={q(out)} '
                  f'--out={q(out + "/report")}']),
  }
  lines = []
  if len(steps) > 1:
    lines.append('# Steps to follow one at a time, not a script for a shell (the stop '
                 'step stops the runs); --print_step=NAME prints one step alone.')
  for number, step in enumerate(STEPS):
    if step in steps:
      what, commands = sections[step]
      lines.append(f'# {number}. {step}: {what}')
      lines.extend(commands)
  return lines


def define_flags():
  """Defines the command-line flags (only when run as a script)."""
  flags.DEFINE_string('out', None, 'Sweep folder: flags/, results/ and manifest.json.')
  flags.DEFINE_string('grid', None, 'JSON grid spec (see the module docstring).')
  flags.DEFINE_multi_string('axis', [], 'name=v1,v2,...: an axis of flag values.')
  flags.DEFINE_multi_string('set', [], 'name=value: a flag shared by every run.')
  flags.DEFINE_multi_string('train', [], 'name=value: a flag of python -m rain_jax.train; '
                            'gives every run a training stage and a distilled stage (see '
                            'the module docstring; the grid\'s "train" object does too).')
  flags.DEFINE_string('name', None, 'Sweep name (default: the grid\'s, or the folder name).')
  flags.DEFINE_string('checkpoint_root', None, 'Folder holding one weights folder per model.')
  flags.DEFINE_enum('checkpoint_format', 'orbax', ['orbax', 'hf'], 'What the folders under '
                    '--checkpoint_root hold: orbax checkpoints (--checkpoint) or HF '
                    'safetensors (--hf_dir).')
  flags.DEFINE_enum('run', 'none', ['none', 'local', 'print'], 'none: only write flagfiles; '
                    'local: run them here in turn; print: print TPU VM commands.')
  flags.DEFINE_list('tpu_names', [], 'print: TPU VMs, one shard each.')
  flags.DEFINE_string('zone', None, 'print: the TPU VMs\' zone.')
  flags.DEFINE_string('accelerator_type', None, 'print: the TPU VMs\' type, as gcloud '
                      'names it: v4-32, v5p-32, v5litepod-16 (or v5e-16), v6e-16.')
  flags.DEFINE_integer('hosts_per_tpu', None, 'print: hosts per TPU VM (> 1: one JAX job, '
                       '--distributed); derived from --accelerator_type, checked against '
                       'it when given (v5e: 4 or 8 chips a host).')
  flags.DEFINE_integer('replicas_per_tpu', None, 'print: data-parallel copies of the model '
                       'per TPU VM: every run\'s mesh gets data=R and its batch_size is '
                       'multiplied by R (default: the runs\' meshes as they are).')
  flags.DEFINE_enum('print_step', 'all', ('all',) + STEPS, 'print: every step, or only '
                    'the commands of one (to pipe into a shell).')
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
                     default_name=os.path.basename(os.path.normpath(FLAGS.out)),
                     train_flags=FLAGS.train)
    runs = expand(spec, FLAGS.out, FLAGS.checkpoint_root, FLAGS.checkpoint_format)
    commands = None
    if FLAGS.run == 'print':
      check_tpu_args(FLAGS.out, FLAGS.tpu_names, FLAGS.zone, FLAGS.remote_dir)
      tpu_slice = parse_slice(FLAGS.accelerator_type, FLAGS.hosts_per_tpu)
      if spec['train'] is not None:
        check_chain_slices(FLAGS.tpu_names, tpu_slice)
      fit_runs(runs, tpu_slice, FLAGS.replicas_per_tpu)
    if spec['train'] is not None:
      add_chain(runs, spec['train'], FLAGS.out)
      check_train_flags(runs)
    if FLAGS.run == 'print':
      steps = STEPS if FLAGS.print_step == 'all' else (FLAGS.print_step,)
      commands = tpu_commands(runs, FLAGS.out, FLAGS.tpu_names, FLAGS.zone, tpu_slice,
                              FLAGS.remote_dir, FLAGS.python, steps)
  except (SpecError, ValueError, OSError) as e:
    print(f'sweep.py: error: {e}', file=sys.stderr)
    sys.exit(1)
  write_sweep(spec, runs, FLAGS.out)
  if commands:
    write_launchers(runs, spec['name'], FLAGS.out, FLAGS.tpu_names, tpu_slice, FLAGS.python)
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
