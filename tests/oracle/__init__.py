"""Plain-Python test oracles: the reference RAIN algorithm and scripted fake models."""
