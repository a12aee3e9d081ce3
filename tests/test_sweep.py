"""Sweeps: expansion into named trials, bad sweeps, and a real learning-rate sweep on the tiny
config."""

import csv
import json
import os
import shlex

import pytest

from conftest import PEAK_FLOPS_ARG, REPO, load_config, run_cli
from pretrax import sweep, sweep_report, sweep_trials

TINY = 'configs/tiny.py'


def _expand(trials, shared=None):
  return sweep_trials.expand(trials, load_config('tiny'), TINY, 'runs/s', shared or {})


def test_product_zip_and_values_count_and_name_trials():
  grid = sweep.product(sweep.values('optim.lr', [1e-3, 3e-3, 1e-2]), sweep.values('seed', [0, 1]))
  assert len(grid) == 6 and grid[1] == {'optim.lr': 1e-3, 'seed': 1}  # The last varies fastest.
  paired = sweep.zip_(
    sweep.values('optim.lr', [1e-3, 2e-3]), sweep.values('optim.min_lr', [1e-4, 2e-4])
  )
  assert paired == [
    {'optim.lr': 1e-3, 'optim.min_lr': 1e-4},
    {'optim.lr': 2e-3, 'optim.min_lr': 2e-4},
  ]
  nested = sweep.product(paired, sweep.values('model.flavour', ['gpt2', 'llama']))
  trials = _expand(grid + nested + sweep.values('model.remat', ['full']))
  names = [t.name for t in trials]
  assert len(names) == len(set(names)) == 11
  assert names[:2] == ['lr=0.001,seed=0', 'lr=0.001,seed=1']
  assert names[-1] == 'remat=full'
  assert trials[0].workdir == os.path.join('runs/s', 'lr=0.001,seed=0')
  assert trials[0].command == (
    'pretrax train --config=configs/tiny.py '
    '--workdir=runs/s/lr=0.001,seed=0 --config.optim.lr=0.001 '
    '--config.seed=0'
  )
  with pytest.raises(sweep.SweepError, match='one length'):
    sweep.zip_(sweep.values('seed', [0, 1]), sweep.values('optim.lr', [1e-3]))
  with pytest.raises(sweep.SweepError, match='seed is swept twice'):
    sweep.product(sweep.values('seed', [0]), sweep.values('seed', [1]))


@pytest.mark.parametrize('name', ['tiny', 'shakespeare_char'])
def test_the_configs_sweeps_expand(name):
  path = os.path.join(REPO, 'configs', f'{name}.py')
  trials = sweep_trials.expand(
    sweep_trials.load_sweep(path, None), load_config(name), path, 'runs/s', {}
  )
  assert [t.name for t in trials] == [
    f'lr={v}'
    for v in {'tiny': ('0.002', '0.005', '0.01'), 'shakespeare_char': ('0.0005', '0.001', '0.002')}[
      name
    ]
  ]


def test_names_are_filesystem_safe_and_unique():
  trials = _expand(
    sweep.values('data.path', ['/a b/*.txt', '/a b/*.txt'])
    + sweep.values('optim.lr', [1e-3, 1.0000001e-3])
  )
  names = [t.name for t in trials]
  assert names == ['path=_a_b__.txt', 'path=_a_b__.txt-2', 'lr=0.001', 'lr=0.001-2']
  assert trials[3].args[-1] == '--config.optim.lr=0.0010000001'  # The exact value trains.
  # Keys that end alike keep their sections; overrides shared by all trials pass through.
  clash = _expand(
    sweep.product(
      sweep.values('data.path', ['a.txt']),
      sweep.values('tokenizer.path', ['t.model']),
      sweep.values('model.dropout', [0.1]),
    ),
    shared={'steps': 7, 'optim.b1': 0.8},
  )
  assert clash[0].name == 'data.path=a.txt,tokenizer.path=t.model,dropout=0.1'
  assert shlex.split(clash[0].command)[4:] == [
    '--config.steps=7',
    '--config.optim.b1=0.8',
    '--config.data.path=a.txt',
    '--config.tokenizer.path=t.model',
    '--config.model.dropout=0.1',
  ]


def test_random_search_is_seeded_and_in_range():
  draws = sweep.random('optim.lr', sweep.log_uniform(1e-4, 1e-2), n=20, seed=3)
  assert draws == sweep.random('optim.lr', sweep.log_uniform(1e-4, 1e-2), n=20, seed=3)
  assert draws != sweep.random('optim.lr', sweep.log_uniform(1e-4, 1e-2), n=20, seed=4)
  lrs = [d['optim.lr'] for d in draws]
  assert all(1e-4 <= x <= 1e-2 for x in lrs) and min(lrs) < 1e-3 < max(lrs)
  assert all(float(f'{x:.4g}') == x for x in lrs)  # Names and commands show the exact value.
  dropout = sweep.random('model.dropout', sweep.uniform(0.0, 0.2), n=5, seed=0)
  assert all(0 <= d['model.dropout'] <= 0.2 for d in dropout)
  flavours = sweep.random('model.flavour', sweep.choice(['gpt2', 'llama']), n=10, seed=0)
  assert {d['model.flavour'] for d in flavours} == {'gpt2', 'llama'}
  assert len({t.name for t in _expand(flavours)}) == 10


@pytest.mark.parametrize(
  'trials,fragments',
  [
    (sweep.values('optim.lrr', [1e-3]), ('optim.lrr', 'did you mean "optim.lr"')),
    (sweep.values('optimizer.lr', [1e-3]), ('optimizer.lr', 'did you mean "optim"')),
    (sweep.values('model.num_layers', [2.5]), ('model.num_layers=2.5', 'int')),
    (sweep.values('model.num_layers', [[2]]), ('numbers, booleans or strings',)),
  ],
)
def test_bad_sweeps_name_the_key(trials, fragments):
  with pytest.raises(sweep.SweepError) as error:
    _expand(trials)
  for fragment in fragments:
    assert fragment in str(error.value)


def test_a_swept_key_cannot_also_be_a_shared_override():
  with pytest.raises(sweep.SweepError, match='--config.optim.lr is swept'):
    _expand(sweep.values('optim.lr', [1e-3]), shared={'optim.lr': 1e-2})


def test_print_gives_one_runnable_command_per_trial(tmp_path):
  result = run_cli(
    'sweep', f'--config={TINY}', f'--workdir={tmp_path}', '--print', '--config.steps=7'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert len(lines) == 3 and not os.listdir(tmp_path)  # Prints; runs and writes nothing.
  for line, lr in zip(lines, ('0.002', '0.005', '0.01'), strict=True):
    assert shlex.split(line) == [
      'pretrax',
      'train',
      f'--config={TINY}',
      f'--workdir={tmp_path}/lr={lr}',
      '--config.steps=7',
      f'--config.optim.lr={lr}',
    ]


def test_a_bucket_sweep_prints_bucket_workdirs_but_runs_only_locally(capsys):
  config = load_config('tiny')
  assert sweep.run_sweep(config, TINY, 'gs://b/lr', shared={}, print_only=True) == 0
  workdirs = [shlex.split(line)[3] for line in capsys.readouterr().out.splitlines()]
  assert workdirs == [f'--workdir=gs://b/lr/lr={lr}' for lr in ('0.002', '0.005', '0.01')]
  with pytest.raises(sweep.SweepError, match='runs and collects its trials in a local directory'):
    sweep.run_sweep(config, TINY, 'gs://b/lr', shared={}, collect=True)


@pytest.mark.parametrize(
  'args,fragments',
  [
    (['--config=configs/gpt2_small.py'], ('gpt2_small.py defines no get_sweep', '--sweep=')),
    ([f'--config={TINY}', '--sweep=BAD'], ('sweep.values("optim.lrr"',)),
    ([f'--config={TINY}', '--sweep=/no/such/sweep.py'], ('/no/such/sweep.py does not exist',)),
  ],
)
def test_bad_sweeps_fail_with_one_line(tmp_path, args, fragments):
  if '--sweep=BAD' in args:
    bad = tmp_path / 'bad_sweep.py'
    bad.write_text(
      'from pretrax import sweep\ndef get_sweep(arg):\n  return sweep.values("optim.lrr", [1e-3])\n'
    )
    args = [args[0], f'--sweep={bad}']
    fragments = ('optim.lrr', 'names no config field', 'did you mean "optim.lr"')
  result = run_cli('sweep', *args, f'--workdir={tmp_path / "w"}', '--print')
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('pretrax sweep: error:')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_learning_rate_sweep_runs_tables_plots_and_skips_finished_trials(tmp_path, corpus_path):
  # Two learning rates that train, and a third trial whose min_lr exceeds its lr: it must fail
  # alone, with train's own error in the table, and fail the sweep's exit status.
  sweep_file = tmp_path / 'lr_sweep.py'
  sweep_file.write_text(
    'from pretrax import sweep\n\n'
    'def get_sweep(arg):\n'
    '  return sweep.zip_(sweep.values("optim.lr", [1e-3, 1e-2, 1e-3]),\n'
    '                    sweep.values("optim.min_lr", [1e-4, 1e-3, 5e-3]))\n'
  )
  workdir = tmp_path / 'sweep'
  args = [
    'sweep',
    f'--config={TINY}',
    f'--sweep={sweep_file}',
    f'--workdir={workdir}',
    '--parallel=2',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    '--config.steps=4',
    '--config.log_every=2',
    '--config.eval_every=4',
    '--config.eval_batches=1',
    '--config.optim.warmup_steps=1',
    PEAK_FLOPS_ARG,
  ]
  names = ['lr=0.001,min_lr=0.0001', 'lr=0.01,min_lr=0.001', 'lr=0.001,min_lr=0.005']
  result = run_cli(*args)
  assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
  out = result.stdout
  for i, name in enumerate(names, 1):
    assert f'[{i}/3] {name}: started' in out
  assert f'[3/3] {names[2]}: FAILED' in out and '(exit 2)' in out
  assert '2 of 3 trials ok' in out and 'SWEEP FAILED: 1 did not finish' in out

  with open(workdir / 'results.csv') as f:
    rows = {r['trial']: r for r in csv.DictReader(f)}
  assert list(rows) == names
  for name in names[:2]:
    row = rows[name]
    assert row['status'] == 'ok' and row['steps'] == '4' and row['exit_code'] == '0'
    for key in ('train_loss', 'eval_loss', 'best_eval_loss', 'tokens_per_s'):
      assert float(row[key]) > 0, (key, row)
  assert float(rows[names[1]]['optim.lr']) == 1e-2
  failed = rows[names[2]]
  assert failed['status'] == 'failed' and failed['exit_code'] == '2' and failed['train_loss'] == ''
  assert 'optim.min_lr=0.005 must be between 0 and optim.lr=0.001' in failed['error']
  table = (workdir / 'results.md').read_text().splitlines()
  assert table[0].startswith('| trial | optim.lr | optim.min_lr | status | train loss |')
  assert len(table) == 2 + 3 and table[4].startswith(f'| {names[2]} | 0.001 | 0.005 | failed |')
  assert table[0] in out  # Printed at the end too.
  png = (workdir / 'loss_curves.png').read_bytes()
  assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 10_000

  # Again: the finished trials are skipped, untouched; the failed one runs (and fails) again.
  logs = {n: workdir / n / 'train.log' for n in names[:2]}
  before = {
    n: (p.stat().st_mtime_ns, (workdir / n / 'metrics.jsonl').read_bytes()) for n, p in logs.items()
  }
  again = run_cli(*args)
  assert again.returncode == 1
  for i, name in enumerate(names[:2], 1):
    assert f'[{i}/3] {name}: finished before, skipped' in again.stdout
  assert f'[3/3] {names[2]}: started' in again.stdout
  assert before == {
    n: (p.stat().st_mtime_ns, (workdir / n / 'metrics.jsonl').read_bytes()) for n, p in logs.items()
  }

  # A trial whose process never recorded its exit (a killed sweep) runs again and resumes from its
  # checkpoint: here the final one, so there is nothing left to train.
  os.remove(workdir / names[0] / 'result.json')
  resumed = run_cli(*args)
  assert f'[1/3] {names[0]}: started' in resumed.stdout
  assert f'[1/3] {names[0]}: finished in' in resumed.stdout
  log = (workdir / names[0] / 'train.log').read_text()
  assert log.count('==== pretrax sweep') == 2 and 'already at step 4 of 4' in log
  with open(workdir / names[0] / 'result.json') as f:
    assert json.load(f)['exit_code'] == 0


def test_collect_counts_trials_run_elsewhere(tmp_path):
  """A launcher ran the printed commands: no result.json, only each trial's metrics."""
  trials = sweep_trials.expand(
    sweep.values('optim.lr', [1e-3, 2e-3]), load_config('tiny'), TINY, str(tmp_path), {}
  )
  for trial, last_step in zip(
    trials, (50, 20), strict=True
  ):  # tiny trains 50 steps: the second stopped short.
    os.makedirs(trial.workdir)
    with open(os.path.join(trial.workdir, 'metrics.jsonl'), 'w') as f:
      for step in range(10, last_step + 1, 10):
        f.write(json.dumps({'step': step, 'loss': 5.0 - step / 20, 'tokens_per_s': 1000.0}) + '\n')
      f.write(json.dumps({'step': last_step, 'eval_loss': 3.5}) + '\n')
  rows, _ = sweep_report.write_results(trials, str(tmp_path))
  assert [r['status'] for r in rows] == ['ok', 'incomplete']
  assert rows[0]['train_loss'] == 2.5 and rows[0]['steps'] == 50 and rows[0]['eval_loss'] == 3.5
  assert os.path.getsize(tmp_path / 'loss_curves.png') > 1000
