"""Benchmark: Muon against AdamW, and learning rates that transfer across widths (muP).

  .venv/bin/python benchmarks/optimizers.py [--out=/tmp/pretrax-optimizers] [--quick]

configs/optim_tiny.py (4 layers of width 128, BPE on Tiny Shakespeare; the Python standard
library's sources without ../shared/data), every setting tuned over the config's learning rates
by `pretrax sweep` (the commands a user would type, printed as they run):

1. AdamW for the config's 400 steps against Muon (optim.name=muon) for 0.8 x 400 = 320 steps,
   each with its own full schedule (warmup, cosine decay): the goal is that Muon's best held-out
   loss after 320 steps is at most AdamW's best after 400, i.e. Muon reaches AdamW's loss in at
   most 0.8x the steps at the same batch.
2. Widths 64 and 256 (4x apart), AdamW, with the standard parametrisation (`:sp`) and with width
   transfer from width 64 (`:mup`, model.mup_base_width=64): the best learning rate at each width.
   The goal is that under muP it moves by at most one grid step (a factor of 2) from 64 to 256.

Prints both tables (held-out loss at every learning rate) and whether each goal is met. About 25
minutes on 2 idle CPU cores; --quick (8 steps, 2 learning rates) about 3 minutes.
"""

import argparse
import math
import os
import shutil
import time

import sweeps  # benchmarks/sweeps.py, beside this script.

CONFIG = os.path.join('configs', 'optim_tiny.py')
STEPS = 400
MUON_SHARE = 0.8  # Muon's steps, as a share of AdamW's: the goal.
COMMON = ['--config.peak_flops=1e11']  # No matmul-peak measurement in each trial.
QUICK_STEPS = 8
QUICK_SWEEP = """from pretrax import sweep


def get_sweep(arg=None):
  lrs = sweep.values('optim.lr', [2e-3, 8e-3])
  if arg == 'widths':
    return sweep.product(sweep.values('model.embed_dim', [64, 256]), lrs)
  return lrs
"""


def run_sweep(variant: str, workdir: str, args: list[str]) -> float:
  """`pretrax sweep` of the config's `variant` into `workdir`; returns its wall time in seconds."""
  return sweeps.run(CONFIG, variant, workdir, [*COMMON, *args])


def trials(workdir: str) -> list[dict]:
  """The sweep's trials (sweeps.trials), each with its width as a number too."""
  rows = sweeps.trials(workdir)
  for row in rows:
    row['width'] = int(row.get('model.embed_dim') or 128)
  return rows


def steps_args(steps: int) -> list[str]:
  """A run of `steps` with its own schedule (warmup a tenth of it), evaluated and saved at its
  end."""
  return [
    f'--config.steps={steps}',
    f'--config.optim.warmup_steps={max(steps // 10, 1)}',
    f'--config.checkpoint.every={steps}',
    f'--config.eval_every={steps}',
  ]


def muon_vs_adamw(out: str, sweep_args: list[str], steps: int) -> dict:
  """Part 1: each optimizer's trials; Muon's with MUON_SHARE of AdamW's steps."""
  muon_steps = int(round(steps * MUON_SHARE))
  seconds = {
    'adamw': run_sweep('', os.path.join(out, 'adamw'), [*sweep_args, *steps_args(steps)]),
    'muon': run_sweep(':muon', os.path.join(out, 'muon'), [*sweep_args, *steps_args(muon_steps)]),
  }
  return {
    'steps': {'adamw': steps, 'muon': muon_steps},
    'trials': {name: trials(os.path.join(out, name)) for name in ('adamw', 'muon')},
    'seconds': seconds,
  }


def width_transfer(out: str, sweep_args: list[str], steps: int) -> dict:
  """Part 2: the widths sweep under the standard parametrisation and under muP."""
  seconds = {}
  for name in ('sp', 'mup'):
    workdir = os.path.join(out, f'widths_{name}')
    seconds[name] = run_sweep(f':{name}', workdir, [*sweep_args, *steps_args(steps)])
  return {
    'trials': {name: trials(os.path.join(out, f'widths_{name}')) for name in ('sp', 'mup')},
    'seconds': seconds,
  }


def best(rows: list[dict]) -> dict:
  return min(rows, key=lambda r: r['eval'])


def per_lr(rows: list[dict]) -> str:
  return ', '.join(f'{r["lr"]:g}: {r["eval"]:.4f}' for r in sorted(rows, key=lambda r: r['lr']))


def table(part1: dict, part2: dict) -> str:
  met = {True: 'met', False: 'NOT met'}
  lines = [
    '| optimizer | steps | best lr | held-out loss at best lr | held-out loss per lr |',
    '| --- | ---: | ---: | ---: | --- |',
  ]
  for name, rows in part1['trials'].items():
    b = best(rows)
    lines.append(
      f'| {name} | {part1["steps"][name]} | {b["lr"]:g} | {b["eval"]:.4f} | {per_lr(rows)} |'
    )
  adamw, muon = best(part1['trials']['adamw']), best(part1['trials']['muon'])
  lines += [
    '',
    f'Muon after {part1["steps"]["muon"]} steps ({MUON_SHARE:g}x) - AdamW after '
    f'{part1["steps"]["adamw"]}, at their best learning rates: {muon["eval"] - adamw["eval"]:+.4f} '
    f'(goal <= 0: {met[muon["eval"] <= adamw["eval"]]})',
    '',
    '| parametrisation | width | best lr | held-out loss at best lr | held-out loss per lr |',
    '| --- | ---: | ---: | ---: | --- |',
  ]
  shifts = {}
  for name, rows in part2['trials'].items():
    widths = sorted({r['width'] for r in rows})
    bests = {w: best([r for r in rows if r['width'] == w]) for w in widths}
    for w in widths:
      at_width = [r for r in rows if r['width'] == w]
      lines.append(
        f'| {name} | {w} | {bests[w]["lr"]:g} | {bests[w]["eval"]:.4f} | {per_lr(at_width)} |'
      )
    # Grid steps are factors of 2: the shift of the best rate, in steps.
    shifts[name] = abs(math.log2(bests[widths[-1]]['lr'] / bests[widths[0]]['lr']))
  lines += [
    '',
    f'best learning rate, width {min(r["width"] for r in part2["trials"]["mup"])} -> '
    f'{max(r["width"] for r in part2["trials"]["mup"])}, in grid steps (factors of 2): '
    f'muP {shifts["mup"]:g} (goal <= 1: {met[shifts["mup"] <= 1]}), standard '
    f'parametrisation {shifts["sp"]:g}',
  ]
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/pretrax-optimizers', help='Runs go here.')
  parser.add_argument('--quick', action='store_true', help='8 steps, 2 learning rates.')
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  started = time.perf_counter()
  steps, sweep_file = STEPS, CONFIG
  if args.quick:
    steps, sweep_file = QUICK_STEPS, os.path.join(args.out, 'quick_sweep.py')
    with open(sweep_file, 'w') as f:
      f.write(QUICK_SWEEP)
  part1 = muon_vs_adamw(args.out, [f'--sweep={sweep_file}'], steps)
  part2 = width_transfer(args.out, [f'--sweep={sweep_file}:widths'], steps)
  print()
  print(table(part1, part2))
  seconds = {**part1['seconds'], **{f'widths {k}': v for k, v in part2['seconds'].items()}}
  print('\nwall time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in seconds.items()))
  print(f'total {(time.perf_counter() - started) / 60:.1f} minutes')


if __name__ == '__main__':
  main()
