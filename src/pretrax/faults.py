"""What a run does when the world misbehaves: the workdir lock, stop signals, a writable workdir.

- One live run per workdir: `WorkdirLock` holds an exclusive `flock` on WORKDIR/lock for the
  run's life. The kernel drops it when the process dies, however it dies, so a killed run never
  leaves a stale lock behind. A bucket has no flock: there the lock is a lease (`BucketLease`),
  WORKDIR/lock with a heartbeat the run renews; a killed run's lease expires on its own.
- SIGTERM and SIGINT (preemption, Ctrl-C) do not interrupt a step: `StopSignals` records them, the
  loop finishes its step, saves, waits for the save to commit, and raises `Stopped`. On several
  processes the stop step is agreed through JAX's preemption sync point, so all save the same step.
"""

from collections.abc import Callable, Iterator
import errno
import fcntl
import io
import json
import os
import signal
import threading
import time
import types
from typing import Any
import uuid

import jax
import numpy as np

from pretrax import errors, paths
from pretrax import workdir as workdir_lib
from pretrax.data.batch import Batch

# Exit status of a run stopped by a signal after saving: EX_TEMPFAIL, "try again later".
STOPPED_EXIT_CODE = 75

# A signal's disposition as `signal.signal` takes and returns it: a function, SIG_DFL or SIG_IGN,
# or None for one that was not set from Python.
_Handler = Callable[[int, types.FrameType | None], Any] | int | signal.Handlers | None


class WorkdirError(errors.PretraxError, OSError):
  """The workdir cannot be used; the message names the problem and the fix."""


class NonFiniteError(errors.PretraxError, FloatingPointError):
  """The loss or the gradients went NaN or infinite; the message names the step and the metric."""


class Stopped(Exception):
  """The run stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f'stopped by {signal_name} after step {step}; checkpoint {step} is saved')
    self.step = step
    self.signal_name = signal_name


def check_writable(workdir: str) -> None:
  """Fails now, not at the first checkpoint, if the workdir cannot be created or written."""
  where = paths.path(workdir)
  try:
    if not paths.is_remote(workdir):  # A bucket has no directories (and no bucket is created).
      where.mkdir(parents=True, exist_ok=True)
    probe = where / f'.write-probe-{os.getpid()}'
    probe.write_text('ok')
    probe.unlink()
  except ImportError as e:  # fsspec names the missing package: gcsfs for gs://, s3fs for s3://.
    raise WorkdirError(
      f'--workdir={workdir} needs a package that is not installed ({e}): '
      'pip install "pretrax[gcs]" for gs:// buckets.'
    ) from None
  except OSError as e:
    if not paths.is_remote(workdir):
      raise WorkdirError(
        f'--workdir={workdir} is not writable ({e.strerror}): choose a directory you can write to.'
      ) from None
    raise _bucket_error(workdir, e) from None
  except Exception as e:  # Bucket clients raise their own kinds: credentials, HTTP errors.
    raise _bucket_error(workdir, e) from None


def _bucket_error(workdir: str, error: Exception) -> WorkdirError:
  detail = ' '.join(str(error).split())[:200]
  return WorkdirError(
    f'--workdir={workdir} is not writable ({type(error).__name__}: {detail}): '
    'check the bucket name and your credentials (gcloud auth '
    'application-default login).'
  )


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> None:
  """Fails before the first step when the disk cannot hold the checkpoints the run will keep."""
  if paths.is_remote(workdir):  # A bucket has no free-space figure to check.
    return
  free = _free_bytes(workdir)
  needed = checkpoint_bytes * (keep + 1)  # The kept ones plus the one being written.
  if free < needed:
    raise WorkdirError(
      f'--workdir={workdir} has {free / 2**20:,.0f} MiB free but {keep} + 1 checkpoints of '
      f'{checkpoint_bytes / 2**20:,.0f} MiB need {needed / 2**20:,.0f} MiB: free space, choose '
      'another workdir or lower --config.checkpoint.keep.'
    )


def _free_bytes(path: str) -> int:
  stat = os.statvfs(path)
  return stat.f_bavail * stat.f_frsize


def _in_use(workdir: str, owner: str, detail: str = '') -> WorkdirError:
  return WorkdirError(
    f'{workdir} is in use by a live run ({owner}{detail}): wait for it to '
    'finish, stop it, or use another --workdir.'
  )


class WorkdirLock:
  """An exclusive lock on WORKDIR/lock for as long as the run lives (process 0 only): a flock on
  a local disk, a `BucketLease` on a bucket."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = workdir_lib.lock_file(workdir)
    self._file: io.TextIOWrapper | None = None
    self._lease: BucketLease | None = None

  def __enter__(self) -> 'WorkdirLock':
    if jax.process_index() != 0:
      return self
    if paths.is_remote(self.workdir):
      self._lease = BucketLease(self.workdir).acquire()
      return self
    self._file = open(self.path, 'a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      self._file.seek(0)
      owner = self._file.read().strip() or 'another process'
      self._file.close()
      self._file = None
      raise _in_use(os.path.dirname(self.path), owner) from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    self._file.flush()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._lease is not None:
      self._lease.release()
      self._lease = None
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class BucketLease:
  """WORKDIR/lock on a bucket: {owner, token, heartbeat}, rewritten every HEARTBEAT_S by a thread.

  A run that finds another's heartbeat younger than STALE_S refuses to start; an older one
  belongs to a run that died without releasing it (a hard kill, a lost VM) and is taken over. So
  a killed run blocks its workdir for at most STALE_S; a stopped one (SIGTERM) releases at once.
  Object stores have no atomic test-and-set here, so two runs started within the same moment
  could both write; the lease is read back after writing, which catches all but a near tie.
  """

  HEARTBEAT_S = 20.0
  STALE_S = 60.0

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = paths.path(workdir_lib.lock_file(workdir))
    self.owner = f'pid {os.getpid()} on {os.uname().nodename}'
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def read(self) -> dict | None:
    """The lease as written, or None when there is none (or it is not one of ours)."""
    for attempt in range(3):
      try:
        lease = json.loads(self.path.read_text())
        break
      except (FileNotFoundError, ValueError):
        # A store without atomic overwrites (a local GCS emulator, some fuse mounts) can show the
        # object missing or half-written while the heartbeat rewrites it: look again shortly.
        if attempt == 2:
          return None
        time.sleep(0.05)
    return lease if isinstance(lease, dict) and 'heartbeat' in lease else None

  def _write(self) -> None:
    self.path.write_text(
      json.dumps({'owner': self.owner, 'token': self.token, 'heartbeat': time.time()})
    )

  def acquire(self) -> 'BucketLease':
    held = self.read()
    if held is not None:
      age = time.time() - float(held['heartbeat'])
      if age < self.STALE_S:
        raise _in_use(
          self.workdir,
          held.get('owner', 'another process'),
          f", heartbeat {max(age, 0):.0f} s ago; a killed run's lock expires "
          f'{self.STALE_S:.0f} s after its last heartbeat',
        )
    self._write()
    held = self.read()
    if held is None or held.get('token') != self.token:  # Another run wrote in between.
      raise _in_use(self.workdir, (held or {}).get('owner', 'another process'))
    self._thread = threading.Thread(target=self._beat, name='pretrax-lease', daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.HEARTBEAT_S):
      try:
        self._write()
      except Exception:  # A transient storage error: the next beat tries again.
        pass

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    try:
      held = self.read()
      if held is not None and held.get('token') == self.token:
        self.path.unlink()
    except Exception:  # The storage is unreachable: the lease expires after STALE_S instead.
      pass


class StopSignals:
  """Records SIGTERM / SIGINT instead of dying mid-step; `should_stop(step)` asks at step ends."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self) -> None:
    self.received: str | None = None
    self._previous: dict[int, _Handler] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: the user wants out now.
    self.received = signal.Signals(signum).name

  def __enter__(self) -> 'StopSignals':
    # On several processes SIGTERM stays with JAX's preemption notifier (see should_stop).
    ours = self.SIGNALS if jax.process_count() == 1 else (signal.SIGINT,)
    for s in ours:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def should_stop(self, step: int) -> bool:
    """True on every process at the same step once any of them got a stop signal."""
    if jax.process_count() > 1:
      # JAX's coordination service sees the preemption notice (SIGTERM) on any host and makes all
      # processes reach the sync point at the same step.
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        self.received = self.received or 'SIGTERM'
        return True
      return False
    return self.received is not None


def poisoned(
  batches: Iterator[Batch[np.ndarray]], step: int, start: int
) -> Iterator[Batch[np.ndarray]]:
  """The batches, with NaN weights in the one of (1-based) `step` (config.fault.poison_step): a
  rehearsal of the non-finite-loss path, kept out of the loop."""
  for k, batch in enumerate(batches, start=start + 1):
    if k == step and batch.label_weights is not None:  # Classification: its loss weighs labels.
      batch = batch._replace(label_weights=np.full_like(batch.label_weights, np.nan))
    elif k == step and batch.weights is not None:
      batch = batch._replace(weights=np.full_like(batch.weights, np.nan))
    yield batch
