"""Sharded and multi-process checkpoint conversion on 8 virtual CPU devices.

Started by tests/test_convert.py in its own process, so that the XLA flag below takes
effect before JAX initialises. Prints one JSON line; the assertions on it live in the
test, and every mismatch found here ends the process with a message (status 1).

  python -m tests.convert_e2e mesh HF_DIR WORK EXPECTED.npz [GGUF]
      converts HF_DIR through scripts/convert_checkpoint.py's function with
      --mesh=1,4,2 and without a mesh (and GGUF, the same weights, with --mesh=1,4,2),
      and restores the checkpoints into both layouts on the mesh 2,2,2 and on one
      device.
  python -m tests.convert_e2e multiprocess HF_DIR WORK EXPECTED.npz SCAN CONVERT_MESH RESTORE_MESH
      runs scripts/convert_checkpoint.py as 2 processes x 4 devices on localhost
      (--distributed, a free port, bounded by a timeout), then restores the checkpoint
      here into the other layout on RESTORE_MESH over 8 devices.

EXPECTED.npz holds the unrolled parameters ("/"-joined paths) the checkpoint must hold.
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from flax import traverse_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))

import convert_checkpoint  # pylint: disable=wrong-import-position
from models import convert, llama  # pylint: disable=wrong-import-position
from rain_jax import sharding  # pylint: disable=wrong-import-position

PROCESS_TIMEOUT_S = 60


def restore_and_compare(checkpoint, expected, scan_layers, mesh_spec):
  """Restores `checkpoint` for layout `scan_layers` on mesh `mesh_spec` (None: one device);
  exits unless every leaf equals `expected` exactly and lies on its target sharding."""
  config = convert.load_config(checkpoint).replace(scan_layers=scan_layers)
  shardings = None
  if mesh_spec:
    shardings = sharding.param_shardings(llama.param_shapes(config),
                                         sharding.make_mesh(mesh_spec),
                                         head_dim=config.head_dim)
  params = convert.restore_params(checkpoint, config, shardings)
  if shardings is not None:
    for path, leaf in traverse_util.flatten_dict(params).items():
      want = traverse_util.flatten_dict(shardings)[path]
      if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
        sys.exit(f'{checkpoint} -> {"/".join(path)}: sharding {leaf.sharding}, want {want}')
  if scan_layers:
    params = llama.unstack_layers(params, config.num_layers)
  flat = {'/'.join(p): np.asarray(v, np.float32)
          for p, v in traverse_util.flatten_dict(params).items()}
  if set(flat) != set(expected):
    sys.exit(f'{checkpoint}: leaves {sorted(flat)} != {sorted(expected)}')
  for name, value in expected.items():
    if not np.array_equal(flat[name], value):
      sys.exit(f'{checkpoint} restored with scan_layers={scan_layers} on mesh {mesh_spec}: '
               f'{name} differs (max |diff| {np.max(np.abs(flat[name] - value))})')


def run_mesh(hf_dir, work, expected, gguf_path=None):
  """The tensors on disk do not depend on --scan_layers (it is only recorded), so one
  layout converts, with and without a mesh, and restores into both."""
  report = {'restored': 0}
  # (hf_dir, gguf, conversion mesh, [(restore layout, restore mesh)]): every pair of
  # layouts and placements is covered once across the three.
  runs = [(hf_dir, None, '1,4,2', [(True, '2,2,2'), (False, None)]),
          (hf_dir, None, None, [(False, '2,2,2'), (True, None)])]
  if gguf_path:
    runs.append((None, gguf_path, '1,4,2', [(False, '2,2,2')]))
  for i, (hf, gguf, mesh, restores) in enumerate(runs):
    checkpoint = os.path.join(work, f'ckpt{i}')
    convert_checkpoint.convert_checkpoint(hf, gguf, checkpoint, 'float32', True, mesh)
    for target_scan, restore_mesh in restores:
      restore_and_compare(checkpoint, expected, target_scan, restore_mesh)
      report['restored'] += 1
  return report


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_multiprocess(hf_dir, work, expected, scan, convert_mesh, restore_mesh):
  checkpoint = os.path.join(work, 'ckpt')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  address = f'127.0.0.1:{free_port()}'
  start = time.time()
  logs = [open(os.path.join(work, f'process{i}.log'), 'w+') for i in range(2)]
  # Files, not pipes: a full pipe would stall one process and, in a barrier, both.
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'scripts', 'convert_checkpoint.py'),
       f'--hf_dir={hf_dir}', f'--output={checkpoint}', '--dtype=float32',
       f'--scan_layers={scan}', f'--mesh={convert_mesh}', '--distributed',
       f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
      stdout=logs[i], stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
      for i in range(2)]
  outputs = []
  for process, log in zip(processes, logs):
    try:
      process.wait(timeout=max(1, PROCESS_TIMEOUT_S - (time.time() - start)))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      sys.exit(f'conversion processes did not finish in {PROCESS_TIMEOUT_S} s')
    log.seek(0)
    text = log.read()
    log.close()
    if process.returncode != 0:
      sys.exit(f'conversion process failed ({process.returncode}): {text[-3000:]}')
    outputs.append([line for line in text.splitlines() if ' wrote ' in line][-1])
  seconds = time.time() - start
  files = sorted(os.listdir(os.path.join(checkpoint, convert.TENSORS_DIR,
                                         'embed.embedding')))
  restore_and_compare(checkpoint, expected, scan != 'true', restore_mesh)
  return {'lines': outputs, 'seconds': round(seconds, 1), 'embed_files': files,
          'saved_scan_layers': convert.load_config(checkpoint).scan_layers}


def main(argv):
  mode, hf_dir, work, expected_path = argv[1:5]
  expected = dict(np.load(expected_path))
  if mode == 'mesh':
    report = run_mesh(hf_dir, work, expected, *argv[5:6])
  elif mode == 'multiprocess':
    report = run_multiprocess(hf_dir, work, expected, *argv[5:8])
  else:
    sys.exit(f'unknown mode {mode!r}')
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv)
