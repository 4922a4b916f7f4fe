"""Weights into our parameter layout (docs/engine.md §1): GGUF, HF safetensors, orbax.

Every loader streams: each process reads from disk only the part of one tensor that its
own devices hold (safetensors: byte ranges of the rows it needs, whole rows, cut to its
columns as they arrive, so a tensor split only by columns is read whole, a block of rows
at a time; GGUF: one whole tensor), converts it on the host (transpose, q/k un-permute, dtype cast) and puts it
straight into a global jax.Array with its target sharding, so host memory peaks at a few
copies of one tensor's local shard, never the whole model. In the stacked
(`scan_layers=True`) layout each [L, ...] leaf is preallocated on the devices, sharded,
and layer i is written in place by a jitted `.at[i].set` that donates the buffer, so the
devices never hold two copies of a leaf.

Checkpoints (`save_params`, `convert_weights`, `restore_params`) are directories holding
our `config.json` and `tensors/`: one orbax checkpoint per tensor of the unrolled layout
(`tensors/embed.embedding`, `tensors/layers_3.attn.wq.kernel`, ...), written one tensor
at a time, every process writing its own shards. The checkpoint's `scan_layers` only
records the layout it was made from: either layout restores into either, straight into
the target shardings, one tensor at a time. Older checkpoints with one orbax tree in
`params/` (stacked or unrolled) restore the same way.

Completeness. On a local (or mounted) file system a save is assembled in a temporary
sibling directory and renamed into place once complete. Object stores (gs://) cannot
rename folders: there every tensor checkpoint is finalised by orbax (its commit marker)
and `config.json` is written last, after all processes finished; `restore_params`
refuses a checkpoint without `config.json` or with a tensor that is missing or that orbax
does not consider finalised. Paths go through `etils.epath`, so gs:// works wherever
orbax and epath reach it (gcsfs).
"""
import functools
import importlib.util
import json
import os
import secrets

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from models import gguf
from models.llama import LlamaConfig, as_dtype, param_shapes

CONFIG_FILE = "config.json"
TENSORS_DIR = "tensors"
PARAMS_DIR = "params"  # the single-tree layout of older checkpoints (still restored)
# Per-layer leaves: our path inside a layer -> (HF name suffix, GGUF name suffix).
_LAYER_SOURCES = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "attn_norm.weight"),
    ("attn", "wq", "kernel"): ("self_attn.q_proj.weight", "attn_q.weight"),
    ("attn", "wk", "kernel"): ("self_attn.k_proj.weight", "attn_k.weight"),
    ("attn", "wv", "kernel"): ("self_attn.v_proj.weight", "attn_v.weight"),
    ("attn", "wo", "kernel"): ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp", "w_gate", "kernel"): ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp", "w_up", "kernel"): ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp", "w_down", "kernel"): ("mlp.down_proj.weight", "ffn_down.weight"),
}
# Leaves outside the layers: first path element -> (HF name, GGUF name).
_TOP_SOURCES = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "final_norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}


def _source_name(path, layer, fmt):
  """Checkpoint tensor name for our leaf `path` (layer-relative when `layer` is set).

  fmt: 0 for HF names, 1 for GGUF names.
  """
  if layer is None:
    return _TOP_SOURCES[path[0]][fmt]
  suffix = _LAYER_SOURCES[tuple(path)][fmt]
  return f"model.layers.{layer}.{suffix}" if fmt == 0 else f"blk.{layer}.{suffix}"


def _is_matrix(path):
  """Whether our leaf is a kernel stored transposed in checkpoints (HF / GGUF (out, in))."""
  return path[-1] == "kernel" or path[0] == "lm_head"


def _expected_source_shape(path, our_shape):
  """Checkpoint (out, in) shape of a leaf whose shape in our layout is `our_shape`."""
  return tuple(reversed(our_shape)) if _is_matrix(path) else tuple(our_shape)


def _to_our_layout(array, path, dtype):
  """Checkpoint tensor -> our layout: kernels [in, out] (transposed), C-order, `dtype`."""
  if _is_matrix(path):
    return np.array(array.T, dtype=dtype, order="C")
  return np.asarray(array, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Paths.


def _gcs_backend_available():
  """Whether etils.epath can reach gs:// here: through gcsfs, or TensorFlow's gfile."""
  return any(importlib.util.find_spec(name) is not None for name in ("gcsfs", "tensorflow"))


def as_path(path):
  """`path` (str, os.PathLike or epath.Path; local or gs://...) as an epath.Path.

  Raises ValueError for a gs:// path when nothing here can reach Cloud Storage.
  """
  if isinstance(path, epath.Path):
    return path
  text = os.fspath(path)
  if text.startswith("gs://") and not _gcs_backend_available():
    raise ValueError(f"{text}: gs:// paths need the gcsfs package (pip install gcsfs, or "
                     f"the [tpu] extra)")
  return epath.Path(text)


def is_remote(path):
  """Whether `path` names an object store (gs://...), where folders cannot be renamed."""
  return "://" in os.fspath(path)


# ----------------------------------------------------------------------------------------
# Streaming assembly onto devices.


def _default_sharding():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _layer_slice_sharding(sharding, path):
  """The sharding of one layer's slice [...] of a stacked leaf [L, ...] with `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * (1 - len(sharding.spec))
    if spec[0] is not None:
      raise ValueError(f"parameter {'/'.join(path)}: sharding the layer axis ({sharding.spec})"
                       " is not supported; shard the other axes")
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  if len(sharding.device_set) == 1:
    return sharding
  raise ValueError(f"parameter {'/'.join(path)}: stacked layers need a NamedSharding or a "
                   f"single-device sharding, got {sharding}")


def _stacked_sharding(sharding, path):
  """The sharding of a stacked leaf [L, ...] whose layers each have `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(None, *sharding.spec))
  if len(sharding.device_set) == 1:
    return sharding
  raise ValueError(f"parameter {'/'.join(path)}: stacked layers need a NamedSharding or a "
                   f"single-device sharding, got {sharding}")


@functools.lru_cache(maxsize=None)
def _zeros_on_devices(shape, dtype, sharding):
  """A jitted () -> zeros(shape, dtype) laid out with `sharding` (no host copy)."""
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_setter(sharding):
  """A jitted (stacked [L, ...], value [...], i) -> stacked.at[i].set(value), donating stacked."""

  def set_layer(stacked, value, index):
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), index,
                                               axis=0)

  return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_getter(sharding):
  """A jitted (stacked [L, ...], i) -> stacked[i], laid out with `sharding`."""

  def get_layer(stacked, index):
    return jax.lax.dynamic_index_in_dim(stacked, index, axis=0, keepdims=False)

  return jax.jit(get_layer, out_shardings=sharding)


def _flat_shardings(shardings, flat_shapes):
  """Flattens a shardings pytree and checks it names exactly the parameters."""
  if shardings is None:
    default = _default_sharding()
    return {path: default for path in flat_shapes}
  flat = traverse_util.flatten_dict(shardings)
  if set(flat) != set(flat_shapes):
    missing = sorted("/".join(p) for p in set(flat_shapes) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(flat_shapes))
    raise ValueError(f"shardings do not match the parameters: missing {missing}, "
                     f"unexpected {extra}")
  return flat


def _array_from_reader(shape, sharding, read):
  """A global jax.Array of `shape` laid out with `sharding`, built from host slices.

  read(bounds) returns the block ((start, stop) per dimension) of the array as a numpy
  array; it is called once per distinct block this process's devices hold, so a process
  never reads what only other processes hold.
  """
  shape = tuple(int(n) for n in shape)
  blocks = {}

  def callback(index):
    bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
    if bounds not in blocks:
      blocks[bounds] = read(bounds)
    return blocks[bounds]

  return jax.make_array_from_callback(shape, sharding, callback)


def _assemble_params(config, reader, dtype, shardings):
  """Builds the parameter tree for `config`, one checkpoint tensor at a time.

  Args:
    config: LlamaConfig; its scan_layers picks the stacked or unrolled layout.
    reader: a `_LeafReader` over the weight source.
    dtype: parameter dtype (a jnp dtype).
    shardings: pytree of jax.sharding.Sharding matching the parameters, or None for
      the default device.
  Returns:
    the parameter tree of jax.Arrays.
  """
  flat_shapes = traverse_util.flatten_dict(param_shapes(config))
  flat_shardings = _flat_shardings(shardings, flat_shapes)
  for path in flat_shapes:  # every tensor exists with the right shape before any read
    if path[0] == "layers":
      for layer in range(config.num_layers):
        reader.check(path[1:], layer)
    elif path[0].startswith("layers_"):
      reader.check(path[1:], int(path[0][len("layers_"):]))
    else:
      reader.check(path, None)
  flat_params = {}
  for path, shape_struct in flat_shapes.items():
    sharding = flat_shardings[path]
    if path[0] == "layers":
      stacked = _zeros_on_devices(shape_struct.shape, dtype, sharding)()
      slice_sharding = _layer_slice_sharding(sharding, path)
      setter = _layer_setter(sharding)
      for layer in range(config.num_layers):
        value = reader.array(path[1:], layer, slice_sharding)
        stacked = setter(stacked, value, jnp.int32(layer))
        del value
      flat_params[path] = stacked
    elif path[0].startswith("layers_"):
      flat_params[path] = reader.array(path[1:], int(path[0][len("layers_"):]), sharding)
    else:
      flat_params[path] = reader.array(path, None, sharding)
  return traverse_util.unflatten_dict(flat_params)


class _LeafReader:
  """Our leaves, read from one weight source a block at a time and checked against `config`.

  source: an object with `shape(name)` (the checkpoint tensor's shape; ValueError when
  missing), `locate(name)` (the file, for errors) and `read(name, bounds)` (the block
  ((start, stop) per dimension) of tensor `name` in the checkpoint's own (out, in) layout).
  fmt: 0 for HF names, 1 for GGUF names.
  """

  def __init__(self, config, source, fmt, dtype):
    self.source, self.fmt, self.dtype = source, fmt, dtype
    self.stacked_shapes = traverse_util.flatten_dict(
        param_shapes(config.replace(scan_layers=True)))

  def shape(self, path, layer):
    """Our shape of leaf `path` of layer `layer` (None: a top-level leaf)."""
    full_path = ("layers",) + tuple(path) if layer is not None else tuple(path)
    return self.stacked_shapes[full_path].shape[1 if layer is not None else 0:]

  def check(self, path, layer):
    """Raises ValueError unless the source holds the tensor with the shape we expect."""
    name = _source_name(path, layer, self.fmt)
    actual = tuple(self.source.shape(name))
    expected = _expected_source_shape(path, self.shape(path, layer))
    if actual != expected:
      raise ValueError(f"{self.source.locate(name)}: tensor {name!r} has shape {actual}, but "
                       f"the config implies {expected}")

  def read(self, path, layer, bounds):
    """The block `bounds` (in our layout) of leaf `path` of layer `layer`, in our dtype."""
    name = _source_name(path, layer, self.fmt)
    source_bounds = tuple(reversed(bounds)) if _is_matrix(path) else tuple(bounds)
    return _to_our_layout(self.source.read(name, source_bounds), path, self.dtype)

  def array(self, path, layer, sharding):
    """Leaf `path` of layer `layer` as a global jax.Array laid out with `sharding`."""
    self.check(path, layer)
    return _array_from_reader(self.shape(path, layer), sharding,
                              functools.partial(self.read, path, layer))


# ----------------------------------------------------------------------------------------
# GGUF.


def _shortest_float32(value):
  """The shortest decimal that rounds to float32 `value` (GGUF 1e-5 reads 9.99999975e-06)."""
  return float(str(np.float32(value)))


def config_from_gguf(metadata, tensor_names, dtype="float32", scan_layers=True):
  """LlamaConfig from GGUF metadata; `tensor_names` decides tied embeddings.

  Args:
    metadata: {key: value} from `models.gguf.read_metadata` / `GGUFFile.metadata`.
    tensor_names: the file's tensor names; embeddings are tied when there is no
      'output.weight' (llama.cpp then reuses 'token_embd.weight' as the LM head).
    dtype: compute and parameter dtype name.
    scan_layers: parameter layout of the returned config.
  """
  arch = metadata.get("general.architecture")
  if arch != "llama":
    raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

  def get(key, default=None):
    value = metadata.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"GGUF metadata lacks {arch}.{key}")
    return value

  hidden = get("embedding_length")
  heads = get("attention.head_count")
  if "tokenizer.ggml.tokens" in metadata:
    vocab = get("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
  else:
    vocab = get("vocab_size")
  return LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
      num_layers=get("block_count"), num_heads=heads,
      num_kv_heads=get("attention.head_count_kv", heads),
      head_dim=get("rope.dimension_count", hidden // heads),
      rope_theta=_shortest_float32(get("rope.freq_base", 10000.0)),
      rms_eps=_shortest_float32(get("attention.layer_norm_rms_epsilon")),
      max_seq_len=get("context_length"), tie_embeddings="output.weight" not in tensor_names,
      dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)


def unpermute_rotary_rows(weight, num_heads):
  """llama.cpp's interleaved rotary row order -> HF rotate_half order.

  weight: [num_heads * D, H] with rows (pair, real/imag) interleaved inside each head
  -> [num_heads * D, H] with each head's D/2 "real" rows first, then the D/2 "imag" rows.
  """
  rows, hidden = weight.shape
  head_dim = rows // num_heads
  return (weight.reshape(num_heads, head_dim // 2, 2, hidden).swapaxes(1, 2)
          .reshape(rows, hidden))


def params_from_gguf(path, config, dtype=None, shardings=None):
  """Parameters of `config`'s layout from the GGUF file at `path`.

  Quantized tensors are dequantized to float32, q/k rows are un-permuted to HF order
  (`unpermute_rotary_rows`), then everything is cast to `dtype` (default
  config.param_dtype). Raises ValueError when a tensor is missing or its shape does not
  match `config`, or when `config.tie_embeddings` disagrees with the file.
  """
  dtype = as_dtype(dtype or config.param_dtype)
  file = gguf.read_gguf(path)
  has_head = "output.weight" in file.tensors
  if has_head == config.tie_embeddings:
    raise ValueError(f"{path}: config.tie_embeddings={config.tie_embeddings} but the file "
                     f"{'has' if has_head else 'has no'} 'output.weight'")
  rotary_heads = {"attn_q.weight": config.num_heads, "attn_k.weight": config.num_kv_heads}
  reader = _LeafReader(config, _GGUFSource(file, rotary_heads), 1, dtype)
  return _assemble_params(config, reader, dtype, shardings)


class _GGUFSource:
  """Tensors of a GGUF file for `_LeafReader`: each tensor is dequantized whole (quantized
  blocks do not split at arbitrary rows), once per process, and sliced per device."""

  def __init__(self, file, rotary_heads):
    self.file, self.rotary_heads = file, rotary_heads
    self.cached = (None, None)  # (name, array): the tensor whose blocks are being read

  def locate(self, name):  # pylint: disable=unused-argument
    return self.file.path

  def shape(self, name):
    if name not in self.file.tensors:
      raise ValueError(f"{self.file.path}: GGUF file has no tensor {name!r}")
    return self.file.tensors[name].shape

  def read(self, name, bounds):
    if self.cached[0] != name:
      self.cached = (None, None)
      array = self.file.load(name)
      suffix = name.split(".", 2)[-1]
      if name.startswith("blk.") and suffix in self.rotary_heads:
        if array.ndim != 2 or array.shape[0] % self.rotary_heads[suffix]:
          raise ValueError(f"{self.file.path}: tensor {name!r} has shape {array.shape}, which "
                           f"does not split into {self.rotary_heads[suffix]} heads")
        array = unpermute_rotary_rows(array, self.rotary_heads[suffix])
      self.cached = (name, array)
    return self.cached[1][tuple(slice(start, stop) for start, stop in bounds)]

  def close(self):
    self.cached = (None, None)


def load_gguf(path, dtype="float32", scan_layers=True, shardings=None):
  """(config, params) from the GGUF file at `path`."""
  file = gguf.read_gguf(path)
  config = config_from_gguf(file.metadata, file.tensors, dtype=dtype, scan_layers=scan_layers)
  return config, params_from_gguf(path, config, shardings=shardings)


# ----------------------------------------------------------------------------------------
# HF safetensors.

_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                       "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype("<f8")}
_MAX_HEADER_BYTES = 100 << 20


def config_from_hf(hf_config, dtype="float32", scan_layers=True):
  """LlamaConfig from an HF LLaMA config.json dict (transformers 4.x or 5.x layout)."""
  model_type = hf_config.get("model_type")
  if model_type != "llama":
    raise ValueError(f"config.json model_type {model_type!r} is not supported (only 'llama')")
  rope = hf_config.get("rope_parameters") or {}
  rope_type = rope.get("rope_type", "default")
  if hf_config.get("rope_scaling") or rope_type != "default":
    raise ValueError(f"config.json asks for rope scaling "
                     f"({hf_config.get('rope_scaling') or rope}); only plain RoPE is supported")
  for flag in ("attention_bias", "mlp_bias"):
    if hf_config.get(flag):
      raise ValueError(f"config.json sets {flag}=true; biases are not supported")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act {hf_config['hidden_act']!r} is not 'silu'")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf_config:
      raise ValueError(f"config.json lacks {key!r}")
  hidden = hf_config["hidden_size"]
  heads = hf_config["num_attention_heads"]
  return LlamaConfig(
      vocab_size=hf_config["vocab_size"], hidden_size=hidden,
      intermediate_size=hf_config["intermediate_size"],
      num_layers=hf_config["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf_config.get("num_key_value_heads") or heads,
      head_dim=hf_config.get("head_dim") or hidden // heads,
      rope_theta=float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
      rms_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      max_seq_len=hf_config.get("max_position_embeddings", 2048),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)


def read_safetensors_header(path):
  """{tensor name: (np dtype or dtype string, shape, absolute offset, nbytes)} of one file.

  Parses the 8-byte little-endian header length and the JSON header itself (no pickle,
  no torch) and checks every tensor's byte range against the file size. `path` may be
  local or gs:// (etils.epath).

  This reader is ours, not the `safetensors` package's, because that package's numpy
  backend has no bfloat16 (`safetensors.numpy.load` raises KeyError 'BF16', as of 0.8),
  the dtype most checkpoints ship in: we parse the header here and view BF16 bytes as
  `ml_dtypes.bfloat16` (the dtype JAX uses), so the run time needs neither
  `safetensors` nor torch; and it reads byte ranges, so a process reads only the rows
  its devices hold.
  """
  path = as_path(path)
  size = path.stat().length
  with path.open("rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
    header_len = int.from_bytes(prefix, "little")
    if header_len > min(size - 8, _MAX_HEADER_BYTES):
      raise ValueError(f"{path}: corrupt or truncated safetensors file (header length "
                       f"{header_len}, file size {size})")
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
  data_start = 8 + header_len
  tensors = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: corrupt safetensors header entry for {name!r}") from None
    dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
    if data_start + end > size:
      raise ValueError(f"{path}: truncated safetensors file: tensor {name!r} needs bytes up "
                       f"to {data_start + end}, the file has {size}")
    if isinstance(dtype, np.dtype) and end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ValueError(f"{path}: corrupt safetensors header: tensor {name!r} of shape {shape} "
                       f"{dtype_name} spans {end - begin} bytes")
    tensors[name] = (dtype, shape, data_start + begin, end - begin)
  return tensors


def _safetensors_files(hf_dir):
  """The shard files of `hf_dir`: from model.safetensors.index.json when present."""
  hf_dir = as_path(hf_dir)
  index_path = hf_dir / "model.safetensors.index.json"
  if index_path.exists():
    try:
      weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path}: corrupt index ({e!r})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not (hf_dir / name).exists():
        raise ValueError(f"{index_path} names shard {name!r}, which is missing from {hf_dir}")
    return [hf_dir / name for name in files]
  files = sorted(hf_dir.glob("*.safetensors"))
  if not files:
    raise ValueError(f"{hf_dir}: no *.safetensors files")
  return files


def safetensors_index(hf_dir):
  """{tensor name: (file, np dtype, shape, offset, nbytes)} over all shards of `hf_dir`."""
  index = {}
  for file in _safetensors_files(hf_dir):
    for name, (dtype, shape, offset, nbytes) in read_safetensors_header(file).items():
      if name in index:
        raise ValueError(f"{hf_dir}: tensor {name!r} appears in both {index[name][0]} and "
                         f"{file}")
      index[name] = (file, dtype, shape, offset, nbytes)
  return index


_READ_BLOCK_BYTES = 16 << 20


def _read_exactly(f, out, file, name):
  """Fills the C-contiguous array `out` from the file object `f` at its position."""
  view = memoryview(out.reshape(-1).view(np.uint8))
  filled = 0
  while filled < len(view):
    count = f.readinto(view[filled:])
    if not count:
      raise ValueError(f"{file}: truncated while reading tensor {name!r}")
    filled += count


def read_safetensors_slice(index, name, bounds=None):
  """The block `bounds` ((start, stop) per dimension; None: all) of one tensor of a
  `safetensors_index`, reading only the byte ranges of the rows it spans.

  Rows are read in blocks of at most 16 MiB and cut to the block's columns at once, so
  host memory stays near the size of the block asked for.
  """
  file, dtype, shape, offset, _ = index[name]
  if not isinstance(dtype, np.dtype):
    raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}; expected one of "
                     f"{sorted(_SAFETENSORS_DTYPES)}")
  if bounds is None:
    bounds = tuple((0, n) for n in shape)
  out = np.empty(tuple(stop - start for start, stop in bounds), dtype)
  if not shape or out.size == 0:
    if not shape:
      with as_path(file).open("rb") as f:
        f.seek(offset)
        _read_exactly(f, out, file, name)
    return out
  row_shape = tuple(shape[1:])
  row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
  whole_rows = all(start == 0 and stop == n for (start, stop), n in zip(bounds[1:], row_shape))
  columns = (slice(None),) + tuple(slice(start, stop) for start, stop in bounds[1:])
  first, last = bounds[0]
  rows_per_block = max(1, _READ_BLOCK_BYTES // max(row_bytes, 1))
  with as_path(file).open("rb") as f:
    for start in range(first, last, rows_per_block):
      stop = min(last, start + rows_per_block)
      f.seek(offset + start * row_bytes)
      if whole_rows:
        _read_exactly(f, out[start - first:stop - first], file, name)
      else:
        block = np.empty((stop - start,) + row_shape, dtype)
        _read_exactly(f, block, file, name)
        out[start - first:stop - first] = block[columns]
        del block
  return out


def read_safetensors_tensor(index, name):
  """One whole tensor from a `safetensors_index` (no mmap)."""
  return read_safetensors_slice(index, name)


def read_hf_config(hf_dir):
  """The config.json dict of an HF model directory (local or gs://)."""
  path = as_path(hf_dir) / "config.json"
  if not path.exists():
    raise ValueError(f"{hf_dir}: no config.json")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


class _SafetensorsSource:
  """Tensors of an HF safetensors folder for `_LeafReader`, read by byte ranges."""

  def __init__(self, path):
    self.path = path
    self.index = safetensors_index(path)

  def locate(self, name):
    return self.index[name][0] if name in self.index else self.path

  def shape(self, name):
    if name not in self.index:
      raise ValueError(f"{self.path}: no tensor {name!r} in the safetensors files")
    return self.index[name][2]

  def read(self, name, bounds):
    return read_safetensors_slice(self.index, name, bounds)

  def close(self):
    pass


def params_from_hf_dir(path, config, dtype=None, shardings=None):
  """Parameters of `config`'s layout from the HF safetensors directory `path`.

  Reads `*.safetensors` shards (via model.safetensors.index.json when present) one
  tensor at a time, each process only the rows and columns its devices hold, bf16 /
  fp16 / fp32 alike, and casts to `dtype` (default config.param_dtype). With tied
  embeddings any 'lm_head.weight' is ignored. Raises ValueError naming the file or
  tensor when a tensor is missing, truncated or of the wrong shape for `config`.
  """
  dtype = as_dtype(dtype or config.param_dtype)
  reader = _LeafReader(config, _SafetensorsSource(path), 0, dtype)
  return _assemble_params(config, reader, dtype, shardings)


def load_hf_dir(path, dtype="float32", scan_layers=True, shardings=None):
  """(config, params) from the HF safetensors directory `path`."""
  config = config_from_hf(read_hf_config(path), dtype=dtype, scan_layers=scan_layers)
  return config, params_from_hf_dir(path, config, shardings=shardings)


# ----------------------------------------------------------------------------------------
# Orbax checkpoints.


def _check_params_match_config(params, config):
  """Raises ValueError unless `params` has exactly the shapes and dtype `config` implies."""
  expected = traverse_util.flatten_dict(param_shapes(config))
  actual = traverse_util.flatten_dict(params)
  if set(expected) != set(actual):
    raise ValueError(f"params do not match the config's tree: missing "
                     f"{sorted('/'.join(p) for p in set(expected) - set(actual))}, unexpected "
                     f"{sorted('/'.join(p) for p in set(actual) - set(expected))}")
  for path, struct in expected.items():
    leaf = actual[path]
    if tuple(leaf.shape) != tuple(struct.shape) or leaf.dtype != struct.dtype:
      raise ValueError(f"param {'/'.join(path)} is {leaf.dtype}{list(leaf.shape)}, the config "
                       f"implies {struct.dtype}{list(struct.shape)}")


def _checkpointer(save_bytes=None, restore_bytes=None):
  """A synchronous orbax PyTree checkpointer with bounded host transfers.

  save_bytes: at most this many bytes in flight from devices to host while saving;
  restore_bytes: at most this many bytes read at once while restoring. Each must exceed
  the largest single array, so callers pass twice the largest leaf.
  """
  handler = ocp.PyTreeCheckpointHandler(
      save_device_host_concurrent_gb=save_bytes and save_bytes / 1e9,
      restore_concurrent_gb=restore_bytes and restore_bytes / 1e9)
  return ocp.Checkpointer(handler)


def tensor_name(path):
  """The folder under tensors/ of our unrolled leaf `path` ('layers_3.attn.wq.kernel')."""
  return ".".join(path)


def _unrolled_paths(config):
  """Our leaves in the unrolled layout, in checkpoint order: top level, then by layer."""
  return list(traverse_util.flatten_dict(param_shapes(config.replace(scan_layers=False))))


def _largest_leaf_bytes(config, dtype=None):
  itemsize = np.dtype(as_dtype(dtype or config.param_dtype)).itemsize
  return max(int(np.prod(s.shape)) * itemsize
             for s in traverse_util.flatten_dict(param_shapes(config)).values())


def _sync(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _shared_token():
  """A random hex token, the same in every process (process 0's)."""
  words = np.array([secrets.randbits(31), secrets.randbits(31)], np.int32)
  if jax.process_count() > 1:
    words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return "".join(f"{int(w):08x}" for w in words)


def _write_checkpoint(directory, config, leaves):
  """Writes checkpoint `directory`: every (path, make) of `leaves`, one tensor at a time.

  leaves: iterable of (our unrolled leaf path, () -> jax.Array) in every process alike;
  each array is made, saved (each process writing its own shards) and dropped before the
  next is made. Every process calls this; process 0 creates folders, writes config.json
  and renames. Locally the checkpoint is assembled in `.<name>.partial-<token>` next to
  `directory` and renamed once complete; on gs:// it is written in place and
  config.json, written last, marks it complete.
  """
  directory = as_path(directory)
  remote = is_remote(directory)
  if directory.exists():
    raise FileExistsError(f"{directory} already exists; choose a new checkpoint directory")
  leader = jax.process_index() == 0
  if remote:
    target = directory
  else:
    directory = as_path(os.path.abspath(os.fspath(directory)))
    target = directory.parent / f".{directory.name}.partial-{_shared_token()}"
  if leader:
    (target / TENSORS_DIR).mkdir(parents=True, exist_ok=remote)
  _sync("rain_jax_checkpoint_start")
  try:
    with _checkpointer(save_bytes=2 * _largest_leaf_bytes(config) + 1) as checkpointer:
      for path, make in leaves:
        array = make()
        checkpointer.save(target / TENSORS_DIR / tensor_name(path),
                          args=ocp.args.PyTreeSave({"value": array}))
        del array
    _sync("rain_jax_checkpoint_tensors_written")
    if leader:
      (target / CONFIG_FILE).write_text(config.to_json())
      if not remote:
        target.rename(directory)
    _sync("rain_jax_checkpoint_complete")
  except BaseException:
    if leader and not remote:
      target.rmtree(missing_ok=True)
    raise


def save_params(params, directory, config):
  """Writes `params` and `config` as a checkpoint directory (see the module docstring).

  One tensor at a time: a stacked [L, ...] leaf is saved layer by layer (each layer cut
  on the devices, keeping the leaf's sharding). Every process of a multi-process job
  calls it alike. Raises FileExistsError if `directory` exists and ValueError if
  `params` do not match `config` (shapes, dtype config.param_dtype, layout).
  """
  _check_params_match_config(params, config)
  flat = traverse_util.flatten_dict(params)

  def leaves():
    for path in _unrolled_paths(config):
      if path[0].startswith("layers_") and config.scan_layers:
        stacked_path = ("layers",) + path[1:]
        stacked = flat[stacked_path]
        getter = _layer_getter(_layer_slice_sharding(stacked.sharding, stacked_path))
        layer = int(path[0][len("layers_"):])
        yield path, functools.partial(getter, stacked, jnp.int32(layer))
      else:
        yield path, functools.partial(lambda leaf: leaf, flat[path])

  _write_checkpoint(directory, config, leaves())


def source_config(fmt, path, dtype="float32", scan_layers=True):
  """The LlamaConfig of a weight source: fmt 'hf' (a folder) or 'gguf' (a file)."""
  if fmt == "hf":
    return config_from_hf(read_hf_config(path), dtype=dtype, scan_layers=scan_layers)
  if fmt == "gguf":
    file = gguf.read_gguf(path)
    return config_from_gguf(file.metadata, file.tensors, dtype=dtype, scan_layers=scan_layers)
  raise ValueError(f"unknown weight format {fmt!r}; expected 'hf' or 'gguf'")


def convert_weights(fmt, path, output, dtype="bfloat16", scan_layers=True, shardings=None):
  """Converts a weight source into checkpoint `output`, one tensor at a time.

  Args:
    fmt: 'hf' (a safetensors folder, local or gs://) or 'gguf' (a local file).
    path: the source, reachable from every process.
    output: the new checkpoint directory (local, mounted or gs://); must not exist.
    dtype: parameter dtype of the checkpoint.
    scan_layers: the layout recorded in the checkpoint's config (either restores into
      either).
    shardings: pytree of shardings matching the *unrolled* parameters
      (`param_shapes(config.replace(scan_layers=False))`), e.g. the inference mesh's
      rules; None: the default device. Each process reads and writes only its devices'
      shards, so with a mesh over all hosts each host holds a part of one tensor at a time.
  Returns:
    the checkpoint's LlamaConfig.
  """
  config = source_config(fmt, path, dtype=dtype, scan_layers=scan_layers)
  unrolled = config.replace(scan_layers=False)
  param_dtype = as_dtype(dtype)
  if fmt == "hf":
    source = _SafetensorsSource(path)
  else:
    file = gguf.read_gguf(path)
    if ("output.weight" in file.tensors) == config.tie_embeddings:
      raise ValueError(f"{path}: tie_embeddings disagrees with the file's 'output.weight'")
    source = _GGUFSource(file, {"attn_q.weight": config.num_heads,
                                "attn_k.weight": config.num_kv_heads})
  reader = _LeafReader(config, source, 0 if fmt == "hf" else 1, param_dtype)
  flat_shardings = _flat_shardings(shardings,
                                   traverse_util.flatten_dict(param_shapes(unrolled)))
  paths = _unrolled_paths(config)

  def split(path):
    if path[0].startswith("layers_"):
      return path[1:], int(path[0][len("layers_"):])
    return path, None

  for path in paths:  # every tensor exists with the right shape before anything is written
    reader.check(*split(path))

  def leaves():
    for path in paths:
      yield path, functools.partial(reader.array, *split(path), flat_shardings[path])
    source.close()

  _write_checkpoint(output, config, leaves())
  return config


def load_config(directory):
  """The LlamaConfig saved in checkpoint `directory` (ValueError when it is incomplete)."""
  directory = as_path(directory)
  path = directory / CONFIG_FILE
  if not path.exists() or not ((directory / TENSORS_DIR).exists()
                               or (directory / PARAMS_DIR).exists()):
    raise ValueError(f"{directory} is not a complete rain_jax checkpoint (needs {CONFIG_FILE} "
                     f"and {TENSORS_DIR}/ or {PARAMS_DIR}/)")
  return LlamaConfig.from_json(path.read_text())


def _architecture(config):
  """What must match between a checkpoint and the config restoring it."""
  return config.replace(dtype="float32", param_dtype="float32", scan_layers=True)


class _TensorStore:
  """Reads one tensor of the unrolled layout at a time from tensors/<name>/."""

  def __init__(self, directory, checkpointer):
    self.directory, self.checkpointer = as_path(directory), checkpointer
    self.present = {p.name for p in (self.directory / TENSORS_DIR).iterdir()}

  def check(self, names):
    missing = sorted(set(names) - self.present)
    if missing:
      raise ValueError(f"{self.directory} is not a complete rain_jax checkpoint: "
                       f"{TENSORS_DIR}/ lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")

  def read(self, path, struct):
    location = self.directory / TENSORS_DIR / tensor_name(path)
    if not ocp.utils.is_checkpoint_finalized(location):
      raise ValueError(f"{self.directory} is not a complete rain_jax checkpoint: {location} "
                       f"was not finalised by orbax (an interrupted save?)")
    target = {"value": struct}
    return self.checkpointer.restore(location, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))["value"]


class _TreeStore:
  """Reads single leaves of an older checkpoint's one orbax tree in params/."""

  def __init__(self, directory, checkpointer):
    self.location = as_path(directory) / PARAMS_DIR
    self.checkpointer = checkpointer
    if not ocp.utils.is_checkpoint_finalized(self.location):
      raise ValueError(f"{directory} is not a complete rain_jax checkpoint: {self.location} "
                       f"was not finalised by orbax (an interrupted save?)")

  def read(self, path, struct):
    target = traverse_util.unflatten_dict({tuple(path): struct})
    restored = self.checkpointer.restore(self.location, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
    return traverse_util.flatten_dict(restored)[tuple(path)]

  def read_all(self, target):
    return self.checkpointer.restore(self.location, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def restore_params(directory, config=None, shardings=None):
  """Restores the parameters of checkpoint `directory` straight into `shardings`.

  Args:
    directory: a directory written by `save_params` / `convert_weights` (or an older
      single-tree checkpoint), local or gs://.
    config: the config to restore for (default: the saved one). It must have the saved
      architecture; its layer layout (scan_layers) and param_dtype may differ (layers are
      stacked or split on the devices, leaves are cast).
    shardings: pytree of jax.sharding.Sharding matching `config`'s parameters, or None
      for the default device.

  One tensor at a time: a stacked leaf is filled layer by layer in place, an unrolled
  leaf cut from a stored stacked one on the devices, so neither a device nor a host ever
  holds the whole model twice, nor more of it than its share of the target shardings
  plus one leaf. Raises ValueError for an incomplete checkpoint or another architecture.
  """
  saved = load_config(directory)
  config = config or saved
  if _architecture(config) != _architecture(saved):
    raise ValueError(f"{directory} holds a checkpoint for {saved}, not for {config} (only "
                     f"dtype, param_dtype and scan_layers may differ)")
  flat_shapes = traverse_util.flatten_dict(param_shapes(config))
  flat_shardings = _flat_shardings(shardings, flat_shapes)
  structs = {path: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_shardings[path])
             for path, s in flat_shapes.items()}
  restore_bytes = 2 * max(_largest_leaf_bytes(saved), _largest_leaf_bytes(config)) + 1
  tree_format = not (as_path(directory) / TENSORS_DIR).exists()
  with _checkpointer(restore_bytes=restore_bytes) as checkpointer:
    if tree_format:
      store = _TreeStore(directory, checkpointer)
      if saved.scan_layers == config.scan_layers:
        return store.read_all(traverse_util.unflatten_dict(structs))
      stored_stacked = saved.scan_layers
    else:
      store = _TensorStore(directory, checkpointer)
      store.check(tensor_name(p) for p in _unrolled_paths(saved))
      stored_stacked = False
    num_layers = config.num_layers
    flat_params = {}
    for path, struct in structs.items():
      if path[0].startswith("layers_") and path[0] != "layers_0":
        continue  # restored with layers_0's family below
      if path[0] == "layers" and not stored_stacked:
        # Stacked target from per-layer tensors: fill [L, ...] in place, layer by layer.
        sharding = struct.sharding
        slice_sharding = _layer_slice_sharding(sharding, path)
        slice_struct = jax.ShapeDtypeStruct(struct.shape[1:], struct.dtype,
                                            sharding=slice_sharding)
        stacked = _zeros_on_devices(struct.shape, struct.dtype, sharding)()
        setter = _layer_setter(sharding)
        for layer in range(num_layers):
          value = store.read((f"layers_{layer}",) + path[1:], slice_struct)
          stacked = setter(stacked, value, jnp.int32(layer))
          del value
        flat_params[path] = stacked
      elif path[0] == "layers_0" and stored_stacked:
        # Unrolled target from a stored stacked leaf: restore it, cut it on the devices.
        stacked_path = ("layers",) + path[1:]
        stacked_struct = jax.ShapeDtypeStruct(
            (num_layers,) + tuple(struct.shape), struct.dtype,
            sharding=_stacked_sharding(struct.sharding, stacked_path))
        stacked = store.read(stacked_path, stacked_struct)
        for layer in range(num_layers):
          layer_path = (f"layers_{layer}",) + path[1:]
          flat_params[layer_path] = _layer_getter(structs[layer_path].sharding)(
              stacked, jnp.int32(layer))
        del stacked
      elif path[0] == "layers_0":
        for layer in range(num_layers):
          layer_path = (f"layers_{layer}",) + path[1:]
          flat_params[layer_path] = store.read(layer_path, structs[layer_path])
      else:
        flat_params[path] = store.read(path, struct)
  return traverse_util.unflatten_dict(flat_params)
