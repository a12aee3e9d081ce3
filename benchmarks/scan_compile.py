"""Benchmark: how long the train step takes to compile with the blocks unrolled and scanned
(model.scan_layers), as the model deepens.

  python benchmarks/scan_compile.py [--layers=12,24] [--config=tiny:llama] [--remat=none]

For each depth, the config's model (narrow: compile time is about the program's size, not its
widths) is traced, lowered and compiled once per layout on this machine, with no compilation
cache; prints one row per depth (layers, unrolled s, scanned s, unrolled / scanned) and a JSON
line per measurement. Unrolled, the program holds every block (forward and backward), so its
compile time grows with the depth; scanned, it holds one, so it stays about flat.
"""

import argparse
import json
import os
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src'))

from pretrax import config as config_lib  # noqa: E402
from pretrax import plan as plan_lib  # noqa: E402
from pretrax import run_config  # noqa: E402
from pretrax import state as state_lib  # noqa: E402
from pretrax import step as step_lib  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')


def compile_seconds(name: str, arg: str | None, layers: int, scan: bool, remat: str) -> dict:
  """Seconds to trace + lower, and to compile, the train step of `name` at this depth."""
  c = config_lib.load(os.path.join(CONFIGS, f'{name}.py'), arg)
  c.model.num_layers, c.model.scan_layers, c.model.remat = layers, scan, remat
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, 256)
  train_step = step_lib.jit_train_step(
    run.model_def, run.optimizer, run.schedule, step_lib.step_config(c)
  )
  start = time.perf_counter()
  lowered = train_step.trace(run.abstract, plan_lib._abstract_batch(c, run)).lower()
  traced = time.perf_counter() - start
  lowered.compile()
  total = time.perf_counter() - start
  return {'layers': layers, 'scan_layers': scan, 'trace_lower_s': traced, 'total_s': total}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--layers', default='12,24', help='comma-separated depths')
  parser.add_argument('--config', default='tiny:llama', help='NAME[:ARG] under configs/')
  parser.add_argument('--remat', default='none')
  args = parser.parse_args()
  jax.config.update('jax_enable_compilation_cache', False)
  name, _, arg = args.config.partition(':')
  rows = []
  for layers in (int(n) for n in args.layers.split(',')):
    got = {
      scan: compile_seconds(name, arg or None, layers, scan, args.remat) for scan in (False, True)
    }
    for record in got.values():
      print(json.dumps({'config': args.config, 'remat': args.remat, **record}), flush=True)
    rows.append((layers, got[False]['total_s'], got[True]['total_s']))
  print(f'\n{args.config}, remat={args.remat}, {jax.devices()[0].platform}: train step compile')
  print(f'{"layers":>6}  {"unrolled s":>10}  {"scanned s":>9}  {"ratio":>5}')
  for layers, unrolled, scanned in rows:
    print(f'{layers:>6}  {unrolled:>10.2f}  {scanned:>9.2f}  {unrolled / scanned:>5.1f}')


if __name__ == '__main__':
  main()
