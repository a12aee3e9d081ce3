"""What a run does when the world misbehaves: the workdir lock, stop signals, a writable workdir.

- One live run per workdir: `WorkdirLock` holds an exclusive `flock` on WORKDIR/lock for the
  run's life. The kernel drops it when the process dies, however it dies, so a killed run never
  leaves a stale lock behind.
- SIGTERM and SIGINT (preemption, Ctrl-C) do not interrupt a step: `StopSignals` records them, the
  loop finishes its step, saves, waits for the save to commit, and raises `Stopped`. On several
  processes the stop step is agreed through JAX's preemption sync point, so all save the same step.
"""

import errno
import fcntl
import os
import signal
import types

import jax

# Exit status of a run stopped by a signal after saving: EX_TEMPFAIL, "try again later".
STOPPED_EXIT_CODE = 75


class WorkdirError(OSError):
  """The workdir cannot be used; the message names the problem and the fix."""


class NonFiniteError(FloatingPointError):
  """The loss or the gradients went NaN or infinite; the message names the step and the metric."""


class Stopped(Exception):
  """The run stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f'stopped by {signal_name} after step {step}; checkpoint {step} is saved')
    self.step = step
    self.signal_name = signal_name


def check_writable(workdir: str) -> None:
  """Fails now, not at the first checkpoint, if the workdir cannot be created or written."""
  if '://' in workdir:  # The lock, disk checks and outputs use local file operations.
    raise WorkdirError(f'--workdir={workdir}: bucket paths are not supported yet; use a '
                       'directory on a filesystem every process can reach (e.g. the bucket '
                       'mounted with gcsfuse).')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write-probe-{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} is not writable ({e.strerror}): '
                       'choose a directory you can write to.') from None


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> None:
  """Fails before the first step when the disk cannot hold the checkpoints the run will keep."""
  free = _free_bytes(workdir)
  needed = checkpoint_bytes * (keep + 1)  # The kept ones plus the one being written.
  if free < needed:
    raise WorkdirError(
        f'--workdir={workdir} has {free / 2**20:,.0f} MiB free but {keep} + 1 checkpoints of '
        f'{checkpoint_bytes / 2**20:,.0f} MiB need {needed / 2**20:,.0f} MiB: free space, choose '
        'another workdir or lower --config.checkpoint.keep.')


def _free_bytes(path: str) -> int:
  stat = os.statvfs(path)
  return stat.f_bavail * stat.f_frsize


class WorkdirLock:
  """An exclusive lock on WORKDIR/lock for as long as the run lives (process 0 only)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'lock')
    self._file = None

  def __enter__(self) -> 'WorkdirLock':
    if jax.process_index() != 0:
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
      raise WorkdirError(f'{os.path.dirname(self.path)} is in use by a live run ({owner}): wait '
                         'for it to finish, stop it, or use another --workdir.') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    self._file.flush()
    return self

  def __exit__(self, *exc_info) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


class StopSignals:
  """Records SIGTERM / SIGINT instead of dying mid-step; `should_stop(step)` asks at step ends."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._previous: dict[int, object] = {}

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
