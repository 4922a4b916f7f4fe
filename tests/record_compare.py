"""Comparing result records across runs whose floats may differ in the last bits (a
batch of one vs a batch, fused vs separate model calls): the structure exactly, the
floats to a tolerance."""


def split_floats(value, floats):
  """`value` (JSON data) with every float replaced by None, the floats appended to
  `floats` in document order."""
  if isinstance(value, float):
    floats.append(value)
    return None
  if isinstance(value, dict):
    return {k: split_floats(v, floats) for k, v in value.items()}
  if isinstance(value, list):
    return [split_floats(v, floats) for v in value]
  return value
