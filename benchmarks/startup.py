"""Benchmark: time to the first step, cold and restarted, with and without the compilation cache.

  .venv/bin/python benchmarks/startup.py [--config=configs/NAME.py[:ARG]] [--quick]
      [--out=PATH.json] [-- --config.KEY=VALUE ...]

Runs `pretrax train` three times in one workdir, each a fresh process, each with a checkpoint
every step, all with a fresh cache directory of their own (PRETRAX_CACHE_DIR in a temporary dir):

  cold              a new run, 1 step, the compilation cache on and empty
  restart, no cache the same run resumed for 1 more step with compile_cache=none
  restart, cache    the same run resumed for 1 more step with the cache the cold run filled

Each run's start-up record (pretrax.startup: imports, backend, data, state, compile, first step,
the programs loaded from the cache and compiled) comes from its metrics.jsonl; 'wall' is the whole
command, exit included. The step compiles on a thread of its own beside the state and data phases
('compile' is what was left to wait for; 'step compile' its own duration). The last column
divides each run's time to its first step by the cold run's step compile: issue 28's goal is at
most 1.5x. Prints a markdown table (and writes its rows
as JSON to --out).

The default is GPT-2 small (12 layers, width 768, its padded vocabulary) on a short context and
one sequence a step (about 2 minutes on 2 CPU cores); --quick runs configs/tiny.py (20 s).
Overrides after `--` go to every run (e.g. --config.model.scan_layers=true).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = ('imports', 'backend', 'data', 'state', 'compile', 'first_step')
# As benchmarks/gpu_session.sh runs it (the standard library's sources, characters, GPT-2's padded
# vocabulary), at a CPU's batch and in float32 (bfloat16 is no faster on a CPU).
GPT2_ON_CPU = (
  '--config.data.path=none',
  '--config.data.fallback=python-stdlib',
  '--config.tokenizer.model_type=char',
  '--config.model.vocab_size=50304',
  '--config.model.dtype=float32',
  '--config.data.seq_len=128',
  '--config.data.batch_size=1',
  '--config.peak_flops=1e11',
)
RUNS = (  # (name, steps after the run, compile_cache)
  ('cold', 1, 'auto'),
  ('restart, no cache', 2, 'none'),
  ('restart, cache', 3, 'auto'),
)


def run_train(config: str, workdir: str, steps: int, cache: str, extra: list[str], env) -> dict:
  """One `pretrax train` process; its start-up record and the command's wall seconds."""
  command = [
    os.path.join(os.path.dirname(sys.executable), 'pretrax'),
    'train',
    f'--config={config}',
    f'--workdir={workdir}',
    f'--config.steps={steps}',
    f'--config.compile_cache={cache}',
    '--config.checkpoint.every=1',
    '--config.log_every=1',
    '--config.eval_batches=1',
    '--config.sample.length=0',
    *extra,
  ]
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
  wall = time.perf_counter() - start
  if result.returncode != 0:
    sys.exit(f'benchmarks/startup.py: {" ".join(command)} failed:\n{result.stderr[-3000:]}')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  startup = [r for r in records if 'startup_s' in r][-1]  # This run's: the newest.
  return {**startup, 'wall_s': wall}


def table(rows: list[dict], compile_s: float) -> str:
  head = ['run', 'to first step s', *(f'{p.replace("_", " ")} s' for p in PHASES)]
  head += ['step compile s', 'programs loaded / compiled', 'wall s', 'first step / cold compile']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for r in rows:
    cells = [r['run'], f'{r["startup_s"]:.1f}']
    cells += [f'{r.get(f"startup_{p}_s", 0.0):.1f}' for p in PHASES]
    cells += [f'{r["startup_step_compile_s"]:.1f}']
    cells += [f'{r["startup_programs_loaded"]} / {r["startup_programs_compiled"]}']
    cells += [f'{r["wall_s"]:.1f}', f'{r["startup_s"] / compile_s:.2f}x']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/gpt2_small.py')
  parser.add_argument('--quick', action='store_true', help='configs/tiny.py, its own shape.')
  parser.add_argument('--out', default='', help='Also write the rows as JSON here.')
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != '--']
  config = 'configs/tiny.py' if args.quick else args.config
  if config == 'configs/gpt2_small.py':
    extra = [*GPT2_ON_CPU, *extra]
  rows = []
  with tempfile.TemporaryDirectory(prefix='pretrax-startup-') as tmp:
    env = {**os.environ, 'PRETRAX_CACHE_DIR': os.path.join(tmp, 'cache')}
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # The fresh directory, not a user's warm one.
    for name, steps, cache in RUNS:
      row = run_train(config, os.path.join(tmp, 'run'), steps, cache, extra, env)
      rows.append({'run': name, 'config': ' '.join([config, *extra]), **row})
      print(f'{name}: {row["startup_s"]:.1f} s to the first step', file=sys.stderr, flush=True)
  print(table(rows, rows[0]['startup_step_compile_s']))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
