"""Fine-tuning on RAIN's answers: SFT and DPO losses, the optimizer and the train step.

Pure functions over the model of models/llama.py (`sequence_forward`, no cache):

- SFT: mean negative log-likelihood of the answer tokens (rain_jax/train_data.py says
  which tokens), over all answer tokens of the optimizer step's batch.
- DPO (Rafailov et al., 2023): per pair, -log sigmoid(beta * ((log pi(y_w|x) -
  log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)))), mean over the step's pairs; log
  probabilities are sums over answer tokens; the reference is the starting model, whose
  log probabilities are computed once before training (`sequence_logprobs`).

Parameters are split into `trainable` (the LoRA updates, or every leaf for a full
fine-tune) and `frozen` (the rest); only `trainable` has gradients and optimizer state.
Both are nested dicts whose union is the model's parameter tree.

The train step takes a batch of shape [A, R, ...] (A micro-batches of R rows, gradient
accumulation) and sums the micro-batches' gradients of the step loss inside one jitted
call (lax.scan): A micro-batches give exactly the gradient of one batch of A * R rows.
The optimizer: global-norm clipping, then AdamW (b1 0.9, b2 0.95, weight decay on
matrices only) with linear warmup and cosine decay to 10% of the peak rate.
"""
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from models import llama, lora as lora_lib
from rain_jax import sharding

FINAL_LEARNING_RATE_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a training run optimises and how (everything the step's program depends on
  besides shapes)."""
  objective: str  # 'sft' | 'dpo'
  learning_rate: float
  total_steps: int
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  beta: float = 0.1
  lora: lora_lib.LoraSpec | None = None
  remat: bool = False


@flax.struct.dataclass
class TrainState:
  """step (int32 scalar: optimizer steps taken), trainable params, optimizer state."""
  step: jax.Array
  trainable: Any
  opt_state: Any


# ----------------------------------------------------------------------------- params


def split_params(params, lora_spec):
  """(trainable, frozen) nested dicts: LoRA leaves vs the rest, or (params, {}) when
  lora_spec is None (full fine-tune)."""
  if lora_spec is None:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  trainable = {p: v for p, v in flat.items() if lora_lib.is_lora_path(p)}
  frozen = {p: v for p, v in flat.items() if not lora_lib.is_lora_path(p)}
  if not trainable:
    raise ValueError('lora_spec given but the parameters hold no LoRA updates')
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join_params(trainable, frozen):
  """The model's parameter tree from its two parts."""
  if not frozen:
    return trainable
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                       **traverse_util.flatten_dict(trainable)})


# ----------------------------------------------------------------------------- losses


def causal_mask(lengths, width):
  """[N, W, W] bool: query q reads key k when k <= q and k < the row's length."""
  q = jnp.arange(width)[:, None]
  k = jnp.arange(width)[None, :]
  return (k <= q)[None] & (k[None] < lengths[:, None, None])


def answer_logprobs(config, params, rows, lora_spec=None, remat=False):
  """log p(answer token) [N, K] float32 at the rows' answer positions.

  rows: dict of tokens [N, W], lengths [N], logits_index [N, K], targets [N, K]
  (rain_jax/train_data.py encode_rows)."""
  tokens = rows['tokens']
  n, width = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (n, width))
  logits, _ = llama.sequence_forward(config, params, tokens, positions,
                                     causal_mask(rows['lengths'], width),
                                     logits_index=rows['logits_index'], lora=lora_spec,
                                     remat=remat)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, rows['targets'][..., None], axis=-1)[..., 0]


def sequence_logprobs(config, params, rows, lora_spec=None):
  """[N] float32: the log probability of each row's whole answer (sum over its tokens)."""
  return jnp.sum(answer_logprobs(config, params, rows, lora_spec) * rows['weights'], axis=-1)


def dpo_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
  """beta * (chosen log-ratio - rejected log-ratio), per pair."""
  return beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
  """-log sigmoid(dpo_logits) per pair (softplus form, stable for large margins)."""
  return jax.nn.softplus(-dpo_logits(policy_chosen, policy_rejected, ref_chosen,
                                     ref_rejected, beta))


def batch_terms(config, settings: Settings, params, rows):
  """Sums over the rows of one (micro-)batch: {'nll', 'tokens'} (SFT: every row; DPO:
  the chosen rows) and for DPO {'dpo', 'pairs', 'correct', 'margin'}. Rows of weight 0
  (row_weights, DPO: pair_weights) count for nothing.

  DPO rows: the first half chosen, the second half rejected (pair i = rows i, M + i), and
  rows['ref'] [2M] holds the reference model's sequence log probabilities."""
  logp = answer_logprobs(config, params, rows, settings.lora, settings.remat)
  token_logp = logp * rows['weights']
  if settings.objective == 'sft':
    return {'nll': -jnp.sum(token_logp), 'tokens': jnp.sum(rows['weights'])}
  seq = jnp.sum(token_logp, axis=-1)
  half = seq.shape[0] // 2
  pair_weight = rows['pair_weights']
  logits = dpo_logits(seq[:half], seq[half:], rows['ref'][:half], rows['ref'][half:],
                      settings.beta)
  losses = jax.nn.softplus(-logits)
  chosen_tokens = rows['weights'][:half]
  return {'dpo': jnp.sum(losses * pair_weight), 'pairs': jnp.sum(pair_weight),
          'correct': jnp.sum((logits > 0) * pair_weight),
          'margin': jnp.sum(logits / settings.beta * pair_weight),
          'nll': -jnp.sum(token_logp[:half] * pair_weight[:, None]),
          'tokens': jnp.sum(chosen_tokens * pair_weight[:, None])}


def step_loss(terms, totals, objective):
  """The optimised loss of a micro-batch's terms, normalised by the whole step's totals
  (so that micro-batch losses add up to the step loss)."""
  if objective == 'sft':
    return terms['nll'] / totals
  return terms['dpo'] / totals


# -------------------------------------------------------------------------- optimizer


def learning_rate_schedule(settings: Settings):
  """Linear warmup to the peak over warmup_steps, cosine decay to 10% at total_steps."""
  decay_steps = max(settings.total_steps, settings.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      0.0 if settings.warmup_steps else settings.learning_rate, settings.learning_rate,
      settings.warmup_steps, decay_steps,
      end_value=settings.learning_rate * FINAL_LEARNING_RATE_FRACTION)


def make_optimizer(settings: Settings) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW; weight decay only on leaves of 2 or more dimensions
  (not the norm scales)."""
  decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
  return optax.chain(
      optax.clip_by_global_norm(settings.max_grad_norm),
      optax.adamw(learning_rate_schedule(settings), b1=0.9, b2=0.95, eps=1e-8,
                  weight_decay=settings.weight_decay, mask=decay_mask))


def init_state(settings: Settings, trainable) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=make_optimizer(settings).init(trainable))


# ------------------------------------------------------------------------------ steps


def _totals(settings, batch):
  if settings.objective == 'sft':
    return jnp.sum(batch['weights'])
  return jnp.sum(batch['pair_weights'])


def train_step(config, settings: Settings, state: TrainState, frozen, batch):
  """One optimizer step over batch arrays [A, R, ...] (A micro-batches).

  Returns (new state, metrics): loss (the step's mean loss), grad_norm (before
  clipping), learning_rate (the rate this step used), tokens (answer tokens), and for
  DPO accuracy (share of pairs with a positive margin) and margin (mean log-ratio gap)."""
  optimizer = make_optimizer(settings)
  totals = _totals(settings, batch)

  def micro(grads, rows):
    def loss_of(trainable):
      terms = batch_terms(config, settings, join_params(trainable, frozen), rows)
      return step_loss(terms, totals, settings.objective), terms
    (loss, terms), g = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
    grads = jax.tree.map(lambda acc, x: acc + x.astype(jnp.float32), grads, g)
    return grads, (loss, terms)

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), state.trainable)
  grads, (losses, terms) = jax.lax.scan(micro, zeros, batch)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.trainable)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  terms = jax.tree.map(jnp.sum, terms)
  metrics = {'loss': jnp.sum(losses), 'grad_norm': optax.tree.norm(grads),
             'learning_rate': learning_rate_schedule(settings)(state.step),
             'tokens': terms['tokens'], 'nll_per_token': terms['nll'] / terms['tokens']}
  if settings.objective == 'dpo':
    metrics.update(accuracy=terms['correct'] / terms['pairs'],
                   margin=terms['margin'] / terms['pairs'])
  return TrainState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics


def eval_terms(config, settings: Settings, trainable, frozen, rows):
  """`batch_terms` of one batch of rows [R, ...] (sums; the caller adds batches up)."""
  return batch_terms(config, settings, join_params(trainable, frozen), rows)


# --------------------------------------------------------------------------- sharding


def batch_spec(mesh, rows: int, leading: int) -> PartitionSpec:
  """Rows over ('data', 'fsdp') after `leading` unsplit axes; ValueError when the rows
  do not divide (every device must get whole rows)."""
  split = mesh.shape['data'] * mesh.shape['fsdp']
  if rows % split:
    raise ValueError(f'{rows} rows per (micro-)batch do not divide over the mesh\'s '
                     f'data x fsdp = {split} devices; choose --batch_size / '
                     f'--grad_accum so that they do')
  return PartitionSpec(*([None] * leading), sharding.BATCH_AXES)


def tree_shardings(shapes, mesh, head_dim):
  """NamedShardings of a (partial) parameter tree by the partition rules."""
  if not shapes:
    return {}
  return sharding.param_shardings(shapes, mesh, head_dim=head_dim)


def state_shardings(settings: Settings, trainable_shapes, trainable_shardings, mesh):
  """TrainState of NamedShardings: optimizer moments sharded like their parameters,
  counters replicated."""
  replicated = NamedSharding(mesh, PartitionSpec())
  optimizer = make_optimizer(settings)
  opt_shapes = jax.eval_shape(optimizer.init, trainable_shapes)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes,
                              trainable_shardings,
                              transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, trainable=trainable_shardings, opt_state=opt)


def batch_shapes(settings: Settings, accumulation: int, rows: int, width: int,
                 answer_width: int) -> dict:
  """ShapeDtypeStructs of one step's batch [A, R, ...] (R rows per micro-batch: DPO
  rows are 2 per pair)."""
  a, r = accumulation, rows
  shapes = {'tokens': ((a, r, width), jnp.int32), 'lengths': ((a, r), jnp.int32),
            'logits_index': ((a, r, answer_width), jnp.int32),
            'targets': ((a, r, answer_width), jnp.int32),
            'weights': ((a, r, answer_width), jnp.float32)}
  if settings.objective == 'dpo':
    shapes.update(ref=((a, r), jnp.float32), pair_weights=((a, r // 2), jnp.float32))
  return {k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()}


def batch_shardings(mesh, shapes: dict, leading: int = 1) -> dict:
  """Every batch array split by rows over ('data', 'fsdp') (axis `leading`), except DPO's
  pair_weights, which every device needs whole (pairs span both halves of the rows)."""
  out = {}
  for name, s in shapes.items():
    if name == 'pair_weights':
      out[name] = NamedSharding(mesh, PartitionSpec())
    else:
      out[name] = NamedSharding(mesh, batch_spec(mesh, s.shape[leading], leading))
  return out


def compile_train_step(config, settings: Settings, mesh, trainable_shapes, frozen_shapes,
                       batch: dict):
  """The train step compiled for `mesh` from abstract arguments (no weights needed):
  returns (compiled, shardings of (state, frozen, batch)). The state is donated."""
  trainable_sh = tree_shardings(trainable_shapes, mesh, config.head_dim)
  frozen_sh = tree_shardings(frozen_shapes, mesh, config.head_dim)
  state_sh = state_shardings(settings, trainable_shapes, trainable_sh, mesh)
  batch_sh = batch_shardings(mesh, batch)
  replicated = NamedSharding(mesh, PartitionSpec())
  state_shapes = jax.eval_shape(lambda t: init_state(settings, t), trainable_shapes)
  with_sharding = lambda shapes, shardings: jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  step = jax.jit(lambda state, frozen, rows: train_step(config, settings, state, frozen, rows),
                 in_shardings=(state_sh, frozen_sh, batch_sh),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))
  compiled = step.lower(with_sharding(state_shapes, state_sh),
                        with_sharding(frozen_shapes, frozen_sh),
                        with_sharding(batch, batch_sh)).compile()
  return compiled, (state_sh, frozen_sh, batch_sh)
