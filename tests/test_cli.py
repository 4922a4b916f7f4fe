"""End-to-end `python -m rain_jax.run` in subprocesses, on a tiny random HF LLaMA checkpoint.

Good runs are checked against transformers' own greedy `generate` on the same weights and
the SentencePiece tokenizer read directly; bad inputs must fail with one error line on
stderr, a non-zero exit status and no output file.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
MAX_NEW_TOKENS = 6
BATCH_SIZE = 2
PROMPTS = [
    {'id': 'greeting', 'prompt': 'Hello there, how are'},
    {'id': 'capital', 'prompt': 'Question: what is the capital of France?\nAnswer:'},
    {'id': 7, 'prompt': 'One two three'},
]
REQUIRED_KEYS = {'id', 'task', 'method', 'model', 'prompt', 'response', 'response_ids',
                 'num_new_tokens', 'stop_reason', 'seconds', 'seed'}
# absl/JAX log lines, e.g. "I1127 00:02:39.808282 1396 xla_bridge.py:849] ...".
LOG_LINE = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
ERROR_PREFIX = 'rain_jax.run: error: '


def _save_tiny_llama(directory, max_position_embeddings=256, seed=0):
  """A random 2-layer GQA LlamaForCausalLM over the 32000-token LLaMA vocabulary, saved
  with safetensors; returns the float32 torch model. Weights are drawn large (std 0.2,
  LM head std 1) so that greedy choices are far from ties."""
  config = transformers.LlamaConfig(
      vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
      max_position_embeddings=max_position_embeddings, tie_word_embeddings=False)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith('norm.weight'):
        param.copy_(1.0 + 0.3 * torch.randn_like(param))
      elif name == 'lm_head.weight':
        param.copy_(torch.randn_like(param))
      else:
        param.copy_(0.2 * torch.randn_like(param))
  model.save_pretrained(directory, safe_serialization=True)
  return model


def _save_other_tokenizer(directory):
  """A 286-token byte-level BPE tokenizer.json (not LLaMA's); returns its path."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(['hello world how are you', 'the sky is blue'], trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '</s>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  directory.mkdir()
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
  return str(directory / 'tokenizer.json')


def _write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
  """Checkpoints and prompt files shared by the tests of this module."""
  root = tmp_path_factory.mktemp('cli')
  model = _save_tiny_llama(root / 'tiny-llama')
  _save_tiny_llama(root / 'short-context', max_position_embeddings=16)
  corrupt = root / 'corrupt'
  corrupt.mkdir()
  for name in os.listdir(root / 'tiny-llama'):
    data = (root / 'tiny-llama' / name).read_bytes()
    if name.endswith('.safetensors'):
      data = data[:len(data) // 2]
    (corrupt / name).write_bytes(data)
  prompts = _write_jsonl(root / 'prompts.jsonl', PROMPTS)
  long_prompt = _write_jsonl(root / 'long.jsonl',
                             [{'id': 'long', 'prompt': ' '.join(['word'] * 40)}])
  bad_json = root / 'bad_json.jsonl'
  bad_json.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": \n')
  no_prompt = _write_jsonl(root / 'no_prompt.jsonl',
                           [{'id': 'a', 'prompt': 'hi'}, {'id': 'b', 'text': 'hi'}])
  (root / 'not-a-folder').write_text('a file\n')
  other_tokenizer = _save_other_tokenizer(root / 'other-tokenizer')
  return dict(root=root, model=model, hf_dir=str(root / 'tiny-llama'),
              short_dir=str(root / 'short-context'), corrupt_dir=str(corrupt),
              prompts=prompts, long_prompt=long_prompt, bad_json=str(bad_json),
              no_prompt=no_prompt, other_tokenizer=other_tokenizer)


def _run_cli(*flags):
  """Runs the CLI on one CPU device; returns the CompletedProcess (text stdout/stderr)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'rain_jax.run', *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def _custom_flags(workspace, output, prompt_file=None, hf_dir=None):
  return [f'--hf_dir={hf_dir or workspace["hf_dir"]}', f'--tokenizer={LLAMA_TOKENIZER}',
          '--task=custom', f'--prompt_file={prompt_file or workspace["prompts"]}',
          f'--max_new_tokens={MAX_NEW_TOKENS}', f'--batch_size={BATCH_SIZE}', '--seed=3',
          f'--compilation_cache={workspace["root"] / "xla"}', f'--output={output}']


def _read_lines(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f.read().splitlines()]


def _hf_greedy(model, prompt_ids, max_new_tokens):
  """transformers' greedy continuation of prompt_ids (stops after EOS id 2)."""
  with torch.no_grad():
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=2, pad_token_id=0)
  return out[0, len(prompt_ids):].tolist()


def _min_greedy_gap(model, prompt_ids, new_ids):
  """Smallest top-1 minus top-2 logit gap over the greedy steps that chose new_ids."""
  with torch.no_grad():
    logits = model(torch.tensor([prompt_ids + new_ids])).logits[0].numpy()
  steps = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(new_ids)]
  top2 = np.sort(steps, axis=-1)[:, -2:]
  return float((top2[:, 1] - top2[:, 0]).min())


def _check_record(record, row, model, sp):
  assert REQUIRED_KEYS <= set(record), REQUIRED_KEYS - set(record)
  assert record['id'] == str(row['id'])
  assert (record['task'], record['method'], record['model']) == ('custom', 'vanilla',
                                                                 'tiny-llama')
  assert record['prompt'] == row['prompt'] and record['seed'] == 3
  prompt_ids = [sp.bos_id()] + sp.encode(row['prompt'])
  assert record['prompt_tokens'] == len(prompt_ids)
  expected = _hf_greedy(model, prompt_ids, MAX_NEW_TOKENS)
  assert _min_greedy_gap(model, prompt_ids, expected) > 1e-2
  assert record['response_ids'] == expected
  assert record['num_new_tokens'] == len(expected)
  ends_with_eos = expected[-1] == sp.eos_id()
  assert record['stop_reason'] == ('eos' if ends_with_eos else 'max_new_tokens')
  text_ids = expected[:-1] if ends_with_eos else expected
  assert record['response'] == sp.decode(text_ids).strip()
  assert record['seconds'] >= 0


def test_run_writes_greedy_records_and_resumes(workspace, tmp_path):
  output = tmp_path / 'results' / 'out.jsonl'
  sp = sentencepiece.SentencePieceProcessor(model_file=LLAMA_TOKENIZER)
  flags = _custom_flags(workspace, output)

  first = _run_cli(*flags, '--num_examples=2')
  assert first.returncode == 0, first.stderr
  records = _read_lines(output)
  assert [r['id'] for r in records] == ['greeting', 'capital']
  for record, row in zip(records, PROMPTS):
    _check_record(record, row, workspace['model'], sp)
  first_bytes = output.read_bytes()

  again = _run_cli(*flags, '--num_examples=2')
  assert again.returncode == 0, again.stderr
  assert output.read_bytes() == first_bytes

  more = _run_cli(*flags, '--num_examples=-1')
  assert more.returncode == 0, more.stderr
  assert output.read_bytes().startswith(first_bytes)
  records = _read_lines(output)
  assert [r['id'] for r in records] == ['greeting', 'capital', '7']
  _check_record(records[2], PROMPTS[2], workspace['model'], sp)


BAD_INPUTS = {
    # name: (flags replacing the good ones, words the error line must contain)
    'unknown_model': (lambda w: {'--hf_dir': None, '--model': 'no-such-model'},
                      ['unknown model', 'no-such-model']),
    'missing_checkpoint': (lambda w: {'--hf_dir': str(w['root'] / 'absent')},
                           ['absent', 'does not exist']),
    'truncated_safetensors': (lambda w: {'--hf_dir': w['corrupt_dir']},
                              ['model.safetensors', 'truncated']),
    'prompt_longer_than_context': (lambda w: {'--hf_dir': w['short_dir'],
                                              '--prompt_file': w['long_prompt']},
                                   ["'long'", 'context of 16 tokens']),
    'prompt_file_bad_json': (lambda w: {'--prompt_file': w['bad_json']},
                             ['bad_json.jsonl:2', 'not valid JSON']),
    'prompt_file_missing_prompt': (lambda w: {'--prompt_file': w['no_prompt']},
                                   ['no_prompt.jsonl:2', '"prompt"']),
    'prompt_file_absent': (lambda w: {'--prompt_file': str(w['root'] / 'absent.jsonl')},
                           ['prompt file', 'absent.jsonl']),
    'mesh_needs_more_devices': (lambda w: {'--mesh': '3,1,1'}, ['mesh', '3,1,1']),
    'unknown_task': (lambda w: {'--task': 'no-such-task'}, ['unknown task', 'no-such-task']),
    'output_under_a_file': (lambda w: {'--output': str(w['root'] / 'not-a-folder' / 'o.jsonl')},
                            ['--output', 'not-a-folder is not a directory']),
    'judge_model_without_rain': (lambda w: {'--judge_hf_dir': w['hf_dir']},
                                 ['judge model', '--method=rain']),
    'judge_model_absent': (lambda w: {'--method': 'rain',
                                      '--judge_hf_dir': str(w['root'] / 'absent')},
                           ['judge model', '--judge_hf_dir', 'absent', 'does not exist']),
    'judge_model_other_tokenizer': (lambda w: {'--method': 'rain', '--judge_hf_dir': w['hf_dir'],
                                               '--judge_tokenizer': w['other_tokenizer']},
                                    ["does not share the policy's tokenizer",
                                     '32000 vs 286 tokens']),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_gives_one_error_line_and_no_output(workspace, tmp_path, case):
  output = tmp_path / 'out.jsonl'
  replace, words = BAD_INPUTS[case]
  flags = dict(flag.split('=', 1) for flag in _custom_flags(workspace, output))
  flags.update(replace(workspace))
  result = _run_cli(*(f'{name}={value}' for name, value in flags.items() if value is not None))
  lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
  assert result.returncode != 0
  assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr
  for word in words:
    assert word in lines[0], lines[0]
  assert not list(tmp_path.iterdir())  # neither the results file nor anything beside it
  assert not result.stdout
