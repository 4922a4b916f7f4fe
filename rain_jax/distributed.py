"""Multi-process runs: joining the JAX job, one decision maker, and failing together.

A multi-host run is one JAX job: every process runs the same program on its own devices
and the collectives join them. Three things make such a job safe to leave overnight:

Joining. `initialize` calls `jax.distributed.initialize` once (a second call is a no-op)
with the coordinator address, process count and process id the user gave, or, with none
given, what JAX detects on Cloud TPU VMs, under SLURM or under Open MPI. On the CPU
backend it selects the gloo collectives first, so a multi-process job runs on any
machine (tests run two processes on localhost).

One decision maker. Anything read from files that could differ between hosts (which
prompts an output file already answers, whether its config matches) is decided by
process 0 alone and handed to the others with `from_process_zero`, so hosts never
disagree about the work and never wait on each other in unequal collectives.

Failing together. A watchdog thread in every process publishes a heartbeat (a counter in
the coordination service's key-value store) every second and watches its peers'. A peer
whose counter has not moved for `peer_timeout_seconds`, a peer that reported a failure
(`fail`), or a lost coordinator ends this process with one line naming the process and
its host, at once, instead of waiting in a collective or at JAX's shutdown barrier.
Counters are compared to their own previous values on this host's clock, so clock skew
between hosts does not matter.

The key-value store is reached through `jax._src.distributed.global_state.client`: JAX
has no public handle on it; this module is the only place that uses it.
"""
import atexit
import json
import os
import socket
import sys
import threading
import time

import jax

KEY_PREFIX = 'rain_jax'
HEARTBEAT_SECONDS = 1.0
DEFAULT_PEER_TIMEOUT_SECONDS = 20.0

_state = {'watchdog': None, 'program': 'rain_jax', 'broadcasts': 0}


class DistributedError(ValueError):
  """The multi-process job cannot start or continue: inconsistent coordinates, a job that
  cannot form, or process 0's decision was an error (reported like bad input)."""


def is_initialized() -> bool:
  return jax.distributed.is_initialized()


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_coordinator() -> bool:
  """True in the process that decides and writes (process 0); True in a single process."""
  return jax.process_index() == 0


def process_cache_dir(base: str):
  """The persistent compilation cache folder of this process: `base` in a single
  process, `base/process-I-of-N` in a multi-process job (processes do not load each
  other's executables), and None (no persistent cache) for a multi-process job on the
  CPU backend: there, 2-process RAIN stream programs loaded back from the cache broke
  their gloo collectives ("Received data size doesn't match expected size"; jax 0.10.2,
  issue 12's programs), while the same programs compiled afresh ran."""
  if jax.process_count() == 1:
    return base
  if jax.default_backend() == 'cpu':
    return None
  return os.path.join(base, f'process-{jax.process_index()}-of-{jax.process_count()}')


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client


def check_arguments(coordinator_address, num_processes, process_id) -> None:
  """DistributedError unless the three are all given (consistently) or all left out."""
  given = [x is not None for x in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise DistributedError(
        '--coordinator_address, --num_processes and --process_id go together: give all '
        'three, or none to let JAX detect them (Cloud TPU VM, SLURM, Open MPI)')
  if all(given):
    if num_processes < 1:
      raise DistributedError(f'--num_processes must be >= 1, got {num_processes}')
    if not 0 <= process_id < num_processes:
      raise DistributedError(f'--process_id must be in [0, {num_processes}), got {process_id}')
    host, sep, port = coordinator_address.rpartition(':')
    if not sep or not host or not port.isdigit():
      raise DistributedError(f'--coordinator_address must be HOST:PORT, got '
                             f'{coordinator_address!r}')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               peer_timeout_seconds: float = DEFAULT_PEER_TIMEOUT_SECONDS,
               initialization_timeout_seconds: int = 300,
               program: str = 'rain_jax') -> None:
  """Joins the multi-process JAX job (before any other JAX call) and starts the watchdog.

  Args:
    coordinator_address, num_processes, process_id: all three, or None for JAX's
      cluster detection.
    peer_timeout_seconds: a peer silent this long ends this process.
    initialization_timeout_seconds: how long to wait for every process to join.
    program: the name in the one-line errors (e.g. 'rain_jax.run').
  Raises DistributedError for inconsistent arguments or a job that cannot form.
  """
  check_arguments(coordinator_address, num_processes, process_id)
  if is_initialized():
    return
  _state['program'] = program
  # Only the CPU backend reads this; TPU and GPU keep their own collectives.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=initialization_timeout_seconds,
        # JAX's own detection stays as a backstop behind the watchdog.
        heartbeat_timeout_seconds=int(max(3 * peer_timeout_seconds, 60)))
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(f'could not join the multi-process job: {first}') from None
  if jax.process_count() > 1:
    _client().key_value_set(f'{KEY_PREFIX}/host/{jax.process_index()}', socket.gethostname())
    watchdog = Watchdog(peer_timeout_seconds)
    watchdog.start()
    _state['watchdog'] = watchdog
    # Runs before JAX's own shutdown (registered earlier): a process that exits without
    # calling `finish` (an uncaught exception) tells its peers and skips JAX's barrier.
    atexit.register(_exit_without_finish)


def host_of(index: int) -> str:
  """The host name process `index` published (or '?' if it cannot be read)."""
  try:
    return _client().key_value_try_get(f'{KEY_PREFIX}/host/{index}')
  except Exception:  # pylint: disable=broad-except
    return '?'


def _end(message: str) -> None:
  """Prints `<program>: error: <message>` and ends the process at once (status 1)."""
  print(f'{_state["program"]}: error: {message}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access


def fail_or_blame(message: str) -> None:
  """Like `fail`, unless a peer has gone silent: then the error names that peer.

  A collective whose peer died raises here as a transport error ("connection reset by
  peer"); the useful line is which process stopped. Waits up to 3 heartbeats: a peer
  whose heartbeat did not move in that time is reported as the cause; otherwise the
  failure is this process's own and `message` is reported. Never returns.
  """
  watchdog = _state['watchdog']
  if watchdog is not None:
    grace = 3 * HEARTBEAT_SECONDS
    start = time.monotonic()
    while time.monotonic() - start < grace + HEARTBEAT_SECONDS:
      silent = watchdog.silent_peers(grace)
      if silent:
        peer = silent[0]
        _end(f'process {peer} (host {watchdog._known_host(peer)}) stopped responding; '  # pylint: disable=protected-access
             f'ending this process too ({message[:200]})')
      time.sleep(HEARTBEAT_SECONDS / 4)
  fail(message)


def fail(message: str) -> None:
  """Reports this process's failure to its peers, prints one line and exits with 1.

  In a single process it only prints and exits. Never returns.
  """
  if jax.process_count() > 1:
    me = jax.process_index()
    watchdog = _state['watchdog']
    if watchdog is not None:  # this process's own error is the line it prints
      watchdog.stop()
    try:
      _client().key_value_set(f'{KEY_PREFIX}/failed/{me}', message.splitlines()[0][:500],
                              allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass
    else:
      if me == 0:
        # Process 0 hosts the coordination service: give the peers' watchdogs time to
        # read the failure (and print it) before its exit takes the service down.
        time.sleep(2.5 * HEARTBEAT_SECONDS)
  _end(message)


class Watchdog(threading.Thread):
  """Beats every HEARTBEAT_SECONDS and ends the process when a peer stops or fails."""

  def __init__(self, peer_timeout_seconds):
    super().__init__(name='rain_jax-watchdog', daemon=True)
    self.timeout = peer_timeout_seconds
    self.me = jax.process_index()
    self.peers = [i for i in range(jax.process_count()) if i != self.me]
    self.client = _client()
    self.stopped = threading.Event()
    self._hosts = {}
    # {peer: (its last heartbeat value, when this host saw it change)}
    self.seen = {peer: (None, time.monotonic()) for peer in self.peers}

  def silent_peers(self, seconds):
    """Peers (not finished) whose heartbeat has not moved for `seconds`."""
    now = time.monotonic()
    return [peer for peer, (_, since) in list(self.seen.items()) if now - since > seconds]

  def run(self):
    beat = 0
    seen = self.seen
    while not self.stopped.wait(HEARTBEAT_SECONDS):
      beat += 1
      try:
        self.client.key_value_set(f'{KEY_PREFIX}/beat/{self.me}', str(beat),
                                  allow_overwrite=True)
        failed = _by_process(self.client.key_value_dir_get(f'{KEY_PREFIX}/failed/'))
        finished = _by_process(self.client.key_value_dir_get(f'{KEY_PREFIX}/finished/'))
        beats = _by_process(self.client.key_value_dir_get(f'{KEY_PREFIX}/beat/'))
      except Exception as e:  # pylint: disable=broad-except
        if self.stopped.is_set():
          return
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _end(f'lost the coordinator (process 0 on {self._known_host(0)}): {first[:200]}')
        return
      if self.stopped.is_set():  # this process is finishing or failing on its own
        return
      for peer, message in failed.items():
        if peer != self.me:
          _end(f'process {peer} (host {self._known_host(peer)}) failed: {message}')
      now = time.monotonic()
      for peer in self.peers:
        if peer in finished:
          self.seen.pop(peer, None)
          continue
        value = beats.get(peer)
        last_value, since = seen[peer]
        if value != last_value:
          seen[peer] = (value, now)
        elif now - since > self.timeout:
          _end(f'process {peer} (host {self._known_host(peer)}) stopped responding '
               f'(no heartbeat for {now - since:.0f} s); ending this process too')

  def _known_host(self, peer):
    if peer not in self._hosts:
      try:
        self._hosts[peer] = self.client.key_value_try_get(f'{KEY_PREFIX}/host/{peer}')
      except Exception:  # pylint: disable=broad-except
        return '?'
    return self._hosts[peer]

  def stop(self):
    self.stopped.set()


def from_process_zero(decide, timeout_seconds: float = 3600.0):
  """The value `decide()` returns in process 0, in every process.

  decide: a function of no arguments returning a JSON-serialisable value; it runs in
  process 0 only. If it raises, every process raises the same exception type's message:
  process 0 re-raises it, the others raise DistributedError with its text, so all stop
  with the same one-line error. In a single process it just calls `decide`.
  """
  if jax.process_count() == 1:
    return decide()
  _state['broadcasts'] += 1
  key = f'{KEY_PREFIX}/decision/{_state["broadcasts"]}'
  client = _client()
  if jax.process_index() == 0:
    try:
      value = decide()
    except Exception as e:
      client.key_value_set(key, json.dumps({'error': str(e).splitlines()[0] if str(e) else
                                            type(e).__name__}))
      raise
    client.key_value_set(key, json.dumps({'value': value}))
    return value
  reply = json.loads(client.blocking_key_value_get(key, int(timeout_seconds * 1000)))
  if 'error' in reply:
    raise DistributedError(reply['error'])
  return reply['value']


def barrier(name: str, timeout_seconds: float = 3600.0) -> None:
  """Waits until every process reaches the barrier `name` (no-op in one process).

  Use it before the first collective after work whose length differs between processes
  (compiling, where one process may hit the compilation cache and another not): the CPU
  collectives give up after 30 s waiting for a peer to join, the coordination service's
  barrier waits `timeout_seconds`."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f'{KEY_PREFIX}/{name}', int(timeout_seconds * 1000))


def _exit_without_finish() -> None:
  if _state['watchdog'] is not None:
    fail('exited before finishing (see the error above)')


def _by_process(entries) -> dict:
  """{process index: value} from key_value_dir_get's [(key, value)], keys ending /<index>."""
  return {int(key.rsplit('/', 1)[-1]): value for key, value in entries}


def finish() -> None:
  """Tells the peers this process ended cleanly and stops its watchdog.

  Entry points call it after their work succeeded; exiting without it counts as a
  failure that the peers hear about (`fail`).

  A finished peer is no longer expected to beat, so a process that is still writing its
  last records is not ended by the silence of one that is already at JAX's shutdown
  barrier.
  """
  watchdog = _state['watchdog']
  if watchdog is None:
    return
  try:
    _client().key_value_set(f'{KEY_PREFIX}/finished/{jax.process_index()}', '1',
                            allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass
  watchdog.stop()
  watchdog.join(timeout=5)
  _state['watchdog'] = None
