"""Progress of a run on stderr: one tqdm bar per method with ETA and running metrics.

The bar counts prompts answered (those found in the output from earlier sessions
included) and shows, over this session's answers: the mean seconds per prompt (the
records' `seconds`, compile time excluded) and, for RAIN, the mean simulations per
committed token set (all simulations / all committed sets, so long answers weigh more).
"""
import sys

import tqdm


class RunningMeans:
  """Running totals of a method's records."""

  def __init__(self):
    self.answers = 0
    self.seconds = 0.0
    self.simulations = 0
    self.committed_sets = 0

  def add(self, record: dict) -> None:
    self.answers += 1
    self.seconds += record['seconds']
    search = record.get('search')
    if search:
      self.simulations += search['simulations']
      self.committed_sets += search['committed_sets']

  def summary(self) -> dict:
    """{'s/prompt': mean seconds, 'sims/set': simulations per committed set (RAIN)}."""
    out = {}
    if self.answers:
      out['s/prompt'] = f'{self.seconds / self.answers:.2f}'
    if self.committed_sets:
      out['sims/set'] = f'{self.simulations / self.committed_sets:.1f}'
    return out


class Progress:
  """A bar over one method's `total` prompts, `already_done` of them from earlier runs.

  enabled=False (e.g. on all but the first process of a multi-host job) shows nothing.
  """

  def __init__(self, method: str, total: int, already_done: int, enabled: bool = True):
    self.means = RunningMeans()
    self.bar = tqdm.tqdm(total=total, initial=already_done, desc=method, unit='prompt',
                         file=sys.stderr, dynamic_ncols=True, mininterval=1.0,
                         disable=not enabled)

  def add(self, records: list) -> None:
    """Counts a finished batch of records and refreshes the metrics."""
    for record in records:
      self.means.add(record)
    self.bar.set_postfix(self.means.summary(), refresh=False)
    self.bar.update(len(records))

  def write(self, message: str) -> None:
    """Prints a line to stderr above the bar."""
    if not self.bar.disable:
      self.bar.write(message, file=sys.stderr)

  def close(self) -> None:
    self.bar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
