"""Counter-based noise: every random draw is a pure function of integers.

`uniform(seed, purpose, a, b, c, token)` hashes six uint32 counters into a float32 in
(0, 1). Because no PRNG state is threaded through the search, the same seed gives the
same draws whatever the batch size, device count or mesh, and a plain-Python model can
replay them exactly (`uniform_py`). The counter layout is documented in docs/engine.md §3.

Sampling uses the Gumbel-max trick: argmax_v (z_v / t + gumbel(u_v)) draws v from
softmax(z / t); restricting the argmax to an allowed set samples the renormalised
distribution over that set.
"""
import numpy as np
import jax.numpy as jnp

# Draw purposes (docs/engine.md §3).
PROPOSE = 1
ROLLOUT = 2
WIDEN = 3
VANILLA = 4

_GOLDEN = 0x9E3779B1
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def _mix_jax(x):
  """lowbias32 finaliser on uint32 arrays."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(_M1)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(_M2)
  x = x ^ (x >> 16)
  return x


def uniform(seed, purpose, a, b, c, token):
  """Float32 uniforms in (0, 1); arguments are broadcastable integer arrays."""
  h = _mix_jax(jnp.asarray(seed).astype(jnp.uint32) ^ jnp.uint32(0xA511E9B3))
  for counter in (purpose, a, b, c, token):
    h = _mix_jax(h + jnp.asarray(counter).astype(jnp.uint32) * jnp.uint32(_GOLDEN))
  return ((h >> 8).astype(jnp.float32) + 0.5) * jnp.float32(1.0 / (1 << 24))


def gumbel(u):
  return -jnp.log(-jnp.log(u))


def _mix_py(x):
  x &= 0xFFFFFFFF
  x ^= x >> 16
  x = (x * _M1) & 0xFFFFFFFF
  x ^= x >> 15
  x = (x * _M2) & 0xFFFFFFFF
  x ^= x >> 16
  return x


def uniform_py(seed, purpose, a, b, c, token):
  """Plain-Python replica of `uniform` for scalar integer arguments (returns float32)."""
  h = _mix_py((seed & 0xFFFFFFFF) ^ 0xA511E9B3)
  for counter in (purpose, a, b, c, token):
    h = _mix_py(h + (counter & 0xFFFFFFFF) * _GOLDEN)
  return np.float32(((h >> 8) + 0.5) * (1.0 / (1 << 24)))


def gumbel_py(u):
  u = np.float32(u)
  return np.float32(-np.log(-np.log(u)))


def row_seed(run_seed: int, example_index: int) -> int:
  """The uint32 seed of one example: the run seed mixed with its dataset index."""
  return _mix_py(_mix_py((run_seed & 0xFFFFFFFF) ^ 0x5EED5EED) + (example_index & 0xFFFFFFFF)
                 * _GOLDEN)
