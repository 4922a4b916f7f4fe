"""LoRA (Hu et al., 2021) on the LLaMA projections: low-rank updates, added and merged.

A LoRA update of projection `name` (wq, wk, wv, wo, w_gate, w_up, w_down) is a sibling
module `<name>_lora` of the projection in the parameter tree, with a [in, r] and
b [r, out] (one more leading layer axis [L] in the stacked layout):

    y = x @ kernel + (alpha / r) * (x @ a) @ b

`models.llama` applies it when called with the spec (`lora=`); `merge` folds it into the
kernels, giving an ordinary parameter tree that `rain_jax.run` loads like any other.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import traverse_util

from models import llama

PROJECTIONS = ('wq', 'wk', 'wv', 'wo', 'w_gate', 'w_up', 'w_down')
SUFFIX = '_lora'


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """rank r >= 1, alpha (the update is scaled by alpha / r), targets: projection names."""
  rank: int
  alpha: float
  targets: tuple = PROJECTIONS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'LoRA rank must be >= 1, got {self.rank}')
    unknown = sorted(set(self.targets) - set(PROJECTIONS))
    if unknown or not self.targets:
      raise ValueError(f'LoRA targets must be a non-empty subset of {list(PROJECTIONS)}, '
                       f'got {list(self.targets)}')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def is_lora_path(path: tuple) -> bool:
  """True for the leaves of LoRA updates (a path through a `<name>_lora` module)."""
  return any(str(part).endswith(SUFFIX) for part in path)


def lora_shapes(config: llama.LlamaConfig, spec: LoraSpec):
  """The full parameter tree with the LoRA updates, as ShapeDtypeStructs."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda rng: llama.Llama(config, spec).init(
      rng, tokens, tokens, None, None, jnp.ones((1, 1, 1), bool))['params'],
                        jax.random.PRNGKey(0))


def init_updates(config: llama.LlamaConfig, spec: LoraSpec, rng):
  """{path: array} of fresh LoRA leaves only: a ~ N(0, 1/in), b = 0 (flattened paths)."""
  shapes = traverse_util.flatten_dict(lora_shapes(config, spec))
  paths = sorted(p for p in shapes if is_lora_path(p))
  keys = jax.random.split(rng, len(paths))
  updates = {}
  for key, path in zip(keys, paths):
    shape, dtype = shapes[path].shape, shapes[path].dtype
    if path[-1] == 'a':
      updates[path] = jax.random.normal(key, shape, jnp.float32) * shape[-2] ** -0.5
    else:
      updates[path] = jnp.zeros(shape, jnp.float32)
    updates[path] = updates[path].astype(dtype)
  return updates


def merge(params, spec: LoraSpec):
  """The parameter tree with every LoRA update folded into its kernel and removed:
  kernel + (alpha / r) * a @ b, computed in float32, cast to the kernel's dtype."""
  flat = traverse_util.flatten_dict(params)
  merged = {p: v for p, v in flat.items() if not is_lora_path(p)}
  for path, a in flat.items():
    if not is_lora_path(path) or path[-1] != 'a':
      continue
    module = path[-2]
    b = flat[path[:-1] + ('b',)]
    kernel_path = path[:-2] + (module[:-len(SUFFIX)], 'kernel')
    kernel = merged[kernel_path]
    delta = jnp.einsum('...ir,...ro->...io', a.astype(jnp.float32), b.astype(jnp.float32))
    merged[kernel_path] = (kernel.astype(jnp.float32) + spec.scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(merged)
