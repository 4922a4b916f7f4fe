"""Controlled sentiment: continue the beginning of an IMDB review toward a target sentiment.

Not one of the paper's RAIN experiments; the judge prompts (rain_jax/data/prompts/
sentiment/) are ours, written in the style of HH's f2/r1/r2. Data: the first 500 reviews
of each label of the IMDB test split (rain_jax/data/imdb/, lowest ids first).

An example is a review of the opposite sentiment (target positive: the negative reviews;
target negative: the positive ones), cut to its first `prefix_words` words after turning
each "<br />" into a space (words are split on whitespace and joined with one space;
30 words keeps the review's stance clear and leaves room to turn it). A review with no
more words than that is kept whole.

  prompt = f1 + "\\n\\nReview: " + beginning          (turn marker: a second "Review:")

The model continues the review. The judge (ABJudge) sees
  f2 + "\\n\\nBeginning: " + beginning + "\\nContinuation:" + generated text + "\\n" + r
and reads "harmless" as "has the target sentiment": r1 lists (A) positive / (B) negative,
r2 the reverse, so for a negative target the two suffixes trade places.
"""

from rain_jax.tasks.base import (Example, Task, data_path,
                                    read_data_text, read_jsonl_gz, select_range)
from rain_jax.tasks.hh import HHTask

SENTIMENTS = ('negative', 'positive')        # IMDB label 0, label 1
DEFAULT_PREFIX_WORDS = 30


def review_beginning(text: str, num_words: int) -> str:
  """The first `num_words` words of a review ("<br />" read as a space)."""
  return ' '.join(text.replace('<br />', ' ').split()[:num_words])


def read_reviews(path) -> list[dict]:
  """Rows {"id", "rating", "label", "text"} of a gzipped IMDB JSONL file."""
  rows = read_jsonl_gz(path, 'IMDB data file')
  for number, row in enumerate(rows, 1):
    if not (isinstance(row, dict) and row.get('label') in (0, 1)
            and isinstance(row.get('text'), str) and 'id' in row):
      raise ValueError(f'IMDB data file {path}: line {number} needs "id", "label" (0 or 1) '
                       f'and "text"')
  return rows


class SentimentTask(Task):
  name = 'sentiment'
  turn_marker = 'Review:'
  judge_prompts = 'sentiment'
  # The reference has no sentiment experiment, so no constants of its own. It is judged
  # like HH (ABJudge, two option orders, prompts in HH's style) on free prose with a turn
  # marker, so it takes HH's constants.
  rain_defaults = HHTask.rain_defaults

  def __init__(self, target_sentiment='positive', prefix_words=DEFAULT_PREFIX_WORDS,
               data_file=None):
    if target_sentiment not in SENTIMENTS:
      raise ValueError(f'--target_sentiment must be positive or negative, got '
                       f'{target_sentiment!r}')
    if prefix_words < 1:
      raise ValueError(f'prefix_words must be >= 1, got {prefix_words}')
    self.target_sentiment = target_sentiment
    self.prefix_words = prefix_words
    self.data_file = data_file

  def load_examples(self, start, num_examples):
    path = self.data_file or data_path('imdb', 'aclImdb_test_first500_per_label.jsonl.gz')
    source_label = 1 - SENTIMENTS.index(self.target_sentiment)
    header = read_data_text('prompts', 'sentiment', 'f1.txt') + '\n\nReview: '
    reviews = [row for row in read_reviews(path) if row['label'] == source_label]
    examples = []
    for index, row in enumerate(reviews):
      beginning = review_beginning(row['text'], self.prefix_words)
      examples.append(Example(
          id=f'imdb-{SENTIMENTS[source_label][:3]}-{row["id"]}', index=index,
          prompt=header + beginning, question=beginning,
          meta={'imdb_id': row['id'], 'rating': row.get('rating'),
                'label': SENTIMENTS[source_label], 'target_sentiment': self.target_sentiment,
                'review': row['text']}))
    return select_range(examples, start, num_examples,
                        f'the {SENTIMENTS[source_label]} IMDB reviews')

  def conversation_start(self, example):
    return 'Beginning: ' + example.question + '\nContinuation:'

  def judge_suffixes(self):
    """("\\n" + r1, "\\n" + r2) for a positive target, swapped for a negative one, so that
    option (A) of the first suffix is always the target sentiment."""
    suffixes = super().judge_suffixes()
    return suffixes if self.target_sentiment == 'positive' else suffixes[::-1]
