"""LLaMA-family decoder in Flax linen, pure-functional, with an explicit KV cache.

One forward pass serves prefill, cached decoding and tree-shaped attention: the caller
passes per-row positions, per-row cache write offsets and an explicit attention mask.

Shapes: B batch rows, T new tokens per row, S cache slots, L layers, H hidden size,
NH query heads, KVH key/value heads, D head dim, F MLP size, V vocabulary.
Parameter names and layouts are documented in docs/engine.md §1.
"""
import dataclasses
import json
from typing import Any, NamedTuple, Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def as_dtype(name):
  """Maps 'float32' / 'bfloat16' / 'float16' to a jnp dtype (clear error otherwise)."""
  if name not in _DTYPES:
    raise ValueError(f'unknown dtype {name!r}; expected one of {sorted(_DTYPES)}')
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of one LLaMA-family model."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-6
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True

  def __post_init__(self):
    as_dtype(self.dtype)
    as_dtype(self.param_dtype)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'head_dim={self.head_dim} must be even for rotary embeddings')

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def to_json(self):
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_json(cls, text):
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
      raise ValueError(f'unknown LlamaConfig fields: {sorted(unknown)}')
    return cls(**fields)

  @property
  def num_params(self):
    h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * h * f + 2 * h
    head = 0 if self.tie_embeddings else h * v
    return v * h + self.num_layers * per_layer + h + head


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer: k, v [L, B, KVH, S, D] in the compute dtype.

  Head-major, the layout attention reads (one [S, D] matrix per row and head); a write
  touches only the new slots of one layer."""
  k: jax.Array
  v: jax.Array

  @property
  def max_len(self):
    return self.k.shape[3]

  @property
  def batch_size(self):
    return self.k.shape[1]


def cache_shape(config: LlamaConfig, batch_size: int, max_len: int) -> tuple:
  """[L, B, KVH, S, D]: the shape of each of KVCache.k and KVCache.v."""
  return (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """A zeroed cache of `max_len` slots for `batch_size` rows."""
  dtype = as_dtype(dtype or config.dtype)
  shape = cache_shape(config, batch_size, max_len)
  return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32, cast back to the compute dtype."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


def rotary_cos_sin(positions, head_dim, theta):
  """cos, sin [B, T, D] for integer positions [B, T] (HF rotate_half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
  """Rotates x [B, T, heads, D] by cos/sin [B, T, D] (float32 math)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def write_cache_rows(layer_cache, new, layer, write_index):
  """Writes new [B, T, KVH, D] into layer_cache [L, B, KVH, S, D] at layer `layer`.

  write_index: [B] (token t of row b goes to slot write_index[b] + t) or [B, T] (an
  explicit slot per token). Slots past the end are dropped. Only the B*T*KVH new
  vectors are written (one scatter into the stacked cache, no copy of it).
  """
  batch, steps, heads = new.shape[:3]
  if write_index.ndim == 1:
    slots = write_index[:, None] + jnp.arange(steps)[None, :]
  else:
    slots = write_index
  rows = jnp.arange(batch)[:, None, None]
  head = jnp.arange(heads)[None, :, None]
  new = jnp.swapaxes(new, 1, 2).astype(layer_cache.dtype)  # [B, KVH, T, D]
  return layer_cache.at[layer, rows, head, slots[:, None, :]].set(new, mode='drop')


def attention_scores_to_output(q, k, v, attn_mask, num_kv_heads):
  """Grouped-query attention with a float32 softmax.

  q: [B, T, NH, D]; k, v: [B, KVH, S, D] (the cache layout); attn_mask: [B, T, S] bool
  -> [B, T, NH, D].
  """
  b, t, nh, d = q.shape
  group = nh // num_kv_heads
  q = q.reshape(b, t, num_kv_heads, group, d)
  scores = jnp.einsum('btkgd,bksd->bkgts', q, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  scores = jnp.where(attn_mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bksd->btkgd', probs, v)
  return out.reshape(b, t, nh, d)


class LowRank(nn.Module):
  """The LoRA update of one projection: scale * (x @ a) @ b, a [in, r], b [r, out].

  b starts at zero, so a freshly added update leaves the model unchanged."""
  features: int
  rank: int
  scale: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    a = self.param('a', nn.initializers.normal(x.shape[-1] ** -0.5),
                   (x.shape[-1], self.rank), self.param_dtype)
    b = self.param('b', nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
    low = jnp.einsum('...h,hr->...r', x.astype(self.dtype), a.astype(self.dtype))
    update = jnp.einsum('...r,rf->...f', low, b.astype(self.dtype))
    return (update * self.scale).astype(self.dtype)


def projection(config: LlamaConfig, lora, x, features: int, name: str):
  """x @ kernel of the bias-free projection `name` (wq, wk, wv, wo, w_gate, w_up,
  w_down), plus its LoRA update (a sibling module `<name>_lora`) when `lora` (anything
  with .rank, .scale, .targets; models/lora.py LoraSpec) targets it. Call it from a
  compact method: the modules belong to the caller."""
  dtype, param_dtype = as_dtype(config.dtype), as_dtype(config.param_dtype)
  y = nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name)(x)
  if lora is not None and name in lora.targets:
    # The updates are float32 whatever the base weights' dtype: they are small, and the
    # optimizer needs their precision (a bf16 base with float32 updates is the usual
    # large-model LoRA).
    y = y + LowRank(features, lora.rank, lora.scale, dtype, jnp.float32,
                    name=f'{name}_lora')(x)
  return y


class Attention(nn.Module):
  config: LlamaConfig
  lora: Any = None

  @nn.compact
  def __call__(self, x, cos, sin, caches, layer, write_indices, attn_masks):
    """x: [B, T, H] -> ([B, T, H], caches with this layer's new keys/values written).

    caches: a tuple of G KVCaches; the T tokens are G consecutive groups, group g
    (attn_masks[g]: [B, T_g, S_g]) written into caches[g] at write_indices[g] and
    attending only caches[g]. caches None (whole-sequence mode, training): the T tokens
    attend only to each other (attn_masks: one [B, T, T]) and nothing is stored."""
    c = self.config
    dense = lambda n, name, inputs: projection(c, self.lora, inputs, n, name)
    b, t, _ = x.shape
    q = dense(c.num_heads * c.head_dim, 'wq', x).reshape(b, t, c.num_heads, c.head_dim)
    k = dense(c.num_kv_heads * c.head_dim, 'wk', x).reshape(b, t, c.num_kv_heads,
                                                             c.head_dim)
    v = dense(c.num_kv_heads * c.head_dim, 'wv', x).reshape(b, t, c.num_kv_heads,
                                                             c.head_dim)
    q = apply_rotary(q, cos, sin)
    k = apply_rotary(k, cos, sin)
    if caches is None:
      keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KVH, T, D]
      out = attention_scores_to_output(q, keys, values, attn_masks, c.num_kv_heads)
    else:
      outs, written, start = [], [], 0
      for cache, write_index, mask in zip(caches, write_indices, attn_masks):
        end = start + mask.shape[1]
        cache = KVCache(k=write_cache_rows(cache.k, k[:, start:end], layer, write_index),
                        v=write_cache_rows(cache.v, v[:, start:end], layer, write_index))
        outs.append(attention_scores_to_output(q[:, start:end], cache.k[layer],
                                               cache.v[layer], mask, c.num_kv_heads))
        written.append(cache)
        start = end
      out, caches = jnp.concatenate(outs, axis=1), tuple(written)
    out = dense(c.hidden_size, 'wo', out.reshape(b, t, c.num_heads * c.head_dim))
    return out, caches


class MLP(nn.Module):
  config: LlamaConfig
  lora: Any = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    gate = projection(c, self.lora, x, c.intermediate_size, 'w_gate')
    up = projection(c, self.lora, x, c.intermediate_size, 'w_up')
    return projection(c, self.lora, nn.silu(gate) * up, c.hidden_size, 'w_down')


class DecoderLayer(nn.Module):
  """Pre-norm attention + SwiGLU block. Call signature fits `nn.scan` (carry, broadcast)."""
  config: LlamaConfig
  lora: Any = None

  @nn.compact
  def __call__(self, carry, cos, sin, write_index, attn_mask):
    x, cache, layer = carry  # cache: a tuple of KVCaches (see Attention) or None
    c = self.config
    norm = lambda name: RMSNorm(c.rms_eps, as_dtype(c.dtype), as_dtype(c.param_dtype),
                                name=name)
    attn_out, cache = Attention(c, self.lora, name='attn')(norm('attn_norm')(x), cos, sin, cache,
                                                layer, write_index, attn_mask)
    x = x + attn_out
    x = x + MLP(c, self.lora, name='mlp')(norm('mlp_norm')(x))
    return (x, cache, layer + 1), None


class Llama(nn.Module):
  """The decoder. `__call__` is the one forward pass (see `forward`, `sequence_forward`).

  lora: None, or the LoRA updates the parameters carry (models/lora.py LoraSpec).
  remat: recompute each layer's activations in the backward pass (training memory)."""
  config: LlamaConfig
  lora: Any = None
  remat: bool = False

  @nn.compact
  def __call__(self, tokens, positions, cache, write_index, attn_mask, logits_index=None):
    """cache, write_index, attn_mask: one KVCache with its [B] / [B, T] write index and
    [B, T, S] mask, or tuples of them (the T tokens are consecutive groups, one per
    cache; see `forward_many`), or cache None (whole sequences, no cache)."""
    c = self.config
    single = isinstance(cache, KVCache)
    if single:
      cache, write_index, attn_mask = (cache,), (write_index,), (attn_mask,)
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=as_dtype(c.dtype),
                     param_dtype=as_dtype(c.param_dtype),
                     embedding_init=nn.initializers.normal(0.02), name='embed')
    x = embed(tokens)
    cos, sin = rotary_cos_sin(positions, c.head_dim, c.rope_theta)
    carry = (x, cache, jnp.int32(0))
    layer_class = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    if c.scan_layers:
      stack = nn.scan(layer_class, variable_axes={'params': 0},
                      split_rngs={'params': True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=c.num_layers)
      carry, _ = stack(c, self.lora, name='layers')(carry, cos, sin, write_index, attn_mask)
    else:
      for i in range(c.num_layers):
        carry, _ = layer_class(c, self.lora, name=f'layers_{i}')(carry, cos, sin,
                                                                  write_index, attn_mask)
    x, cache, _ = carry
    hidden = RMSNorm(c.rms_eps, as_dtype(c.dtype), as_dtype(c.param_dtype),
                     name='final_norm')(x)
    read = hidden
    if logits_index is not None:
      read = jnp.take_along_axis(hidden, logits_index[..., None], axis=1)
    if c.tie_embeddings:
      table = embed.variables['params']['embedding'].astype(hidden.dtype)
      logits = jnp.einsum('bth,vh->btv', read, table, preferred_element_type=jnp.float32)
    else:
      kernel = self.param('lm_head', nn.initializers.normal(0.02),
                          (c.hidden_size, c.vocab_size), as_dtype(c.param_dtype))
      logits = jnp.einsum('bth,hv->btv', read, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
    return logits, hidden, (cache[0] if single else cache)


def forward(config: LlamaConfig, params, tokens, positions, cache: KVCache, write_index,
            attn_mask, logits_index=None):
  """One forward pass over T new tokens per row, reading and writing the cache.

  Args:
    params: the parameter tree (docs/engine.md §1), without the {'params': ...} wrapper.
    tokens: [B, T] int32. positions: [B, T] int32 (rotary positions).
    cache: KVCache with k, v [L, B, KVH, S, D].
    write_index: [B] int32, row b's new keys/values go to slots write_index[b] + t; or
      [B, T] int32, an explicit slot for each new token (tree and stream layouts).
    attn_mask: [B, T, S] bool; True where query t of row b may read slot s (after the
      write, so it must include the new token's own slot).
    logits_index: optional [B, K] int32: compute logits only at these token indices
      (saves the vocabulary projection of positions nobody reads).
  Returns:
    logits [B, T, V] float32 ([B, K, V] with logits_index), hidden [B, T, H] (after the
    final norm), updated cache.
  """
  return Llama(config).apply({'params': params}, tokens, positions, cache, write_index,
                             attn_mask, logits_index)


class Feed(NamedTuple):
  """The arguments of one `forward` call over one cache (see `forward`); logits_index
  None reads the logits at every fed token."""
  tokens: jax.Array
  positions: jax.Array
  cache: KVCache
  write_index: jax.Array
  attn_mask: jax.Array
  logits_index: Optional[jax.Array] = None


def forward_many(config: LlamaConfig, params, feeds: Sequence[Feed]):
  """Several `forward` calls over different caches as one pass through the layers.

  Every feed has the same B rows; their tokens are concatenated along T, so the weights
  are read once for all of them (a RAIN simulation feeds the policy's cache and the
  judge's in the same pass), while each feed's tokens write and attend only their own
  cache, under their own mask. Returns one (logits, hidden, cache) per feed, each what
  `forward` returns for that feed alone (to float rounding of the shared matmuls).
  """
  offsets = np.cumsum([0] + [f.tokens.shape[1] for f in feeds])
  index = jnp.concatenate(
      [(jnp.broadcast_to(jnp.arange(f.tokens.shape[1]), f.tokens.shape)
        if f.logits_index is None else f.logits_index) + offset
       for f, offset in zip(feeds, offsets)], axis=1)
  logits, hidden, caches = Llama(config).apply(
      {'params': params}, jnp.concatenate([f.tokens for f in feeds], axis=1),
      jnp.concatenate([f.positions for f in feeds], axis=1), tuple(f.cache for f in feeds),
      tuple(f.write_index for f in feeds), tuple(f.attn_mask for f in feeds), index)
  reads = np.cumsum([0] + [f.tokens.shape[1] if f.logits_index is None
                           else f.logits_index.shape[1] for f in feeds])
  return tuple((logits[:, reads[g]:reads[g + 1]], hidden[:, offsets[g]:offsets[g + 1]],
                caches[g]) for g in range(len(feeds)))


def sequence_forward(config: LlamaConfig, params, tokens, positions, attn_mask,
                     logits_index=None, lora=None, remat=False):
  """Whole sequences without a cache (training, scoring): [B, T] tokens attend to each
  other as attn_mask [B, T, T] bool allows (causal and padding, the caller's choice).

  lora: the LoRA spec the parameters carry (their `<name>_lora` updates), or None.
  remat: recompute layer activations in the backward pass.
  Returns logits [B, T, V] float32 ([B, K, V] with logits_index [B, K]) and hidden
  [B, T, H]."""
  logits, hidden, _ = Llama(config, lora, remat).apply(
      {'params': params}, tokens, positions, None, None, attn_mask, logits_index)
  return logits, hidden


def init_params(config: LlamaConfig, rng):
  """Random parameters (normal 0.02 embeddings/head, lecun-normal kernels, unit norms)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  cache = init_cache(config, 1, 1)
  mask = jnp.ones((1, 1, 1), bool)
  variables = Llama(config).init(rng, tokens, tokens, cache, jnp.zeros((1,), jnp.int32),
                                 mask)
  return variables['params']


def param_shapes(config: LlamaConfig):
  """The parameter tree as jax.ShapeDtypeStruct leaves (no memory allocated)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def stack_layers(params, num_layers):
  """Unrolled layout (layers_0 … layers_{L-1}) -> scanned layout (layers with leading L)."""
  params = dict(params)
  per_layer = [params.pop(f'layers_{i}') for i in range(num_layers)]
  params['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


def unstack_layers(params, num_layers):
  """Scanned layout (layers with leading L) -> unrolled layout (layers_0 … layers_{L-1})."""
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(num_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
