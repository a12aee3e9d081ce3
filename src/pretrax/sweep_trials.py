"""A sweep expanded into named trials: each swept key and value checked against the config, each
trial's name, workdir and `pretrax train` command.

A trial is named after its overrides (`lr=0.001,seed=1`: the last part of each key, the whole key
where two would clash) and trains in WORKDIR/<name> with the sweep's shared `--config.*` overrides
and its own. A sweep that cannot be expanded raises SweepError, before anything runs.
"""

import dataclasses
import difflib
import hashlib
import os
import re
import shlex
from typing import Any

import ml_collections

from pretrax import config as config_lib
from pretrax import errors

Sweep = list[dict[str, Any]]


class SweepError(errors.PretraxError, ValueError):
  """A sweep that cannot be expanded; the message names the key or file and the fix."""


@dataclasses.dataclass(frozen=True)
class Trial:
  """One run of a sweep: its name, swept values, workdir and the arguments that run it."""

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
