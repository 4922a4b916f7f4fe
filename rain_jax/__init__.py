"""rain_jax: RAIN inference-time alignment in JAX/Flax."""
