"""Weights into our parameter layout (docs/engine.md §1): GGUF, HF safetensors, orbax.

Every loader streams: it reads one tensor at a time from disk, converts it on the host
(transpose, q/k un-permute, dtype cast) and puts it straight onto the devices with its
target sharding, so host memory peaks at a few copies of the largest single tensor,
never the whole model. In the stacked (`scan_layers=True`) layout each [L, ...] leaf is
preallocated on the devices, sharded, and layer i is written in place by a jitted
`.at[i].set` that donates the buffer, so the devices never hold two copies of a leaf.

Checkpoints (`save_params` / `restore_params`) are orbax directories holding
`params/` and our `config.json`; a save is assembled in a temporary sibling directory
and renamed into place, so an interrupted save never leaves a complete-looking one.
"""
import functools
import glob
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from models import gguf
from models.llama import LlamaConfig, as_dtype, param_shapes

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

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


@functools.lru_cache(maxsize=None)
def _zeros_on_devices(shape, dtype, sharding):
  """A jitted () -> zeros(shape, dtype) laid out with `sharding` (no host copy)."""
  return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _layer_setter(sharding):
  """A jitted (stacked [L, ...], value [...], i) -> stacked.at[i].set(value), donating stacked."""

  def set_layer(stacked, value, index):
    return jax.lax.dynamic_update_index_in_dim(stacked, value, index, axis=0)

  return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


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


def _assemble_params(config, read_leaf, dtype, shardings):
  """Builds the parameter tree for `config`, one checkpoint tensor at a time.

  Args:
    config: LlamaConfig; its scan_layers picks the stacked or unrolled layout.
    read_leaf: (path, layer) -> np.ndarray in our layout and `dtype`, for our leaf
      `path` (layer-relative, e.g. ('attn', 'wq', 'kernel')) of layer `layer`, or of
      the top level when layer is None.
    dtype: parameter dtype (a jnp dtype).
    shardings: pytree of jax.sharding.Sharding matching the parameters, or None for
      the default device.
  Returns:
    the parameter tree of jax.Arrays.
  """
  flat_shapes = traverse_util.flatten_dict(param_shapes(config))
  flat_shardings = _flat_shardings(shardings, flat_shapes)
  flat_params = {}
  for path, shape_struct in flat_shapes.items():
    sharding = flat_shardings[path]
    if path[0] == "layers":
      stacked = _zeros_on_devices(shape_struct.shape, dtype, sharding)()
      slice_sharding = _layer_slice_sharding(sharding, path)
      setter = _layer_setter(sharding)
      for layer in range(config.num_layers):
        value = jax.device_put(read_leaf(path[1:], layer), slice_sharding)
        stacked = setter(stacked, value, jnp.int32(layer))
      flat_params[path] = stacked
    elif path[0].startswith("layers_"):
      layer = int(path[0][len("layers_"):])
      flat_params[path] = jax.device_put(read_leaf(path[1:], layer), sharding)
    else:
      flat_params[path] = jax.device_put(read_leaf(path, None), sharding)
  return traverse_util.unflatten_dict(flat_params)


def _checked_leaf_reader(config, read_source, fmt, dtype, locate):
  """Wraps read_source(name) -> np.ndarray into a read_leaf for `_assemble_params`.

  Checks each tensor's shape against `config` and converts it to our layout;
  locate(name) names the file holding tensor `name` in errors.
  """
  stacked_shapes = traverse_util.flatten_dict(param_shapes(config.replace(scan_layers=True)))

  def read_leaf(path, layer):
    full_path = ("layers",) + tuple(path) if layer is not None else tuple(path)
    our_shape = stacked_shapes[full_path].shape[1 if layer is not None else 0:]
    name = _source_name(path, layer, fmt)
    array = read_source(name)
    expected = _expected_source_shape(path, our_shape)
    if tuple(array.shape) != expected:
      raise ValueError(f"{locate(name)}: tensor {name!r} has shape {tuple(array.shape)}, but the "
                       f"config implies {expected}")
    return _to_our_layout(array, path, dtype)

  return read_leaf


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

  def read_source(name):
    if name not in file.tensors:
      raise ValueError(f"{path}: GGUF file has no tensor {name!r}")
    array = file.load(name)
    suffix = name.split(".", 2)[-1]
    if name.startswith("blk.") and suffix in rotary_heads:
      if array.ndim != 2 or array.shape[0] % rotary_heads[suffix]:
        raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, which does not "
                         f"split into {rotary_heads[suffix]} heads")
      array = unpermute_rotary_rows(array, rotary_heads[suffix])
    return array

  read_leaf = _checked_leaf_reader(config, read_source, 1, dtype, lambda name: path)
  return _assemble_params(config, read_leaf, dtype, shardings)


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
  no torch) and checks every tensor's byte range against the file size.

  This reader is ours, not the `safetensors` package's, because that package's numpy
  backend has no bfloat16 (`safetensors.numpy.load` raises KeyError 'BF16', as of 0.8),
  the dtype most checkpoints ship in: we parse the header here and view BF16 bytes as
  `ml_dtypes.bfloat16` (the dtype JAX uses), so the run time needs neither
  `safetensors` nor torch.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
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
  index_path = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.isfile(index_path):
    try:
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index_path}: corrupt index ({e!r})") from None
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.isfile(os.path.join(hf_dir, name)):
        raise ValueError(f"{index_path} names shard {name!r}, which is missing from {hf_dir}")
    return [os.path.join(hf_dir, name) for name in files]
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
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


def read_safetensors_tensor(index, name):
  """One tensor from a `safetensors_index`, read with a single file read (no mmap)."""
  file, dtype, shape, offset, nbytes = index[name]
  if not isinstance(dtype, np.dtype):
    raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}; expected one of "
                     f"{sorted(_SAFETENSORS_DTYPES)}")
  count = nbytes // dtype.itemsize
  array = np.fromfile(file, dtype=dtype, count=count, offset=offset)
  if array.size != count:
    raise ValueError(f"{file}: truncated while reading tensor {name!r}")
  return array.reshape(shape)


def read_hf_config(hf_dir):
  """The config.json dict of an HF model directory."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"{hf_dir}: no config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def params_from_hf_dir(path, config, dtype=None, shardings=None):
  """Parameters of `config`'s layout from the HF safetensors directory `path`.

  Reads `*.safetensors` shards (via model.safetensors.index.json when present) one
  tensor at a time, bf16 / fp16 / fp32 alike, and casts to `dtype` (default
  config.param_dtype). With tied embeddings any 'lm_head.weight' is ignored.
  Raises ValueError naming the file or tensor when a tensor is missing, truncated or of
  the wrong shape for `config`.
  """
  dtype = as_dtype(dtype or config.param_dtype)
  index = safetensors_index(path)

  def read_source(name):
    if name not in index:
      raise ValueError(f"{path}: no tensor {name!r} in the safetensors files")
    return read_safetensors_tensor(index, name)

  read_leaf = _checked_leaf_reader(config, read_source, 0, dtype,
                                   lambda name: index[name][0])
  return _assemble_params(config, read_leaf, dtype, shardings)


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


def save_params(params, directory, config):
  """Writes `params` and `config` as an orbax checkpoint directory, atomically.

  The checkpoint is assembled in a temporary sibling directory and renamed to
  `directory` only once complete. Raises FileExistsError if `directory` exists and
  ValueError if `params` do not match `config` (shapes, dtype config.param_dtype, layout).
  """
  if jax.process_count() > 1:
    raise ValueError("save_params writes from a single process; convert on one host")
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} already exists; choose a new checkpoint directory")
  _check_params_match_config(params, config)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.partial-", dir=parent)
  largest = max(leaf.nbytes for leaf in jax.tree.leaves(params))
  try:
    with _checkpointer(save_bytes=2 * largest + 1) as checkpointer:
      checkpointer.save(os.path.join(staging, PARAMS_DIR), args=ocp.args.PyTreeSave(params))
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      f.write(config.to_json())
    os.rename(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def load_config(directory):
  """The LlamaConfig saved in checkpoint `directory`."""
  path = os.path.join(os.fspath(directory), CONFIG_FILE)
  if not os.path.isfile(path) or not os.path.isdir(os.path.join(os.fspath(directory),
                                                                PARAMS_DIR)):
    raise ValueError(f"{directory} is not a complete rain_jax checkpoint (needs {CONFIG_FILE} "
                     f"and {PARAMS_DIR}/)")
  with open(path) as f:
    return LlamaConfig.from_json(f.read())


def restore_params(directory, config=None, shardings=None):
  """Restores the parameters of checkpoint `directory` straight into `shardings`.

  Args:
    directory: a directory written by `save_params`.
    config: the config to restore for (default: the saved one). It must have the saved
      architecture and layer layout; its param_dtype may differ (leaves are cast).
    shardings: pytree of jax.sharding.Sharding matching the parameters, or None for
      the default device.
  """
  saved = load_config(directory)
  config = config or saved
  if config.replace(dtype=saved.dtype, param_dtype=saved.param_dtype) != saved:
    raise ValueError(f"{directory} holds a checkpoint for {saved}, not for {config}")
  flat_shapes = traverse_util.flatten_dict(param_shapes(config))
  flat_shardings = _flat_shardings(shardings, flat_shapes)
  target = traverse_util.unflatten_dict({
      path: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=flat_shardings[path])
      for path, s in flat_shapes.items()})
  largest = max(s.size * s.dtype.itemsize for s in flat_shapes.values())
  with _checkpointer(restore_bytes=2 * largest + 1) as checkpointer:
    return checkpointer.restore(
        os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR),
        args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
