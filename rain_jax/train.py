"""Command line: fine-tune the model on its own RAIN answers (SFT or DPO), then export it.

  python -m rain_jax.train --data=out/hh.jsonl --objective=sft --steps=100 --output=out/sft
  python -m rain_jax.train --flagfile=configs/distill/hh-sft.flags

Reads RAIN (and for DPO vanilla) result files of `python -m rain_jax.run`
(rain_jax/train_data.py), trains with optax on the same model code, mesh and partition
rules as inference (rain_jax/training.py), and writes to --output (a folder):

  train_config.json  the settings and data of the run (a restart must match them)
  metrics.jsonl      one line per step (split "train") and per evaluation ("heldout")
  checkpoints/<step> orbax checkpoints of the trainable params and optimizer state,
                     every --save_every steps and at the end; a restart (even after
                     kill -9) continues from the latest one, with the same batches
  model/             the trained model (LoRA merged), a rain_jax checkpoint:
                     python -m rain_jax.run --checkpoint=OUT/model --tokenizer=... (or
                     --model=<the registry name> --checkpoint=OUT/model)
  summary.json       held-out loss before / after, tokens/s, memory; also on stdout

A bad flag or data (no pairs, a file that is not results JSONL, prompts of another task)
gives a one-line error and exit status 1 before --output is touched.
"""
import json
import os
import resource
import sys
import time

from absl import app, flags, logging

from rain_jax import flag_table

FLAGS = flags.FLAGS
flag_table.define_flags(FLAGS, names=flag_table.MODEL_FLAGS + flag_table.DISTRIBUTED_FLAGS)
flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the '
                  'trained weights and optimizer state (float32: master weights; the '
                  'compute dtype is --dtype).')
flags.DEFINE_string('data', None, 'Result files of rain_jax.run (JSONL), comma-separated: '
                    'RAIN answers (SFT), RAIN and vanilla answers of the same prompts (DPO).')
flags.DEFINE_string('task', None, 'When set, the data must be prompts of this task.')
flags.DEFINE_enum('objective', 'sft', ['sft', 'dpo'], 'sft: imitate the RAIN answers; '
                  'dpo: prefer the RAIN answer to the vanilla one (Rafailov et al.).')
flags.DEFINE_string('pair_scores', None, 'DPO: scripts/evaluate.py --metric=harmless '
                    '--scores_out file; keep pairs whose RAIN answer the judge scores above '
                    'the vanilla one by more than --min_score_margin.')
flags.DEFINE_float('min_score_margin', 0.0, 'DPO with --pair_scores: see there.')
flags.DEFINE_float('heldout_fraction', 0.1, 'Share of example ids held out for evaluation '
                   '(by a hash of the id, rain_jax/train_data.py).')
flags.DEFINE_integer('steps', 100, 'Optimizer steps.')
flags.DEFINE_integer('batch_size', 8, 'Examples (SFT answers or DPO pairs) per optimizer step.')
flags.DEFINE_integer('grad_accum', 1, 'Micro-batches per step (gradient accumulation); '
                     'must divide --batch_size.')
flags.DEFINE_float('learning_rate', 1e-5, 'Peak learning rate.')
flags.DEFINE_integer('warmup_steps', 0, 'Linear warmup steps (then cosine decay to 10%).')
flags.DEFINE_float('weight_decay', 0.0, 'AdamW weight decay (matrices only).')
flags.DEFINE_float('max_grad_norm', 1.0, 'Clip gradients to this global norm.')
flags.DEFINE_float('beta', 0.1, 'DPO beta (strength of the reference-model tie).')
flags.DEFINE_integer('lora_rank', 0, 'LoRA rank; 0 = full fine-tune.')
flags.DEFINE_float('lora_alpha', 16.0, 'LoRA alpha (updates scaled by alpha / rank).')
flags.DEFINE_list('lora_modules', ['wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down'],
                  'Projections that get LoRA updates.')
flags.DEFINE_bool('remat', False, 'Recompute layer activations in the backward pass '
                  '(less memory, about a third more compute).')
flags.DEFINE_integer('eval_every', 50, 'Evaluate on the held-out split every N steps '
                     '(and before the first and after the last step).')
flags.DEFINE_integer('save_every', 50, 'Checkpoint every N steps (and after the last).')
flags.DEFINE_integer('keep_checkpoints', 2, 'Checkpoints kept (the newest).')
flags.DEFINE_integer('seed', 0, 'Seed of the batch order and of the LoRA initialisation.')
flags.DEFINE_integer('length_bucket', 64, 'Row widths round up to a multiple of this.')
flags.DEFINE_string('output', None, 'Output folder (created; a restart continues it).')

# Flags that decide what is trained: a restart must give the same ones (and --data must
# make the same examples: train_config.json keeps their digest).
RUN_FLAGS = ('model', 'checkpoint', 'hf_dir', 'gguf', 'dtype', 'param_dtype', 'data', 'task',
             'objective', 'pair_scores', 'min_score_margin', 'heldout_fraction', 'steps',
             'batch_size', 'grad_accum', 'learning_rate', 'warmup_steps', 'weight_decay',
             'max_grad_norm', 'beta', 'lora_rank', 'lora_alpha', 'lora_modules', 'seed')
CONFIG_FILE = 'train_config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
MODEL_DIR = 'model'
CHECKPOINT_DIR = 'checkpoints'
DEFAULT_MODEL = 'smollm2-135m-instruct'


class InputError(Exception):
  """A problem with the user's flags or files (reported as one line, exit 1)."""


def _check_flags():
  if not FLAGS.data:
    raise InputError('--data is required: result files of rain_jax.run, comma-separated')
  if not FLAGS.output:
    raise InputError('--output is required: the folder for checkpoints and the model')
  if os.path.exists(FLAGS.output) and not os.path.isdir(FLAGS.output):
    raise InputError(f'--output {FLAGS.output} is a file, not a folder')
  for name in ('steps', 'batch_size', 'grad_accum', 'eval_every', 'save_every',
               'keep_checkpoints', 'length_bucket'):
    if getattr(FLAGS, name) < 1:
      raise InputError(f'--{name} must be >= 1, got {getattr(FLAGS, name)}')
  if FLAGS.batch_size % FLAGS.grad_accum:
    raise InputError(f'--grad_accum={FLAGS.grad_accum} does not divide '
                     f'--batch_size={FLAGS.batch_size}')
  if FLAGS.lora_rank < 0:
    raise InputError(f'--lora_rank must be >= 0, got {FLAGS.lora_rank}')
  if FLAGS.learning_rate <= 0 or FLAGS.beta <= 0 or FLAGS.max_grad_norm <= 0:
    raise InputError('--learning_rate, --beta and --max_grad_norm must be > 0')
  if not 0 <= FLAGS.warmup_steps <= FLAGS.steps:
    raise InputError(f'--warmup_steps must be in [0, --steps], got {FLAGS.warmup_steps}')
  if FLAGS.pair_scores and FLAGS.objective != 'dpo':
    raise InputError('--pair_scores only applies to --objective=dpo')


def settings_from_flags():
  from models import lora
  from rain_jax import training
  spec = None
  if FLAGS.lora_rank:
    try:
      spec = lora.LoraSpec(FLAGS.lora_rank, FLAGS.lora_alpha, tuple(FLAGS.lora_modules))
    except ValueError as e:
      raise InputError(f'--lora_modules: {e}') from None
  return training.Settings(
      objective=FLAGS.objective, learning_rate=FLAGS.learning_rate, total_steps=FLAGS.steps,
      warmup_steps=FLAGS.warmup_steps, weight_decay=FLAGS.weight_decay,
      max_grad_norm=FLAGS.max_grad_norm, beta=FLAGS.beta, lora=spec, remat=FLAGS.remat)


def run_config():
  """What decides the training (compared on restart)."""
  return {name: getattr(FLAGS, name) for name in RUN_FLAGS}


def check_or_write_config(output, config, data_summary):
  """Writes train_config.json on the first start; a restart with other settings is an
  InputError naming the differences."""
  path = os.path.join(output, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    diffs = [f'--{k}: {saved["config"].get(k)!r} -> {v!r}' for k, v in config.items()
             if saved['config'].get(k) != v]
    if saved['data'].get('digest') != data_summary['digest']:
      diffs.append(f'the --data files now make other examples ({saved["data"].get("examples")}'
                   f' -> {data_summary["examples"]})')
    if diffs:
      raise InputError(f'--output {output} was trained with other settings ('
                       + '; '.join(diffs) + '); use a new --output')
    return
  os.makedirs(output, exist_ok=True)
  from rain_jax import results
  results.write_json_atomic(path, {'config': config, 'data': data_summary})


def _host_value(x):
  """A replicated (or fully addressable) array's value on this host, as a Python float."""
  import numpy as np
  return float(np.asarray(x.addressable_data(0)))


class MetricsLog:
  """metrics.jsonl: appended and fsynced per line; `truncate(step)` drops lines past a
  restored checkpoint so the curve continues from it."""

  def __init__(self, path, enabled=True):
    self.path, self.enabled = path, enabled

  def truncate(self, step):
    if not self.enabled or not os.path.exists(self.path):
      return
    from rain_jax import results
    kept = [row for _, row in results.read_jsonl_objects(self.path) if row['step'] <= step]
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(json.dumps(row) + '\n' for row in kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def write(self, row):
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
      f.flush()
      os.fsync(f.fileno())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    summary = _train()
  except (InputError, ValueError, FileNotFoundError, FileExistsError) as e:
    print(f'rain_jax.train: error: {e}', file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


def _start_distributed():
  from rain_jax import distributed
  coordinates = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if not FLAGS.distributed and all(c is None for c in coordinates):
    return
  try:
    distributed.initialize(*coordinates, peer_timeout_seconds=FLAGS.peer_timeout_seconds,
                           program='rain_jax.train')
  except distributed.DistributedError as e:
    raise InputError(str(e)) from None


def _load_data(tokenizer, vocab_size, config_max_len):
  from rain_jax import train_data
  paths = [p.strip() for p in FLAGS.data.split(',') if p.strip()]
  records = train_data.read_records(paths, FLAGS.task)
  scores = train_data.read_scores(FLAGS.pair_scores) if FLAGS.pair_scores else None
  examples = train_data.build_examples(records, FLAGS.objective, tokenizer, vocab_size,
                                       scores, FLAGS.min_score_margin)
  train, heldout = train_data.split(examples, FLAGS.heldout_fraction)
  width, answer_width = train_data.widths(examples, FLAGS.objective, FLAGS.length_bucket)
  if width > config_max_len:
    raise InputError(f'the longest prompt + answer needs {width} positions (padded), more '
                     f'than the model context of {config_max_len}')
  return train, heldout, width, answer_width, {
      'files': paths, 'task': records[0]['task'], 'records': len(records),
      'examples': len(examples), 'train': len(train), 'heldout': len(heldout),
      'heldout_ids': [e.id for e in heldout], 'width': width, 'answer_width': answer_width,
      'digest': train_data.digest(examples)}


def _train():
  # Imports here so that --help and flag errors do not pay for JAX start-up.
  _check_flags()
  _start_distributed()
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  import tqdm
  from flax import traverse_util
  from models import convert, lora as lora_lib
  from rain_jax import distributed, loading, programs, sharding, train_data, training

  cache = FLAGS.compilation_cache and distributed.process_cache_dir(
      os.path.expanduser(FLAGS.compilation_cache))
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
  settings = settings_from_flags()
  no_source = not (FLAGS.checkpoint or FLAGS.hf_dir or FLAGS.gguf)
  model = loading.describe_model(
      model=FLAGS.model or (DEFAULT_MODEL if no_source else None),
      checkpoint=FLAGS.checkpoint, hf_dir=FLAGS.hf_dir, gguf_path=FLAGS.gguf,
      tokenizer=FLAGS.tokenizer, dtype=FLAGS.dtype, scan_layers=FLAGS.scan_layers)
  config = model.config.replace(dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype)
  model.config = config
  train, heldout, width, answer_width, data_summary = _load_data(
      model.tokenizer, config.vocab_size, config.max_seq_len)
  mesh = sharding.make_mesh(FLAGS.mesh)
  rows_per_example = 1 if FLAGS.objective == 'sft' else 2
  micro = FLAGS.batch_size // FLAGS.grad_accum
  training.batch_spec(mesh, micro * rows_per_example, 1)  # checks the rows divide
  output = os.path.abspath(FLAGS.output)
  writes = jax.process_index() == 0
  if writes:
    check_or_write_config(output, run_config(), data_summary)
  distributed.barrier('train_config')
  metrics_log = MetricsLog(os.path.join(output, METRICS_FILE), enabled=writes)
  model_dir = os.path.join(output, MODEL_DIR)
  summary_path = os.path.join(output, SUMMARY_FILE)
  if os.path.exists(os.path.join(model_dir, convert.CONFIG_FILE)) and os.path.exists(
      summary_path):
    logging.info('%s is complete (trained and exported); nothing to do', output)
    with open(summary_path) as f:
      return json.load(f)

  # Shapes and shardings: the full tree (with LoRA updates when asked), split in two.
  if settings.lora:
    full_shapes = lora_lib.lora_shapes(config, settings.lora)
  else:
    from models import llama
    full_shapes = llama.param_shapes(config)
  trainable_shapes, frozen_shapes = training.split_params(full_shapes, settings.lora)
  batch = training.batch_shapes(settings, FLAGS.grad_accum, micro * rows_per_example, width,
                                answer_width)
  t0 = time.time()
  compiled, (state_sh, frozen_sh, batch_sh) = training.compile_train_step(
      config, settings, mesh, trainable_shapes, frozen_shapes, batch)
  compile_seconds = time.time() - t0
  step_memory = programs.MemoryUse.of(compiled).as_gib()
  logging.info('train step compiled in %.1f s: %s', compile_seconds, step_memory)

  # Weights: the starting model on the step's shardings (the frozen part's for LoRA, the
  # trainable part's for a full fine-tune); LoRA updates added fresh.
  base_sh = frozen_sh if settings.lora else state_sh.trainable
  frozen = loading.load_params(model, base_sh)
  if settings.lora:
    updates = lora_lib.init_updates(config, settings.lora, jax.random.PRNGKey(FLAGS.seed))
    trainable = jax.device_put(traverse_util.unflatten_dict(updates), state_sh.trainable)
  else:
    trainable, frozen = frozen, {}

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(arrays, leading):
    """Host numpy batch arrays -> global arrays on their shardings (every process holds
    the same numpy arrays; each places its devices' rows)."""
    shardings = training.batch_shardings(mesh, arrays, leading)
    return {name: jax.make_array_from_callback(value.shape, shardings[name],
                                               lambda i, v=value: v[i])
            for name, value in arrays.items()}

  def padded_chunks(examples, size):
    """(chunk, chunk padded to `size` with copies of its first example) of `examples`."""
    for i in range(0, len(examples), size):
      chunk = examples[i:i + size]
      yield chunk, chunk + [chunk[0]] * (size - len(chunk))

  # DPO: the reference model's log probabilities, once, with the starting weights.
  reference = {}
  eval_rows = max(micro * rows_per_example, mesh.shape['data'] * mesh.shape['fsdp'])
  if settings.objective == 'dpo':
    score = jax.jit(lambda params, rows: training.sequence_logprobs(config, params, rows),
                    out_shardings=replicated)
    # The starting model is the base weights (fresh LoRA updates are zero, b = 0).
    start_params = frozen if settings.lora else trainable
    for examples in (train, heldout):
      for chunk, padded in padded_chunks(examples, micro):
        arrays = train_data.encode_examples(padded, 'dpo', width, answer_width)
        logp = np.asarray(score(start_params, put(arrays, 0)).addressable_data(0))
        for j, e in enumerate(chunk):
          reference[e.id] = (float(logp[j]), float(logp[micro + j]))
    del start_params

  def encode(examples):
    arrays = train_data.encode_examples(examples, FLAGS.objective, width, answer_width)
    if settings.objective == 'dpo':
      n = len(examples)
      arrays['ref'] = np.array([reference[e.id][0] for e in examples]
                               + [reference[e.id][1] for e in examples], np.float32)
      arrays['pair_weights'] = np.ones((n,), np.float32)
    return arrays

  def step_batch(step):
    chosen = train_data.batch_order(len(train), FLAGS.batch_size, step, FLAGS.seed)
    micro_batches = []
    for a in range(FLAGS.grad_accum):
      part = [train[int(i)] for i in chosen[a * micro:(a + 1) * micro]]
      micro_batches.append(encode(part))  # DPO: chosen rows, then rejected rows
    stacked = {k: np.stack([m[k] for m in micro_batches]) for k in micro_batches[0]}
    return put(stacked, 1), int(stacked['lengths'].sum()), int(stacked['weights'].sum())

  evaluate_rows = jax.jit(
      lambda trainable, frozen, rows: training.eval_terms(config, settings, trainable, frozen,
                                                          rows),
      out_shardings=replicated)

  def evaluate(state_trainable):
    """Held-out sums -> {'nll_per_token', 'loglik_per_token', and DPO 'loss', ...}."""
    if not heldout:
      return None
    totals = {}
    for chunk, padded in padded_chunks(heldout, eval_rows // rows_per_example):
      arrays = encode(padded)
      if settings.objective == 'sft':
        arrays['weights'][len(chunk):] = 0.0
      else:
        arrays['pair_weights'][len(chunk):] = 0.0
      terms = evaluate_rows(state_trainable, frozen, put(arrays, 0))
      for k, v in terms.items():
        totals[k] = totals.get(k, 0.0) + _host_value(v)
    out = {'nll_per_token': totals['nll'] / totals['tokens'],
           'loglik_per_token': -totals['nll'] / totals['tokens'], 'tokens': totals['tokens']}
    if settings.objective == 'dpo':
      out.update(loss=totals['dpo'] / totals['pairs'],
                 accuracy=totals['correct'] / totals['pairs'],
                 margin=totals['margin'] / totals['pairs'])
    else:
      out['loss'] = out['nll_per_token']
    return out

  # Optimizer state; a checkpoint, when there is one, replaces the fresh state.
  init = jax.jit(lambda t: training.init_state(settings, t), out_shardings=state_sh)
  state = init(trainable)
  del trainable
  manager = ocp.CheckpointManager(
      os.path.join(output, CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=FLAGS.keep_checkpoints, create=True))
  restored_from = manager.latest_step()
  if restored_from is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    state = manager.restore(restored_from, args=ocp.args.StandardRestore(abstract))
    metrics_log.truncate(restored_from)
    logging.info('restored step %d from %s', restored_from, manager.directory)
  start = int(_host_value(state.step))

  heldout_before = None
  if start == 0:
    heldout_before = evaluate(state.trainable)
    if heldout_before:
      metrics_log.write({'step': 0, 'split': 'heldout', **heldout_before})
  step_seconds, processed_tokens, answer_tokens = [], 0, 0
  bar = tqdm.tqdm(total=FLAGS.steps, initial=start, desc=f'train {FLAGS.objective}',
                  unit='step', file=sys.stderr, disable=not writes, dynamic_ncols=True)
  for step in range(start, FLAGS.steps):
    arrays, n_tokens, n_answer = step_batch(step)
    t0 = time.time()
    state, metrics = compiled(state, frozen, arrays)
    metrics = {k: _host_value(v) for k, v in metrics.items()}
    seconds = time.time() - t0
    if step > start:  # the first call of a process also pays for loading the executable
      step_seconds.append(seconds)
      processed_tokens += n_tokens
      answer_tokens += n_answer
    if not np.isfinite(metrics['loss']):
      raise ValueError(f'step {step + 1}: the loss is {metrics["loss"]}; lower '
                       f'--learning_rate')
    row = {'step': step + 1, 'split': 'train', **metrics, 'seconds': seconds,
           'row_tokens': n_tokens}
    metrics_log.write(row)
    bar.set_postfix(loss=f'{metrics["loss"]:.4f}', tok_s=f'{n_tokens / seconds:.0f}')
    bar.update(1)
    done = step + 1
    if done % FLAGS.eval_every == 0 and done != FLAGS.steps:
      result = evaluate(state.trainable)
      if result:
        metrics_log.write({'step': done, 'split': 'heldout', **result})
    if done % FLAGS.save_every == 0 or done == FLAGS.steps:
      manager.save(done, args=ocp.args.StandardSave(state))
  bar.close()
  manager.wait_until_finished()
  heldout_after = evaluate(state.trainable)
  if heldout_after and start < FLAGS.steps:
    metrics_log.write({'step': FLAGS.steps, 'split': 'heldout', **heldout_after})

  # Export: LoRA merged into the kernels, an ordinary rain_jax checkpoint.
  params = training.join_params(state.trainable, frozen)
  if settings.lora:
    params = jax.jit(lambda p: lora_lib.merge(p, settings.lora),
                     out_shardings=base_sh)(params)
  if os.path.exists(model_dir):
    import shutil
    if writes:
      shutil.rmtree(model_dir)  # an export interrupted before summary.json was written
    distributed.barrier('train_export_clean')
  convert.save_params(params, model_dir, config)
  if heldout_before is None and os.path.exists(os.path.join(output, METRICS_FILE)):
    from rain_jax import results
    first = [row for _, row in results.read_jsonl_objects(os.path.join(output, METRICS_FILE))
             if row['split'] == 'heldout' and row['step'] == 0]
    heldout_before = {k: v for k, v in first[0].items() if k not in ('step', 'split')} \
        if first else None
  total_seconds = sum(step_seconds)
  summary = {
      'output': output, 'model': model.name, 'objective': FLAGS.objective,
      'lora_rank': FLAGS.lora_rank, 'steps': FLAGS.steps, 'resumed_from': restored_from,
      'data': {k: v for k, v in data_summary.items() if k != 'heldout_ids'},
      'heldout_before': heldout_before, 'heldout_after': heldout_after,
      'timed_steps': len(step_seconds),
      'seconds_per_step': total_seconds / len(step_seconds) if step_seconds else None,
      'tokens_per_second': processed_tokens / total_seconds if step_seconds else None,
      'answer_tokens_per_second': answer_tokens / total_seconds if step_seconds else None,
      'compile_seconds': compile_seconds, 'train_step_memory': step_memory,
      'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      'devices': jax.device_count(), 'mesh': dict(mesh.shape),
      'exported_model': model_dir,
  }
  if writes:
    from rain_jax import results
    results.write_json_atomic(summary_path, summary)
  return summary


if __name__ == '__main__':
  app.run(main)
