"""Greedy decoding on real SmolLM2-135M weights: `rain_jax.generate.generate` (one batched
call, prompts of different lengths) vs transformers' `generate(do_sample=False)` in fp32
torch, one prompt at a time, on transformers' own conversion of the same GGUF file.

Run with `pytest -m integration tests/test_greedy_parity_hf.py -s` to see the per-prompt
agreement and the smallest top-1/top-2 logit gap along each greedy path."""
import contextlib

import numpy as np
import pytest
import torch

from models import convert
from models.tokenizer import load_tokenizer
from rain_jax import generate as gen
from rain_jax import stopping, tasks

NEW_TOKENS = 64
CHATML_PROMPT = ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained '
                 'by Hugging Face<|im_end|>\n<|im_start|>user\nName three colours of the '
                 'rainbow.<|im_end|>\n<|im_start|>assistant\n')


def _prompt_ids(tokenizer):
  """Token ids [P_i] of three HH prompts and a ChatML one (different lengths)."""
  texts = [ex.prompt for ex in tasks.get_task('hh').load_examples(0, 3)]
  texts.append(CHATML_PROMPT)
  return [tokenizer.encode(text, add_bos=tokenizer.adds_bos) for text in texts]


def _rain_jax_greedy(config, params, prompts):
  """Greedy continuations [NEW_TOKENS] of every prompt, from one batched generate call."""
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, prompt in enumerate(prompts):
    tokens[i, :len(prompt)] = prompt
  out = gen.generate(config, params, tokens, np.array([len(p) for p in prompts], np.int32),
                     np.zeros((len(prompts),), np.uint32), stopping.right_align([]),
                     np.int32(-1), settings=gen.DecodeSettings(NEW_TOKENS, width + NEW_TOKENS))
  assert [stopping.STOP_REASONS[r] for r in np.asarray(out.stop_reason)] == (
      ['max_new_tokens'] * len(prompts))
  return [list(map(int, row)) for row in np.asarray(out.tokens)]


@contextlib.contextmanager
def _torch_threads(count):
  """Runs torch on `count` intra-op threads (2 spinning threads on 2 busy shared cores
  made transformers' decoding 7x slower here), then restores the previous count."""
  previous = torch.get_num_threads()
  torch.set_num_threads(count)
  try:
    yield
  finally:
    torch.set_num_threads(previous)


def _hf_greedy(model, prompt):
  """transformers' greedy continuation [NEW_TOKENS] of one prompt (EOS not stopping it),
  and its top-1 minus top-2 logit gap at each step [NEW_TOKENS]."""
  with torch.no_grad(), _torch_threads(1):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=0, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                         output_logits=True, return_dict_in_generate=True)
  top2 = np.sort(torch.cat(out.logits).float().numpy(), axis=-1)[:, -2:]
  return out.sequences[0, len(prompt):].tolist(), top2[:, 1] - top2[:, 0]


@pytest.mark.integration
@pytest.mark.slow  # 2-3 minutes on 2 shared CPU cores
def test_batched_greedy_matches_transformers(smollm2_gguf_path, smollm2_hf_model):
  config, params = convert.load_gguf(smollm2_gguf_path)
  prompts = _prompt_ids(load_tokenizer(smollm2_gguf_path))
  assert len({len(p) for p in prompts}) == len(prompts)
  ours = _rain_jax_greedy(config, params, prompts)
  agreed, report = [], []
  for prompt, got in zip(prompts, ours):
    expected, gaps = _hf_greedy(smollm2_hf_model, prompt)
    assert len(expected) == NEW_TOKENS
    agree = next((t for t in range(NEW_TOKENS) if got[t] != expected[t]), NEW_TOKENS)
    agreed.append(agree)
    report.append(f'prompt of {len(prompt)} tokens: first {agree}/{NEW_TOKENS} tokens agree, '
                  f'smallest top-2 logit gap {gaps.min():.3g}'
                  + (f', gap at the divergence {gaps[agree]:.3g}' if agree < NEW_TOKENS
                     else ''))
  print('\n'.join(report))
  assert agreed == [NEW_TOKENS] * len(prompts), '\n'.join(report)
