"""Fit planner: compiles a run's programs for a device slice and says whether they fit.

  python -m rain_jax.plan --flagfile=configs/paper/hh-llama-65b.flags --topology=v4-16
  python -m rain_jax.plan --flagfile=configs/demo.flags --topology=cpu:8 --mesh=2,2,2

Takes the flags of `rain_jax.run` plus --topology. For every program the run would
build (each method, each padded prompt width of the task's prompts, at most
--max_programs per method) it compiles ahead of time, for the slice's chips, from
abstract arguments (no weights, no TPU needed: a TPU topology compiles through the
`libtpu` wheel, `pip install .[tpu]`), and prints one JSON object per program: per-chip
bytes of parameters, policy cache, judge cache, search tree, XLA's temporaries and peak,
the chip's memory, whether it fits, compile seconds, the per-chip shape of each large
array, and when it does not fit a suggested mesh and batch size: the best candidate
that compiled and fit (--verify_suggestions compiles, default 2), else an estimate
scaled from this compile. `rain_jax.run` makes the same check with the devices it sees.

Topologies: v4-N and v5p-N (N TensorCores, 2 per chip), v5e-N and v6e-N (N chips), and
cpu:N (N simulated CPU devices; memory only with --device_memory_gib).
"""
import dataclasses
import json
import os
import sys
import types

from absl import app, flags

from rain_jax import run  # defines the flags of the run; shares its steps

FLAGS = flags.FLAGS
flags.DEFINE_string('topology', 'cpu:1', 'v4-16, v5e-16, v5p-8, v6e-8, ... or cpu:N.')
flags.DEFINE_integer('verify_suggestions', 2, 'When a program does not fit, compile up to '
                     'this many of the best meshes and batch sizes estimated to fit (or '
                     'nearly) and suggest the first that does; 0 = estimate only.')

GIB = 2 ** 30
# Chip memory (HBM) and the share a program may use, as the TPU compiler states it when
# a program does not fit ("exceeds available HBM (30.75G)" on v4, 15.75G on v5e); for
# v5p and v6e the v5e reserve of 0.25 GiB is assumed.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
RUNTIME_RESERVE_GIB = {'v4': 1.25, 'v5e': 0.25, 'v5p': 0.25, 'v6e': 0.25}
CORES_PER_CHIP = {'v4': 2, 'v5e': 1, 'v5p': 2, 'v6e': 1}
CHIP_CONFIG = {'v4': 'megacore', 'v5e': 'default', 'v5p': 'megacore', 'v6e': 'default'}
GRID_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
           128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8)}
GRID_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
           128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A slice: its name, device kind ('cpu' or a TPU generation), chips and the memory a
  program may use on one chip (None: unknown)."""
  name: str
  kind: str
  chips: int
  usable_bytes: int | None


def parse_topology(name: str) -> Topology:
  """'v4-16' / 'v5e-64' / 'cpu:8' -> Topology (ValueError naming the problem)."""
  if name.startswith('cpu:'):
    count = name[4:]
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f'--topology={name}: cpu:N needs a positive device count')
    return Topology(name, 'cpu', int(count), None)
  kind, _, size = name.partition('-')
  if kind not in HBM_GIB or not size.isdigit():
    raise ValueError(f'--topology={name}: expected one of {sorted(HBM_GIB)} followed by '
                     f'-N (e.g. v4-16, v5e-16), or cpu:N')
  if int(size) % CORES_PER_CHIP[kind]:
    raise ValueError(f'--topology={name}: {kind}-N counts TensorCores, '
                     f'{CORES_PER_CHIP[kind]} per chip')
  chips = int(size) // CORES_PER_CHIP[kind]
  grids = GRID_3D if CORES_PER_CHIP[kind] == 2 else GRID_2D
  if chips not in grids:
    raise ValueError(f'--topology={name}: no {kind} slice of {chips} chips known '
                     f'(chips: {sorted(grids)})')
  usable = int((HBM_GIB[kind] - RUNTIME_RESERVE_GIB[kind]) * GIB)
  return Topology(name, kind, chips, usable)


def topology_devices(topology: Topology):
  """The devices of the slice (TPU: from libtpu's topology description, no TPU needed)."""
  import jax
  if topology.kind == 'cpu':
    devices = jax.devices('cpu')
    if len(devices) < topology.chips:
      raise ValueError(f'--topology={topology.name}: {len(devices)} CPU devices; set '
                       f'XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts')
    return devices[:topology.chips]
  from jax.experimental import topologies
  grids = GRID_3D if CORES_PER_CHIP[topology.kind] == 2 else GRID_2D
  grid = grids[topology.chips]
  # Hosts of 2 x 2 chips (fewer on smaller slices); libtpu wants three bounds, also for
  # the 2-D v5e/v6e grids.
  bounds = (min(2, grid[0]), min(2, grid[1]), 1)
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compiles only; no TPU held
  try:
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=f'{topology.kind}:{"x".join(map(str, grid))}',
        chip_config_name=CHIP_CONFIG[topology.kind], chips_per_host_bounds=bounds,
        num_slices=1, wrap=(False, False, False))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'--topology={topology.name}: cannot describe the TPU slice ({e}); '
                     f'is the libtpu wheel that jax pins installed (pip install .[tpu])?')
  return desc.devices


def plan_model(flag_values):
  """(LoadedModel without weights) from the weight flags, or a preset of --model's
  name when its weights are not here (the paper's LLaMA names)."""
  from models import presets, registry
  from models.tokenizer import load_tokenizer
  from rain_jax import loading
  given = flag_values.checkpoint or flag_values.hf_dir or flag_values.gguf
  name = flag_values.model or ('smollm2-135m-instruct' if not given else None)
  if given or name not in presets.PRESETS:
    return loading.describe_model(model=name, checkpoint=flag_values.checkpoint,
                                  hf_dir=flag_values.hf_dir, gguf_path=flag_values.gguf,
                                  tokenizer=flag_values.tokenizer, dtype=flag_values.dtype,
                                  scan_layers=flag_values.scan_layers)
  config = presets.get_preset(name, dtype=flag_values.dtype, param_dtype=flag_values.dtype,
                              scan_layers=flag_values.scan_layers)
  entry = registry.registry_entry(name)
  tokenizer = load_tokenizer(flag_values.tokenizer or entry.tokenizer_path)
  return loading.LoadedModel(name=name, config=config, params=None, tokenizer=tokenizer)


def plan_judge_model(flag_values, policy):
  """RAIN's judge model (--judge_*) without weights, described as `plan_model` describes
  the policy (a preset when its weights are not here); None when the policy judges
  itself. ValueError when its tokenizer is not the policy's."""
  from rain_jax import loading
  names = ('model', 'checkpoint', 'hf_dir', 'gguf')
  if not any(getattr(flag_values, 'judge_' + name) for name in names):
    return None
  judge = plan_model(types.SimpleNamespace(
      **{name: getattr(flag_values, 'judge_' + name) for name in names},
      tokenizer=flag_values.judge_tokenizer or flag_values.tokenizer,
      dtype=flag_values.dtype, scan_layers=flag_values.scan_layers))
  loading.check_shared_tokenizer(policy, judge)
  return judge


def mesh_spec(mesh) -> str:
  """'d,f,t': the --mesh spec of `mesh`."""
  return ','.join(str(mesh.shape[axis]) for axis in mesh.axis_names)


def _per_device(shape, dtype, where):
  import numpy as np
  local = where.shard_shape(tuple(shape)) if where is not None else tuple(shape)
  return list(local), int(np.prod(local, dtype=np.int64)) * np.dtype(dtype).itemsize


def array_report(runner, program, mesh, min_bytes=2 ** 20) -> dict:
  """Per-device shapes and bytes of what the program holds: the parameters, the policy
  and judge caches, the search tree (RAIN; its arrays of at least `min_bytes` per device
  listed) and the vanilla cache."""
  import jax
  import numpy as np
  from models import llama
  from rain_jax import engine, kvcache, sharding
  config, batch = runner.model.config, program.batch_size
  arrays = []

  def add(name, shape, dtype, where):
    local, size = _per_device(shape, dtype, where)
    arrays.append({'name': name, 'shape': list(shape), 'per_device_shape': local,
                   'per_device_bytes': size})

  params = (runner.abstract_program_params() if program.method == 'rain'
            else engine.abstract_params(config, runner.placement))
  param_bytes = sum(_per_device(x.shape, x.dtype, x.sharding)[1]
                    for x in jax.tree.leaves(params))

  def cache(name, rows, slots, model_config=config):
    shape = llama.cache_shape(model_config, rows, slots)
    where = sharding.cache_sharding(mesh, shape) if mesh is not None else None
    for part in ('k', 'v'):
      add(f'{name}/{part}', shape, model_config.dtype, where)
    return 2 * _per_device(shape, model_config.dtype, where)[1]

  if program.method == 'vanilla':
    slots = min(program.prompt_width + runner.max_new_tokens, config.max_seq_len)
    return {'params_bytes': param_bytes, 'policy_cache_bytes': cache('cache', batch, slots),
            'judge_cache_bytes': 0, 'tree_bytes': 0, 'arrays': arrays}
  rows = batch * runner.cfg.parallel_leaves
  policy = kvcache.policy_layout(runner.cfg, program.prompt_width)
  task_judge = runner.judge_for(policy, program.judge_width)
  policy_bytes = cache('policy_cache', rows, policy.num_slots)
  judge_bytes = cache('judge_cache', rows, task_judge.layout.num_slots,
                      (runner.judge_model or runner.model).config)
  tree = runner.tree_shapes(batch)
  tree_bytes = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    where = (jax.sharding.NamedSharding(mesh, sharding.batch_spec(
        mesh.shape, len(leaf.shape), leaf.shape[0])) if mesh is not None else None)
    _, size = _per_device(leaf.shape, leaf.dtype, where)
    tree_bytes += size
    if size >= min_bytes:
      add('tree/' + sharding.path_name(path), leaf.shape, leaf.dtype, where)
  return {'params_bytes': param_bytes, 'policy_cache_bytes': policy_bytes,
          'judge_cache_bytes': judge_bytes, 'tree_bytes': tree_bytes, 'arrays': arrays}


def candidates(report: dict, config, mesh_shape, batch_size, chips):
  """Meshes and batch sizes of this slice, best first, each with its per-device bytes
  estimated from one compile: parameters scale with 1/(fsdp x tensor), everything else
  with the rows and KV heads one device holds. Best: the largest batch, then no fsdp
  (decoding would gather every weight at every step), then the least memory. Returns
  [(estimated bytes, 'd,f,t', batch)]."""
  data, fsdp, tensor = mesh_shape

  def rows_split(d, f, batch):
    return d * f if batch % (d * f) == 0 else 1

  def heads_split(t):
    return t if config.num_kv_heads % t == 0 else 1

  def weights_split(t):
    return t if config.num_heads % t == 0 else 1

  params = report['params_bytes'] * fsdp * weights_split(tensor)
  rest = report['peak_bytes'] - report['params_bytes']
  per_row = rest * rows_split(data, fsdp, batch_size) * heads_split(tensor) / batch_size
  found = []
  for t in (x for x in range(1, chips + 1) if chips % x == 0 and config.num_heads % x == 0):
    for f in (x for x in range(1, chips // t + 1) if (chips // t) % x == 0):
      d = chips // (t * f)
      for batch in sorted({batch_size, max(1, batch_size // 2), max(1, batch_size // 4), 1}):
        need = (params / (f * t)
                + per_row * batch / (rows_split(d, f, batch) * heads_split(t)))
        found.append((-batch, f > 1, need, f'{d},{f},{t}', batch))
  return [(need, mesh, batch) for _, _, need, mesh, batch in sorted(found)]


def suggest(report: dict, config, mesh_shape, batch_size, chips, usable_bytes):
  """The best of `candidates` estimated to fit `usable_bytes` (None if none is)."""
  for need, mesh, batch in candidates(report, config, mesh_shape, batch_size, chips):
    if need <= usable_bytes:
      return {'mesh': mesh, 'batch_size': batch, 'estimated_gib': round(need / GIB, 2),
              'basis': 'scaled from this compile, not compiled'}
  return None


# A candidate estimated up to this much over the limit is still worth compiling: the
# estimate scales every temporary with the rows, which overstates some (a 65B HH program
# on v5e-16 needs 16.66 GiB of temporaries at batch 16 but 6.43 at batch 8).
VERIFY_SLACK = 1.25


def verified_suggestion(report, config, mesh, program, chips, limit, compile_at, tries):
  """The best candidate that compiles and fits (compiled with `compile_at(mesh spec,
  batch)` -> Program, at most `tries` compiles), else the best estimate, else None."""
  for need, spec, batch in candidates(report, config, tuple(mesh.shape.values()),
                                      program.batch_size, chips):
    if tries <= 0:
      break
    if need > VERIFY_SLACK * limit or (spec, batch) == (mesh_spec(mesh), program.batch_size):
      continue
    tries -= 1
    other = compile_at(spec, batch)
    if not other.out_of_memory and other.memory.peak <= limit:
      return {'mesh': spec, 'batch_size': batch,
              'peak_gib': round(other.memory.peak / GIB, 2),
              'compile_s': round(other.compile_seconds, 1), 'basis': 'compiled'}
  return suggest(report, config, tuple(mesh.shape.values()), program.batch_size, chips,
                 limit)


def plan_rows(flag_values, topology: Topology, devices, min_array_bytes=2 ** 20):
  """One dict per program of the run the flags describe, on `devices` (arrays of at
  least `min_array_bytes` per device listed)."""
  from rain_jax import sharding
  mesh = sharding.make_mesh(flag_values.mesh, devices=devices)
  model = plan_model(flag_values)
  task, examples = run.chosen_examples(flag_values)
  runners = run.make_runners(model, mesh, task, flag_values,
                             judge_model=plan_judge_model(flag_values, model))
  encoded = next(iter(runners.values())).encode(examples)
  limit = (int(flag_values.device_memory_gib * GIB) if flag_values.device_memory_gib
           else topology.usable_bytes)
  plans = run.plan_runs(runners, examples, encoded, set(), flag_values)
  rows = []
  for method, runner in runners.items():
    counts = {}
    for _, widths in plans[method]:
      counts[widths] = counts.get(widths, 0) + 1
    for widths, num_batches in counts.items():
      # One program per batch shape; a continuous-batching stream has three.
      for program in run.method_programs(runner, method, flag_values.batch_size, widths,
                                         flag_values):
        report = array_report(runner, program, mesh, min_array_bytes)
        report['peak_bytes'] = (program.memory.peak if program.compiled is not None else
                                report['params_bytes'] + program.memory.temporaries)
        kv = report['policy_cache_bytes'] + report['judge_cache_bytes']
        row = {
            'program': program.method, 'model': model.name, 'task': task.name,
            'topology': topology.name, 'mesh': mesh_spec(mesh),
            'batch_size': program.batch_size, 'prompt_width': program.prompt_width,
            'judge_width': program.judge_width, 'batches': num_batches,
            'scan_layers': model.config.scan_layers, 'dtype': model.config.dtype,
            'compile_s': round(program.compile_seconds, 1),
            'trace_s': round(program.trace_seconds, 1),
            **{k[:-6] + '_gib': round(v / GIB, 3) for k, v in report.items()
               if k.endswith('_bytes') and k != 'peak_bytes'},
            **{'xla_' + k: v for k, v in program.memory.as_gib().items()},
            'kv_gib': round(kv / GIB, 3),
            'device_memory_gib': round(limit / GIB, 2) if limit else None,
            'fits': (False if program.out_of_memory else
                     None if limit is None else program.memory.peak <= limit),
            'out_of_memory': program.out_of_memory or None,
        }
        row['temporaries_over_kv'] = (round(program.memory.temporaries / kv, 2) if kv
                                      else None)
        if program.compiled is not None and program.memory.temporaries < kv:
          # The caches live inside the program, so XLA holds them in fewer bytes than the
          # sharding asked for (seen when the KV heads do not divide by 'tensor': the
          # requested layout replicates heads, XLA's propagation splits something else).
          row['note'] = ('XLA holds the caches in fewer bytes per device than the '
                         'requested sharding; the cache rows above are the request, not '
                         'what runs')
        if row['fits'] is False:

          def compile_at(spec, batch, method=method, widths=widths, name=program.method):
            other_mesh = sharding.make_mesh(spec, devices=devices)
            other = run.make_runners(model, other_mesh, task, flag_values)[method]
            candidates = run.method_programs(other, method, batch, widths, flag_values)
            return next(p for p in candidates if p.method == name)

          row['suggestion'] = verified_suggestion(report, model.config, mesh, program,
                                                  topology.chips, limit, compile_at,
                                                  flag_values.verify_suggestions)
        row['arrays'] = report['arrays']
        rows.append(row)
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    topology = parse_topology(FLAGS.topology)
    import jax
    if topology.kind != 'cpu':
      jax.config.update('jax_platforms', 'cpu')  # compile for the slice; run nothing
    for row in plan_rows(FLAGS, topology, topology_devices(topology)):
      print(json.dumps(row), flush=True)
  except (ValueError, FileNotFoundError) as e:
    print(f'rain_jax.plan: error: {e}', file=sys.stderr)
    sys.exit(1)


def _simulate_cpu_devices(argv):
  """cpu:N needs N host devices, set before JAX starts."""
  for arg in argv:
    if arg.startswith('--topology=cpu:') and arg[15:].isdigit():
      flag = f'--xla_force_host_platform_device_count={arg[15:]}'
      if flag not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()


if __name__ == '__main__':
  _simulate_cpu_devices(sys.argv)
  app.run(main)
