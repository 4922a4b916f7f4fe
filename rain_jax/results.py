"""Result files that survive: append-only JSONL, dataset shards, and a config sidecar.

Records. One JSON line per (prompt, method), written with one `write` to a file opened
with O_APPEND and fsynced before the next prompt starts, so a killed run (kill -9, OOM,
pre-emption) keeps every answer it finished. A line is only torn if the machine or the
disk fails mid-write; `read_records` skips an unterminated last line and `ResultWriter`
cuts it off before appending, so no line that does not parse is ever followed by
another. A restart skips the (id, method) pairs already present (`done_keys`).

One writer per file: `ResultWriter` holds an exclusive `flock` on the results file while
it is open, so a second run pointed at the same output fails at once instead of
interleaving lines (the kernel drops the lock when the holder dies, even by kill -9).

Object stores. An output (and its sidecar) may be a `gs://` URL (any path with a scheme
that `etils.epath` knows). An object cannot be appended to, so `ObjectResultWriter`
rewrites the whole object with every record; an object write replaces the object at
once, so readers see the file before or after a record, never half of one. There is no
lock on an object: one process must write it (in a multi-process run, process 0 alone
writes; rain_jax/run.py).

Shards. `shard_examples` gives shard i of n the examples whose dataset index is i mod n
(after --start/--num_examples chose the range). Together the shards cover the range once;
an example never changes shard when the range is widened later, and long and short
prompts spread evenly.

Config sidecar. `<output>.config.json` (written atomically: temp file, fsync, rename)
holds the flags that decide the answers (`config`) and one entry per session that wrote
to the output (`sessions`: every flag, model name and size, git commit, library versions,
host, start time). A restart whose answer-deciding flags differ from the file's is an
error unless --allow_config_change; flags that only choose which prompts to answer
(`SELECTION_FLAGS`) or how to run (`OPERATIONAL_FLAGS`) may change freely (each flag's
role: rain_jax/flag_table.py). A flag the sidecar holds but today's code no longer has
(e.g. the removed --rain_mode), or the reverse, is not compared.
"""
import datetime
import errno
import fcntl
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile

from rain_jax import flag_table

# Flags that choose which (prompt, method) pairs a session answers, and flags that change
# how a run executes but not its answers (rain_jax/flag_table.py gives every flag's role).
SELECTION_FLAGS = flag_table.SELECTION_FLAGS
OPERATIONAL_FLAGS = flag_table.OPERATIONAL_FLAGS
CONFIG_SUFFIX = '.config.json'


class ConfigMismatchError(ValueError):
  """A restart's answer-deciding flags differ from those its output was written with."""


def read_jsonl_objects(path):
  """(line number, dict) for each non-blank line of a JSONL file.

  Raises ValueError naming the file and line for bad JSON or a line that is not an
  object. (Results files may end with a torn line: `read_records` handles those.)
  """
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not valid JSON ({e.msg})') from None
      if not isinstance(row, dict):
        raise ValueError(f'{path}:{number}: each line must be a JSON object')
      yield number, row


def read_records(path):
  """Parsed records (list of dicts) of a results file; a torn last line is skipped.

  Raises ValueError naming the file and line when a complete line is not JSON.
  """
  data = _read_bytes(path)
  if data is None:
    return []
  complete = data.split(b'\n')[:-1]  # the last piece is b'' or an unterminated line
  records = []
  for number, line in enumerate(complete, 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not a JSON record ({e.msg}); the file is '
                         f'corrupt') from None
  return records


def is_remote(path) -> bool:
  """True for a URL such as gs://bucket/file (read and written through etils.epath)."""
  return '://' in os.fspath(path)


def _read_bytes(path):
  """The bytes of the file or object at `path`, or None when there is none."""
  if is_remote(path):
    from etils import epath  # pylint: disable=import-outside-toplevel
    target = epath.Path(path)
    return target.read_bytes() if target.exists() else None
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    return f.read()


def open_writer(path):
  """The writer for `path`: ResultWriter for a local file, ObjectResultWriter for a URL."""
  return ObjectResultWriter(path) if is_remote(path) else ResultWriter(path)


def done_keys(path):
  """{(id, method)} already answered in `path` (ids as strings)."""
  return {(str(r['id']), r['method']) for r in read_records(path)}


class ResultWriter:
  """Appends records to `path` (creating parent folders), one whole line per write.

  Opening takes an exclusive lock on the file (ValueError if another process holds it)
  and then cuts a torn last line left by an earlier crash.
  """

  def __init__(self, path):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise ValueError(f'{path} is being written by another run (its lock is held); '
                       f'give each process its own --output') from None
    self._drop_torn_tail()

  def _drop_torn_tail(self):
    size = os.fstat(self._fd).st_size
    if size == 0:
      return
    data = os.pread(self._fd, size, 0)
    keep = data.rfind(b'\n') + 1
    if keep != size:
      os.ftruncate(self._fd, keep)
      os.fsync(self._fd)

  def write(self, record: dict):
    """Appends `record` as one JSON line and fsyncs it.

    If the line cannot be written whole (e.g. the disk is full) the file is cut back to
    its previous end and the OSError is raised, so no torn line stays behind.
    """
    line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
    end = os.fstat(self._fd).st_size
    try:
      written = os.write(self._fd, line)
      while written < len(line):
        more = os.write(self._fd, line[written:])
        if more == 0:
          raise OSError(errno.ENOSPC, f'no room to write a record to {self.path}')
        written += more
      os.fsync(self._fd)
    except OSError:
      os.ftruncate(self._fd, end)
      raise

  def close(self):
    os.close(self._fd)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class ObjectResultWriter:
  """Appends records to an object (gs://...) by rewriting it whole after each record.

  Same contract as ResultWriter (a torn last line is dropped at open; every record is
  stored before `write` returns) without the lock: the caller makes sure one process
  writes. Rewriting costs the object's size per record: fine for results files (a few
  KiB per record, minutes per batch at scale).
  """

  def __init__(self, path, storage=None):
    """storage: an etils.epath.Path-like object (tests pass a local one); default
    epath.Path(path)."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    self.path = path
    self._object = storage if storage is not None else epath.Path(path)
    data = self._object.read_bytes() if self._object.exists() else b''
    self._data = data[:data.rfind(b'\n') + 1]
    if self._data != data:
      self._object.write_bytes(self._data)

  def write(self, record: dict):
    line = (json.dumps(record, ensure_ascii=False) + '\n').encode('utf-8')
    self._object.write_bytes(self._data + line)
    self._data += line

  def close(self):
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def shard_examples(examples, shard_index: int, num_shards: int):
  """The examples of shard `shard_index` of `num_shards`: those with index % n == i.

  examples: a list of objects with an integer `index` (the position in the dataset).
  """
  if num_shards < 1:
    raise ValueError(f'--num_shards must be >= 1, got {num_shards}')
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'--shard_index must be in [0, {num_shards}) for --num_shards='
                     f'{num_shards}, got {shard_index}')
  return [ex for ex in examples if ex.index % num_shards == shard_index]


def config_path(output: str) -> str:
  """The sidecar file of a results file: `<output>.config.json`."""
  return output + CONFIG_SUFFIX


def answer_config(flag_values: dict) -> dict:
  """The flags among `flag_values` that decide the answers (selection/operation dropped)."""
  return {name: value for name, value in sorted(flag_values.items())
          if name not in SELECTION_FLAGS and name not in OPERATIONAL_FLAGS}


def read_config(output: str):
  """The sidecar of `output` as a dict, or None when there is none."""
  path = config_path(output)
  data = _read_bytes(path)
  if data is None:
    return None
  try:
    return json.loads(data.decode('utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e.msg}); delete it or pass a new --output'
                     ) from None


def config_differences(old: dict, new: dict) -> list:
  """['name: old -> new', ...] for the flags present in both configs whose values differ.

  A flag present on one side only (added or removed from the code since) is not counted.
  """
  return [f'{name}: {old[name]!r} -> {new[name]!r}'
          for name in sorted(set(old) & set(new)) if old[name] != new[name]]


def check_config(output: str, flag_values: dict, allow_change: bool) -> None:
  """Raises ConfigMismatchError if `output` holds answers made with other answer flags.

  Only an output that already holds records is checked; allow_change skips the check.
  """
  if allow_change or not read_records(output):
    return
  saved = read_config(output)
  if saved is None:
    return
  changed = config_differences(saved['config'], answer_config(flag_values))
  if changed:
    raise ConfigMismatchError(
        f'{output} holds answers made with other settings ({"; ".join(changed)}); use '
        f'another --output, or --allow_config_change to add these answers anyway')


def git_commit(folder: str):
  """{'commit': sha or None, 'dirty': bool or None} of the git checkout holding `folder`."""
  def git(*args):
    result = subprocess.run(['git', '-C', folder, *args], capture_output=True, text=True,
                            timeout=30, check=False)
    return result.stdout.strip() if result.returncode == 0 else None
  try:
    commit = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no') if commit else None
  except (OSError, subprocess.TimeoutExpired):
    commit = status = None
  return {'commit': commit, 'dirty': None if status is None else bool(status)}


def library_versions() -> dict:
  """Versions of Python and the libraries the answers depend on (None: not installed)."""
  versions = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'numpy', 'transformers'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def session_record(flag_values: dict, model_name: str, model_parameters: int,
                   processes=None) -> dict:
  """Provenance of this session: flags, model, code commit, versions, host, start time.

  processes: the host of each process of a multi-process job (recorded when given)."""
  code_folder = os.path.dirname(os.path.abspath(__file__))
  return {
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'host': socket.gethostname(),
      **({'processes': list(processes)} if processes and len(processes) > 1 else {}),
      'pid': os.getpid(),
      'argv': list(sys.argv),
      'flags': dict(sorted(flag_values.items())),
      'model': model_name,
      'model_parameters': int(model_parameters),
      'git': git_commit(code_folder),
      'versions': library_versions(),
  }


def record_session(output: str, flag_values: dict, session: dict) -> dict:
  """Writes `<output>.config.json` with this session added; returns what was written.

  The config becomes this session's answer flags; a changed config (allowed by the
  caller) keeps the previous one in the session that replaced it. A sidecar without
  results behind it (the results file is missing or empty) starts afresh.
  """
  saved = read_config(output) if read_records(output) else None
  config = answer_config(flag_values)
  sessions = list(saved['sessions']) if saved else []
  entry = dict(session)
  if saved and config_differences(saved['config'], config):
    entry['previous_config'] = saved['config']
  sessions.append(entry)
  content = {'config': config, 'sessions': sessions}
  write_json_atomic(config_path(output), content)
  return content


def write_json_atomic(path: str, content) -> None:
  """Writes JSON to `path` atomically (`write_text_atomic`)."""
  write_text_atomic(path, json.dumps(content, indent=1, ensure_ascii=False) + '\n')


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that readers see the old file or the new one, never a
  mix: a temp file in the same folder, fsynced, renamed, the folder fsynced.

  A URL (gs://...) is written as one object, which replaces the old one at once."""
  if is_remote(path):
    from etils import epath  # pylint: disable=import-outside-toplevel
    epath.Path(path).write_text(text)
    return
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, temp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.',
                              suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp, path)
  except BaseException:
    if os.path.exists(temp):
      os.remove(temp)
    raise
  dir_fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)
