"""Binomial confidence intervals."""
import math

Z_95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: float, trials: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval (lower, upper) for a binomial proportion successes / trials.

  `successes` may be fractional (ties counted as half a success). Raises ValueError for
  trials < 1 or successes outside [0, trials].
  """
  if trials < 1:
    raise ValueError(f'a confidence interval needs at least one trial, got {trials}')
  if not 0 <= successes <= trials:
    raise ValueError(f'successes={successes} is outside [0, {trials}]')
  p = successes / trials
  z2 = z * z
  denominator = 1 + z2 / trials
  center = (p + z2 / (2 * trials)) / denominator
  half = z / denominator * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
  return max(0.0, center - half), min(1.0, center + half)
