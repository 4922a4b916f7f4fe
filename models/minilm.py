"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as a Flax linen encoder, for RAIN's similarity.

RAIN embeds text with sentence-transformers' all-MiniLM-L6-v2, a pipeline of three
modules (modules.json): Transformer (HF `BertModel`, inputs truncated to
max_seq_length = 256 WordPiece tokens including [CLS]/[SEP]), Pooling (mean over the
attention mask) and Normalize (L2). `embed` is that pipeline after tokenisation:

  ids [N, W] int32, mask [N, W] bool -> BERT -> hidden [N, W, H]
  -> sum(hidden * mask) / max(sum(mask), 1e-9) -> x / max(|x|_2, 1e-12)  -> [N, H]

with H = 384. The clamps are sentence-transformers' (Pooling clamps the token count at
1e-9, Normalize is `torch.nn.functional.normalize` with eps 1e-12), so an all-False
mask row gives a zero vector rather than NaN.

The network follows HF `BertModel` exactly: word + position + token-type (all type 0,
as for a single sentence) embeddings, LayerNorm, then post-LN layers of self-attention
(biased q/k/v/output projections, softmax with masked keys at the float minimum) and a
GELU (exact erf form, HF's "gelu") feed-forward, every residual followed by LayerNorm
(eps from config.json, 1e-12 here). The pooler is not used. Weights come from the
fp32 model.safetensors via models/convert.py's safetensors reader (no torch).
Matmuls run at `precision` (default "highest", so TPU/GPU fp32 do not fall back to
bf16/TF32 passes and results match CPU to ~1e-6).
"""
import dataclasses
import functools
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import convert

# sentence-transformers' clamps: Pooling's token-count floor and F.normalize's eps.
POOLING_MIN_COUNT = 1e-9
NORMALIZE_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
  """BERT hyper-parameters (the fields of an HF BertConfig that the encoder needs).

  Attributes:
    vocab_size: WordPiece vocabulary size V (30522).
    hidden_size: H (384).
    num_layers: transformer layers (6).
    num_heads: attention heads (12); H must be a multiple.
    intermediate_size: feed-forward width (1536).
    max_position_embeddings: longest input the position table covers (512).
    type_vocab_size: token-type table rows (2).
    layer_norm_eps: LayerNorm epsilon (1e-12).
    precision: jax.lax.Precision name for the matmuls ("highest", "high", "default").
  """
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  precision: str = "highest"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_heads {self.num_heads}")

  @classmethod
  def from_hf(cls, hf_config: dict[str, Any], precision: str = "highest") -> "MiniLMConfig":
    """The config of an HF BERT config.json dict; ValueError for what we do not run."""
    if hf_config.get("model_type") != "bert":
      raise ValueError(f"config.json model_type {hf_config.get('model_type')!r} is not 'bert'")
    if hf_config.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"config.json hidden_act {hf_config['hidden_act']!r} is not 'gelu'")
    position_type = hf_config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
      raise ValueError(f"config.json position_embedding_type {position_type!r} is not "
                       "'absolute'")
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size") if key not in hf_config]
    if missing:
      raise ValueError(f"config.json lacks {missing}")
    return cls(vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
               num_layers=hf_config["num_hidden_layers"],
               num_heads=hf_config["num_attention_heads"],
               intermediate_size=hf_config["intermediate_size"],
               max_position_embeddings=hf_config.get("max_position_embeddings", 512),
               type_vocab_size=hf_config.get("type_vocab_size", 2),
               layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
               precision=precision)

  @classmethod
  def from_dir(cls, directory: str, precision: str = "highest") -> "MiniLMConfig":
    """The config from `directory`/config.json."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no config.json in {directory} (expected the all-MiniLM-L6-v2 "
                              "folder made by models.registry.minilm_files())")
    with open(path, encoding="utf-8") as f:
      return cls.from_hf(json.load(f), precision)


def read_max_seq_length(directory: str) -> int:
  """sentence-transformers' max_seq_length (sentence_bert_config.json) of `directory`."""
  path = os.path.join(directory, "sentence_bert_config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no sentence_bert_config.json in {directory}")
  with open(path, encoding="utf-8") as f:
    return int(json.load(f)["max_seq_length"])


class _SelfAttention(nn.Module):
  """Multi-head self-attention with BERT's output projection (no norm)."""
  config: MiniLMConfig

  @nn.compact
  def __call__(self, x, mask):
    """x: [N, W, H] float32; mask: [N, W] bool (keys that may be attended) -> [N, W, H]."""
    cfg = self.config
    heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads

    def dense(name):
      return nn.Dense(cfg.hidden_size, name=name, precision=cfg.precision)

    def project(name):  # [N, W, H] -> [N, W, heads, D]
      return dense(name)(x).reshape(x.shape[:2] + (heads, head_dim))

    query, key, value = project("query"), project("key"), project("value")
    scores = jnp.einsum("nqhd,nkhd->nhqk", query, key, precision=cfg.precision)
    scores = scores / np.sqrt(head_dim).astype(np.float32)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [N, heads, W, W]
    context = jnp.einsum("nhqk,nkhd->nqhd", probs, value, precision=cfg.precision)
    return dense("output")(context.reshape(x.shape))


class _Layer(nn.Module):
  """One post-LN BERT layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""
  config: MiniLMConfig

  @nn.compact
  def __call__(self, x, mask):
    """x: [N, W, H]; mask: [N, W] bool -> [N, W, H]."""
    cfg = self.config
    norm = functools.partial(nn.LayerNorm, epsilon=cfg.layer_norm_eps)
    x = norm(name="attention_norm")(x + _SelfAttention(cfg, name="attention")(x, mask))
    hidden = nn.Dense(cfg.intermediate_size, name="intermediate", precision=cfg.precision)(x)
    hidden = jax.nn.gelu(hidden, approximate=False)
    hidden = nn.Dense(cfg.hidden_size, name="output", precision=cfg.precision)(hidden)
    return norm(name="output_norm")(x + hidden)


class BertEncoder(nn.Module):
  """HF BertModel's last hidden state (no pooler)."""
  config: MiniLMConfig

  @nn.compact
  def __call__(self, ids, mask):
    """ids: [N, W] int32 WordPiece ids; mask: [N, W] bool -> hidden [N, W, H] float32.

    Positions are 0..W-1 and token types 0, as BertModel uses for one sentence.
    """
    cfg = self.config
    width = ids.shape[1]
    if width > cfg.max_position_embeddings:
      raise ValueError(f"input width {width} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    table = functools.partial(nn.Embed, features=cfg.hidden_size)
    x = (table(cfg.vocab_size, name="word_embeddings")(ids)
         + table(cfg.max_position_embeddings, name="position_embeddings")(
             jnp.arange(width))[None]
         + table(cfg.type_vocab_size, name="token_type_embeddings")(jnp.zeros_like(ids)))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="embeddings_norm")(x)
    for index in range(cfg.num_layers):
      x = _Layer(cfg, name=f"layer_{index}")(x, mask)
    return x


@flax.struct.dataclass
class MiniLM:
  """An encoder ready to embed: config (static) plus the Flax params pytree.

  A pytree, so it can be passed into `jax.jit`ted functions as an ordinary argument
  (the config travels as static aux data, the params as arrays).
  """
  config: MiniLMConfig = flax.struct.field(pytree_node=False)
  params: Any


def mean_pool_normalize(hidden, mask):
  """hidden [N, W, H] float32, mask [N, W] bool -> [N, H] float32.

  sentence-transformers' Pooling (mean over mask, count clamped at 1e-9) then Normalize
  (x / max(|x|_2, 1e-12)); an all-False row gives zeros.
  """
  weights = mask.astype(hidden.dtype)[..., None]  # [N, W, 1]
  summed = jnp.sum(hidden * weights, axis=1)  # [N, H]
  count = jnp.maximum(jnp.sum(weights, axis=1), POOLING_MIN_COUNT)  # [N, 1]
  pooled = summed / count
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, NORMALIZE_EPS)


def embed(model: MiniLM, ids, mask):
  """Sentence embeddings: ids [N, W] int32, mask [N, W] bool -> [N, H] float32, unit norm.

  Pure and jittable. Each row is one tokenised text ([CLS] ... [SEP] then padding with
  mask False); a row whose mask is all False embeds to zeros.
  """
  hidden = BertEncoder(model.config).apply(model.params, ids, mask)
  return mean_pool_normalize(hidden, mask)


def _hf_name(path: tuple[str, ...]) -> str:
  """HF BertModel tensor name of our parameter `path` (e.g. ('layer_0', 'attention',
  'query', 'kernel') -> 'encoder.layer.0.attention.self.query.weight')."""
  *modules, leaf = path
  suffix = {"kernel": "weight", "bias": "bias", "scale": "weight",
            "embedding": "weight"}[leaf]
  if modules[0] == "embeddings_norm":
    return f"embeddings.LayerNorm.{suffix}"
  if modules[0].endswith("_embeddings"):
    return f"embeddings.{modules[0]}.{suffix}"
  layer = f"encoder.layer.{modules[0].split('_')[1]}"
  inner = {
      ("attention", "query"): "attention.self.query",
      ("attention", "key"): "attention.self.key",
      ("attention", "value"): "attention.self.value",
      ("attention", "output"): "attention.output.dense",
      ("attention_norm",): "attention.output.LayerNorm",
      ("intermediate",): "intermediate.dense",
      ("output",): "output.dense",
      ("output_norm",): "output.LayerNorm",
  }[tuple(modules[1:])]
  return f"{layer}.{inner}.{suffix}"


def _params_shapes(config: MiniLMConfig):
  """Our params pytree as ShapeDtypeStructs, from an abstract init (no compute)."""
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
  return jax.eval_shape(BertEncoder(config).init, jax.random.PRNGKey(0), ids, mask)


def load_minilm_params(path: str, config: MiniLMConfig):
  """Flax params {'params': ...} of `config`'s encoder from a BertModel safetensors.

  Args:
    path: a model.safetensors file, or a directory holding *.safetensors.
    config: the architecture, for the expected shapes.

  Tensor names may carry a "bert." prefix (BertFor* checkpoints); HF Linear weights
  [out, in] become Dense kernels [in, out]. Raises ValueError for a missing tensor or
  a shape mismatch.
  """
  if os.path.isdir(path):
    index = convert.safetensors_index(path)
  else:
    index = {name: (path,) + entry
             for name, entry in convert.read_safetensors_header(path).items()}
  index.update({name[len("bert."):]: entry for name, entry in list(index.items())
                if name.startswith("bert.")})

  def read(key_path, shape_struct):
    path_names = tuple(getattr(k, "key", str(k)) for k in key_path)[1:]
    name = _hf_name(path_names)
    if name not in index:
      raise ValueError(f"{path}: no tensor {name!r} (for parameter {'/'.join(path_names)})")
    array = convert.read_safetensors_tensor(index, name).astype(np.float32)
    if path_names[-1] == "kernel":
      array = array.T
    if array.shape != shape_struct.shape:
      raise ValueError(f"{path}: tensor {name!r} has shape {array.shape} (after transpose), "
                       f"expected {shape_struct.shape}")
    return jnp.asarray(array)

  return jax.tree_util.tree_map_with_path(read, _params_shapes(config))


def load_minilm(directory: str, precision: str = "highest") -> MiniLM:
  """The encoder (config.json + model.safetensors) of an all-MiniLM-L6-v2 folder, such
  as `models.registry.minilm_files()`."""
  config = MiniLMConfig.from_dir(directory, precision)
  return MiniLM(config=config, params=load_minilm_params(directory, config))
