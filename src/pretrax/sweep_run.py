"""Running a sweep's trials: each a `pretrax train` process, `parallel` at a time, logging to
WORKDIR/<name>/train.log.

After a trial's process exits its outcome goes to WORKDIR/<name>/result.json (exit code, seconds,
command, error); a trial whose result.json records exit 0 for the same command is finished and
skipped next time. A trial that was killed has none, so it runs again and `pretrax train` resumes
it from its latest checkpoint. Ctrl-C or SIGTERM stops every trial (each saves and exits 75).
"""

from collections.abc import Callable, Sequence
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

from pretrax.sweep_report import RESULT_FILE, duration, read_result, status_of, summarize
from pretrax.sweep_trials import Trial

LOG_FILE = 'train.log'


def finished(trial: Trial) -> bool:
  """Ran to a zero exit with this very command (a changed override or step count runs it again)."""
  result = read_result(trial)
  if not result:
    return False
  return result.get('exit_code') == 0 and result.get('command') == trial.command


def run(trials: Sequence[Trial], parallel: int = 1, log: Callable[[str], None] = print) -> None:
  """Runs the unfinished trials, `parallel` at a time, each as a `pretrax train` process; records
  each one's outcome in its result.json. A failed trial does not stop the others."""
  n = len(trials)
  todo = []
  for i, trial in enumerate(trials, 1):
    if finished(trial):
      log(f'[{i}/{n}] {trial.name}: finished before, skipped')
    else:
      todo.append((i, trial))
  env = dict(os.environ, PYTHONUNBUFFERED='1')  # train.log follows the run live.
  if parallel > 1:
    # Several JAX processes on one accelerator: each would otherwise take 75% of its memory.
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  running: dict[subprocess.Popen, tuple[int, Trial, float, int]] = {}
  # SIGTERM (a scheduler ending the sweep) is handled as Ctrl-C is; and Ctrl-C is handled even where
  # the sweep was started with it ignored (a background job of a script).
  previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    while todo or running:
      while todo and len(running) < parallel:
        i, trial = todo.pop(0)
        process, offset = _start(trial, env)
        running[process] = (i, trial, time.time(), offset)
        log(f'[{i}/{n}] {trial.name}: started, log in {os.path.join(trial.workdir, LOG_FILE)}')
      time.sleep(0.2)
      for process in [p for p in running if p.poll() is not None]:
        i, trial, start, offset = running.pop(process)
        log(f'[{i}/{n}] {trial.name}: ' + _finish(trial, process.returncode, start, offset))
  except KeyboardInterrupt:
    # Ctrl-C reached the trials too (one process group); SIGTERM covers a signal sent to the sweep
    # alone. Either way each trial saves a checkpoint and exits 75; the next sweep resumes it.
    for process in running:
      process.send_signal(signal.SIGTERM)
    for process, (i, trial, start, offset) in running.items():
      process.wait()
      log(f'[{i}/{n}] {trial.name}: ' + _finish(trial, process.returncode, start, offset))
    raise
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _interrupt(signum: int, frame: Any) -> None:
  del signum, frame
  raise KeyboardInterrupt


def _start(trial: Trial, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
  os.makedirs(trial.workdir, exist_ok=True)
  result_path = os.path.join(trial.workdir, RESULT_FILE)
  if os.path.exists(result_path):
    os.remove(result_path)  # Whatever an earlier attempt recorded no longer holds.
  # Appended, not replaced: an earlier, killed attempt's log stays above this one.
  with open(os.path.join(trial.workdir, LOG_FILE), 'a') as f:
    f.write(f'==== pretrax sweep, {time.strftime("%Y-%m-%d %H:%M:%S")}: {trial.command}\n')
    f.flush()
    offset = f.tell()
    process = subprocess.Popen(
      [sys.executable, '-m', 'pretrax.cli', *trial.args],
      env=env,
      stdin=subprocess.DEVNULL,
      stdout=f,
      stderr=subprocess.STDOUT,
    )
  return process, offset


def _finish(trial: Trial, exit_code: int, start: float, offset: int) -> str:
  """Records the outcome in result.json; returns the progress line's ending."""
  seconds = time.time() - start
  error = '' if exit_code == 0 else _error_line(trial, exit_code, offset)
  with open(os.path.join(trial.workdir, RESULT_FILE), 'w') as f:
    json.dump(
      {
        'command': trial.command,
        'exit_code': exit_code,
        'seconds': round(seconds, 1),
        'error': error,
      },
      f,
      indent=1,
    )
  took = duration(seconds)
  if exit_code == 0:
    row = summarize(trial)
    losses = ', '.join(
      f'{label} {row[key]:.4f}'
      for key, label in (('train_loss', 'loss'), ('eval_loss', 'eval loss'))
      if row[key] != ''
    )
    return f'finished in {took}' + (f': {losses}' if losses else '')
  return f'{status_of(exit_code).upper()} after {took} (exit {exit_code}): {error}'


def _error_line(trial: Trial, exit_code: int, offset: int) -> str:
  """The line that says what went wrong: pretrax's one-line error, else an exception's last line."""
  with open(os.path.join(trial.workdir, LOG_FILE), errors='replace') as f:
    f.seek(offset)
    lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  ours = [line for line in lines if line.startswith('pretrax train:')]
  raised = [line for line in lines if re.match(r'^[\w.]*(Error|Exception|Interrupt)\b', line)]
  line = (ours or raised or lines or [''])[-1].removeprefix('pretrax train: ')
  line = line.removeprefix('error: ').split('. Resume with the same command')[0]
  if exit_code < 0:  # Killed by a signal: say which.
    line = f'killed by {signal.Signals(-exit_code).name}' + (f'; {line}' if line else '')
  return line[:300]
