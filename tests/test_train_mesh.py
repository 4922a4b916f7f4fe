"""Sharded training equals single-device training: 20 steps of SFT (full fine-tune) and
DPO (LoRA) on meshes 8x1x1 and 2x2x2 of 8 virtual CPU devices give the one-device
losses to 1e-5 (tests/train_mesh_e2e.py, in its own process)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # six compiles of the train step in a fresh process (~1 min)
def test_sharded_training_equals_one_device():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'tests.train_mesh_e2e'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, by_mesh in report.items():
    single = np.array(by_mesh['1,1,1'])
    assert len(single) == 20 and single[-1] < single[0], (name, single)
    for mesh in ('8,1,1', '2,2,2'):
      np.testing.assert_allclose(by_mesh[mesh], single, rtol=0, atol=1e-5,
                                 err_msg=f'{name} on mesh {mesh}')
