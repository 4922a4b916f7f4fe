"""Flax model ports, weight conversion and tokenizers."""
