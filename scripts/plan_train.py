"""Fit planner for fine-tuning: compiles `rain_jax.train`'s train step for a device slice
and says whether it fits.

  python scripts/plan_train.py --topology=v4-32 --model=llama-65b --objective=sft,dpo \
      --lora_rank=16 --mesh=1,16,1 --batch_size=16 --width=512 --remat
  python scripts/plan_train.py --topology=cpu:8 --model=tiny-mha --lora_rank=0,4 --mesh=1,8,1

The step is the one `rain_jax.train` runs (`training.compile_train_step`: the same
settings, shapes, shardings and donation), compiled ahead of time from abstract
arguments (no weights; a TPU topology compiles through the `libtpu` wheel, no TPU
needed, as `rain_jax.plan` does). Prints one JSON object per configuration (every
combination of --objective, --lora_rank, --mesh, --batch_size, --grad_accum): XLA's
per-chip arguments, outputs, aliased (donated state), temporaries and peak in GiB, the
per-chip bytes of each argument group by its sharding (frozen weights, trainable
weights, optimizer state, batch) and of the float32 gradient sum the step accumulates
micro-batches in (XLA folds it away when --grad_accum is 1; docs/measurements.md), the
chip's usable memory, whether it fits, compile seconds and parameter counts.
A step the TPU compiler refuses for lack of memory is a row with fits false and XLA's
message (what it needed; the largest allocations it names).

--batch_size counts examples per optimizer step (SFT answers or DPO pairs; a DPO pair is
2 rows), split into --grad_accum micro-batches whose rows must divide over data x fsdp.
"""
import argparse
import itertools
import json
import os
import re
import sys
import time

GIB = 2 ** 30


def _ints(text):
  return [int(x) for x in text.split(',') if x.strip()]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--topology', default='cpu:1', help='v4-32, v5e-64, ... or cpu:N.')
  p.add_argument('--model', default='llama-65b', help='A preset of models/presets.py.')
  p.add_argument('--objective', default='sft', help='sft, dpo or both (comma-separated).')
  p.add_argument('--lora_rank', type=_ints, default=[0],
                 help='Comma-separated LoRA ranks; 0 = full fine-tune.')
  p.add_argument('--lora_modules', default='wq,wk,wv,wo,w_gate,w_up,w_down',
                 help='Projections that get LoRA updates.')
  p.add_argument('--mesh', action='append', default=None,
                 help="data,fsdp,tensor (repeat the flag for several; default 1,N,1: "
                      "fsdp over all chips).")
  p.add_argument('--batch_size', type=_ints, default=[16],
                 help='Examples per optimizer step (comma-separated for several).')
  p.add_argument('--grad_accum', type=_ints, default=[1],
                 help='Micro-batches per step (comma-separated for several).')
  p.add_argument('--width', type=int, default=512, help='Tokens per row (prompt + answer).')
  p.add_argument('--answer_width', type=int, default=256, help='Answer tokens per row.')
  p.add_argument('--dtype', default='bfloat16', help='Compute dtype.')
  p.add_argument('--param_dtype', default='bfloat16',
                 help='Dtype of the weights and optimizer state (float32: master weights).')
  p.add_argument('--remat', action=argparse.BooleanOptionalAction, default=True,
                 help='Recompute layer activations in the backward pass.')
  p.add_argument('--scan_layers', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--device_memory_gib', type=float, default=None,
                 help='Usable memory per device (default: the TPU chip\'s; none on CPU).')
  p.add_argument('--max_message_lines', type=int, default=30,
                 help='Lines of an out-of-memory message kept in the row.')
  args = p.parse_args(argv)
  args.objective = [x.strip() for x in args.objective.split(',') if x.strip()]
  if not set(args.objective) <= {'sft', 'dpo'} or not args.objective:
    p.error(f'--objective: sft and/or dpo, got {args.objective}')
  if any(r < 0 for r in args.lora_rank):
    p.error('--lora_rank must be >= 0')
  if any(b < 1 for b in args.batch_size + args.grad_accum):
    p.error('--batch_size and --grad_accum must be >= 1')
  if not 0 < args.answer_width <= args.width:
    p.error('--answer_width must be in [1, --width]')
  return args


def per_device_bytes(tree) -> int:
  """Bytes one device holds of abstract arrays with shardings (the largest shard)."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(tree):
    local = x.sharding.shard_shape(tuple(x.shape))
    total += int(np.prod(local, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def parameter_count(tree) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def oom_message(error, max_lines):
  """(message lines kept, temporaries GiB XLA asked for or None)."""
  lines = [l for l in str(error).strip().splitlines() if l.strip()]
  text = '\n'.join(lines)
  need = re.search(r'HLO temporaries \(([\d.]+)G\)', text)
  return lines[:max_lines], float(need.group(1)) if need else None


def plan_one(config, topology, devices, limit, objective, rank, lora_modules, mesh_text,
             batch_size, grad_accum, args):
  """One configuration's row (a dict)."""
  import jax
  from models import llama, lora as lora_lib
  from rain_jax import plan, programs, sharding, training
  row = {'topology': topology.name, 'model': args.model, 'objective': objective,
         'lora_rank': rank, 'batch_size': batch_size, 'grad_accum': grad_accum,
         'width': args.width, 'answer_width': args.answer_width, 'dtype': config.dtype,
         'param_dtype': config.param_dtype, 'remat': args.remat,
         'scan_layers': config.scan_layers}
  mesh = sharding.make_mesh(mesh_text or f'1,{len(devices)},1', devices=devices)
  row['mesh'] = plan.mesh_spec(mesh)
  spec = lora_lib.LoraSpec(rank, 16.0, tuple(lora_modules)) if rank else None
  settings = training.Settings(objective=objective, learning_rate=1e-5, total_steps=100,
                               lora=spec, remat=args.remat)
  full = lora_lib.lora_shapes(config, spec) if spec else llama.param_shapes(config)
  trainable, frozen = training.split_params(full, spec)
  row['params_total'] = parameter_count(full)
  row['params_trainable'] = parameter_count(trainable)
  if batch_size % grad_accum:
    row['error'] = f'--grad_accum={grad_accum} does not divide --batch_size={batch_size}'
    return row
  rows = batch_size // grad_accum * (2 if objective == 'dpo' else 1)
  row['rows_per_micro_batch'] = rows
  batch = training.batch_shapes(settings, grad_accum, rows, args.width, args.answer_width)
  try:
    training.batch_spec(mesh, rows, 1)
  except ValueError as e:
    row['error'] = str(e)
    return row

  # Per-device bytes of each argument group, by the shardings the step takes them in.
  head_dim = config.head_dim
  trainable_sh = training.tree_shardings(trainable, mesh, head_dim)
  frozen_sh = training.tree_shardings(frozen, mesh, head_dim)
  state_sh = training.state_shardings(settings, trainable, trainable_sh, mesh)
  state = jax.eval_shape(lambda t: training.init_state(settings, t), trainable)
  place = lambda shapes, shardings: jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  placed_state = place(state, state_sh)
  accumulator = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, 'float32', sharding=sh), trainable,
      trainable_sh)
  by_sharding = {
      'frozen': per_device_bytes(place(frozen, frozen_sh)),
      'trainable': per_device_bytes(placed_state.trainable),
      'opt_state': per_device_bytes(placed_state.opt_state),
      'batch': per_device_bytes(place(batch, training.batch_shardings(mesh, batch))),
      'f32_grad_accumulator': per_device_bytes(accumulator),
  }
  row['by_sharding_gib'] = {k: round(v / GIB, 3) for k, v in by_sharding.items()}
  row['bytes'] = {'by_sharding': by_sharding}

  t0 = time.time()
  try:
    compiled, _ = training.compile_train_step(config, settings, mesh, trainable, frozen,
                                              batch)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    lines, need = oom_message(e, args.max_message_lines)
    row.update(compile_s=round(time.time() - t0, 1), fits=False,
               out_of_memory=lines, oom_temporaries_gib=need,
               device_memory_gib=round(limit / GIB, 2) if limit else None)
    return row
  row['compile_s'] = round(time.time() - t0, 1)
  memory = programs.MemoryUse.of(compiled)
  exact = {'arguments': memory.arguments, 'outputs': memory.outputs,
           'aliased': memory.aliased, 'temporaries': memory.temporaries,
           'code': memory.code, 'peak': memory.peak}
  row.update({f'{k}_gib': round(v / GIB, 3) for k, v in exact.items()})
  row['bytes'].update(exact)
  row['device_memory_gib'] = round(limit / GIB, 2) if limit else None
  row['fits'] = None if limit is None else memory.peak <= limit
  return row


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from rain_jax import plan  # after argparse: --help without JAX start-up
  try:
    topology = plan.parse_topology(args.topology)
  except ValueError as e:
    print(f'plan_train: error: {e}', file=sys.stderr)
    return 1
  if topology.kind == 'cpu':  # N host devices, before JAX's backend starts
    flag = f'--xla_force_host_platform_device_count={topology.chips}'
    if flag not in os.environ.get('XLA_FLAGS', ''):
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + flag).strip()
  import jax
  if topology.kind != 'cpu':
    jax.config.update('jax_platforms', 'cpu')  # compile for the slice; run nothing
  from models import presets
  try:
    devices = plan.topology_devices(topology)
    config = presets.get_preset(args.model, dtype=args.dtype, param_dtype=args.param_dtype,
                                scan_layers=args.scan_layers)
  except ValueError as e:
    print(f'plan_train: error: {e}', file=sys.stderr)
    return 1
  if args.width > config.max_seq_len:
    print(f'plan_train: error: --width={args.width} exceeds the model context '
          f'{config.max_seq_len}', file=sys.stderr)
    return 1
  limit = (int(args.device_memory_gib * GIB) if args.device_memory_gib
           else topology.usable_bytes)
  modules = [m.strip() for m in args.lora_modules.split(',') if m.strip()]
  for objective, rank, mesh_text, batch_size, grad_accum in itertools.product(
      args.objective, args.lora_rank, args.mesh or [None], args.batch_size,
      args.grad_accum):
    try:
      row = plan_one(config, topology, devices, limit, objective, rank, modules, mesh_text,
                     batch_size, grad_accum, args)
    except ValueError as e:  # a mesh that does not match the slice, bad LoRA modules
      row = {'topology': topology.name, 'model': args.model, 'objective': objective,
             'lora_rank': rank, 'mesh': mesh_text, 'batch_size': batch_size,
             'grad_accum': grad_accum, 'error': str(e)}
    print(json.dumps(row), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
