"""Tokenizers for rain_jax, and the token tables the RAIN search needs.

One interface, `Tokenizer`, over three sources of a vocabulary:

* a SentencePiece `tokenizer.model` (LLaMA-1/2, Vicuna), run by `sentencepiece`;
* an HF `tokenizer.json`, run by `tokenizers`;
* the byte-level BPE stored in a GGUF file's metadata, rebuilt with `tokenizers`
  (no torch, no transformers).

Conventions every backend follows:

* `encode(text)` never adds special tokens unless `add_bos=True`; text that spells a
  special token of a `tokenizers` vocabulary (e.g. "<|im_start|>") becomes that token,
  while SentencePiece reads such text as plain characters (as `sentencepiece` does).
* `decode(ids)` keeps special tokens as their text unless `skip_special_tokens=True`.
* `token_bytes(id)` is what the token contributes *inside* a text: a SentencePiece
  word-start marker is a space (so "▁Yes" gives b" Yes", whereas `decode([id])` drops the
  leading space of a whole text), a byte piece is its byte, a byte-level BPE token is
  its bytes (possibly a partial UTF-8 sequence), a special token is its text.
  `token_text(id)` is those bytes decoded as UTF-8 with errors='replace'.

`token_tables(tok)` derives, from the vocabulary alone, the id sets the search needs:
clause ends (rollout stops), the judge's "A"/"B" labels, the "Yes"/"No" ids, EOS.
`encode_stop_sequences(tok, marker)` lists the token sequences that spell a turn marker.
"""

import abc
import dataclasses
import json
import os
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from models import gguf

# Characters that end a clause: RAIN stops a rollout once the decoded text ends with one.
CLAUSE_END_CHARS = (",", ".", "?", ":", ";", "\n")
# The judge prompts end with this text; the verdict is the next token's letter.
LABEL_CONTEXT = "The answer is: ("
# GGUF `tokenizer.ggml.pre` names whose pre-tokenizer isolates every numeric character
# before the GPT-2 split (llama.cpp gives these the regexes "\p{N}" then GPT-2's).
_GGUF_PRE_DIGITS = frozenset({"smollm", "starcoder", "refact"})
# GGUF pre-tokenizer names that use the plain GPT-2 split.
_GGUF_PRE_GPT2 = frozenset({"gpt-2"})
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_WORD_START = "\u2581"


def _byte_level_alphabet() -> dict[str, int]:
  """The GPT-2 byte-level spelling, inverted: printable character -> byte value.

  Bytes that are printable Latin-1 characters (other than space and soft hyphen) spell
  themselves; the other 68 bytes take the characters U+0100, U+0101, ... in byte order.
  """
  printable = [
      *range(ord("!"), ord("~") + 1),
      *range(ord("\u00a1"), ord("\u00ac") + 1),
      *range(ord("\u00ae"), ord("\u00ff") + 1),
  ]
  printable_set = set(printable)
  char_to_byte = {chr(b): b for b in printable}
  shifted = (b for b in range(256) if b not in printable_set)
  for offset, byte in enumerate(shifted):
    char_to_byte[chr(256 + offset)] = byte
  return char_to_byte


_BYTE_LEVEL_CHARS = _byte_level_alphabet()


def _byte_level_token_bytes(token: str) -> bytes:
  """Bytes spelled by a byte-level BPE token string (a character outside the alphabet
  stands for its own UTF-8 bytes, as the ByteLevel decoder treats it)."""
  out = bytearray()
  for char in token:
    byte = _BYTE_LEVEL_CHARS.get(char)
    if byte is None:
      out += char.encode("utf-8")
    else:
      out.append(byte)
  return bytes(out)


def _sentencepiece_piece_bytes(piece: str, byte_pieces: bool) -> bytes:
  """Bytes of a SentencePiece-style piece: "<0xNN>" is one byte (when the vocabulary
  has byte pieces), and the word-start marker "▁" is a space."""
  match = _BYTE_PIECE.fullmatch(piece) if byte_pieces else None
  if match:
    return bytes([int(match.group(1), 16)])
  return piece.replace(_WORD_START, " ").encode("utf-8")


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the per-token facts the search needs.

  Attributes:
    bos_id: beginning-of-sequence id, or None when the vocabulary has none.
    eos_id: end-of-sequence id.
    vocab_size: number of ids V; every id is in [0, V).
    chat_template: the Jinja chat template shipped with the tokenizer, or None.
    adds_bos: whether the model was trained with a BOS at the start of a text (a hint
      for callers; `encode` itself adds BOS only when asked).
  """

  def __init__(self, *, bos_id: Optional[int], eos_id: Optional[int], vocab_size: int,
               chat_template: Optional[str], adds_bos: bool):
    if vocab_size <= 0:
      raise ValueError(f"vocabulary is empty (vocab_size={vocab_size})")
    if eos_id is None:
      raise ValueError("the tokenizer declares no end-of-sequence token")
    for name, token_id in (("bos_id", bos_id), ("eos_id", eos_id)):
      if token_id is not None and not 0 <= token_id < vocab_size:
        raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {vocab_size})")
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.vocab_size = vocab_size
    self.chat_template = chat_template
    self.adds_bos = adds_bos

  # Constructors for each source.

  @classmethod
  def from_sentencepiece(cls, path: str) -> "Tokenizer":
    """A tokenizer from a SentencePiece `tokenizer.model` file."""
    return SentencePieceTokenizer(path)

  @classmethod
  def from_tokenizer_json(cls, path: str) -> "Tokenizer":
    """A tokenizer from an HF `tokenizer.json`; BOS/EOS and the chat template come from
    `tokenizer_config.json` (and `chat_template.jinja`) in the same directory."""
    return HFTokenizer.from_file(path)

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
    """A tokenizer from a GGUF file's metadata (key -> value, arrays as sequences)."""
    return HFTokenizer.from_gguf_metadata(metadata)

  @classmethod
  def from_gguf(cls, path: str) -> "Tokenizer":
    """A tokenizer from the vocabulary embedded in a GGUF file."""
    return cls.from_gguf_metadata(gguf.read_metadata(path))

  # The interface.

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text` ([T] ints), with `bos_id` in front when `add_bos`."""
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self._encode(text)
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids` ([T] ints); special tokens appear as their text unless skipped."""
    return self._decode(self._checked_ids(ids), skip_special_tokens)

  def token_bytes(self, token_id: int) -> bytes:
    """Exact bytes that one token contributes inside a text (see the module doc)."""
    return self._token_bytes(self._checked_ids([token_id])[0])

  def token_text(self, token_id: int) -> str:
    """`token_bytes(token_id)` as text; a partial UTF-8 sequence becomes U+FFFD."""
    return self.token_bytes(token_id).decode("utf-8", errors="replace")

  def is_special(self, token_id: int) -> bool:
    """Whether the id is a control token (BOS, EOS, <unk>, chat markers, ...)."""
    return self._checked_ids([token_id])[0] in self._special_ids()

  def _checked_ids(self, ids: Iterable[int]) -> list[int]:
    """`ids` as Python ints, each checked to lie in [0, vocab_size)."""
    checked = []
    for token_id in ids:
      if isinstance(token_id, (bool, np.bool_)) or not isinstance(token_id, (int, np.integer)):
        raise TypeError(f"token ids must be integers, got {token_id!r}")
      if not 0 <= token_id < self.vocab_size:
        raise ValueError(
            f"token id {int(token_id)} is outside the vocabulary [0, {self.vocab_size})")
      checked.append(int(token_id))
    return checked

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text` without any added special token."""

  @abc.abstractmethod
  def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    """Text of valid ids."""

  @abc.abstractmethod
  def _token_bytes(self, token_id: int) -> bytes:
    """Bytes of one valid id."""

  @abc.abstractmethod
  def _special_ids(self) -> frozenset[int]:
    """Ids of the control tokens."""


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece model (LLaMA-1/2, Vicuna `tokenizer.model`)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"SentencePiece model not found: {path}")
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (RuntimeError, OSError) as error:
      raise ValueError(f"{path} is not a valid SentencePiece model: {error}") from error
    vocab_size = self._sp.GetPieceSize()
    self._specials = frozenset(
        i for i in range(vocab_size) if self._sp.IsControl(i) or self._sp.IsUnknown(i))
    self._byte_ids = frozenset(i for i in range(vocab_size) if self._sp.IsByte(i))
    config = _read_tokenizer_config(os.path.dirname(path))
    bos, eos = self._sp.bos_id(), self._sp.eos_id()
    super().__init__(
        bos_id=bos if bos >= 0 else None,
        eos_id=eos if eos >= 0 else None,
        vocab_size=vocab_size,
        chat_template=config.chat_template,
        adds_bos=True if config.add_bos is None else config.add_bos)

  def _encode(self, text: str) -> list[int]:
    return list(self._sp.EncodeAsIds(text))

  def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    """Joins the tokens' bytes and drops one leading space (the word-start marker of
    the first word), as `sentencepiece` does for ordinary pieces."""
    kept = [i for i in ids if not (skip_special_tokens and i in self._specials)]
    text = b"".join(self._token_bytes(i) for i in kept).decode("utf-8", errors="replace")
    if kept and kept[0] not in self._specials and kept[0] not in self._byte_ids:
      text = text[1:] if text.startswith(" ") else text
    return text

  def _token_bytes(self, token_id: int) -> bytes:
    piece = self._sp.IdToPiece(token_id)
    if token_id in self._specials:
      return piece.encode("utf-8")
    return _sentencepiece_piece_bytes(piece, token_id in self._byte_ids)

  def _special_ids(self) -> frozenset[int]:
    return self._specials


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer`, byte-level BPE or SentencePiece-style BPE."""

  def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: Optional[int],
               eos_id: Optional[int], chat_template: Optional[str], adds_bos: bool):
    self._backend = backend
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    id_to_token = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    missing = [i for i in range(vocab_size) if i not in id_to_token]
    if missing:
      raise ValueError(f"tokenizer vocabulary has holes: no token for ids {missing[:5]}")
    added = backend.get_added_tokens_decoder()
    self._specials = frozenset(i for i, token in added.items() if token.special)
    spelling = _token_spelling(backend)
    byte_pieces = bool(getattr(backend.model, "byte_fallback", False))
    self._bytes = [
        added[i].content.encode("utf-8") if i in added else
        _byte_level_token_bytes(id_to_token[i]) if spelling == "byte_level" else
        _sentencepiece_piece_bytes(id_to_token[i], byte_pieces)
        for i in range(vocab_size)
    ]
    super().__init__(bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size,
                     chat_template=chat_template, adds_bos=adds_bos)

  @classmethod
  def from_file(cls, path: str) -> "HFTokenizer":
    """Loads `tokenizer.json` plus `tokenizer_config.json` beside it (BOS, EOS, chat
    template); EOS must be named there."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer.json not found: {path}")
    try:
      backend = tokenizers.Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON.
      raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error
    config = _read_tokenizer_config(os.path.dirname(path))
    if config.eos_token is None:
      raise ValueError(
          f"no eos_token for {path}: expected tokenizer_config.json beside it naming one")
    return cls(backend,
               bos_id=_token_id(backend, config.bos_token, "bos_token"),
               eos_id=_token_id(backend, config.eos_token, "eos_token"),
               chat_template=config.chat_template,
               adds_bos=bool(config.add_bos))

  @classmethod
  def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "HFTokenizer":
    """Rebuilds a GGUF file's byte-level BPE ("gpt2" model) from its metadata."""
    model_type = _required(metadata, "tokenizer.ggml.model")
    if model_type != "gpt2":
      raise ValueError(
          f"GGUF tokenizer model {model_type!r} is not supported (only byte-level BPE "
          "'gpt2'); load a SentencePiece vocabulary from its tokenizer.model instead")
    tokens = _str_list(_required(metadata, "tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")
    merges = _str_list(_required(metadata, "tokenizer.ggml.merges"), "tokenizer.ggml.merges")
    token_types = np.asarray(metadata.get("tokenizer.ggml.token_type", []), dtype=np.int64)
    if token_types.size and token_types.shape != (len(tokens),):
      raise ValueError(f"tokenizer.ggml.token_type has {token_types.size} entries "
                       f"for {len(tokens)} tokens")
    if len(set(tokens)) != len(tokens):
      raise ValueError("tokenizer.ggml.tokens holds duplicate tokens")
    backend = tokenizers.Tokenizer(models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[_merge_pair(merge) for merge in merges]))
    backend.pre_tokenizer = _gguf_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([
        tokenizers.AddedToken(tokens[i], special=True, normalized=False)
        for i in np.flatnonzero(token_types == _GGUF_CONTROL)])
    backend.add_tokens([
        tokenizers.AddedToken(tokens[i], special=False, normalized=False)
        for i in np.flatnonzero(token_types == _GGUF_USER_DEFINED)])
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return cls(backend,
               bos_id=None if bos is None else int(bos),
               eos_id=None if eos is None else int(eos),
               chat_template=metadata.get("tokenizer.chat_template"),
               adds_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)))

  def save(self, directory: str) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` (BOS, EOS, chat template)
    to `directory`, the layout `load_tokenizer(directory)` reads back."""
    os.makedirs(directory, exist_ok=True)
    self._backend.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "bos_token": None if self.bos_id is None else self._backend.id_to_token(self.bos_id),
        "eos_token": self._backend.id_to_token(self.eos_id),
        "add_bos_token": self.adds_bos,
        "chat_template": self.chat_template,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, ensure_ascii=False, indent=2)

  def _encode(self, text: str) -> list[int]:
    return self._backend.encode(text, add_special_tokens=False).ids

  def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

  def _token_bytes(self, token_id: int) -> bytes:
    return self._bytes[token_id]

  def _special_ids(self) -> frozenset[int]:
    return self._specials


def _token_spelling(backend: tokenizers.Tokenizer) -> str:
  """How vocabulary strings spell bytes, read from the decoder: "byte_level" (GPT-2
  alphabet) or "sentencepiece" ("▁" for space, "<0xNN>" byte pieces)."""
  decoder = json.loads(backend.to_str()).get("decoder") or {}
  types = set()
  pending = [decoder]
  while pending:
    node = pending.pop()
    types.add(node.get("type"))
    pending.extend(node.get("decoders") or [])
    if node.get("type") == "Replace" and node.get("pattern", {}).get("String") == _WORD_START:
      types.add("ReplaceWordStart")
  if "ByteLevel" in types:
    return "byte_level"
  if types & {"Metaspace", "ReplaceWordStart"}:
    return "sentencepiece"
  raise ValueError(
      f"unsupported tokenizer.json decoder {sorted(t for t in types if t)}: expected "
      "ByteLevel (byte-level BPE) or Metaspace / Replace('▁', ' ') (SentencePiece-style)")


def _gguf_pre_tokenizer(pre: Optional[str]) -> pre_tokenizers.PreTokenizer:
  """The pre-tokenizer llama.cpp applies for a GGUF `tokenizer.ggml.pre` name."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _GGUF_PRE_DIGITS:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _GGUF_PRE_GPT2:
    return byte_level
  supported = sorted(_GGUF_PRE_DIGITS | _GGUF_PRE_GPT2)
  raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {supported}")


def _required(metadata: Mapping[str, Any], key: str) -> Any:
  if key not in metadata:
    raise ValueError(f"GGUF metadata lacks {key!r}: the file embeds no usable tokenizer")
  return metadata[key]


def _str_list(values: Sequence[Any], key: str) -> list[str]:
  """`values` as a list of str; ValueError naming `key` for any other item."""
  for value in values:
    if not isinstance(value, str):
      raise ValueError(f"{key} must hold strings, found {type(value).__name__}")
  return list(values)


def _merge_pair(merge: str) -> tuple[str, str]:
  parts = merge.split(" ")
  if len(parts) != 2 or not all(parts):
    raise ValueError(f"malformed BPE merge {merge!r}: expected two tokens separated by a space")
  return parts[0], parts[1]


@dataclasses.dataclass(frozen=True)
class _TokenizerConfig:
  bos_token: Optional[str] = None
  eos_token: Optional[str] = None
  add_bos: Optional[bool] = None
  chat_template: Optional[str] = None


def _read_tokenizer_config(directory: str) -> _TokenizerConfig:
  """BOS/EOS strings, add_bos flag and chat template from `tokenizer_config.json`
  (and `chat_template.jinja`) in `directory`; absent files give Nones."""
  config = {}
  config_path = os.path.join(directory, "tokenizer_config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{config_path} is not valid JSON: {error}") from error
  template = config.get("chat_template")
  template_path = os.path.join(directory, "chat_template.jinja")
  if template is None and os.path.isfile(template_path):
    with open(template_path, encoding="utf-8") as f:
      template = f.read()
  if template is not None and not isinstance(template, str):
    raise ValueError(f"{config_path}: chat_template must be a string")
  return _TokenizerConfig(
      bos_token=_token_content(config.get("bos_token")),
      eos_token=_token_content(config.get("eos_token")),
      add_bos=config.get("add_bos_token"),
      chat_template=template)


def _token_content(token: Any) -> Optional[str]:
  """A special token as written in tokenizer_config.json: a string or {"content": ...}."""
  if isinstance(token, dict):
    return token.get("content")
  return token


def _token_id(backend: tokenizers.Tokenizer, token: Optional[str], name: str) -> Optional[int]:
  if token is None:
    return None
  token_id = backend.token_to_id(token)
  if token_id is None:
    raise ValueError(f"{name} {token!r} from tokenizer_config.json is not in the vocabulary")
  return token_id


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a tokenizer from a `.model` (SentencePiece), a `tokenizer.json`, a `.gguf`,
  or a directory holding `tokenizer.model` (preferred: the original vocabulary) or
  `tokenizer.json`."""
  if os.path.isdir(path):
    for name, loader in (("tokenizer.model", Tokenizer.from_sentencepiece),
                         ("tokenizer.json", Tokenizer.from_tokenizer_json)):
      candidate = os.path.join(path, name)
      if os.path.isfile(candidate):
        return loader(candidate)
    raise FileNotFoundError(f"no tokenizer.model or tokenizer.json in directory {path}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  if path.endswith(".model"):
    return Tokenizer.from_sentencepiece(path)
  if path.endswith(".json"):
    return Tokenizer.from_tokenizer_json(path)
  if path.endswith(".gguf"):
    return Tokenizer.from_gguf(path)
  raise ValueError(f"cannot tell the tokenizer format of {path}: expected a .model, "
                   ".json or .gguf file, or a directory")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenTables:
  """Per-vocabulary id sets for the search (arrays are read-only).

  Attributes:
    clause_end: bool [V]; True where the token's text ends with one of
      `CLAUSE_END_CHARS`. Like the reference's check on the decoded text, only the
      last character counts: ".\\n" is a clause end, ". " is not.
    label_a, label_b: ids of "A" and "B" as the token right after "(".
    yes_ids, no_ids: int32 [n]; every single token reading "Yes" / "No", with or without
      a word-start space (the truth judge takes the max probability over them).
    eos_id: end-of-sequence id.
    vocab_size: V.
  """
  clause_end: np.ndarray
  label_a: int
  label_b: int
  yes_ids: np.ndarray
  no_ids: np.ndarray
  eos_id: int
  vocab_size: int


def token_tables(tok: Tokenizer, label_context: str = LABEL_CONTEXT) -> TokenTables:
  """Derives the search's token tables from `tok`'s vocabulary."""
  texts = [tok.token_text(i) for i in range(tok.vocab_size)]
  clause_end = np.array([text.endswith(CLAUSE_END_CHARS) for text in texts], dtype=bool)
  return TokenTables(
      clause_end=_read_only(clause_end),
      label_a=next_token_id(tok, label_context, "A"),
      label_b=next_token_id(tok, label_context, "B"),
      yes_ids=_read_only(_word_ids(tok, texts, "Yes")),
      no_ids=_read_only(_word_ids(tok, texts, "No")),
      eos_id=tok.eos_id,
      vocab_size=tok.vocab_size)


def next_token_id(tok: Tokenizer, context: str, continuation: str) -> int:
  """The one id that `continuation` becomes right after `context`.

  Raises:
    ValueError: when appending `continuation` changes the tokens of `context` or adds
      other than exactly one token spelling `continuation`.
  """
  try:
    ids = encode_continuation(tok, continuation, context)
  except ValueError as e:
    raise ValueError(f"{continuation!r} after {context!r} is not a single token of its "
                     f"own: {e}") from None
  if len(ids) != 1:
    raise ValueError(f"{continuation!r} after {context!r} is not a single token of its "
                     f"own: {ids}")
  if tok.token_text(ids[0]) != continuation:
    raise ValueError(f"{continuation!r} after {context!r} became token {ids[0]} "
                     f"reading {tok.token_text(ids[0])!r}")
  return ids[0]


def encode_continuation(tok: Tokenizer, text: str, context: str = "Hello.") -> list[int]:
  """Ids of `text` where it continues other text, as one-string tokenisation gives them.

  The original judge tokenises f2 + "\\n\\n" + convo + "\\n" + r1 as one string. Encoding
  "\\n" + r1 on its own is not the same with SentencePiece, which puts a word-start
  piece ("▁", id 29871 on LLaMA) before the newline of a string's start. Here `text` is
  encoded after `context` (a clause end, where judged text ends) and the context's ids
  are removed.

  Raises:
    ValueError: when appending `text` changes the tokens of `context`.
  """
  base = tok.encode(context)
  full = tok.encode(context + text)
  if full[:len(base)] != base:
    raise ValueError(f"{text!r} merges with the end of {context!r}: {base} -> {full}")
  return full[len(base):]


def _word_ids(tok: Tokenizer, texts: list[str], word: str) -> np.ndarray:
  """int32 [n]: non-special ids whose text is `word`, optionally after one space."""
  ids = [i for i, text in enumerate(texts)
         if (text[1:] if text.startswith(" ") else text) == word and not tok.is_special(i)]
  if not ids:
    raise ValueError(f"no single token reads {word!r} in this vocabulary")
  return np.array(ids, dtype=np.int32)


def _read_only(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array


def encode_stop_sequences(tok: Tokenizer, marker: str) -> list[list[int]]:
  """Token sequences that spell `marker` in generated text, distinct, in a fixed order.

  The marker is tokenized at the start of a text and after ".", " ", "\\n", "\\n\\n",
  each followed by nothing, a space or a newline; each sequence is the run of tokens
  from the first one that covers part of the marker to the first one that completes it
  (so it may carry a merged leading space, as in " Human"). Generated tokens ending with
  any of these mean the marker appeared; the host then cuts the exact text.
  """
  if not isinstance(marker, str) or not marker.strip():
    raise ValueError(f"stop marker must be a non-empty string, got {marker!r}")
  anchor = "Hello."
  texts = [(0, marker + follow) for follow in ("", " ", "\n")]
  texts += [(len(anchor + sep), anchor + sep + marker + follow)
            for sep in ("", " ", "\n", "\n\n") for follow in ("", " ", "\n")]
  sequences = []
  for marker_start, text in texts:
    sequence = _marker_tokens(tok, text, marker_start, marker)
    if sequence not in sequences:
      sequences.append(sequence)
  return sequences


def _marker_tokens(tok: Tokenizer, text: str, marker_start: int, marker: str) -> list[int]:
  """Tokens of `tok.encode(text)` spanning text[marker_start : marker_start+len(marker)]."""
  ids = tok.encode(text)
  marker_end = marker_start + len(marker)
  offsets = [0]
  for token_id in ids:
    offsets.append(offsets[-1] + len(tok.token_bytes(token_id)))
  start_byte = len(text[:marker_start].encode("utf-8"))
  end_byte = len(text[:marker_end].encode("utf-8"))
  # SentencePiece puts a word-start space before a text: shift by the surplus bytes.
  surplus = offsets[-1] - len(text.encode("utf-8"))
  first = max(i for i in range(len(ids)) if offsets[i] <= start_byte + surplus)
  last = min(i for i in range(1, len(ids) + 1) if offsets[i] >= end_byte + surplus)
  return ids[first:last]
