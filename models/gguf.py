"""A numpy reader for GGUF v2/v3 files (llama.cpp's weight format).

The file is memory-mapped: parsing reads only the header, metadata and tensor infos,
and `GGUFFile.load(name)` touches only that tensor's bytes. Supported tensor types
dequantize to float32: F32, F16, BF16, Q8_0, Q4_0, Q4_1. Other types parse (their
infos are listed) but `load` raises naming the type.

Layout facts (GGUF spec): little-endian; header = magic b"GGUF", uint32 version,
uint64 tensor count, uint64 metadata count; then metadata key/values, then tensor
infos (name, uint32 n_dims, uint64 dims[n_dims] fastest-varying first, uint32 type,
uint64 offset relative to the data section); the data section starts at the next
multiple of `general.alignment` (default 32) after the infos. A tensor with ggml dims
(ne0, ne1, ...) is the numpy row-major array of shape (..., ne1, ne0), so a weight
matrix stored as (in, out) ggml dims reads as numpy (out, in).
"""
import dataclasses
import os
import struct

import numpy as np

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32

# Metadata value types: id -> (name, struct format or None for string/array).
_VALUE_TYPES = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<?"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING = 8
_ARRAY = 9
_BOOL = 7

# ggml tensor types: id -> (name, elements per block, bytes per block).
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}


class GGUFError(ValueError):
  """A GGUF file is missing, truncated, corrupt or uses an unsupported feature."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives in the file.

  Attributes:
    name: tensor name, e.g. 'blk.0.attn_q.weight'.
    shape: numpy (row-major) shape, i.e. the ggml dims reversed.
    ggml_type: ggml type id (see GGML_TYPES).
    type_name: ggml type name, e.g. 'Q4_1'.
    offset: absolute byte offset of the tensor's data in the file.
    nbytes: size of the tensor's data in bytes.
  """
  name: str
  shape: tuple
  ggml_type: int
  type_name: str
  offset: int
  nbytes: int


class _Cursor:
  """Sequential little-endian reads from a byte buffer with bounds checks."""

  def __init__(self, buffer, path):
    self.buffer = buffer
    self.path = path
    self.offset = 0

  def _need(self, nbytes, what):
    if nbytes < 0 or self.offset + nbytes > len(self.buffer):
      raise GGUFError(
          f"{self.path}: truncated or corrupt GGUF file: {what} needs {nbytes} bytes at "
          f"offset {self.offset}, but the file has {len(self.buffer)} bytes")

  def scalar(self, fmt, what):
    size = struct.calcsize(fmt)
    self._need(size, what)
    (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
    self.offset += size
    return value

  def string(self, what):
    length = self.scalar("<Q", f"length of {what}")
    self._need(length, what)
    raw = bytes(self.buffer[self.offset:self.offset + length])
    self.offset += length
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

  def numeric_array(self, fmt, count, what):
    """`count` values of struct format `fmt` as a Python list."""
    dtype = np.dtype(fmt)
    self._need(count * dtype.itemsize, what)
    values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
    self.offset += count * dtype.itemsize
    return values.tolist()


def _read_value(cursor, value_type, key):
  """One metadata value of type id `value_type` (arrays become Python lists)."""
  if value_type not in _VALUE_TYPES:
    raise GGUFError(f"{cursor.path}: unknown metadata value type {value_type} for key {key!r}")
  if value_type == _STRING:
    return cursor.string(f"string value of {key!r}")
  if value_type == _ARRAY:
    item_type = cursor.scalar("<I", f"array item type of {key!r}")
    count = cursor.scalar("<Q", f"array length of {key!r}")
    if item_type not in _VALUE_TYPES:
      raise GGUFError(
          f"{cursor.path}: unknown array item type {item_type} for key {key!r}")
    if item_type in (_STRING, _ARRAY):
      return [_read_value(cursor, item_type, f"{key}[{i}]") for i in range(count)]
    return cursor.numeric_array(_VALUE_TYPES[item_type][1], count, f"array {key!r}")
  return cursor.scalar(_VALUE_TYPES[value_type][1], f"value of {key!r}")


def _open_buffer(path):
  """Read-only uint8 memmap of the whole file, with clear errors."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise GGUFError(f"{path}: GGUF file not found")
  if os.path.getsize(path) < 4:
    raise GGUFError(f"{path}: not a GGUF file (only {os.path.getsize(path)} bytes)")
  return np.memmap(path, dtype=np.uint8, mode="r")


def _read_header_and_metadata(buffer, path):
  """Parses the header and metadata; returns (cursor after metadata, tensor count, metadata)."""
  cursor = _Cursor(buffer, path)
  magic = bytes(buffer[:4])
  if magic != _MAGIC:
    raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {_MAGIC!r})")
  cursor.offset = 4
  version = cursor.scalar("<I", "version")
  if version not in _SUPPORTED_VERSIONS:
    if struct.unpack("<I", struct.pack(">I", version))[0] in _SUPPORTED_VERSIONS:
      raise GGUFError(f"{path}: big-endian GGUF files are not supported")
    raise GGUFError(
        f"{path}: unsupported GGUF version {version} (supported: {_SUPPORTED_VERSIONS})")
  tensor_count = cursor.scalar("<Q", "tensor count")
  kv_count = cursor.scalar("<Q", "metadata count")
  metadata = {}
  for i in range(kv_count):
    key = cursor.string(f"metadata key #{i}")
    if key in metadata:
      raise GGUFError(f"{path}: duplicate metadata key {key!r}")
    value_type = cursor.scalar("<I", f"value type of {key!r}")
    metadata[key] = _read_value(cursor, value_type, key)
  return cursor, tensor_count, metadata


def _tensor_nbytes(path, name, dims, ggml_type):
  """Byte size of a tensor with ggml dims `dims` (fastest first) and type `ggml_type`."""
  if ggml_type not in GGML_TYPES:
    raise GGUFError(f"{path}: tensor {name!r} has unknown ggml type id {ggml_type}")
  type_name, block_size, block_bytes = GGML_TYPES[ggml_type]
  if dims and dims[0] % block_size:
    raise GGUFError(
        f"{path}: tensor {name!r} of type {type_name} has first dim {dims[0]}, "
        f"not a multiple of its block size {block_size}")
  count = int(np.prod(dims, dtype=np.int64)) if dims else 1
  return count // block_size * block_bytes


def _read_tensor_infos(cursor, tensor_count, alignment):
  """Parses the tensor infos after the metadata; returns {name: TensorInfo}."""
  path = cursor.path
  raw_infos = []
  for i in range(tensor_count):
    name = cursor.string(f"name of tensor #{i}")
    n_dims = cursor.scalar("<I", f"dimension count of tensor {name!r}")
    if n_dims > 8:
      raise GGUFError(f"{path}: tensor {name!r} claims {n_dims} dimensions (corrupt file)")
    dims = [cursor.scalar("<Q", f"dims of tensor {name!r}") for _ in range(n_dims)]
    ggml_type = cursor.scalar("<I", f"type of tensor {name!r}")
    relative_offset = cursor.scalar("<Q", f"offset of tensor {name!r}")
    raw_infos.append((name, dims, ggml_type, relative_offset))
  data_start = -(-cursor.offset // alignment) * alignment
  file_size = len(cursor.buffer)
  tensors = {}
  for name, dims, ggml_type, relative_offset in raw_infos:
    if name in tensors:
      raise GGUFError(f"{path}: duplicate tensor name {name!r}")
    if relative_offset % alignment:
      raise GGUFError(
          f"{path}: tensor {name!r} offset {relative_offset} is not aligned to {alignment}")
    nbytes = _tensor_nbytes(path, name, dims, ggml_type)
    offset = data_start + relative_offset
    if offset + nbytes > file_size:
      raise GGUFError(
          f"{path}: truncated GGUF file: tensor {name!r} needs bytes {offset}..{offset + nbytes}"
          f" but the file has {file_size} bytes")
    tensors[name] = TensorInfo(
        name=name, shape=tuple(int(d) for d in reversed(dims)), ggml_type=ggml_type,
        type_name=GGML_TYPES[ggml_type][0], offset=offset, nbytes=nbytes)
  return tensors


def _split_nibbles(packed):
  """uint8 [N, 16] packed 4-bit values -> uint8 [N, 32]: low nibbles, then high nibbles."""
  return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)


def _f16_column(blocks, start):
  """float32 [N, 1] from the little-endian f16 at byte `start` of each block row."""
  return blocks[:, start:start + 2].copy().view("<f2").astype(np.float32)


def _dequantize_q8_0(blocks):
  """uint8 [N, 34] (f16 scale d, int8 q[32]) -> float32 [N, 32] = q * d."""
  scale = _f16_column(blocks, 0)
  quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
  return quants * scale


def _dequantize_q4_0(blocks):
  """uint8 [N, 18] (f16 scale d, 16 bytes of nibbles) -> float32 [N, 32] = (q - 8) * d."""
  scale = _f16_column(blocks, 0)
  quants = _split_nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
  return scale * quants.astype(np.float32)


def _dequantize_q4_1(blocks):
  """uint8 [N, 20] (f16 scale d, f16 min m, 16 bytes of nibbles) -> float32 [N, 32] = q*d + m."""
  scale = _f16_column(blocks, 0)
  minimum = _f16_column(blocks, 2)
  quants = _split_nibbles(blocks[:, 4:]).astype(np.float32)
  return scale * quants + minimum


def _dequantize_f32(blocks):
  return blocks.view("<f4").astype(np.float32, copy=False)


def _dequantize_f16(blocks):
  return blocks.view("<f2").astype(np.float32)


def _dequantize_bf16(blocks):
  """bfloat16 bits are the high half of float32 bits."""
  return (blocks.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


_DEQUANTIZERS = {
    0: _dequantize_f32,
    1: _dequantize_f16,
    30: _dequantize_bf16,
    8: _dequantize_q8_0,
    2: _dequantize_q4_0,
    3: _dequantize_q4_1,
}


class GGUFFile:
  """A parsed, memory-mapped GGUF file.

  Attributes:
    path: the file path.
    version: GGUF version (2 or 3).
    metadata: {key: value}; scalars are Python int/float/bool/str, arrays are lists.
    alignment: data alignment in bytes.
    tensors: {name: TensorInfo} in file order.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    buffer = _open_buffer(self.path)
    cursor, tensor_count, self.metadata = _read_header_and_metadata(buffer, self.path)
    self.version = struct.unpack_from("<I", buffer, 4)[0]
    self.alignment = self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(self.alignment, int) or self.alignment <= 0 or (
        self.alignment & (self.alignment - 1)):
      raise GGUFError(
          f"{self.path}: general.alignment must be a positive power of two, "
          f"got {self.alignment!r}")
    self.tensors = _read_tensor_infos(cursor, tensor_count, self.alignment)

  def load(self, name):
    """Dequantizes tensor `name` into a new float32 array of shape `tensors[name].shape`.

    Only this tensor's bytes are mapped, and only while they are read, so loading every
    tensor in turn keeps the resident memory at about one tensor.
    """
    if name not in self.tensors:
      raise KeyError(f"{self.path}: no tensor named {name!r}")
    info = self.tensors[name]
    if info.ggml_type not in _DEQUANTIZERS:
      supported = ", ".join(GGML_TYPES[t][0] for t in _DEQUANTIZERS)
      raise GGUFError(
          f"{self.path}: tensor {name!r} has type {info.type_name}, which this reader "
          f"cannot dequantize (supported: {supported})")
    _, _, block_bytes = GGML_TYPES[info.ggml_type]
    if info.nbytes == 0:
      return np.zeros(info.shape, np.float32)
    mapped = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset,
                       shape=(info.nbytes,))
    blocks = np.array(mapped).reshape(-1, block_bytes)
    del mapped
    return _DEQUANTIZERS[info.ggml_type](blocks).reshape(info.shape)


def read_gguf(path):
  """Parses the GGUF file at `path` (tensor data stays on disk until `load`)."""
  return GGUFFile(path)


def read_metadata(path):
  """Only the metadata {key: value} of the GGUF file at `path`."""
  path = os.fspath(path)
  _, _, metadata = _read_header_and_metadata(_open_buffer(path), path)
  return metadata
