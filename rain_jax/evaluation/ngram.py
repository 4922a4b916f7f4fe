"""Sentence BLEU-4 and ROUGE-L F1 between one hypothesis and one reference.

Both work on lowercased words; scores lie in [0, 1].

BLEU (Papineni et al. 2002) here is sentence-level: clipped n-gram precisions p_1..p_4,
their geometric mean times the brevity penalty exp(1 - r/c) when the hypothesis (c
words) is shorter than the reference (r words). Two choices make it usable on short
sentences, the same as sacrebleu's `sentence_bleu` defaults: exponential smoothing (the
k-th order with no match gets precision 1 / (2^k * total n-grams of that order)), and
the effective order (orders longer than the hypothesis are left out of the mean). No
word in common gives 0.

ROUGE-L (Lin 2004) is the F1 of longest-common-subsequence precision and recall.
"""
import collections
import math
import re

MAX_ORDER = 4
_BLEU_TOKEN = re.compile(r'\w+|[^\w\s]')
_ROUGE_TOKEN = re.compile(r'[a-z0-9]+')


def bleu_tokens(text: str) -> list[str]:
  """Lowercased words and single punctuation marks: "It's 5." -> it ' s 5 ."""
  return _BLEU_TOKEN.findall(text.lower())


def rouge_tokens(text: str) -> list[str]:
  """Lowercased runs of ASCII letters and digits (everything else separates)."""
  return _ROUGE_TOKEN.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> collections.Counter:
  """Counts of the n-grams (tuples of n tokens) in `tokens`."""
  return collections.Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: str, reference: str, max_order: int = MAX_ORDER) -> float:
  """Smoothed sentence BLEU of `hypothesis` against one `reference`, in [0, 1]."""
  if max_order < 1:
    raise ValueError(f'max_order must be >= 1, got {max_order}')
  hyp, ref = bleu_tokens(hypothesis), bleu_tokens(reference)
  if not hyp or not ref:
    return 0.0
  log_precision, order, unmatched_orders = 0.0, 0, 0
  for n in range(1, max_order + 1):
    total = len(hyp) - n + 1
    if total <= 0:
      break
    order = n
    matches = sum((ngrams(hyp, n) & ngrams(ref, n)).values())
    if n == 1 and not matches:
      return 0.0
    if matches:
      log_precision += math.log(matches / total)
    else:
      unmatched_orders += 1
      log_precision += math.log(1.0 / (2 ** unmatched_orders * total))
  brevity = 1.0 if len(hyp) >= len(ref) else math.exp(1.0 - len(ref) / len(hyp))
  return brevity * math.exp(log_precision / order)


def lcs_length(a: list[str], b: list[str]) -> int:
  """Length of the longest common subsequence of two token lists."""
  previous = [0] * (len(b) + 1)
  for token in a:
    current = [0]
    for j, other in enumerate(b):
      current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
  """ROUGE-L F1 of `hypothesis` against one `reference`, in [0, 1]."""
  hyp, ref = rouge_tokens(hypothesis), rouge_tokens(reference)
  if not hyp or not ref:
    return 0.0
  common = lcs_length(hyp, ref)
  if not common:
    return 0.0
  precision, recall = common / len(hyp), common / len(ref)
  return 2 * precision * recall / (precision + recall)
