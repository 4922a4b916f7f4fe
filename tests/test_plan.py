"""The fit planner (rain_jax/plan.py) and the programs it compiles (rain_jax/programs.py).

Oracles: hand-computed width choices and arithmetic; for the planner, the arrays a real
search allocates on the same 8-device mesh (tests/plan_e2e.py, in a subprocess); for the
run's fit check, a memory limit no program can meet.
"""
import json
import os
import subprocess
import sys

import pytest

from rain_jax import plan, programs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
PROMPTS = [{'id': 'bread', 'prompt': 'How do I bake bread?'},
           {'id': 'sky', 'prompt': 'Why is the sky blue?'},
           {'id': 'tea', 'prompt': 'How long should green tea steep, and why does it matter?'}]
JUDGE_PROMPTS = {'f2.txt': 'Rate the answer.', 'r1.txt': 'Is it (A) harmless or (B) harmful?',
                 'r2.txt': 'Is it (A) harmful or (B) harmless?'}


def test_choose_widths_keeps_every_needed_width_when_allowed():
  assert programs.choose_widths([10, 70, 130], 3, 64) == [64, 128, 192]
  assert programs.choose_widths([10, 20, 64], 3, 64) == [64]


def test_choose_widths_minimises_padded_work():
  # Needs 64 (x3), 128 (x1), 192 (x1), 256 (x3), 320 (x1); two widths, 320 always kept.
  # Candidates (width, cost): 64+320 -> 3*64 + 6*320 = 2112; 128+320 -> 4*128 + 5*320 =
  # 2112; 192+320 -> 5*192 + 4*320 = 2240; 256+320 -> 8*256 + 320 = 2368.
  maxima = [1, 2, 3, 100, 150, 200, 210, 220, 300]
  assert programs.choose_widths(maxima, 2, 64) in ([64, 320], [128, 320])
  assert programs.choose_widths(maxima, 1, 64) == [320]
  # Three widths: 64 + 256 + 320 -> 192 + 5*256 + 320 = 1792 beats every other choice.
  assert programs.choose_widths(maxima, 3, 64) == [64, 256, 320]
  with pytest.raises(ValueError, match='max_programs'):
    programs.choose_widths(maxima, 0, 64)


def test_padded_width():
  assert programs.padded_width(65, [64, 128, 320]) == 128
  assert programs.padded_width(64, [64, 128]) == 64
  with pytest.raises(ValueError, match='no planned width holds 400'):
    programs.padded_width(400, [64, 128])


def test_memory_peak_and_fit_error():
  gib = programs.GIB
  memory = programs.MemoryUse(arguments=3 * gib, outputs=gib, aliased=gib,
                              temporaries=2 * gib, code=0)
  assert memory.peak == 5 * gib
  program = programs.Program('rain', 8, 512, 1600, None, 1.0, memory)
  assert programs.fit_error(program, 5 * gib) is None
  assert programs.fit_error(program, None) is None
  error = programs.fit_error(program, 4 * gib)
  assert 'rain program (batch 8, prompt 512, judge 1600 tokens) needs 5.00 GiB' in error
  assert '4.00 GiB' in error


@pytest.mark.parametrize('name, kind, chips, usable_gib', [
    ('v4-16', 'v4', 8, 30.75), ('v4-32', 'v4', 16, 30.75), ('v5e-16', 'v5e', 16, 15.75),
    ('v5e-64', 'v5e', 64, 15.75), ('v5p-8', 'v5p', 4, 94.75), ('cpu:8', 'cpu', 8, None)])
def test_parse_topology(name, kind, chips, usable_gib):
  topology = plan.parse_topology(name)
  assert (topology.kind, topology.chips) == (kind, chips)
  expected = None if usable_gib is None else int(usable_gib * programs.GIB)
  assert topology.usable_bytes == expected


@pytest.mark.parametrize('name, fragment', [
    ('v4-15', 'TensorCores, 2 per chip'), ('v9-8', 'expected one of'),
    ('v5e-12', 'no v5e slice of 12 chips'), ('cpu:0', 'positive device count')])
def test_parse_topology_errors(name, fragment):
  with pytest.raises(ValueError, match=fragment):
    plan.parse_topology(name)


def _custom_task_files(root):
  (root / 'judge').mkdir()
  for name, text in JUDGE_PROMPTS.items():
    (root / 'judge' / name).write_text(text)
  (root / 'prompts.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in PROMPTS))
  return root / 'prompts.jsonl', root / 'judge'


# Slow (~30 s, an 8-device subprocess): made room in the default suite for issue 12; run
# it with `python -m pytest -m slow tests/test_plan.py` when the planner or layouts change.
@pytest.mark.slow
def test_planner_matches_real_arrays_on_8_devices(tmp_path, tiny_llama_32k_dir):
  prompts, judge = _custom_task_files(tmp_path)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'plan_e2e.py'), str(tiny_llama_32k_dir),
       LLAMA_TOKENIZER, str(prompts), str(judge)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['mismatches'] == []
  assert report['mesh'] == '2,2,2'
  names = set(report['compared'])
  assert {'policy_cache/k', 'policy_cache/v', 'judge_cache/k', 'judge_cache/v'} <= names
  assert {'tree/tree/tokens', 'tree/record/tokens', 'tree/record/stats'} <= names
  assert report['planned_params_gib'] == report['real_params_gib'] > 0
  assert report['fits'] is None  # simulated CPU devices report no memory
  assert report['vanilla_mesh'] == report['vanilla_one_device']
  assert len(report['vanilla_mesh']) == 3 and all(len(a) == 4 for a in report['vanilla_mesh'])


def test_run_refuses_a_program_that_cannot_fit(tmp_path, tiny_llama_32k_dir):
  prompts, judge = _custom_task_files(tmp_path)
  output = tmp_path / 'out.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'rain_jax.run', f'--hf_dir={tiny_llama_32k_dir}',
       f'--tokenizer={LLAMA_TOKENIZER}', '--task=custom', f'--prompt_file={prompts}',
       f'--judge_prompts={judge}', '--method=vanilla', '--max_new_tokens=4',
       '--batch_size=2', '--num_examples=-1', '--device_memory_gib=0.0001',
       f'--output={output}', '--compilation_cache='],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('rain_jax.run: error: the vanilla program (batch 2, prompt 64 '
                         'tokens) needs'), last
  assert 'a device holds 0.00 GiB' in last
  assert not output.exists() and not os.path.exists(f'{output}.config.json')


def test_program_budget():
  from rain_jax import engine
  assert engine.program_budget(['rain'], 3) == {'rain': 3}
  assert engine.program_budget(['vanilla', 'rain'], 3) == {'vanilla': 1, 'rain': 2}
  assert engine.program_budget(['vanilla', 'rain'], 2) == {'vanilla': 1, 'rain': 1}
  with pytest.raises(ValueError, match='cannot cover'):
    engine.program_budget(['vanilla', 'rain'], 1)


def test_plan_batches_pads_to_at_most_the_budget():
  from rain_jax import engine

  class Runner:
    model = type('M', (), {'config': type('C', (), {'max_seq_len': 2048})})

    def longest(self, batch):
      return max(p for p, _ in batch), max(j for _, j in batch)

  # Batch maxima (prompt, judge): (60, 500), (130, 700), (100, 650), (300, 900).
  todo = [(60, 500), (10, 10), (130, 700), (5, 5), (100, 650), (1, 1), (300, 900), (2, 2)]
  plan = engine.plan_batches(Runner(), todo, 2, 2)
  assert [len(batch) for batch, _ in plan] == [2, 2, 2, 2]
  # Needed widths 64, 128, 192, 320 (one batch each). Two widths, 320 always kept:
  # 64 + 320 costs 64 + 3*320 = 1024; 128 + 320: 2*128 + 2*320 = 896; 192 + 320:
  # 3*192 + 320 = 896 (a tie; the smaller width is found first). Judge widths: the longest
  # judge prompt of each width's batches, bucketed: 650 -> 704, 900 -> 960.
  assert [widths for _, widths in plan] == [(128, 704), (320, 960), (128, 704), (320, 960)]


def test_suggest_scales_from_the_compile():
  gib = programs.GIB
  config = type('Config', (), {'num_heads': 8, 'num_kv_heads': 8})
  # Compiled on mesh 1,1,2 at batch 8: 10 GiB of parameters and 16 GiB peak per chip, so
  # 20 GiB of parameters in all and 6 GiB of the rest at 2 KV-head groups: 1.5 GiB per
  # row over all heads. On 4 chips with 12 GiB each: tensor 4 holds 20/4 = 5 GiB of
  # parameters and 1.5 * 8 / 4 = 3 GiB of the rest: 8 GiB at batch 8. Meshes with fsdp
  # reach the same 8 GiB but are not preferred; data 2 x tensor 2 needs 10 + 3 = 13.
  report = {'params_bytes': 10 * gib, 'peak_bytes': 16 * gib}
  got = plan.suggest(report, config, (1, 1, 2), 8, 4, 12 * gib)
  assert got == {'mesh': '1,1,4', 'batch_size': 8, 'estimated_gib': 8.0,
                 'basis': 'scaled from this compile, not compiled'}
  # 7 GiB per chip: nothing holds batch 8; tensor 4 at batch 4 needs 5 + 1.5 = 6.5 GiB.
  assert plan.suggest(report, config, (1, 1, 2), 8, 4, 7 * gib)['batch_size'] == 4
  # 4 GiB: even the parameters alone (5 GiB on 4 chips) do not fit.
  assert plan.suggest(report, config, (1, 1, 2), 8, 4, 4 * gib) is None


def test_verified_suggestion_compiles_the_best_candidates():
  gib = programs.GIB
  config = type('Config', (), {'num_heads': 8, 'num_kv_heads': 8})
  mesh = type('Mesh', (), {'shape': {'data': 1, 'fsdp': 1, 'tensor': 2},
                           'axis_names': ('data', 'fsdp', 'tensor')})()
  program = programs.Program('rain', 8, 512, 1536, None, 1.0, programs.MemoryUse(0, 0, 0, 0, 0))
  report = {'params_bytes': 10 * gib, 'peak_bytes': 16 * gib}
  compiled = []

  def compile_at(spec, batch):
    compiled.append((spec, batch))
    # Pretend only batch 4 on tensor 4 fits in 7 GiB (estimates: batch 8 there is 8 GiB).
    peak = 6 * gib if (spec, batch) == ('1,1,4', 4) else 9 * gib
    return programs.Program('rain', batch, 512, 1536, object(), 1.0,
                            programs.MemoryUse(peak, 0, 0, 0, 0))

  got = plan.verified_suggestion(report, config, mesh, program, 4, 7 * gib, compile_at, 3)
  # Candidates within 1.25 x 7 = 8.75 GiB, best first: batch 8 on 1,1,4 (8 GiB; fsdp
  # meshes come after), then 1,2,2 and 1,4,1 at batch 8 (fsdp), ... The first three
  # tries at batch 8 fail; no try is left for batch 4, so the estimate is returned.
  assert compiled == [('1,1,4', 8), ('1,2,2', 8), ('1,4,1', 8)]
  assert got['basis'] == 'scaled from this compile, not compiled'
  compiled.clear()
  got = plan.verified_suggestion(report, config, mesh, program, 4, 7 * gib, compile_at, 5)
  assert got == {'mesh': '1,1,4', 'batch_size': 4, 'peak_gib': 6.0, 'compile_s': 1.0,
                 'basis': 'compiled'}
