"""Measures sharded multi-process conversion: peak RSS per process, seconds, restore.

  python3 scripts/bench_convert.py --work=/tmp/bench_convert [--hidden=1536 --layers=16]

1. Writes (in a child process) a random LLaMA-shaped HF checkpoint (bfloat16 safetensors in several shard
   files plus model.safetensors.index.json, one tensor at a time; numpy only).
2. Baseline: 2 processes x 4 CPU devices that import JAX and scripts/convert_checkpoint.py,
   join the job (rain_jax.distributed), build the mesh, put one small array on it and
   import orbax, converting nothing; their peak RSS (ru_maxrss) is the process baseline.
3. Converts with scripts/convert_checkpoint.py as 2 processes x 4 devices on localhost
   (--distributed --mesh=...), each process's peak RSS and seconds read from its last line.
4. Restores the checkpoint in a fresh process over 8 devices into the other layer layout
   on another mesh, and compares every leaf with the source tensors exactly.

Prints one JSON object. The machine is whatever runs it: note its cores and load.
"""
import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_BYTES = 400 << 20


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def hf_tensors(hidden, intermediate, layers, vocab, heads, kv_heads):
  """[(name, shape)] of an HF LLaMA checkpoint, in file order."""
  head_dim = hidden // heads
  names = [('model.embed_tokens.weight', (vocab, hidden))]
  for i in range(layers):
    p = f'model.layers.{i}.'
    names += [(p + 'input_layernorm.weight', (hidden,)),
              (p + 'self_attn.q_proj.weight', (heads * head_dim, hidden)),
              (p + 'self_attn.k_proj.weight', (kv_heads * head_dim, hidden)),
              (p + 'self_attn.v_proj.weight', (kv_heads * head_dim, hidden)),
              (p + 'self_attn.o_proj.weight', (hidden, heads * head_dim)),
              (p + 'post_attention_layernorm.weight', (hidden,)),
              (p + 'mlp.gate_proj.weight', (intermediate, hidden)),
              (p + 'mlp.up_proj.weight', (intermediate, hidden)),
              (p + 'mlp.down_proj.weight', (hidden, intermediate))]
  names += [('model.norm.weight', (hidden,)), ('lm_head.weight', (vocab, hidden))]
  return names


def random_tensor(name, shape):
  """Deterministic random bfloat16 values for tensor `name` (seeded by its name)."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  seed = int.from_bytes(name.encode()[-8:].rjust(8, b'\0'), 'little') ^ len(name)
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def write_hf_checkpoint(directory, args):
  """Writes the checkpoint one tensor at a time (never more than one in memory)."""
  os.makedirs(directory)
  tensors = hf_tensors(args.hidden, args.intermediate, args.layers, args.vocab, args.heads,
                       args.kv_heads)
  shards, current, size = [], [], 0
  for name, shape in tensors:
    nbytes = int(np.prod(shape)) * 2
    if current and size + nbytes > SHARD_BYTES:
      shards.append(current)
      current, size = [], 0
    current.append((name, shape))
    size += nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(shards):
    file = f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors'
    header, offset = {}, 0
    for name, shape in shard:
      nbytes = int(np.prod(shape)) * 2
      header[name] = {'dtype': 'BF16', 'shape': list(shape),
                      'data_offsets': [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = file
    encoded = json.dumps(header).encode()
    encoded += b' ' * (-len(encoded) % 8)
    with open(os.path.join(directory, file), 'wb') as f:
      f.write(len(encoded).to_bytes(8, 'little'))
      f.write(encoded)
      for name, shape in shard:
        f.write(random_tensor(name, shape).tobytes())
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'weight_map': weight_map}, f)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(dict(model_type='llama', vocab_size=args.vocab, hidden_size=args.hidden,
                   intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                   rms_norm_eps=1e-5, max_position_embeddings=2048), f)
  largest = max(int(np.prod(shape)) for _, shape in tensors)
  return {'parameters': sum(int(np.prod(shape)) for _, shape in tensors),
          'largest_tensor_elements': largest, 'largest_tensor_mib_bf16': largest * 2 / 2**20,
          'files': len(shards)}


def run_two_processes(argv_of, log_prefix, timeout):
  """Runs argv_of(i, address) for i in 0, 1 with 4 CPU devices each; their log texts."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  address = f'127.0.0.1:{free_port()}'
  logs = [open(f'{log_prefix}{i}.log', 'w+') for i in range(2)]
  processes = [subprocess.Popen(argv_of(i, address), stdout=logs[i], stderr=subprocess.STDOUT,
                                env=env, cwd=ROOT) for i in range(2)]
  texts = []
  for process, log in zip(processes, logs):
    process.wait(timeout=timeout)
    log.seek(0)
    texts.append(log.read())
    log.close()
    if process.returncode:
      raise SystemExit(f'{process.args[:3]} failed: {texts[-1][-3000:]}')
  return texts


BASELINE_CHILD = '''
import resource, sys
sys.path.insert(0, {scripts!r})
import convert_checkpoint
from rain_jax import distributed, sharding
distributed.initialize({address!r}, 2, {index}, program="baseline")
import jax, numpy as np, orbax.checkpoint
mesh = sharding.make_mesh({mesh!r})
x = jax.make_array_from_callback((8, 8), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
                                 lambda index: np.zeros((8, 8), np.float32)[index])
x.block_until_ready()
if {orbax_save}:
  # What converting a model of no size costs: orbax's save machinery (its barriers compile
  # a small XLA program; tensorstore starts its pools), on one tiny sharded array.
  with orbax.checkpoint.Checkpointer(orbax.checkpoint.PyTreeCheckpointHandler()) as c:
    c.save({path!r}, args=orbax.checkpoint.args.PyTreeSave({{"value": x}}))
print("baseline peak RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB", flush=True)
distributed.finish()
'''

RESTORE_CHILD = '''
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import jax, numpy as np
from flax import traverse_util
from models import convert, llama
from rain_jax import sharding
start = time.time()
config = convert.load_config({checkpoint!r}).replace(scan_layers={scan!r})
mesh = sharding.make_mesh({mesh!r})
shardings = sharding.param_shardings(llama.param_shapes(config), mesh, head_dim=config.head_dim)
params = convert.restore_params({checkpoint!r}, config, shardings)
jax.block_until_ready(params)
seconds = time.time() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
held = sum(shard.data.nbytes for leaf in jax.tree.leaves(params) for shard in leaf.addressable_shards)
index = convert.safetensors_index({hf_dir!r})
names = {{"embed/embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
         "lm_head": "lm_head.weight"}}
suffixes = {{"attn_norm/scale": "input_layernorm.weight", "attn/wq/kernel": "self_attn.q_proj.weight",
            "attn/wk/kernel": "self_attn.k_proj.weight", "attn/wv/kernel": "self_attn.v_proj.weight",
            "attn/wo/kernel": "self_attn.o_proj.weight", "mlp_norm/scale": "post_attention_layernorm.weight",
            "mlp/w_gate/kernel": "mlp.gate_proj.weight", "mlp/w_up/kernel": "mlp.up_proj.weight",
            "mlp/w_down/kernel": "mlp.down_proj.weight"}}
flat = traverse_util.flatten_dict(params)
compared = 0
for path, leaf in flat.items():
  name = "/".join(path)
  if not leaf.sharding.is_equivalent_to(traverse_util.flatten_dict(shardings)[path], leaf.ndim):
    sys.exit(f"{{name}}: wrong sharding {{leaf.sharding}}")
  for layer in (range(config.num_layers) if path[0] == "layers" else [None]):
    if layer is None and path[0].startswith("layers_"):
      layer_index, rel = int(path[0][7:]), "/".join(path[1:])
      source = f"model.layers.{{layer_index}}.{{suffixes[rel]}}"
      got = np.asarray(leaf)
    elif layer is None:
      source, got = names[name], np.asarray(leaf)
    else:
      source = f"model.layers.{{layer}}.{{suffixes['/'.join(path[1:])]}}"
      got = np.asarray(leaf[layer])
    want = convert.read_safetensors_tensor(index, source)
    if path[-1] == "kernel" or path[0] == "lm_head":
      want = want.T
    if got.dtype != want.dtype or not np.array_equal(got, want):
      sys.exit(f"{{name}} layer {{layer}} differs from {{source}}")
    compared += 1
print(json.dumps({{"restore_seconds": round(seconds, 1), "restore_peak_rss_mib": round(rss),
                  "restored_bytes_on_devices_mib": round(held / 2**20),
                  "tensors_compared_equal": compared, "scan_layers": {scan!r}, "mesh": {mesh!r}}}))
'''


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--work', required=True, help='new folder for the checkpoints')
  parser.add_argument('--hidden', type=int, default=1536)
  parser.add_argument('--intermediate', type=int, default=4096)
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--kv_heads', type=int, default=12)
  parser.add_argument('--mesh', default='1,4,2', help='conversion mesh (2 processes x 4)')
  parser.add_argument('--scan_layers', default='true',
                      help='layout recorded at conversion; the restore uses the other')
  parser.add_argument('--restore_mesh', default='2,2,2', help='restore mesh (8 devices)')
  parser.add_argument('--timeout', type=int, default=1800)
  parser.add_argument('--write_source_only', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()

  hf_dir = os.path.join(args.work, 'hf')
  if args.write_source_only:
    print(json.dumps(write_hf_checkpoint(hf_dir, args)))
    return
  os.makedirs(args.work)
  report = {'machine': {'cpus': os.cpu_count(), 'load_avg_1m': os.getloadavg()[0]}}
  # Linux carries a parent's peak RSS into ru_maxrss of the children it starts (fork
  # copies the high-water mark, exec keeps it), so this process stays small: the random
  # source is written by a child, and every measured process is started from here.
  start = time.time()
  result = subprocess.run([sys.executable, os.path.abspath(__file__), '--write_source_only',
                           *sys.argv[1:]], capture_output=True, text=True, check=True)
  report['source'] = json.loads(result.stdout)
  report['source']['write_seconds'] = round(time.time() - start, 1)

  scripts = os.path.join(ROOT, 'scripts')
  for key, orbax_save in (('baseline_peak_rss_mib', False),
                          ('baseline_with_tiny_orbax_save_peak_rss_mib', True)):
    texts = run_two_processes(
        lambda i, address, orbax_save=orbax_save: [
            sys.executable, '-c', BASELINE_CHILD.format(
                scripts=scripts, address=address, index=i, mesh=args.mesh,
                orbax_save=orbax_save, path=os.path.join(args.work, f'tiny{int(orbax_save)}'))],
        os.path.join(args.work, f'baseline{int(orbax_save)}-'), args.timeout)
    report[key] = [float(re.search(r'baseline peak RSS ([\d.]+) MiB', t).group(1))
                   for t in texts]

  checkpoint = os.path.join(args.work, 'ckpt')
  start = time.time()
  texts = run_two_processes(
      lambda i, address: [
          sys.executable, os.path.join(scripts, 'convert_checkpoint.py'), f'--hf_dir={hf_dir}',
          f'--output={checkpoint}', '--dtype=bfloat16', f'--scan_layers={args.scan_layers}',
          f'--mesh={args.mesh}', '--distributed', f'--coordinator_address={address}',
          '--num_processes=2', f'--process_id={i}'],
      os.path.join(args.work, 'convert'), args.timeout)
  wall = time.time() - start
  lines = [[line for line in t.splitlines() if ' wrote ' in line][-1] for t in texts]
  peaks = [float(re.search(r'peak RSS (\d+) MiB', line).group(1)) for line in lines]
  largest = report['source']['largest_tensor_mib_bf16']
  report['convert'] = {
      'mesh': args.mesh, 'scan_layers': args.scan_layers, 'wall_seconds': round(wall, 1),
      'lines': lines, 'peak_rss_mib': peaks,
      'peak_minus_baseline_mib': [round(p - b, 1) for p, b in
                                  zip(peaks, report['baseline_peak_rss_mib'])],
      'target_mib': [round(b + 1.5 * largest, 1) for b in report['baseline_peak_rss_mib']],
      'under_target': [p < b + 1.5 * largest for p, b in
                       zip(peaks, report['baseline_peak_rss_mib'])],
      'peak_minus_orbax_baseline_mib': [
          round(p - b, 1) for p, b in
          zip(peaks, report['baseline_with_tiny_orbax_save_peak_rss_mib'])],
      'checkpoint_mib': round(sum(os.path.getsize(os.path.join(d, f))
                                  for d, _, fs in os.walk(checkpoint) for f in fs) / 2**20, 1)}

  restore_scan = args.scan_layers.lower() not in ('true', '1')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-c', RESTORE_CHILD.format(root=ROOT, checkpoint=checkpoint,
                                                  scan=restore_scan, mesh=args.restore_mesh,
                                                  hf_dir=hf_dir)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
  if result.returncode:
    raise SystemExit(f'restore failed: {result.stderr[-3000:]}')
  report['restore'] = json.loads(result.stdout.strip().splitlines()[-1])
  # Must stay below the children's own baselines (see above).
  report['bench_peak_rss_mib'] = round(
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(json.dumps(report, indent=1))


if __name__ == '__main__':
  main()
