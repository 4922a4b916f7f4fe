"""Vanilla decoding: greedy or sampled, batched, in one jitted `lax.while_loop`.

Prompts of different lengths are right-padded; each row writes its cache at its own
positions, so a batch gives the same tokens as the prompts one by one. Sampling uses the
counter-based noise of `rain_jax.noise` (purpose VANILLA), so a row's draws depend only on
its seed and the step, never on its batch neighbours.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from models import llama
from rain_jax import kvcache, noise, stopping
from rain_jax.stopping import EOS, MAX_LENGTH, MAX_NEW_TOKENS, RUNNING, TURN_MARKER


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0, got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
  """tokens [B, N] (0 after a row stops), num_tokens [B] (stop token included),
  stop_reason [B] (index into stopping.STOP_REASONS)."""
  tokens: jax.Array
  num_tokens: jax.Array
  stop_reason: jax.Array


def truncate_logits(logits, top_k, top_p):
  """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits: [B, V] float32."""
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_tokens(logits, sampling: SamplingParams, seeds, step):
  """Next tokens [B] from logits [B, V]; seeds [B] uint32, step scalar int."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = truncate_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
  vocab = jnp.arange(logits.shape[-1])[None, :]
  u = noise.uniform(seeds[:, None], noise.VANILLA, 0, 0, step, vocab)
  return jnp.argmax(logits + noise.gumbel(u), axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """The static side of one `generate` program: max_new_tokens per row, cache_len slots
  S (>= prompt width; a row stops with 'max_length' when it fills them), sampling, and an
  optional NamedSharding for the KV cache."""
  max_new_tokens: int
  cache_len: int
  sampling: SamplingParams = SamplingParams()
  cache_sharding: Any = None


def generate_fn(config: llama.LlamaConfig, params, prompt_tokens, prompt_lengths, seeds,
                stop_sequences, eos_id, settings: DecodeSettings) -> Generation:
  """Decodes up to `settings.max_new_tokens` per row.

  Args:
    prompt_tokens: [B, P] int32, right-padded; prompt_lengths: [B] int32 (>= 1).
    seeds: [B] uint32 per-row seeds (used when sampling).
    stop_sequences: [M, W] int32 from `stopping.right_align` (a row stops with
      'turn_marker' when its generated tokens end with one).
    eos_id: scalar int32; a row stops after emitting it.
    settings: see DecodeSettings.
  """
  max_new_tokens, cache_len = settings.max_new_tokens, settings.cache_len
  sampling, cache_sharding = settings.sampling, settings.cache_sharding
  batch = prompt_tokens.shape[0]
  cache = llama.init_cache(config, batch, cache_len)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
  logits, _, cache = kvcache.prefill(config, params, prompt_tokens, prompt_lengths, cache)
  out = jnp.zeros((batch, max_new_tokens), jnp.int32)

  def record(step, token, out, reason):
    """Writes token [B] at column `step` for running rows; returns out, reason."""
    running = reason == RUNNING
    out = out.at[:, step].set(jnp.where(running, token, 0))
    new_reason = jnp.where(token == eos_id, EOS, RUNNING)
    new_reason = jnp.where((new_reason == RUNNING)
                           & stopping.window_matches(out, jnp.full((batch,), step),
                                                     stop_sequences),
                           TURN_MARKER, new_reason)
    new_reason = jnp.where((new_reason == RUNNING) & (step + 1 >= max_new_tokens),
                           MAX_NEW_TOKENS, new_reason)
    new_reason = jnp.where((new_reason == RUNNING)
                           & (prompt_lengths + step + 1 >= cache_len), MAX_LENGTH, new_reason)
    return out, jnp.where(running, new_reason, reason)

  first = sample_tokens(logits, sampling, seeds, 0)
  reason = jnp.full((batch,), RUNNING, jnp.int32)
  out, reason = record(0, first, out, reason)
  num = jnp.ones((batch,), jnp.int32)

  def cond(state):
    step, _, _, _, reason, _ = state
    return (step < max_new_tokens) & jnp.any(reason == RUNNING)

  def body(state):
    step, last, cache, out, reason, num = state
    positions = prompt_lengths + step - 1
    logits, _, cache = kvcache.decode(config, params, last, positions, cache)
    token = sample_tokens(logits, sampling, seeds, step)
    running = reason == RUNNING
    out, reason = record(step, token, out, reason)
    return step + 1, token, cache, out, reason, num + running.astype(jnp.int32)

  state = (jnp.int32(1), first, cache, out, reason, num)
  _, _, _, out, reason, num = jax.lax.while_loop(cond, body, state)
  return Generation(tokens=out, num_tokens=num, stop_reason=reason)


# The same, jitted with the config and settings static (generate_fn is for callers that
# jit it themselves, with shardings and parameter layouts: rain_jax.engine).
generate = jax.jit(generate_fn, static_argnames=('config', 'settings'))
