"""GGUF files (llama.cpp's weight format), read through the `gguf` package.

What the `gguf` package (llama.cpp's own Python reader/writer) does here:
- `gguf.GGUFReader` memory-maps the file and parses the header, the metadata key/values
  and the tensor infos (GGUF v2 and v3).
- `gguf.quants.dequantize` turns a tensor's raw bytes into float32 for every type the
  package implements (gguf 0.19: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the
  K-quants Q2_K..Q6_K, so Q4_K_M / Q5_K_M files, which are Q4_K / Q5_K with some Q6_K
  tensors, the IQ and TQ types, MXFP4, NVFP4). A type it cannot dequantize (gguf 0.19:
  Q8_1, Q8_K, Q1_0, the integer types and F64) makes `GGUFFile.load` raise a GGUFError
  naming the tensor and the type.

What stays ours:
- `GGUFFile`: the metadata as plain Python values (`ReaderField.contents()`; nested
  arrays come back flattened, as the package gives them; no LLaMA key uses one), the
  tensor infos as `TensorInfo`, and `load(name)`, which maps only that tensor's bytes
  while they are dequantized, so loading every tensor in turn keeps about one tensor
  resident (the reader's own whole-file map is dropped once the infos are read).
- GGUFError messages naming the file (and the tensor), a check of the 8 header bytes
  so that a non-GGUF, big-endian or unknown-version file says so, and a small cache of
  parsed files: the package's metadata parse is slow (about 2 s for a 49k-token
  vocabulary), and one model load reads the same file three times (config, weights,
  tokenizer). The cache is keyed on the file's path, inode, size and mtime.
- Elsewhere: the GGUF -> our parameter names and the q/k rotary un-permute are in
  `models.convert` (`params_from_gguf`, `unpermute_rotary_rows`); the tokenizer built
  from `tokenizer.ggml.*` metadata is in `models.tokenizer`.

Layout fact (GGUF spec): a tensor with ggml dims (ne0, ne1, ...), fastest first, is the
numpy row-major array of shape (..., ne1, ne0), so a weight matrix stored with ggml dims
(in, out) reads as numpy (out, in).
"""
import dataclasses
import functools
import importlib.metadata
import os

import gguf as gguf_lib
import numpy as np

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_CACHED_FILES = 4


class GGUFError(ValueError):
  """A GGUF file is missing, truncated, corrupt or uses an unsupported feature."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives in the file.

  Attributes:
    name: tensor name, e.g. 'blk.0.attn_q.weight'.
    shape: numpy (row-major) shape, i.e. the ggml dims reversed.
    ggml_type: ggml type id (`gguf.GGMLQuantizationType` value).
    type_name: ggml type name, e.g. 'Q4_K'.
    offset: absolute byte offset of the tensor's data in the file.
    nbytes: size of the tensor's data in bytes.
  """
  name: str
  shape: tuple
  ggml_type: int
  type_name: str
  offset: int
  nbytes: int


def _package_version():
  return importlib.metadata.version("gguf")


def _check_header(path):
  """GGUFError unless `path` is a file starting with b"GGUF" and a supported version."""
  if not os.path.isfile(path):
    raise GGUFError(f"{path}: GGUF file not found")
  with open(path, "rb") as f:
    head = f.read(8)
  if len(head) < 4:
    raise GGUFError(f"{path}: not a GGUF file (only {len(head)} bytes)")
  if head[:4] != _MAGIC:
    raise GGUFError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {_MAGIC!r})")
  if len(head) < 8:
    raise GGUFError(f"{path}: truncated GGUF file ({len(head)} bytes)")
  version = int.from_bytes(head[4:], "little")
  if version in _SUPPORTED_VERSIONS:
    return
  if int.from_bytes(head[4:], "big") in _SUPPORTED_VERSIONS:
    raise GGUFError(f"{path}: big-endian GGUF files are not supported")
  raise GGUFError(
      f"{path}: unsupported GGUF version {version} (supported: {_SUPPORTED_VERSIONS})")


def _tensor_info(tensor):
  """TensorInfo of a `gguf.ReaderTensor` (whose `shape` holds the ggml dims)."""
  return TensorInfo(
      name=tensor.name, shape=tuple(int(d) for d in reversed(tensor.shape.tolist())),
      ggml_type=int(tensor.tensor_type), type_name=tensor.tensor_type.name,
      offset=int(tensor.data_offset), nbytes=int(tensor.n_bytes))


@functools.lru_cache(maxsize=_CACHED_FILES)
def _parse(path, identity):  # pylint: disable=unused-argument
  """(version, alignment, metadata, {name: TensorInfo}) of the GGUF file at `path`.

  `identity` (absolute path, device, inode, size, mtime) only keys the cache, so that a
  rewritten file is parsed again.
  """
  _check_header(path)
  try:
    reader = gguf_lib.GGUFReader(path)
  except (ValueError, KeyError, IndexError, OverflowError, TypeError) as e:
    raise GGUFError(
        f"{path}: truncated or corrupt GGUF file, or one that gguf {_package_version()} "
        f"cannot parse ({type(e).__name__}: {e})") from None
  metadata = {key: field.contents() for key, field in reader.fields.items()
              if not key.startswith("GGUF.")}
  version = reader.fields["GGUF.version"].contents()
  tensors = {tensor.name: _tensor_info(tensor) for tensor in reader.tensors}
  return version, int(reader.alignment), metadata, tensors


def _dequantize(path, info):
  """float32 array of shape `info.shape`: tensor `info` of the file at `path`, decoded.

  Maps only the tensor's bytes, and only while `gguf.quants.dequantize` reads them.
  """
  if info.nbytes == 0:
    return np.zeros(info.shape, np.float32)
  qtype = gguf_lib.GGMLQuantizationType(info.ggml_type)
  mapped = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset,
                     shape=(info.nbytes,))
  rows = mapped.reshape(*info.shape[:-1], -1) if info.shape else mapped
  try:
    values = gguf_lib.quants.dequantize(rows, qtype)
  except NotImplementedError:
    raise GGUFError(
        f"{path}: tensor {info.name!r} has type {info.type_name}, which gguf "
        f"{_package_version()} cannot dequantize") from None
  if np.may_share_memory(values, mapped):
    values = np.array(values)
  del rows, mapped
  return values.astype(np.float32, copy=False).reshape(info.shape)


class GGUFFile:
  """A parsed GGUF file; tensor data stays on disk until `load`.

  Attributes:
    path: the file path.
    version: GGUF version (2 or 3).
    metadata: {key: value}; scalars are Python int/float/bool/str, arrays are lists.
      The lists are shared with the parse cache: do not mutate them.
    alignment: data alignment in bytes.
    tensors: {name: TensorInfo} in file order.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise GGUFError(f"{self.path}: GGUF file not found")
    stat = os.stat(self.path)
    identity = (os.path.abspath(self.path), stat.st_dev, stat.st_ino, stat.st_size,
                stat.st_mtime_ns)
    self.version, self.alignment, metadata, self.tensors = _parse(self.path, identity)
    self.metadata = dict(metadata)

  def load(self, name):
    """Dequantizes tensor `name` into a new float32 array of shape `tensors[name].shape`."""
    if name not in self.tensors:
      raise KeyError(f"{self.path}: no tensor named {name!r}")
    return _dequantize(self.path, self.tensors[name])


def read_gguf(path):
  """Parses the GGUF file at `path` (tensor data stays on disk until `load`)."""
  return GGUFFile(path)


def read_metadata(path):
  """Only the metadata {key: value} of the GGUF file at `path`."""
  return read_gguf(path).metadata
