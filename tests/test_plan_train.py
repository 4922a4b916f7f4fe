"""scripts/plan_train.py: the fine-tuning fit planner, on 8 simulated CPU devices.

Oracles: LoRA parameter counts by hand from the tiny preset's shapes; XLA's argument
bytes against the planner's per-sharding sums of the same arrays; a LoRA step must take
fewer argument bytes than the full fine-tune of the same model.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ('topology', 'model', 'objective', 'lora_rank', 'mesh', 'batch_size', 'grad_accum',
          'params_total', 'params_trainable', 'by_sharding_gib', 'arguments_gib',
          'outputs_gib', 'aliased_gib', 'temporaries_gib', 'peak_gib', 'device_memory_gib',
          'fits', 'compile_s')


def test_plan_train_lora_and_full_on_8_cpu_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)  # the script asks for 8 host devices itself
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'plan_train.py'), '--topology=cpu:8',
       '--model=tiny-mha', '--objective=sft', '--lora_rank=0,4', '--mesh=2,2,2',
       '--batch_size=2,8', '--width=32', '--answer_width=8', '--device_memory_gib=1',
       # float32, unrolled, no remat: the quickest CPU compiles (about 4 s each).
       '--dtype=float32', '--param_dtype=float32', '--no-scan_layers', '--no-remat'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert [(r['lora_rank'], r['batch_size']) for r in rows] == [(0, 2), (0, 8), (4, 2), (4, 8)]
  # 2 rows cannot split over data x fsdp = 4 devices: an error row, nothing compiled.
  for row in (rows[0], rows[2]):
    assert 'do not divide' in row['error'] and 'peak_gib' not in row
  full, lora = rows[1], rows[3]
  for row in (full, lora):
    assert set(FIELDS) <= set(row), set(FIELDS) - set(row)
    assert row['mesh'] == '2,2,2' and row['rows_per_micro_batch'] == 8
    b = row['bytes']
    assert b['peak'] == (b['arguments'] + b['outputs'] - b['aliased'] + b['temporaries']
                         + b['code'])
    # Arguments: frozen weights, the state (trainable + optimizer) and the batch, as the
    # shardings split them, plus the state's step counter (int32, 4 bytes on CPU).
    parts = b['by_sharding']
    named = parts['frozen'] + parts['trainable'] + parts['opt_state'] + parts['batch']
    assert b['arguments'] - named == 4, (b['arguments'], parts)
    # The donated state comes back in place: aliased = trainable + optimizer state + step.
    assert b['aliased'] >= parts['trainable'] + parts['opt_state']
    assert row['fits'] is True and row['device_memory_gib'] == 1.0
  # tiny-mha: 2 layers, hidden 64, MLP 128. Rank-4 LoRA on all 7 projections per layer:
  # 4 x ((64+64) x 4 [wq wk wv wo] + (64+128) x 2 [gate up] + (128+64) [down]) = 4352.
  assert lora['params_trainable'] == 2 * 4352
  assert lora['params_total'] == full['params_total'] + 2 * 4352
  assert full['params_trainable'] == full['params_total']
  assert lora['bytes']['by_sharding']['frozen'] > 0 == full['bytes']['by_sharding']['frozen']
  assert lora['bytes']['arguments'] < full['bytes']['arguments']
  assert lora['bytes']['by_sharding']['opt_state'] < full['bytes']['by_sharding']['opt_state']
