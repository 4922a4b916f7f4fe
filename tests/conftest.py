"""Shared pytest fixtures."""
import pytest

from models import registry


@pytest.fixture(scope="session")
def smollm2_gguf_path():
  """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF (fetched once per cache)."""
  return registry.smollm2_gguf_path()
