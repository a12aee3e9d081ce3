"""A sweep's results, read from what its trials left: each one's result.json (written by
sweep_run.py) and metrics.jsonl, into one row per trial; WORKDIR/results.md, results.csv and
loss_curves.png.

A trial with no result.json whose metrics reach its last step ran to the end elsewhere (a launcher
ran the printed command); one with metrics but no result is incomplete.
"""

from collections.abc import Sequence
import csv
import json
import os
import statistics
from typing import Any

from pretrax import workdir as workdir_lib
from pretrax.sweep_trials import Trial

# Where a trial's process exit code says it stopped on a signal after saving (faults.py).
STOPPED_EXIT_CODE = 75
RESULT_FILE = 'result.json'


def duration(seconds: float) -> str:
  """`seconds` as the progress line shows it (metrics.format_duration)."""
  from pretrax import metrics  # Local: config files import this module; metrics imports JAX.

  return metrics.format_duration(seconds)


def status_of(exit_code: int | None) -> str:
  """A trial's status from its process's exit code (None: no result.json)."""
  if exit_code is None:
    return 'not run'
  return {0: 'ok', STOPPED_EXIT_CODE: 'stopped'}.get(exit_code, 'failed')


def read_result(trial: Trial) -> dict[str, Any] | None:
  """The trial's result.json; None where it has none (not run, or killed) or half of one."""
  try:
    with open(os.path.join(trial.workdir, RESULT_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


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
    with open(workdir_lib.metrics_file(trial.workdir)) as f:
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
  result = read_result(trial) or {}
  exit_code = result.get('exit_code')
  status = status_of(exit_code)
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
      '' if r['seconds'] == '' else duration(r['seconds']),
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
