"""A LLaMA forward pass in plain numpy (float64): the independent oracle of the training
tests. Written from the architecture (RMSNorm, rotary embeddings in the rotate-half
layout, grouped-query causal attention, SwiGLU), not from models/llama.py; it reads the
same parameter tree (stacked layout, kernels [in, out]).
"""
import numpy as np


def _rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rotate(x, positions, theta):
  """x [T, heads, D] rotated by the angles of `positions` [T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
  angles = positions[:, None] * inv_freq[None, :]
  cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
  half = d // 2
  rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos + rotated * sin


def logits(config, params, tokens):
  """Next-token logits [T, V] (float64) of one sequence `tokens` [T] (causal)."""
  p = {k: v for k, v in params.items()}
  as64 = lambda a: np.asarray(a, np.float64)
  t = len(tokens)
  x = as64(p['embed']['embedding'])[np.asarray(tokens)]
  positions = np.arange(t, dtype=np.float64)
  causal = np.tril(np.ones((t, t), bool))
  layers = p['layers']
  nh, kvh, d = config.num_heads, config.num_kv_heads, config.head_dim
  for i in range(config.num_layers):
    layer = lambda *path: as64(_get(layers, path)[i])
    h = _rms_norm(x, layer('attn_norm', 'scale'), config.rms_eps)
    q = (h @ layer('attn', 'wq', 'kernel')).reshape(t, nh, d)
    k = (h @ layer('attn', 'wk', 'kernel')).reshape(t, kvh, d)
    v = (h @ layer('attn', 'wv', 'kernel')).reshape(t, kvh, d)
    q, k = _rotate(q, positions, config.rope_theta), _rotate(k, positions, config.rope_theta)
    out = np.zeros((t, nh, d))
    for head in range(nh):
      kv = head // (nh // kvh)
      scores = q[:, head] @ k[:, kv].T / np.sqrt(d)
      scores = np.where(causal, scores, -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      weights /= weights.sum(-1, keepdims=True)
      out[:, head] = weights @ v[:, kv]
    x = x + out.reshape(t, nh * d) @ layer('attn', 'wo', 'kernel')
    h = _rms_norm(x, layer('mlp_norm', 'scale'), config.rms_eps)
    gate = h @ layer('mlp', 'w_gate', 'kernel')
    up = h @ layer('mlp', 'w_up', 'kernel')
    x = x + (gate / (1 + np.exp(-gate)) * up) @ layer('mlp', 'w_down', 'kernel')
  x = _rms_norm(x, as64(p['final_norm']['scale']), config.rms_eps)
  if config.tie_embeddings:
    return x @ as64(p['embed']['embedding']).T
  return x @ as64(p['lm_head'])


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def answer_logprob(config, params, prompt, answer):
  """log p(answer | prompt) (float64): the sum over the answer's tokens."""
  tokens = list(prompt) + list(answer)
  z = logits(config, params, tokens)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(answer))


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
  """Rafailov et al.: mean over pairs of -log sigmoid(beta * (chosen - rejected
  log-ratio))."""
  z = beta * ((np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected)
                                                         - ref_rejected))
  return float(np.mean(np.log1p(np.exp(-z))))
