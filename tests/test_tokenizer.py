"""Tokenizer backends and token tables, checked against independent tokenizers.

Oracles: the `sentencepiece` library on the real LLaMA model; transformers' own GGUF
tokenizer (`AutoTokenizer.from_pretrained(..., gguf_file=...)`) on SmolLM2;
transformers' LLaMA slow->fast conversion for the tokenizer.json path; hand-built
vocabularies with hand-computed ids. (The GGUF metadata reader, models.gguf, is checked
against the `gguf` package in test_gguf.py.)
"""
import os
import random

import numpy as np
import pytest
import sentencepiece

from models import registry
from models import tokenizer as tokenizer_lib

LLAMA_MODEL = registry.LLAMA_TOKENIZER

VARIED_TEXTS = [
    "The answer is: (A",
    "Hello, world! How are you today?",
    "Numbers 1234567890 and 3.14159, 2024-11-26, x=42;",
    "  leading and trailing spaces   ",
    "tabs\tand\ttabs\t\t\tend",
    "line one\nline two\n\n\nline five\r\nwindows",
    "Unicode: café naïve Æsir Straße – “quotes” …",
    "中文字符和日本語のテキスト、한국어",
    "Emoji: 😀👍🏽🇫🇷 family 👨‍👩‍👧",
    "Math: x² + y³ = z⁴",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water and yeast.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after the end marker",
    "code: def f(x):\n    return x ** 2  # square\n",
    "",
    " ",
    "\n",
    "a",
    "'s 're 've 'm 'll 'd don't I'M",
]


@pytest.fixture(scope="module")
def smollm(smollm2_gguf_path):
  return tokenizer_lib.load_tokenizer(smollm2_gguf_path)


@pytest.fixture(scope="module")
def smollm_oracle(smollm2_gguf_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(smollm2_gguf_path), gguf_file=os.path.basename(smollm2_gguf_path))


@pytest.fixture(scope="module")
def llama():
  return tokenizer_lib.load_tokenizer(LLAMA_MODEL)


@pytest.fixture(scope="module")
def llama_tables(llama):
  return tokenizer_lib.token_tables(llama)


@pytest.fixture(scope="module")
def smollm_tables(smollm):
  return tokenizer_lib.token_tables(smollm)


@pytest.fixture(scope="module")
def llama_sp():
  return sentencepiece.SentencePieceProcessor(model_file=LLAMA_MODEL)


def _ids_by_text(tok):
  """{token text: [ids]} over the whole vocabulary."""
  ids_by_text = {}
  for i in range(tok.vocab_size):
    ids_by_text.setdefault(tok.token_text(i), []).append(i)
  return ids_by_text


def _random_sequences(vocab_size, count, seed, extra_ids=()):
  rng = random.Random(seed)
  pool = list(extra_ids)
  return [[rng.randrange(vocab_size) if not pool or rng.random() < 0.9 else rng.choice(pool)
           for _ in range(rng.randrange(1, 12))] for _ in range(count)]


# LLaMA SentencePiece.


def test_llama_known_ids(llama):
  assert (llama.vocab_size, llama.bos_id, llama.eos_id) == (32000, 1, 2)
  assert llama.encode("The answer is: (A") == [450, 1234, 338, 29901, 313, 29909]
  assert llama.encode("The answer is: (A", add_bos=True) == [1, 450, 1234, 338, 29901, 313, 29909]
  assert [llama.token_text(i) for i in (29909, 29933, 3869, 8241, 1939, 3782)] == [
      "A", "B", " Yes", "Yes", " No", "No"]
  assert llama.token_bytes(13) == b"\n"  # the byte piece <0x0A>
  assert llama.token_bytes(0xE2 + 3) == b"\xe2"  # byte pieces start at id 3
  assert llama.token_text(0xE2 + 3) == "\ufffd"
  assert llama.is_special(1) and llama.is_special(0) and not llama.is_special(29909)


def test_llama_encode_decode_match_sentencepiece(llama, llama_sp):
  for text in VARIED_TEXTS:
    ids = llama.encode(text)
    assert ids == llama_sp.encode(text), text
    assert llama.decode(ids) == llama_sp.decode(ids), text
  specials = {0, 1, 2}
  for ids in _random_sequences(llama.vocab_size, 300, seed=0):
    if specials.isdisjoint(ids):
      assert llama.decode(ids) == llama_sp.decode(ids), ids
  # Specials: kept as their text by default, dropped like sentencepiece when skipped.
  ids = [1, 450, 1234, 2]
  assert llama.decode(ids) == "<s> The answer</s>"
  assert llama.decode(ids, skip_special_tokens=True) == llama_sp.decode(ids) == "The answer"


def test_llama_tokenizer_json_matches_sentencepiece(llama, llama_tables, tmp_path):
  """transformers converts the same model to tokenizer.json; the tokenizers backend
  must then agree with the SentencePiece backend id for id and byte for byte."""
  transformers = pytest.importorskip("transformers")
  (tmp_path / "src").mkdir()
  os.symlink(LLAMA_MODEL, tmp_path / "src" / "tokenizer.model")
  converted = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "src"))
  json_dir = tmp_path / "json"
  json_dir.mkdir()
  converted.backend_tokenizer.save(str(json_dir / "tokenizer.json"))
  (json_dir / "tokenizer_config.json").write_text(
      '{"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true}')
  from_json = tokenizer_lib.load_tokenizer(str(json_dir))
  assert isinstance(from_json, tokenizer_lib.HFTokenizer)
  assert (from_json.vocab_size, from_json.bos_id, from_json.eos_id) == (32000, 1, 2)
  for text in VARIED_TEXTS:
    assert from_json.encode(text) == converted.encode(text, add_special_tokens=False), text
    # HF's BPE and sentencepiece split runs of spaces differently ("  a": "▁▁" + "a" vs
    # "▁▁" + "▁a"); elsewhere they agree.
    if "  " not in text and text != " ":
      assert from_json.encode(text) == llama.encode(text), text
  assert [from_json.token_bytes(i) for i in range(32000)] == [
      llama.token_bytes(i) for i in range(32000)]
  for ids in _random_sequences(32000, 200, seed=1, extra_ids=(0, 1, 2)):
    for skip in (False, True):
      assert from_json.decode(ids, skip) == llama.decode(ids, skip), (ids, skip)
  tables_json = tokenizer_lib.token_tables(from_json)
  tables_sp = llama_tables
  np.testing.assert_array_equal(tables_json.clause_end, tables_sp.clause_end)
  assert (tables_json.label_a, tables_json.label_b) == (tables_sp.label_a, tables_sp.label_b)


# SmolLM2 GGUF byte-level BPE.


def test_smollm_header_facts(smollm):
  assert (smollm.vocab_size, smollm.bos_id, smollm.eos_id) == (49152, 1, 2)
  assert not smollm.adds_bos
  assert smollm.chat_template.startswith("{% for message in messages %}")
  assert "<|im_start|>" in smollm.chat_template
  assert smollm.encode("<|im_start|>user\n") == [1, 4093, 198]


def test_smollm_matches_transformers_gguf_tokenizer(smollm, smollm_oracle):
  for text in VARIED_TEXTS:
    ids = smollm.encode(text)
    assert ids == smollm_oracle.encode(text, add_special_tokens=False), text
    for skip in (False, True):
      assert smollm.decode(ids, skip) == smollm_oracle.decode(ids, skip_special_tokens=skip)
  for ids in _random_sequences(smollm.vocab_size, 300, seed=2, extra_ids=range(17)):
    for skip in (False, True):
      assert smollm.decode(ids, skip) == smollm_oracle.decode(ids, skip_special_tokens=skip)
  special = {i for i in range(smollm.vocab_size) if smollm.is_special(i)}
  oracle_special = {i for i, t in smollm_oracle.added_tokens_decoder.items() if t.special}
  assert special == oracle_special == set(range(17))


def test_smollm_numeric_characters_split_one_by_one(smollm):
  """llama.cpp's 'smollm' pre-tokenizer (like SmolLM2's own tokenizer.json, Digits with
  individual_digits) isolates every \\p{N} character, so a space before one stays a
  token of its own. transformers' GGUF loader omits that split: it agrees on ASCII
  digits (the vocabulary has no " 2"-like merges) but gives " ½" -> [" \\xc2", "\\xbd"]."""
  assert [smollm.token_text(i) for i in smollm.encode(" 2024")] == [" ", "2", "0", "2", "4"]
  assert [smollm.token_text(i) for i in smollm.encode("x²³")] == ["x", "²", "³"]
  assert [smollm.token_text(i) for i in smollm.encode(" ½")] == [" ", "½"]


def test_smollm_token_bytes_rebuild_text(smollm):
  for text in VARIED_TEXTS:
    ids = smollm.encode(text)
    assert b"".join(smollm.token_bytes(i) for i in ids) == text.encode("utf-8"), text
  # "😀" is the four bytes F0 9F 98 80; no single token holds them all.
  pieces = [smollm.token_bytes(i) for i in smollm.encode("😀")]
  assert len(pieces) > 1 and b"".join(pieces) == "😀".encode("utf-8")
  assert "\ufffd" in smollm.token_text(smollm.encode("😀")[0])


def test_gguf_tokenizer_round_trips_through_tokenizer_json(smollm, tmp_path):
  smollm.save(str(tmp_path))
  reloaded = tokenizer_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert isinstance(reloaded, tokenizer_lib.HFTokenizer)
  assert (reloaded.vocab_size, reloaded.bos_id, reloaded.eos_id, reloaded.adds_bos) == (
      49152, 1, 2, False)
  assert reloaded.chat_template == smollm.chat_template
  for text in VARIED_TEXTS:
    assert reloaded.encode(text) == smollm.encode(text), text
  assert [reloaded.token_bytes(i) for i in range(49152)] == [
      smollm.token_bytes(i) for i in range(49152)]


# Token tables.


def test_clause_end_spot_checks(llama, smollm, llama_tables, smollm_tables):
  """Neither real vocabulary holds a punctuation+whitespace token such as ". " or ".\n"
  (the tiny vocabulary below covers those); "\n " and '."' show that only the last
  character counts."""
  for tok, tables, true_texts, false_texts in (
      (llama, llama_tables, [",", ".", "?", ":", ";", "\n", "),", "...", " ."],
       ["Hello", " Yes", "!", "’", '."']),
      (smollm, smollm_tables, [",", ".", "?", ":", ";", "\n", "\n\n", "),", "..."],
       ["Hello", " Yes", "!", "’", '."', "\n "]),
  ):
    clause_end = tables.clause_end
    assert clause_end.shape == (tok.vocab_size,) and clause_end.dtype == bool
    ids_by_text = _ids_by_text(tok)
    for text, expected in [(t, True) for t in true_texts] + [(t, False) for t in false_texts]:
      ids = ids_by_text.get(text)
      assert ids, f"no token reads {text!r}"
      assert all(clause_end[i] == expected for i in ids), text
    assert not clause_end[tok.eos_id]


def test_clause_end_matches_oracle_decoding(llama, llama_sp, llama_tables, smollm, smollm_oracle,
                                            smollm_tables):
  """Over the whole vocabulary: the oracle's decoding of the token alone ends with a
  clause-end character exactly where the table says so (tokens whose oracle text is
  a partial UTF-8 sequence or empty are skipped: nothing to compare)."""
  ends = tuple(",.?:;\n")
  for tok, tables, decode_one in (
      (llama, llama_tables, lambda i: llama_sp.decode([i])),
      (smollm, smollm_tables, lambda i: smollm_oracle.decode([i]))):
    clause_end = tables.clause_end
    checked = 0
    for i in range(tok.vocab_size):
      text = decode_one(i)
      if text and "\ufffd" not in text:
        assert clause_end[i] == text.endswith(ends), (i, text)
        checked += 1
    assert checked > 0.95 * tok.vocab_size


def test_labels_and_yes_no_llama(llama_tables):
  tables = llama_tables
  assert (tables.label_a, tables.label_b) == (29909, 29933)
  assert sorted(tables.yes_ids.tolist()) == [3869, 8241]
  assert sorted(tables.no_ids.tolist()) == [1939, 3782]
  assert (tables.eos_id, tables.vocab_size) == (2, 32000)
  with pytest.raises(ValueError):
    tables.clause_end[0] = True


def test_labels_and_yes_no_smollm(smollm_tables, smollm_oracle):
  tables = smollm_tables
  prompt = tokenizer_lib.LABEL_CONTEXT
  for letter, label in (("A", tables.label_a), ("B", tables.label_b)):
    oracle_ids = smollm_oracle.encode(prompt + letter, add_special_tokens=False)
    assert oracle_ids[-1] == label
    assert smollm_oracle.convert_ids_to_tokens(label) == letter
  vocab = smollm_oracle.get_vocab()
  assert set(tables.yes_ids.tolist()) == {i for t, i in vocab.items() if t in ("Yes", "\u0120Yes")}
  assert set(tables.no_ids.tolist()) == {i for t, i in vocab.items() if t in ("No", "\u0120No")}
  assert len(tables.yes_ids) == 2 and len(tables.no_ids) == 2


def _tiny_gguf_metadata(extra_merges=()):
  """A hand-made byte-level vocabulary: ids 0-1 control, then single characters."""
  chars = ["(", "A", "B", "Y", "e", "s", "N", "o", ".", ",", "\u0120", "\u010a", "H", "u", "m",
           "a", "n", ":", "T", "h", "w", "r", "i", "1", "2"]
  merged = [left + right for left, right in (m.split(" ") for m in extra_merges)]
  tokens = ["<|end|>", "<|start|>"] + chars + merged
  return {
      "tokenizer.ggml.model": "gpt2",
      "tokenizer.ggml.pre": "smollm",
      "tokenizer.ggml.tokens": tokens,
      "tokenizer.ggml.merges": list(extra_merges),
      "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
      "tokenizer.ggml.bos_token_id": 1,
      "tokenizer.ggml.eos_token_id": 0,
  }


def test_tiny_vocabulary_hand_computed():
  tok = tokenizer_lib.Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(
      ["Y e", "Ye s", "N o", "\u0120 Yes", ". \u010a", ". \u0120"]))
  # ids: "(" 2, "A" 3, "B" 4, "." 10, " " 12, "\n" 13, "Ye" 27, "Yes" 28, "No" 29,
  # " Yes" 30, ".\n" 31, ". " 32. The GPT-2 split cuts ".\n" and " No" apart before merging.
  assert tok.encode("(A") == [2, 3]
  assert tok.encode("Yes No. Yes.\n", add_bos=True) == [1, 28, 12, 29, 10, 30, 10, 13]
  assert tok.decode([1, 28, 0]) == "<|start|>Yes<|end|>"
  assert tok.decode([1, 28, 0], skip_special_tokens=True) == "Yes"
  tables = tokenizer_lib.token_tables(tok, label_context="Th(")
  assert (tables.label_a, tables.label_b, tables.eos_id) == (3, 4, 0)
  assert tables.yes_ids.tolist() == [28, 30] and tables.no_ids.tolist() == [29]
  assert np.flatnonzero(tables.clause_end).tolist() == [10, 11, 13, 19, 31]


def test_gguf_pre_tokenizer_names():
  """'smollm' isolates digits, so the merge "1 2" never applies; 'gpt-2' keeps "12"
  one pre-token and merges it (id 27 = first merged token)."""
  metadata = _tiny_gguf_metadata(["1 2"])
  assert tokenizer_lib.Tokenizer.from_gguf_metadata(metadata).encode("12") == [25, 26]
  gpt2 = tokenizer_lib.Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "gpt-2"})
  assert gpt2.encode("12") == [27]


def test_next_token_id_rejects_merges_and_multi_token_letters():
  tok = tokenizer_lib.Tokenizer.from_gguf_metadata(_tiny_gguf_metadata(["Y e"]))
  assert tokenizer_lib.next_token_id(tok, "(", "Y") == 5
  with pytest.raises(ValueError, match="not a single token"):  # "Y" + "e" merge into "Ye"
    tokenizer_lib.next_token_id(tok, "(Y", "e")
  with pytest.raises(ValueError, match="not a single token"):
    tokenizer_lib.next_token_id(tok, "(", "AB")


def test_stop_sequences_find_marker(llama, llama_sp, smollm, smollm_oracle):
  generated = ["Sure.\nHuman: next", "Sure. Human: next", "Human: hi", "ok\n\nHuman:",
               "Fine.Human: x", "A: yes Human:\nwhat"]
  for tok, encode in ((llama, llama_sp.encode),
                      (smollm, lambda t: smollm_oracle.encode(t, add_special_tokens=False))):
    sequences = tokenizer_lib.encode_stop_sequences(tok, "Human:")
    assert len(sequences) == len({tuple(s) for s in sequences}) >= 2
    for sequence in sequences:
      assert tok.decode(sequence).strip() == "Human:"
    for text in generated:
      ids = encode(text)
      windows = {tuple(ids[i:j]) for i in range(len(ids)) for j in range(i + 1, len(ids) + 1)}
      assert any(tuple(s) in windows for s in sequences), (text, ids, sequences)
    ids = encode("Humane: no")
    windows = {tuple(ids[i:j]) for i in range(len(ids)) for j in range(i + 1, len(ids) + 1)}
    assert not any(tuple(s) in windows for s in sequences)
  with pytest.raises(ValueError):
    tokenizer_lib.encode_stop_sequences(llama, "  ")


# Errors.


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    tokenizer_lib.load_tokenizer(str(tmp_path / "nope.model"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  bad_model = tmp_path / "tokenizer.model"
  bad_model.write_bytes(b"\x00not a sentencepiece model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    tokenizer_lib.load_tokenizer(str(bad_model))
  bad_json = tmp_path / "j" / "tokenizer.json"
  bad_json.parent.mkdir()
  bad_json.write_text("{ this is not json")
  with pytest.raises(ValueError, match="not a valid tokenizer.json"):
    tokenizer_lib.load_tokenizer(str(bad_json))
  bad_gguf = tmp_path / "model.gguf"
  bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
  with pytest.raises(ValueError, match="model.gguf"):
    tokenizer_lib.load_tokenizer(str(bad_gguf))
  other = tmp_path / "vocab.txt"
  other.write_text("a\nb\n")
  with pytest.raises(ValueError, match="cannot tell the tokenizer format"):
    tokenizer_lib.load_tokenizer(str(other))


def test_tokenizer_json_without_config_is_rejected(smollm, tmp_path):
  smollm.save(str(tmp_path))
  os.remove(tmp_path / "tokenizer_config.json")
  with pytest.raises(ValueError, match="no eos_token"):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_bad_gguf_metadata():
  metadata = _tiny_gguf_metadata()
  with pytest.raises(ValueError, match="lacks 'tokenizer.ggml.tokens'"):
    tokenizer_lib.Tokenizer.from_gguf_metadata(
        {k: v for k, v in metadata.items() if k != "tokenizer.ggml.tokens"})
  with pytest.raises(ValueError, match="'llama' is not supported"):
    tokenizer_lib.Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.model": "llama"})
  with pytest.raises(ValueError, match="pre-tokenizer 'qwen2' is not supported"):
    tokenizer_lib.Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.pre": "qwen2"})
  with pytest.raises(ValueError, match="malformed BPE merge"):
    tokenizer_lib.Tokenizer.from_gguf_metadata({**metadata, "tokenizer.ggml.merges": ["Ye"]})
  with pytest.raises(ValueError, match="end-of-sequence"):
    tokenizer_lib.Tokenizer.from_gguf_metadata(
        {k: v for k, v in metadata.items() if k != "tokenizer.ggml.eos_token_id"})


def test_bad_ids_and_text(llama):
  with pytest.raises(ValueError, match="outside the vocabulary"):
    llama.decode([5, 32000])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    llama.token_text(-1)
  with pytest.raises(TypeError):
    llama.decode([1.5])
  with pytest.raises(TypeError):
    llama.encode(b"bytes")
  no_bos = tokenizer_lib.Tokenizer.from_gguf_metadata(
      {k: v for k, v in _tiny_gguf_metadata().items() if k != "tokenizer.ggml.bos_token_id"})
  assert no_bos.bos_id is None
  with pytest.raises(ValueError, match="no BOS"):
    no_bos.encode("A", add_bos=True)
