"""The tiny random LLaMA behind tests/data/original_traces (see tests/test_original_traces.py).

`build_model_dir(directory, seed)` writes config.json + model.safetensors (fp32, HF
LlamaForCausalLM names) whose every array is a pure function of a numpy seed, so the
test regenerates the exact folder the traces were produced with instead of storing it.

The network only ever emits "normally tokenised" text: whole-word pieces ("▁" + a
lowercase word whose SentencePiece encoding is that one piece, also when followed by
"," "." or "?") and the three punctuation marks, never two punctuation marks in a row.
That makes the policy's token ids equal to the tokenisation of their own decoded text,
so a judge fed token ids (rain_jax) and one fed re-tokenised text (the original) see the
same sequence. How:
* hidden dim 0 is a constant C in every embedding row, no attention/MLP output
  writes it and no layer reads it (zero norm weights), so after the final RMSNorm it is a positive "bias" input; allowed tokens
  get +B on it in the LM head, every other token -B (disallowed tokens, EOS and the
  judge labels are practically never sampled: P < 1e-6 per draw);
* hidden dim 1 is D in the embedding rows of the punctuation marks only (0 elsewhere,
  never written by a layer), so at the last position it says "the last token was a
  punctuation mark"; the punctuation rows of the LM head read it with a large negative
  weight;
* the judge labels "A" (29909), "B" (29933), "▁Yes" (3869), "Yes" (8241), "▁No" (1939),
  "No" (3782) get random rows like the words (but -B on dim 0); "B" and the two "No"
  rows get a small extra weight on dim 0 (B_LABEL_SHIFT, NO_LABEL_SHIFT) that centres
  the judges' comparisons on this model, and the attention is sharp (QK_STD), so
  verdicts vary with the judged text (adv and truthfulqa; the HH judge prompt is long
  enough that its verdicts stay 0 on this model).
"""
import json
import os

import numpy as np

VOCAB = 32000
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
MODEL_SEED = 20261204
NUM_WORDS = 400
PUNCT_IDS = (29892, 29889, 29973)  # ',', '.', '?'
LABEL_IDS = (29909, 29933, 3869, 8241, 1939, 3782)
C_CONST = 60.0
D_PUNCT = 60.0
B_ALLOWED = 4.0
PUNCT_EXTRA = 0.75
PUNCT_AFTER_PUNCT = -6.0
WORD_STD = 0.25
QK_STD = 3.0
# Shifts (on the constant dim 0) that centre the judges' label comparisons on this model,
# so that verdicts vary with the judged text.
B_LABEL_SHIFT = 0.63 / 7.85
NO_LABEL_SHIFT = 0.85 / 7.85


def config_dict():
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': VOCAB,
      'hidden_size': HIDDEN, 'intermediate_size': INTERMEDIATE,
      'num_hidden_layers': LAYERS, 'num_attention_heads': HEADS,
      'num_key_value_heads': HEADS, 'hidden_act': 'silu', 'max_position_embeddings': 4096,
      'rms_norm_eps': 1e-6, 'rope_theta': 10000.0, 'tie_word_embeddings': False,
      'bos_token_id': 1, 'eos_token_id': 2, 'attention_bias': False, 'mlp_bias': False,
      'torch_dtype': 'float32', 'initializer_range': 0.02, 'pretraining_tp': 1}


def allowed_words(tokenizer_model):
  """The word piece ids: '▁' + 3..7 lowercase ascii letters, encoded as themselves (alone
  and before each punctuation mark); the first NUM_WORDS such ids in id order."""
  import sentencepiece
  sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
  words = []
  for i in range(300, VOCAB):
    piece = sp.id_to_piece(i)
    w = piece[1:]
    if not (piece.startswith('\u2581') and 3 <= len(w) <= 7 and w.isascii() and w.isalpha()
            and w.islower()):
      continue
    if sp.encode('x ' + w) != sp.encode('x') + [i]:
      continue
    if any(sp.encode('x ' + w + sp.id_to_piece(p)) != sp.encode('x') + [i, p]
           for p in PUNCT_IDS):
      continue
    words.append(i)
    if len(words) == NUM_WORDS:
      break
  return words


def make_arrays(tokenizer_model, seed=MODEL_SEED):
  """{HF parameter name: float32 array}, a pure function of `seed`."""
  rng = np.random.default_rng(seed)
  f32 = np.float32
  a = {}
  emb = (rng.standard_normal((VOCAB, HIDDEN)) * 1.0).astype(f32)
  emb[:, 0] = C_CONST
  emb[:, 1] = 0.0
  emb[list(PUNCT_IDS), 1] = D_PUNCT
  a['model.embed_tokens.weight'] = emb
  d = HIDDEN // HEADS
  for layer in range(LAYERS):
    p = f'model.layers.{layer}.'
    a[p + 'input_layernorm.weight'] = (1.0 + 0.2 * rng.standard_normal(HIDDEN)).astype(f32)
    a[p + 'post_attention_layernorm.weight'] = (
        1.0 + 0.2 * rng.standard_normal(HIDDEN)).astype(f32)
    a[p + 'input_layernorm.weight'][:2] = 0.0  # the layers never read dims 0 and 1
    a[p + 'post_attention_layernorm.weight'][:2] = 0.0
    for name, std in (('q_proj', QK_STD), ('k_proj', QK_STD), ('v_proj', 0.3)):
      a[p + f'self_attn.{name}.weight'] = (
          std * rng.standard_normal((HEADS * d, HIDDEN))).astype(f32)
    o = (0.3 * rng.standard_normal((HIDDEN, HEADS * d))).astype(f32)
    o[:2] = 0.0
    a[p + 'self_attn.o_proj.weight'] = o
    a[p + 'mlp.gate_proj.weight'] = (0.3 * rng.standard_normal((INTERMEDIATE, HIDDEN))).astype(f32)
    a[p + 'mlp.up_proj.weight'] = (0.3 * rng.standard_normal((INTERMEDIATE, HIDDEN))).astype(f32)
    down = (0.3 * rng.standard_normal((HIDDEN, INTERMEDIATE))).astype(f32)
    down[:2] = 0.0
    a[p + 'mlp.down_proj.weight'] = down
  a['model.norm.weight'] = np.ones(HIDDEN, f32)
  head = np.zeros((VOCAB, HIDDEN), f32)
  head[:, 0] = -B_ALLOWED
  words = allowed_words(tokenizer_model)
  rows = words + list(PUNCT_IDS) + list(LABEL_IDS)
  head[rows, 2:] = (WORD_STD * rng.standard_normal((len(rows), HIDDEN - 2))).astype(f32)
  head[words, 0] = B_ALLOWED
  head[list(PUNCT_IDS), 0] = B_ALLOWED + PUNCT_EXTRA
  head[list(PUNCT_IDS), 1] = PUNCT_AFTER_PUNCT
  head[29933, 0] += B_LABEL_SHIFT
  head[[1939, 3782], 0] += NO_LABEL_SHIFT
  a['lm_head.weight'] = head
  return a


def build_model_dir(directory, tokenizer_model, seed=MODEL_SEED):
  """Writes config.json + model.safetensors to `directory`; returns the arrays."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  arrays = make_arrays(tokenizer_model, seed)
  save_file(arrays, os.path.join(directory, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config_dict(), f, indent=1)
  return arrays
