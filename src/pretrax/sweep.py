"""Sweeps: a config's variants as named trials, run here or printed for a launcher; one table,
one plot.

A sweep is declared beside its config, as `get_sweep(arg)` in the config file (or in a separate
file passed with `--sweep=FILE.py[:ARG]`). It returns a list of trials, each a dict of config
overrides keyed as on the command line without `--config.` (`{'optim.lr': 1e-3}`), built with:

  values(key, [v1, v2, ...])          one trial per value
  product(s1, s2, ...)                every combination of the trials of s1, s2, ... (s2 varies
                                      fastest)
  zip_(s1, s2, ...)                   the i-th trials of s1, s2, ... merged; all the same length
  random(key, dist, n, seed)          n values drawn from log_uniform(lo, hi), uniform(lo, hi) or
                                      choice([...]), the same n for the same seed

A sweep is a plain list, so `s1 + s2` runs both. For example, beside get_config:

  def get_sweep(arg):
    return sweep.product(sweep.values('optim.lr', [1e-3, 3e-3, 1e-2]), sweep.values('seed', [0, 1]))

  pretrax sweep --config=configs/NAME.py --workdir=runs/lr [--parallel=2] [--print | --collect]

Each trial is named after its overrides (`lr=0.001,seed=1`: the last part of each key, the whole key
where two would clash), trains in WORKDIR/<name> with `pretrax train` and the same `--config.*`
overrides the sweep got, and logs to WORKDIR/<name>/train.log. After the trial's process exits the
sweep writes WORKDIR/<name>/result.json (exit code, seconds, command, error); a trial whose
result.json records exit 0 for the same command is finished and skipped next time. A trial that was
killed has none, so it runs again and `pretrax train` resumes it from its latest checkpoint.
Results: WORKDIR/results.md, results.csv and loss_curves.png, read from the trials' metrics.jsonl.
The sweep exits 1 if any trial failed or stopped (after running all of them), 2 if the sweep itself
is wrong (an unknown key, a value of the wrong type), before anything runs.
"""

from collections.abc import Callable, Sequence
import csv
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import ml_collections

from pretrax import config as config_lib
from pretrax import errors, paths

Sweep = list[dict[str, Any]]
# Where a trial's process exit code says it stopped on a signal after saving (faults.py).
STOPPED_EXIT_CODE = 75


class SweepError(errors.PretraxError, ValueError):
  """A sweep that cannot be expanded; the message names the key or file and the fix."""


# ---------------------------------------------------------------------------------------------
# Declaring a sweep.


def values(key: str, options: Sequence[Any]) -> Sweep:
  """One trial per value of `key`."""
  return [{key: v} for v in options]


def product(*sweeps: Sweep) -> Sweep:
  """Every combination: one trial per choice of a trial from each sweep, merged."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zip_(*sweeps: Sweep) -> Sweep:
  """The i-th trials of all sweeps merged into one; the sweeps must have the same length."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise SweepError(f'zip_ needs sweeps of one length; got lengths {lengths}.')
  return [_merge(combo) for combo in zip(*sweeps, strict=True)]


def log_uniform(low: float, high: float) -> Callable[[Any], float]:
  """A distribution for `random`: uniform in log space between low and high (both > 0)."""
  if not 0 < low < high:
    raise SweepError(f'log_uniform({low}, {high}) needs 0 < low < high.')
  return lambda rng: math.exp(rng.uniform(math.log(low), math.log(high)))


def uniform(low: float, high: float) -> Callable[[Any], float]:
  """A distribution for `random`: uniform between low and high."""
  return lambda rng: rng.uniform(low, high)


def choice(options: Sequence[Any]) -> Callable[[Any], Any]:
  """A distribution for `random`: one of `options`, each as likely."""
  return lambda rng: options[rng.randrange(len(options))]


def random(key: str, distribution: Callable[[Any], Any], n: int, seed: int) -> Sweep:
  """n trials of `key` drawn from `distribution`; floats keep 4 significant digits, so trial names
  and commands show the exact value. The same seed draws the same values."""
  import random as random_lib  # Local: the name `random` is this function.

  rng = random_lib.Random(seed)
  drawn = (distribution(rng) for _ in range(n))
  return [{key: float(f'{v:.4g}') if isinstance(v, float) else v} for v in drawn]


def _merge(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
  merged: dict[str, Any] = {}
  for trial in trials:
    for key in trial:
      if key in merged:
        raise SweepError(f'{key} is swept twice in one trial: combine its values in one values().')
    merged.update(trial)
  return merged


# ---------------------------------------------------------------------------------------------
# Expanding a sweep into trials.


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict[str, Any]  # The swept values only.
  workdir: str
  args: tuple[str, ...]  # After `pretrax`: ('train', '--config=...', '--workdir=...', ...).
  steps: int = 0  # The step it trains to: its metrics reaching it mean it finished.

  @property
  def command(self) -> str:
    return shlex.join(('pretrax',) + self.args)


def load_sweep(config_spec: str, sweep_spec: str | None) -> Sweep:
  """The trials of `get_sweep(ARG)` in the sweep file, else in the config file (PATH[:ARG])."""
  path, _, arg = (sweep_spec or config_spec).partition(':')
  if not os.path.isfile(path):
    raise SweepError(f'{path} does not exist: give a Python file that defines get_sweep(arg).')
  module = config_lib.load_module(path)
  if not hasattr(module, 'get_sweep'):
    raise SweepError(
      f'{path} defines no get_sweep(arg): add one beside get_config, or pass '
      '--sweep=FILE.py with one.'
    )
  trials = module.get_sweep(arg or None)
  if not trials or not all(isinstance(t, dict) for t in trials):
    raise SweepError(
      f'get_sweep in {path} must return a non-empty list of dicts of overrides '
      '(build it with pretrax.sweep.values, product, zip_, random).'
    )
  return [{k.removeprefix('config.'): v for k, v in t.items()} for t in trials]


def expand(
  sweep: Sweep,
  config: ml_collections.ConfigDict,
  config_spec: str,
  workdir: str,
  shared: dict[str, Any],
) -> list[Trial]:
  """Named trials with their workdirs and `pretrax train` arguments.

  `config` is the loaded config with the `shared` overrides applied: each swept key and value is
  checked against it here, so a typo fails before anything runs.
  """
  for trial in sweep:
    for key, value in trial.items():
      _check_override(config, key, value)
      if key in shared:
        raise SweepError(f'--config.{key} is swept by the sweep: drop it from the command line.')
  names = _unique(_name(trial, _short_keys(sweep)) for trial in sweep)
  common = [f'--config={config_spec}'] + [_flag(k, v) for k, v in shared.items()]
  trials = []
  for name, overrides in zip(names, sweep, strict=True):
    trial_dir = os.path.join(workdir, name)
    args = (
      'train',
      common[0],
      f'--workdir={trial_dir}',
      *common[1:],
      *(_flag(k, v) for k, v in overrides.items()),
    )
    trials.append(
      Trial(name, overrides, trial_dir, args, steps=int(overrides.get('steps', config.steps)))
    )
  return trials


def _check_override(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  node: Any = config
  parts = key.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      near = difflib.get_close_matches(part, fields, n=1)
      fix = f'did you mean "{".".join(parts[:i] + near)}"?' if near else 'see the config file.'
      raise SweepError(f'the sweep sets {key}, which names no config field; {fix}')
    if i < len(parts) - 1:
      node = node[part]
  _flag_value(key, value)  # A type the command line can carry.
  probe = ml_collections.ConfigDict(node.to_dict())  # A copy with the same field types.
  try:
    probe[parts[-1]] = value
  except TypeError:
    raise SweepError(
      f'the sweep sets {key}={value!r}, but {key} is a {type(node[parts[-1]]).__name__}.'
    ) from None


def _flag(key: str, value: Any) -> str:
  return f'--config.{key}={_flag_value(key, value)}'


def _flag_value(key: str, value: Any) -> str:
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, float):
    return repr(value)  # Exact: the trial trains on the very value the sweep declared.
  if isinstance(value, (int, str)):
    return str(value)
  raise SweepError(f'{key}={value!r}: sweep values must be numbers, booleans or strings.')


def _short_keys(sweep: Sweep) -> dict[str, str]:
  keys = list(dict.fromkeys(k for trial in sweep for k in trial))
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def _name(trial: dict[str, Any], short: dict[str, str]) -> str:
  parts = []
  for key, value in trial.items():
    text = f'{value:g}' if isinstance(value, float) else _flag_value(key, value)
    parts.append(f'{short[key]}={text}')
  name = re.sub(r'[^A-Za-z0-9.,=+_-]', '_', ','.join(parts)) or 'base'
  if len(name) > 120:  # File names stop at 255 bytes; a digest keeps shortened names apart.
    name = f'{name[:110]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}'
  return name


def _unique(names) -> list[str]:
  out: list[str] = []
  for name in names:
    candidate, i = name, 1
    while candidate in out:  # Duplicate trials (two equal random draws) each still run.
      i += 1
      candidate = f'{name}-{i}'
    out.append(candidate)
  return out


# ---------------------------------------------------------------------------------------------
# Running trials.

RESULT_FILE = 'result.json'
LOG_FILE = 'train.log'


def finished(trial: Trial) -> bool:
  """Ran to a zero exit with this very command (a changed override or step count runs it again)."""
  result = _read_result(trial)
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
  took = _duration(seconds)
  if exit_code == 0:
    row = summarize(trial)
    losses = ', '.join(
      f'{label} {row[key]:.4f}'
      for key, label in (('train_loss', 'loss'), ('eval_loss', 'eval loss'))
      if row[key] != ''
    )
    return f'finished in {took}' + (f': {losses}' if losses else '')
  return f'{_status(exit_code).upper()} after {took} (exit {exit_code}): {error}'


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


def _duration(seconds: float) -> str:
  from pretrax import metrics  # Local: config files import this module; metrics imports JAX.

  return metrics.format_duration(seconds)


def _status(exit_code: int | None) -> str:
  if exit_code is None:
    return 'not run'
  return {0: 'ok', STOPPED_EXIT_CODE: 'stopped'}.get(exit_code, 'failed')


def _read_result(trial: Trial) -> dict[str, Any] | None:
  try:
    with open(os.path.join(trial.workdir, RESULT_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ---------------------------------------------------------------------------------------------
# Results: the table and the plot.

COLUMNS = (
  'status',
  'train_loss',
  'eval_loss',
  'best_eval_loss',
  'tokens_per_s',
  'steps',
  'seconds',
  'exit_code',
  'error',
)


def _records(trial: Trial) -> list[dict[str, Any]]:
  try:
    with open(os.path.join(trial.workdir, 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except OSError:
    return []
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except ValueError:  # A trial killed mid-write leaves half a line; its rerun rewrites it.
      pass
  return records


def summarize(trial: Trial) -> dict[str, Any]:
  """One row of the table: the trial's swept values, outcome and final numbers ('' if none)."""
  records = _records(trial)
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  result = _read_result(trial) or {}
  exit_code = result.get('exit_code')
  status = _status(exit_code)
  if exit_code is None and train and trial.steps and train[-1]['step'] >= trial.steps:
    status = 'ok'  # Run to the end elsewhere (a launcher ran the printed command).
  elif exit_code is None and records:
    status = 'incomplete'  # Metrics but no recorded exit: running, killed, or stopped early.
  speeds = [r['tokens_per_s'] for r in train if 'tokens_per_s' in r]
  return {
    'trial': trial.name,
    **trial.overrides,
    'status': status,
    'train_loss': train[-1]['loss'] if train else '',
    'eval_loss': evals[-1]['eval_loss'] if evals else '',
    'best_eval_loss': min(r['eval_loss'] for r in evals) if evals else '',
    'tokens_per_s': statistics.median(speeds) if speeds else '',
    'steps': train[-1]['step'] if train else '',
    'seconds': result.get('seconds', ''),
    'exit_code': '' if exit_code is None else exit_code,
    'error': result.get('error', ''),
  }


def write_results(trials: Sequence[Trial], workdir: str) -> tuple[list[dict[str, Any]], str]:
  """Writes WORKDIR/results.md, results.csv and loss_curves.png; returns the rows and the table."""
  keys = list(dict.fromkeys(k for t in trials for k in t.overrides))
  rows = [summarize(t) for t in trials]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, ['trial', *keys, *COLUMNS], restval='')
    writer.writeheader()
    writer.writerows(rows)
  table = markdown_table(rows, keys)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  plot_losses(trials, os.path.join(workdir, 'loss_curves.png'))
  return rows, table


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
  def number(value: Any, spec: str) -> str:
    return '' if value == '' else format(value, spec)

  head = [
    'trial',
    *keys,
    'status',
    'train loss',
    'eval loss',
    'best eval',
    'tok/s',
    'steps',
    'time',
    'error',
  ]
  lines = [
    '| ' + ' | '.join(head) + ' |',
    '| --- | ' + '---: | ' * len(keys) + '--- | ' + '---: | ' * 6 + '--- |',
  ]
  for r in rows:
    cells = [
      r['trial'],
      *(
        number(r.get(k, ''), 'g') if isinstance(r.get(k), float) else str(r.get(k, ''))
        for k in keys
      ),
      r['status'],
      number(r['train_loss'], '.4f'),
      number(r['eval_loss'], '.4f'),
      number(r['best_eval_loss'], '.4f'),
      number(r['tokens_per_s'], ',.0f'),
      str(r['steps']),
      '' if r['seconds'] == '' else _duration(r['seconds']),
      (f'exit {r["exit_code"]}: ' if r['error'] else '') + r['error'],
    ]
    lines.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
  return '\n'.join(lines)


def plot_losses(trials: Sequence[Trial], path: str) -> None:
  """All trials' training loss curves, with their evaluations as dots of the same colour."""
  # The Figure API draws with Agg and never touches pyplot's global state or a display.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(9, 5.5), layout='constrained')
  ax = fig.subplots()
  for trial in trials:
    records = _records(trial)
    train = [(r['step'], r['loss']) for r in records if 'loss' in r]
    evals = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
    if not train and not evals:
      continue
    color = ax.plot(*zip(*train, strict=True), label=trial.name)[0].get_color() if train else None
    if evals:
      ax.plot(
        *zip(*evals, strict=True),
        'o',
        color=color,
        markersize=5,
        label=None if train else trial.name,
      )
  ax.set_xlabel('step')
  ax.set_ylabel('loss')
  ax.set_title(f'{os.path.basename(os.path.dirname(path))}: train loss (lines), eval loss (dots)')
  ax.grid(alpha=0.3)
  if ax.get_lines():
    ax.legend(fontsize='small' if len(trials) <= 12 else 'x-small')
  fig.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------
# The command.


def run_sweep(
  config: ml_collections.ConfigDict,
  config_spec: str,
  workdir: str,
  *,
  shared: dict[str, Any],
  sweep_spec: str | None = None,
  parallel: int = 1,
  print_only: bool = False,
  collect: bool = False,
  log: Callable[[str], None] = print,
) -> int:
  """`pretrax sweep`: expands, then prints the commands or runs the trials and writes the results.
  With `collect`, runs nothing and writes the results of trials run elsewhere (`print_only`).

  Returns the exit status: 0, or 1 if any trial did not finish.
  """
  trials = expand(load_sweep(config_spec, sweep_spec), config, config_spec, workdir, shared)
  if print_only:
    for trial in trials:
      print(trial.command)
    return 0
  if paths.is_remote(workdir):  # Trials' logs and results, and the table, are local files.
    raise SweepError(
      f'--workdir={workdir}: a sweep runs and collects its trials in a local '
      'directory; for trials on a bucket, pass --print and start the commands '
      'with a launcher.'
    )
  log(f'sweep of {len(trials)} trials in {workdir}, {parallel} at a time')
  start = time.time()
  interrupted = False
  try:
    if not collect:
      run(trials, parallel, log)
  except KeyboardInterrupt:
    interrupted = True
  rows, table = write_results(trials, workdir)
  log(table)
  bad = [r for r in rows if r['status'] != 'ok']
  scored = [r for r in rows if r['status'] == 'ok' and r['eval_loss'] != '']
  best = min(scored, key=lambda r: r['eval_loss']) if scored else None
  took = _duration(time.time() - start)
  summary = f'{len(rows) - len(bad)} of {len(rows)} trials ok in {took}' + (
    f'; best eval loss {best["eval_loss"]:.4f}: {best["trial"]}' if best else ''
  )
  if bad:
    summary += (
      f'; SWEEP FAILED: {len(bad)} did not finish ('
      + ', '.join(f'{r["trial"]}: {r["status"]}' for r in bad)
      + ')'
    )
  log(summary)
  log(f'results in {workdir}: results.md, results.csv, loss_curves.png')
  if interrupted:
    raise KeyboardInterrupt
  return 1 if bad else 0
