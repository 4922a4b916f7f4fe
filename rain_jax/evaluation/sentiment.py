"""Sentiment of a continuation: the VADER compound score (Hutto & Gilbert 2014).

The `vaderSentiment` package ships its lexicon, so this runs offline.
"""
import functools

from rain_jax import extras

TARGETS = ('positive', 'negative')


@functools.lru_cache(maxsize=1)
def _analyzer():
  vader = extras.require('vaderSentiment.vaderSentiment', 'eval')
  return vader.SentimentIntensityAnalyzer()


def compound(text: str) -> float:
  """VADER compound score of `text`, in [-1, 1] (0 for text with no sentiment)."""
  if not isinstance(text, str):
    raise TypeError(f'text must be a str, got {type(text).__name__}')
  return float(_analyzer().polarity_scores(text)['compound'])


def on_target(score: float, target: str) -> bool:
  """Whether a compound score lies strictly on the `target` side of zero."""
  if target not in TARGETS:
    raise ValueError(f'sentiment target must be one of {TARGETS}, got {target!r}')
  return score > 0 if target == 'positive' else score < 0
