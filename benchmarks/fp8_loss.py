"""Benchmark: FP8 against bfloat16 over a whole training run, on the same batches.

  .venv/bin/python benchmarks/fp8_loss.py [--quick] [--root=DIR] [--runs=bf16,fp8] [--steps=N]
      [--out=PATH.json] [-- --config.KEY=VALUE ...]

Trains the same config from the same seed twice with `pretrax train`, once in bfloat16 and once
with `model.fp8=true` (the batch of step k is a function of (seed, k), so both runs read the same
batches), then compares: the mean training loss over the last tenth of the steps, the held-out
loss at the end, and their relative differences (issue 28's goal: within 1% after 1,000 steps),
with each run's tokens/s. Prints a markdown table (and writes it as JSON to --out).

Each run's workdir is ROOT/bf16 and ROOT/fp8: a run already finished there is read, not run
again, so the two can run as separate commands (`--runs=bf16`, then `--runs=fp8`: on one H200,
llama_1b's 1,000 steps take about 7 minutes each) and the comparison printed by either.

Default: llama_1b as benchmarks/gpu_session.sh runs it (the standard library's sources,
characters, 32k vocabulary), 1,000 steps of 8 x 2048 tokens, every projection of at least 1024
converted (model.fp8_min_dim's default). --quick: configs/tiny.py:llama in bfloat16 on this CPU,
300 steps, every projection converted (fp8_min_dim=16), in about 2 minutes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_1B = (
  'configs/llama_1b.py',
  '--config.data.path=none',
  '--config.data.fallback=python-stdlib',
  '--config.tokenizer.model_type=char',
  '--config.model.vocab_size=32000',
  '--config.data.batch_size=8',
  '--config.optim.grad_accum_steps=1',
)
TINY = (
  'configs/tiny.py:llama',
  '--config.model.dtype=bfloat16',
  '--config.model.fp8_min_dim=16',
  '--config.peak_flops=1e11',
)


def train(config: list[str], workdir: str, steps: int, fp8: bool, extra: list[str]) -> None:
  """One `pretrax train` run to `steps` (resumed if it stopped before)."""
  command = [
    os.path.join(os.path.dirname(sys.executable), 'pretrax'),
    'train',
    f'--config={config[0]}',
    f'--workdir={workdir}',
    *config[1:],
    f'--config.steps={steps}',
    f'--config.model.fp8={fp8}',
    '--config.log_every=10',
    f'--config.eval_every={steps}',
    '--config.eval_batches=20',
    '--config.sample.length=0',
    *extra,
  ]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  if result.returncode != 0:
    sys.exit(f'benchmarks/fp8_loss.py: {" ".join(command)} failed:\n{result.stderr[-3000:]}')


def summary(workdir: str, steps: int) -> dict | None:
  """The finished run's losses and speed from its metrics.jsonl; None if it has not finished."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r and r['step'] == steps]
  if not train or train[-1]['step'] < steps or not evals:
    return None
  tail = [r for r in train if r['step'] > steps - max(steps // 10, 1)]
  speeds = [r['tokens_per_s'] for r in train[1:]]  # The first window holds no start-up: see train.
  return {
    'steps': steps,
    'train_loss_tail': statistics.mean(r['loss'] for r in tail),
    'eval_loss': evals[-1]['eval_loss'],
    'tokens_per_s': statistics.median(speeds) if speeds else train[0]['tokens_per_s'],
    'losses': {r['step']: r['loss'] for r in train},
  }


def table(bf16: dict, fp8: dict) -> str:
  rows = [
    ('train loss, mean of the last tenth', 'train_loss_tail', '.4f'),
    ('held-out loss at the end', 'eval_loss', '.4f'),
    ('tokens/s (median of logged windows)', 'tokens_per_s', ',.0f'),
  ]
  lines = [
    '| after the run | bfloat16 | fp8 | fp8 / bfloat16 - 1 |',
    '| --- | ---: | ---: | ---: |',
  ]
  for name, key, fmt in rows:
    a, b = bf16[key], fp8[key]
    lines.append(f'| {name} | {a:{fmt}} | {b:{fmt}} | {b / a - 1:+.2%} |')
  common = sorted(set(bf16['losses']) & set(fp8['losses']))
  worst = max(abs(fp8['losses'][s] / bf16['losses'][s] - 1) for s in common)
  lines.append(f"| largest gap of a logged step's loss (of {len(common)}) | | | {worst:.2%} |")
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='configs/tiny.py:llama, 300 steps.')
  parser.add_argument('--root', default='', help='Where the two workdirs go (default: a temp dir).')
  parser.add_argument('--runs', default='bf16,fp8', help='Which runs to train here.')
  parser.add_argument('--steps', type=int, default=0, help='Default 1000 (--quick: 300).')
  parser.add_argument('--out', default='', help='Also write the comparison as JSON here.')
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != '--']
  config = list(TINY if args.quick else LLAMA_1B)
  steps = args.steps or (300 if args.quick else 1000)
  root = args.root or tempfile.mkdtemp(prefix='pretrax-fp8-loss-')
  results = {}
  for name in ('bf16', 'fp8'):
    workdir = os.path.join(root, name)
    if name in args.runs.split(',') and summary(workdir, steps) is None:
      print(f'training {name} in {workdir} ...', file=sys.stderr, flush=True)
      train(config, workdir, steps, name == 'fp8', extra)
    results[name] = summary(workdir, steps)
  if results['bf16'] is None or results['fp8'] is None:
    missing = [n for n, r in results.items() if r is None]
    print(f'not finished yet in {root}: {", ".join(missing)} (run with --runs={",".join(missing)})')
    return
  print(f'{" ".join(config + extra)}, {steps} steps, the same batches:')
  print(table(results['bf16'], results['fp8']))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'config': config + extra, **results}, f, indent=1)


if __name__ == '__main__':
  main()
