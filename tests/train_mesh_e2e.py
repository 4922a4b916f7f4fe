"""Trains the tiny model of tests/test_training.py for 20 steps on 8 virtual CPU devices
under several meshes and on one device; prints one JSON line of the losses.

Started by tests/test_train_mesh.py in its own process, so that the XLA flag below takes
effect before JAX initialises. It measures and reports; the assertions live in the test.

Usage: python -m tests.train_mesh_e2e
Report: {"sft-full": {"1,1,1": [20 losses], "8,1,1": [...], "2,2,2": [...]},
         "dpo-lora": {...}}
"""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import json

import jax

from models import lora
from tests import test_training

STEPS = 20
MESHES = ((1, 1, 1), (8, 1, 1), (2, 2, 2))


def main():
  assert jax.device_count() == 8, jax.devices()
  runs = {
      'sft-full': dict(objective='sft', exs=test_training.examples(8, seed=11)),
      'dpo-lora': dict(objective='dpo', exs=test_training.examples(4, seed=12, pairs=True),
                       spec=lora.LoraSpec(rank=4, alpha=8.0)),
  }
  report = {}
  for name, run in runs.items():
    report[name] = {}
    for mesh in MESHES:
      losses, _ = test_training.run_steps(run['objective'], run['exs'], 1, STEPS,
                                          spec=run.get('spec'), learning_rate=3e-3,
                                          mesh_shape=mesh)
      report[name][','.join(map(str, mesh))] = losses
  print(json.dumps(report))


if __name__ == '__main__':
  main()
