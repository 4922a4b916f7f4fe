"""The fit planner against a real allocation, on 8 simulated CPU devices (a subprocess of
tests/test_plan.py; XLA_FLAGS must give 8 host devices before JAX starts).

  python tests/plan_e2e.py HF_DIR TOKENIZER PROMPTS_JSONL JUDGE_DIR

Plans the RAIN program of a tiny checkpoint on cpu:8 (mesh 2,2,2), then builds the same
search for real on the same mesh, runs its initial state (policy cache, judge cache,
tree) with real weights, and prints JSON comparing every array the planner lists with
the real array's per-device shape and bytes, and the parameters' per-device bytes; and
the vanilla answers of one batch on the mesh and on one device.
"""
import json
import sys

import jax
import numpy as np
from absl import flags

from rain_jax import engine, flag_table, kvcache, loading, plan, search, sharding, tasks

hf_dir, tokenizer, prompts, judge_dir = sys.argv[1:5]
FLAGS = flags.FLAGS  # rain_jax.plan defines the flags of rain_jax.run and --topology
FLAGS([sys.argv[0], f'--hf_dir={hf_dir}', f'--tokenizer={tokenizer}', '--task=custom',
       f'--prompt_file={prompts}', f'--judge_prompts={judge_dir}', '--turn_marker=Human:',
       '--method=rain', '--similarity=mean_hidden', '--max_T=4', '--max_new_tokens=6',
       '--max_rollout=8', '--max_depth=3', '--num_nodes=64', '--batch_size=4',
       '--num_examples=-1', '--mesh=2,2,2'])
topology = plan.parse_topology('cpu:8')
devices = plan.topology_devices(topology)
[row] = plan.plan_rows(FLAGS, topology, devices, min_array_bytes=0)

mesh = sharding.make_mesh('2,2,2', devices=devices)
model = loading.load_model(hf_dir=hf_dir, tokenizer=tokenizer, mesh=mesh)
task = tasks.get_task('custom', **tasks.task_options('custom', FLAGS.flag_values_dict()))
cfg = tasks.rain_config('custom', **flag_table.rain_overrides(FLAGS))
runner = engine.RainRunner(model, mesh, task, cfg)
examples = task.load_examples(0, -1)
batch = list(zip(examples, runner.encode(examples)))
widths = (row['prompt_width'], row['judge_width'])
task_judge = runner.judge_for(kvcache.policy_layout(cfg, widths[0]), widths[1])
searcher = search.Searcher(runner.fns, task_judge, cfg, widths[0], runner.embedder, mesh=mesh)
params, _, tokens, lens, seeds, judge_inputs, _ = runner._inputs(batch, 4, *widths)
state = jax.jit(searcher._init_state)(params, tokens, lens, seeds, judge_inputs)

real = {'policy_cache/k': state.rows.cache.k, 'policy_cache/v': state.rows.cache.v,
        'judge_cache/k': state.rows.judge.cache.k, 'judge_cache/v': state.rows.judge.cache.v}
for path, leaf in jax.tree_util.tree_flatten_with_path(state.trees)[0]:
  real['tree/' + sharding.path_name(path)] = leaf
compared, mismatches = [], []
for array in row['arrays']:
  x = real[array['name']]
  shard = x.addressable_shards[0].data
  got = {'shape': list(x.shape), 'per_device_shape': list(shard.shape),
         'per_device_bytes': int(shard.nbytes)}
  want = {k: array[k] for k in got}
  compared.append(array['name'])
  if got != want:
    mismatches.append({'name': array['name'], 'planned': want, 'real': got})
# The run path on the mesh: a vanilla batch through its AOT-compiled program (parameters
# placed in the layouts it chose) answers as on one device.
answers = {}
for name, where in (('mesh', mesh), ('one', sharding.make_mesh('1,1,1', devices=devices[:1]))):
  one_model = model if where is mesh else loading.load_model(hf_dir=hf_dir, tokenizer=tokenizer,
                                                             mesh=where)
  vanilla = engine.VanillaRunner(one_model, where, task, max_new_tokens=4)
  answers[name] = [r['response_ids'] for r in vanilla.run_batch(batch, 4)]
param_bytes = sum(int(x.addressable_shards[0].data.nbytes) for x in jax.tree.leaves(params))
print(json.dumps({'compared': compared, 'mismatches': mismatches,
                  'planned_params_gib': row['params_gib'],
                  'real_params_gib': round(param_bytes / 2 ** 30, 3),
                  'xla_arguments_gib': row['xla_arguments_gib'],
                  'fits': row['fits'], 'mesh': row['mesh'],
                  'vanilla_mesh': answers['mesh'], 'vanilla_one_device': answers['one']}))
