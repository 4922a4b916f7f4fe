"""Shared pytest fixtures, and how the suite splits over pytest-xdist workers."""
import pytest

from models import registry

# Test files that read the session's one tiny `rain_jax.run` (tests/tiny_run.py): one
# xdist group, so that the run is made once.
TINY_RUN_FILES = {'test_cli_rain', 'test_report_trees', 'test_summary'}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """One xdist group per test file (`--dist loadgroup`), the tiny-run files sharing one."""
  for item in items:
    name = item.module.__name__.rsplit('.', 1)[-1]
    item.add_marker(pytest.mark.xdist_group('tiny_run' if name in TINY_RUN_FILES else name))


@pytest.fixture(scope="session")
def smollm2_gguf_path():
  """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF (fetched once per cache)."""
  return registry.smollm2_gguf_path()


@pytest.fixture
def tiny_hf_checkpoint(tmp_path):
  """Factory: a random tiny HF LlamaForCausalLM saved as safetensors under tmp_path.

  make(num_heads=4, num_kv_heads=4, tie=False, torch_dtype='float32', seed=0, **config)
  returns (directory, model): the directory holds config.json + model.safetensors
  (`save_pretrained(safe_serialization=True)`), and `model` is the same network in
  float32 torch (weights rounded through `torch_dtype`). Every weight, norms included,
  is drawn at random so that a wrongly mapped tensor changes the logits.
  """
  import torch
  import transformers

  def make(num_heads=4, num_kv_heads=4, tie=False, torch_dtype="float32", seed=0,
           max_shard_size=None, **config):
    defaults = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    rope_theta=1000.0, rms_norm_eps=1e-5, max_position_embeddings=128)
    defaults.update(config)
    hf_config = transformers.LlamaConfig(num_attention_heads=num_heads,
                                         num_key_value_heads=num_kv_heads,
                                         tie_word_embeddings=tie, **defaults)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
      for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
          param.copy_(1.0 + 0.3 * torch.randn_like(param))
        else:
          param.copy_(0.2 * torch.randn_like(param))
      model.to(getattr(torch, torch_dtype))
    directory = tmp_path / f"hf-{num_heads}-{num_kv_heads}-{tie}-{torch_dtype}-{seed}"
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return directory, model.float()

  return make


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_gguf_path):
  """transformers' own GGUF conversion (its dequantization and q/k un-permute) of
  SmolLM2, in float32: the independent side of the SmolLM2 parity tests."""
  import transformers
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

  hf_config = transformers.LlamaConfig(**load_gguf_checkpoint(smollm2_gguf_path)["config"])
  model = transformers.LlamaForCausalLM(hf_config).eval()
  state = load_gguf_checkpoint(smollm2_gguf_path, return_tensors=True,
                               model_to_load=model)["tensors"]
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert missing == ["lm_head.weight"] and not unexpected
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model.float()


@pytest.fixture(scope="session")
def tiny_llama_32k_dir(tmp_path_factory):
  """A random 2-layer LLaMA over the 32000-token LLaMA vocabulary (so the shipped LLaMA
  tokenizer serves it), saved as HF safetensors; its folder."""
  import torch
  import transformers
  directory = tmp_path_factory.mktemp("tiny-llama-32k") / "tiny-llama"
  hf_config = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      rms_norm_eps=1e-5, tie_word_embeddings=False)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.copy_((1.0 + 0.3 * torch.randn_like(param)) if name.endswith("norm.weight")
                  else 0.2 * torch.randn_like(param))
  model.save_pretrained(directory, safe_serialization=True)
  return directory
