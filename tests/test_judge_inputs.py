"""The judge reads the ids the original's one-string tokenisation gives (issue 7, item 2).

The original tokenises the whole judge string (BOS + f2 + "\\n\\n" + conversation +
"\\n" + r1; truth: "[INST] " + f2 + "\\n\\n" + "Q: ...\\nA:" + answer + "\\nIs the answer
truthful? [\\INST] "). rain_jax feeds the judge prompt's ids, the policy's own answer ids
and the suffix ids. For an answer the policy tokenised normally, the concatenation must
equal `tokenizer.encode(whole string)`: the oracle here is the tokenizer itself.
"""
import os

import pytest

from models import tokenizer as tokenizer_lib
from rain_jax import engine, tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama',
                               'tokenizer.model')
ANSWERS = [" I'm sorry, but I cannot help with that.", ' Sure, here is how: first,',
           ' No.']


def policy_answer_ids(tok, prompt, answer):
  """The answer's ids as the policy holds them after the prompt's ids."""
  base = tok.encode(prompt, add_bos=tok.adds_bos)
  full = tok.encode(prompt + answer, add_bos=tok.adds_bos)
  assert full[:len(base)] == base, 'the answer merges into the prompt'
  return full[len(base):]


def check_ab_task(tok, task_name):
  task = tasks.get_task(task_name)
  example = task.load_examples(0, 1)[0]
  prefix = engine.judge_prompt_ids(tok, task, example)
  suffixes = engine.judge_suffix_ids(tok, task)
  f2 = task.read_judge_prompt('f2.txt')
  for answer in ANSWERS:
    answer_ids = policy_answer_ids(tok, example.prompt, answer)
    for r, suffix in zip(('r1.txt', 'r2.txt'), suffixes):
      whole = (f2 + '\n\n' + task.conversation_start(example) + answer + '\n' +
               task.read_judge_prompt(r))
      assert prefix + answer_ids + list(suffix) == tok.encode(whole, add_bos=tok.adds_bos)


def check_truth(tok):
  task = tasks.get_task('truthfulqa')
  example = task.load_examples(0, 1)[0]
  prefix = engine.judge_prompt_ids(tok, task, example)
  (suffix,) = engine.judge_suffix_ids(tok, task)
  for answer in ('The seeds pass through your digestive system.', 'Nothing happens.'):
    # After "[/INST] " the answer's first word carries no word-start space.
    answer_ids = tokenizer_lib.encode_continuation(tok, answer)
    whole = ('[INST] ' + task.read_judge_prompt('f2.txt') + '\n\nQ: ' + example.question +
             '\nA:' + answer + '\nIs the answer truthful? [\\INST] ')
    assert prefix + answer_ids + list(suffix) == tok.encode(whole, add_bos=tok.adds_bos)


@pytest.mark.parametrize('task_name', ['hh', 'adv'])
def test_ab_judge_ids_equal_one_string_tokenisation_llama(task_name):
  check_ab_task(tokenizer_lib.load_tokenizer(LLAMA_TOKENIZER), task_name)


def test_truth_judge_ids_equal_one_string_tokenisation_llama():
  check_truth(tokenizer_lib.load_tokenizer(LLAMA_TOKENIZER))


def test_suffix_has_no_sentencepiece_word_start_before_the_newline():
  tok = tokenizer_lib.load_tokenizer(LLAMA_TOKENIZER)
  suffixes = engine.judge_suffix_ids(tok, tasks.get_task('hh'))
  assert tok.encode('\n' + tasks.get_task('hh').read_judge_prompt('r1.txt'))[0] == 29871
  assert all(s[0] == 13 for s in suffixes)   # "\n" (<0x0A>) first, no "▁" (29871)


@pytest.mark.integration
@pytest.mark.parametrize('task_name', ['hh', 'adv', 'truthfulqa'])
def test_judge_ids_equal_one_string_tokenisation_smollm2(task_name, smollm2_gguf_path):
  tok = tokenizer_lib.load_tokenizer(smollm2_gguf_path)
  if task_name == 'truthfulqa':
    check_truth(tok)
  else:
    check_ab_task(tok, task_name)
