"""Append-only JSONL results: one line per (prompt, method), safe to resume.

Each record is written with one `write` to a file opened with O_APPEND and flushed to
disk, so a killed run leaves whole lines plus at most one torn last line; `read_done`
ignores a torn tail and `open_for_append` cuts it off before appending.
"""
import json
import os


def read_records(path):
  """Parsed records of a results file; a torn (unterminated) last line is skipped."""
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    data = f.read()
  lines = data.split(b'\n')
  complete = lines[:-1]  # the last piece is '' after a final newline, or a torn line
  records = []
  for number, line in enumerate(complete, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not a JSON record ({e.msg}); the file is '
                         f'corrupt') from None
  return records


def done_keys(path):
  """{(id, method)} already answered in `path`."""
  return {(str(r['id']), r['method']) for r in read_records(path)}


class ResultWriter:
  """Appends records to `path` (creating parent folders), dropping a torn last line."""

  def __init__(self, path):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._drop_torn_tail()
    self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def _drop_torn_tail(self):
    if not os.path.exists(self.path):
      return
    with open(self.path, 'rb+') as f:
      data = f.read()
      keep = data.rfind(b'\n') + 1
      if keep != len(data):
        f.truncate(keep)

  def write(self, record: dict):
    line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
    os.write(self._fd, line)
    os.fsync(self._fd)

  def close(self):
    os.close(self._fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
