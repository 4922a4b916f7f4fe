"""Our Flax forward pass vs transformers' LlamaForCausalLM (fp32 torch) on the same weights."""
import numpy as np
import pytest
import torch

from models import convert
from models.llama import forward, init_cache


def our_logits(config, params, tokens):
  """Logits [T, V] float32 of one causal pass over tokens [T] from an empty cache."""
  steps = len(tokens)
  tokens = np.asarray(tokens, np.int32)[None]
  positions = np.arange(steps, dtype=np.int32)[None]
  mask = np.tril(np.ones((steps, steps), bool))[None]
  logits, _, _ = forward(config, params, tokens, positions, init_cache(config, 1, steps),
                         np.zeros((1,), np.int32), mask)
  return np.asarray(logits[0])


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor([list(tokens)])).logits[0].float().numpy()


@pytest.mark.parametrize("num_heads,num_kv_heads,tie", [(4, 4, False), (4, 4, True),
                                                       (4, 2, False), (6, 2, True)])
def test_tiny_safetensors_logits_match_hf(tiny_hf_checkpoint, num_heads, num_kv_heads, tie):
  hf_dir, model = tiny_hf_checkpoint(num_heads=num_heads, num_kv_heads=num_kv_heads, tie=tie,
                                     hidden_size=48, seed=num_heads + num_kv_heads)
  config, params = convert.load_hf_dir(hf_dir)
  assert (config.num_kv_heads, config.tie_embeddings) == (num_kv_heads, tie)
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, 40)
  expected = hf_logits(model, tokens)
  assert np.abs(expected).max() > 1.0
  np.testing.assert_allclose(our_logits(config, params, tokens), expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def smollm2_prompt_and_hf_logits(smollm2_hf_model):
  tokens = np.random.default_rng(0).integers(3, 49152, 512)
  tokens[0] = 1  # <|im_start|>
  return tokens, hf_logits(smollm2_hf_model, tokens)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_smollm2_logits_match_hf(smollm2_gguf_path, smollm2_prompt_and_hf_logits,
                                 scan_layers):
  tokens, expected = smollm2_prompt_and_hf_logits
  config, params = convert.load_gguf(smollm2_gguf_path, scan_layers=scan_layers)
  got = our_logits(config, params, tokens)
  max_diff = float(np.abs(got - expected).max())
  print(f"SmolLM2 {len(tokens)} tokens, scan_layers={scan_layers}: max |logit diff| "
        f"{max_diff:.3g}, max |logit| {np.abs(expected).max():.3g}")
  assert max_diff <= 5e-4
