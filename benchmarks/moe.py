"""Benchmark: a Mixture-of-Experts model against a dense one with the same active parameters.

  .venv/bin/python benchmarks/moe.py [--out=/tmp/pretrax-moe] [--quick]

configs/moe_tiny.py (4 layers of width 128; 8 experts of 256 a layer, 2 a token) against its
`:dense` variant (one MLP of 512 a layer): the same active parameters, the same tokens (600 steps
of 16 x 64 characters of Tiny Shakespeare; the Python standard library's sources without
../shared/data), the same everything else. Each model is tuned over the config's learning rates
by `pretrax sweep` (the commands a user would type, one trial after another); the table reads
the trials' metrics.jsonl and results.csv:

- per model: parameters (all / active), the best learning rate by held-out loss, the held-out loss
  there (and at every rate), the jitted train step's time and its tokens/s;
- the MoE/dense step-time ratio (goal <= 1.5 on CPU), from the two jitted steps timed side by
  side in this process (alternating rounds, the same batch): the sweeps run one after another on
  a shared machine, so their own times are not comparable;
- the expert load's coefficient of variation (std/mean of the tokens each expert gets) at the best
  rate, balanced by DeepSeek-V3's auxiliary-loss-free bias alone: the mean over layers and logged
  steps after the warm-up (the first sixth of the run), and the largest (goal < 0.2).

About 10 minutes on 2 idle CPU cores (longer on a busy machine); --quick (10 steps, one learning
rate) well under a minute.
"""

import argparse
import json
import os
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import sweeps  # benchmarks/sweeps.py, beside this script.

from pretrax import config as config_lib
from pretrax import plan as plan_lib
from pretrax import run_config, train
from pretrax import state as state_lib
from pretrax import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join('configs', 'moe_tiny.py')
MODELS = (('dense', ':dense'), ('moe', ''))  # (name, config variant)
# No matmul-peak measurement in each trial: MFU is not what this benchmark compares.
COMMON = {'peak_flops': 1e11}
QUICK = {
  'steps': 10,
  'log_every': 5,
  'eval_every': 10,
  'eval_batches': 2,
  'checkpoint.every': 10,
  'optim.warmup_steps': 2,
}
QUICK_SWEEP = """from pretrax import sweep


def get_sweep(arg=None):
  return sweep.values('optim.lr', [2e-3])
"""
STEP_TIME_GOAL = 1.5  # MoE step time / dense, at most.
CV_GOAL = 0.2  # Expert load coefficient of variation after warm-up, below.


def flags(overrides: dict) -> list[str]:
  return [f'--config.{key}={value}' for key, value in overrides.items()]


def run_sweep(variant: str, workdir: str, overrides: dict, extra: list[str]) -> float:
  """`pretrax sweep` of the config's `variant` into `workdir`; returns its wall time in seconds."""
  return sweeps.run(CONFIG, variant, workdir, [*flags(overrides), *extra])


def records(trial_dir: str) -> list[dict]:
  with open(os.path.join(trial_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def load_balance(trial_dir: str, after_step: int) -> dict[str, float]:
  """Each MoE layer's expert load CV (and the copies dropped) at the logged steps after
  `after_step`: their mean over layers and steps, and the largest."""
  logged = [r for r in records(trial_dir) if 'moe_load_cv_layer0' in r and r['step'] > after_step]
  cvs = [v for r in logged for k, v in r.items() if k.startswith('moe_load_cv_layer')]
  return {
    'cv_mean': statistics.mean(cvs),
    'cv_max': max(cvs),
    'dropped': statistics.mean(r['moe_dropped_fraction'] for r in logged),
    'imbalance_mean': statistics.mean(r['moe_imbalance'] for r in logged),
    'steps_logged': len(logged),
    'layers': len(cvs) // len(logged),
  }


def build(variant: str, overrides: dict):
  """The run config of a trial of `variant` with `overrides`, as its command line makes it."""
  cfg = config_lib.load(os.path.join(REPO, CONFIG), variant.lstrip(':') or None)
  for key, value in overrides.items():
    *path, name = key.split('.')
    node = cfg
    for part in path:
      node = node[part]
    node[name] = value
  return run_config.build(cfg, num_devices=1)


def param_counts(run, vocab_size: int) -> tuple[int, int]:
  """(all, active) parameters of the model `run` builds."""
  state = state_lib.build(run, vocab_size)
  leaves, treedef = jax.tree_util.tree_flatten(state.abstract['params'])
  axes = treedef.flatten_up_to(state.logical_axes)
  moe = run.model.moe
  sizes = [(x.size, a) for x, a in zip(leaves, axes, strict=True)]
  return sum(s for s, _ in sizes), plan_lib.active_params(sizes, moe.top_k, moe.num_experts)


def step_times(
  runs: dict, rounds: int, per_round: int, workdir: str
) -> tuple[dict[str, float], int]:
  """Median ms per jitted train step of each run, timed in alternating rounds on one real batch
  so that the machine's drift hits them alike (its data store in `workdir`); and the vocabulary
  size."""
  data = train.load_data(next(iter(runs.values())), workdir)
  batch = jax.tree.map(jnp.asarray, next(data.train_batches(0)))
  steps = {}
  for name, run in runs.items():
    built = state_lib.build(run, data.tok.vocab_size)
    step = step_lib.jit_train_step(
      built.model_def, built.optimizer, built.schedule, step_lib.step_config(run)
    )
    holder = {'state': built.init(run.seed)}  # The step donates its state: thread it through.

    def one(holder=holder, step=step):
      holder['state'], step_metrics = step(holder['state'], batch)
      jax.block_until_ready(step_metrics)

    steps[name] = one
  times: dict[str, list[float]] = {name: [] for name in steps}
  for one in steps.values():
    for _ in range(3):  # Compile and warm up.
      one()
  for _ in range(rounds):
    for name, one in steps.items():
      for _ in range(per_round):
        start = time.perf_counter()
        one()
        times[name].append(time.perf_counter() - start)
  return {name: 1000 * statistics.median(t) for name, t in times.items()}, data.tok.vocab_size


def table(results: dict, ratio: float, balance: dict, settle: int, bias_rate: float) -> str:
  lines = [
    '| model | parameters (all / active) | best lr | held-out loss at best lr | held-out loss '
    'per lr | step ms (side by side) | tokens/s (side by side) | tokens/s (sweep, median) |',
    '| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |',
  ]
  for name, r in results.items():
    per_lr = ', '.join(f'{t["lr"]:g}: {t["eval"]:.4f}' for t in r['trials'])
    lines.append(
      f'| {name} | {r["params"][0]:,} / {r["params"][1]:,} | {r["best"]["lr"]:g} | '
      f'{r["best"]["eval"]:.4f} | {per_lr} | {r["step_ms"]:.1f} | {r["tokens_per_s"]:,.0f} | '
      f'{float(r["best"]["tokens_per_s"]):,.0f} |'
    )
  gap = results['moe']['best']['eval'] - results['dense']['best']['eval']
  met = {True: 'met', False: 'NOT met'}
  lines += [
    '',
    f'MoE / dense step time (side by side): {ratio:.3f}x (goal <= {STEP_TIME_GOAL}: '
    f'{met[ratio <= STEP_TIME_GOAL]})',
    f'MoE expert load CV after step {settle} (bias_rate {bias_rate:g}, no balancing loss), over '
    f'{balance["layers"]} layers x {balance["steps_logged"]} logged steps: mean '
    f'{balance["cv_mean"]:.3f}, max {balance["cv_max"]:.3f} (goal < {CV_GOAL}: '
    f'{met[balance["cv_mean"] < CV_GOAL]})',
    f'MoE busiest expert / mean load (worst layer), mean after step {settle}: '
    f'{balance["imbalance_mean"]:.2f}; token copies dropped for capacity: '
    f'{balance["dropped"]:.2%}',
    f'held-out loss, MoE - dense at their best learning rates: {gap:+.4f} '
    f'(MoE lower: {met[gap < 0]})',
  ]
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/pretrax-moe', help='Sweeps go here (emptied first).')
  parser.add_argument(
    '--quick', action='store_true', help='10 steps at one learning rate: a smoke test.'
  )
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  started = time.perf_counter()
  overrides, extra = dict(COMMON), []
  if args.quick:
    sweep_file = os.path.join(args.out, 'quick_sweep.py')
    with open(sweep_file, 'w') as f:
      f.write(QUICK_SWEEP)
    overrides.update(QUICK)
    extra = [f'--sweep={sweep_file}']

  results = {}
  for name, variant in MODELS:
    workdir = os.path.join(args.out, name)
    seconds = run_sweep(variant, workdir, overrides, extra)
    rows = sweeps.trials(workdir)
    best = min(rows, key=lambda row: row['eval'])
    results[name] = {'variant': variant, 'trials': rows, 'best': best, 'seconds': seconds}

  runs = {
    name: build(r['variant'], {**overrides, 'optim.lr': r['best']['lr']})
    for name, r in results.items()
  }
  rounds, per_round = (2, 2) if args.quick else (20, 10)
  ms, vocab_size = step_times(runs, rounds, per_round, os.path.join(args.out, 'timing'))
  for name, r in results.items():
    run = runs[name]
    r['step_ms'] = ms[name]
    r['tokens_per_s'] = run.data.batch_size * run.data.seq_len / (ms[name] / 1000)
    r['params'] = param_counts(run, vocab_size)

  shakespeare = config_lib.shared_data(os.path.join(REPO, CONFIG), 'tinyshakespeare.txt')
  corpus = 'Tiny Shakespeare' if os.path.exists(shakespeare) else 'the stdlib fallback corpus'
  moe_run = runs['moe']
  settle = moe_run.steps // 6
  best_dir = os.path.join(args.out, 'moe', results['moe']['best']['trial'])
  balance = load_balance(best_dir, settle)
  print(
    f'\ncorpus: {corpus}, characters; {moe_run.steps} steps of {moe_run.data.batch_size} x '
    f'{moe_run.data.seq_len} tokens for each model\n'
  )
  print(table(results, ms['moe'] / ms['dense'], balance, settle, moe_run.model.moe.bias_rate))
  sweep_times = ', '.join(f'{name} {r["seconds"]:.0f} s' for name, r in results.items())
  print(f'\nsweeps: {sweep_times}; total {(time.perf_counter() - started) / 60:.1f} minutes')


if __name__ == '__main__':
  main()
