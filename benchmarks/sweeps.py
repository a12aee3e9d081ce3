"""What the tuned benchmarks (moe.py, optimizers.py) share: run `pretrax sweep` as a user would,
and read its trials back."""

import csv
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAX = [sys.executable, '-m', 'pretrax.cli']


def run(config: str, variant: str, workdir: str, args: list[str]) -> float:
  """`pretrax sweep` of `config`'s `variant` into `workdir` with `args` (its output to
  workdir.log, printed as it starts); returns its wall time in seconds, or exits with the log's
  tail if it failed."""
  command = ['sweep', f'--config={config}{variant}', f'--workdir={workdir}', *args]
  print('$ pretrax ' + ' '.join(command), flush=True)
  started = time.perf_counter()
  with open(workdir + '.log', 'w') as f:
    done = subprocess.run(PRETRAX + command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  if done.returncode:
    with open(workdir + '.log') as f:
      raise SystemExit(f'pretrax sweep failed ({workdir}.log):\n' + f.read()[-3000:])
  return time.perf_counter() - started


def trials(workdir: str) -> list[dict]:
  """The sweep's results.csv rows, each with its learning rate ('lr') and held-out loss ('eval')
  as numbers."""
  with open(os.path.join(workdir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    row['lr'], row['eval'] = float(row['optim.lr']), float(row['eval_loss'])
  return rows
