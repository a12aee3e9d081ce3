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

This module holds what a sweep file calls and the command; below it, sweep_trials.py expands a
sweep into named trials, sweep_run.py runs them and sweep_report.py collects the table and plot.
"""

from collections.abc import Callable, Sequence
import itertools
import math
import time
from typing import Any

import ml_collections

from pretrax import paths
from pretrax.sweep_report import duration, write_results
from pretrax.sweep_run import run
from pretrax.sweep_trials import Sweep, SweepError, expand, load_sweep

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
  took = duration(time.time() - start)
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
