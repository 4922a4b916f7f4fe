"""Named model configurations (architecture only; weights come from a checkpoint).

Shapes follow the published configs: LLaMA-1 (Touvron et al. 2023a), LLaMA-2
(Touvron et al. 2023b; 70B uses grouped-query attention with 8 KV heads), Vicuna v1.3
(fine-tuned LLaMA-1, same shapes), SmolLM2-135M (shapes read from its GGUF).
"""
from models.llama import LlamaConfig


def _llama1(hidden, ffn, layers, heads):
  return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn,
                     num_layers=layers, num_heads=heads, num_kv_heads=heads,
                     head_dim=hidden // heads, rope_theta=10000.0, rms_eps=1e-6,
                     max_seq_len=2048)


def _llama2(hidden, ffn, layers, heads, kv_heads):
  return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn,
                     num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=hidden // heads, rope_theta=10000.0, rms_eps=1e-5,
                     max_seq_len=4096)


PRESETS = {
    'llama-7b': _llama1(4096, 11008, 32, 32),
    'llama-13b': _llama1(5120, 13824, 40, 40),
    'llama-30b': _llama1(6656, 17920, 60, 52),
    'llama-65b': _llama1(8192, 22016, 80, 64),
    'llama2-7b': _llama2(4096, 11008, 32, 32, 32),
    'llama2-13b': _llama2(5120, 13824, 40, 40, 40),
    'llama2-70b': _llama2(8192, 28672, 80, 64, 8),
    'vicuna-7b': _llama1(4096, 11008, 32, 32),
    'vicuna-13b': _llama1(5120, 13824, 40, 40),
    'vicuna-33b': _llama1(6656, 17920, 60, 52),
    'smollm2-135m': LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rope_theta=100000.0, rms_eps=1e-5, max_seq_len=8192,
                                tie_embeddings=True),
    # Tiny random-weight configs for tests: heads divide 8 so every 8-device mesh applies.
    'tiny-mha': LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=8, num_kv_heads=8, head_dim=8,
                            rope_theta=10000.0, rms_eps=1e-6, max_seq_len=256),
    'tiny-gqa': LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160,
                            num_layers=3, num_heads=8, num_kv_heads=4, head_dim=8,
                            rope_theta=500.0, rms_eps=1e-5, max_seq_len=256,
                            tie_embeddings=True),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
  """The named config, with field overrides (e.g. dtype='bfloat16', scan_layers=False)."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {", ".join(sorted(PRESETS))}')
  return PRESETS[name].replace(**overrides)
