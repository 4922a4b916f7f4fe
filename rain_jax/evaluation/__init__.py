"""Offline evaluation of rain_jax results (issue 4 §2).

* `refusal`: attack success rate on adv (the GCG refusal-substring test).
* `ngram`: BLEU and ROUGE-1/2/L through sacrebleu and rouge-score, configured as
  TruthfulQA's evaluation calls them, for the TruthfulQA metric.
* `truthfulqa`: reference answers and the true-minus-false similarity metric;
  `embedding`: an optional all-MiniLM-L6-v2 cosine scorer for it.
* `sentiment`: VADER compound score of a continuation.
* `ab_scoring`: the HH A/B judge prompt scored with full forward passes of a model.
* `judged`: self-evaluation accuracy on HH pairs, and harmlessness of responses.
* `export`: RAIN/vanilla answer pairs with a pairwise prompt for an external judge.
* `metrics`: the record metrics (asr, truthfulqa, sentiment) per (task, method).
* `records`, `stats`: reading results files, grouping, binomial intervals.

The command line is scripts/evaluate.py.
"""
