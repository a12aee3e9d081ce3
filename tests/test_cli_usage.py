"""The command line as a new user meets it: --help everywhere, --print_config, typos named with the
nearest name, broken config files and damaged files in one line, resumes judged by meaning."""

import json
import os
import subprocess
import sys

import pytest

from conftest import PEAK_FLOPS_ARG, REPO, run_cli
from pretrax import cli, config_fields, errors, metrics, run_config
from pretrax import config as config_lib

TINY = 'configs/tiny.py'


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith('pretrax')]
  assert len(lines) >= 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def _main(*argv: str) -> subprocess.CompletedProcess:
  """`pretrax ARGV` in a fresh interpreter (absl flags are process-wide)."""
  return subprocess.run(
    [sys.executable, '-m', 'pretrax.cli', *argv],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=120,
  )


@pytest.mark.parametrize('command', sorted(cli.COMMANDS))
def test_every_command_answers_help_with_its_flags_and_an_example(command):
  for flag in ('--help', '-h', '--helpfull'):
    result = _main(command, flag)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith(f'usage: pretrax {command}') and 'flags:' in out
    assert f'example:\n  pretrax {command} ' in out
  flag_lines = [line for line in out.splitlines() if line.startswith('  --')]
  assert len(flag_lines) >= 2 and all(': ' in line for line in flag_lines)


def test_top_level_help_and_a_mistyped_command():
  assert _main('--help').returncode == 0 and 'commands:' in _main('-h').stdout
  result = _main('trian', '--config=configs/tiny.py')
  assert result.returncode == 2
  assert "'trian' is not a command; did you mean 'train'?" in result.stderr


def test_an_unknown_flag_names_the_nearest_one():
  _one_line_error(
    _main('train', f'--config={TINY}', '--workdirr=x'),
    'unknown flag --workdirr; did you mean --workdir?',
  )


def test_print_config_shows_every_field_with_its_meaning_and_trains_nothing(tmp_path):
  result = _main(
    'train',
    f'--config={TINY}',
    f'--workdir={tmp_path / "run"}',
    '--config.optim.lr=0.0123',
    '--print_config',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert 'optim.lr = 0.0123' in lines  # The override, not the file's value.
  assert any(
    line.startswith('optim.schedule_steps = 0  # Length of the schedule; 0: steps.')
    for line in lines
  )
  fields = _leaves(json.loads(config_lib.load(os.path.join(REPO, TINY)).to_json()))
  assert len(lines) == fields > 50  # One line per field.
  assert not (tmp_path / 'run').exists()


def _leaves(d: dict) -> int:
  return sum(_leaves(v) if isinstance(v, dict) else 1 for v in d.values())


def test_every_base_field_has_a_comment_or_a_self_explaining_name():
  comments = config_fields.field_comments()
  assert comments['data.text_field'].startswith('JSON lines and Parquet')
  assert (
    comments['optim.schedule_steps']
    == 'Length of the schedule; 0: steps. Set it to stop a run early.'
  )
  assert comments['model.remat'].startswith('Rematerialisation per block')


@pytest.mark.parametrize(
  'config_text, fragments',
  [
    (None, ('does not exist', 'did you mean configs/tiny.py')),
    ('def get_config(:\n  pass\n', ('broken.py:1', 'invalid syntax')),
    ('X = 1\n', ('defines no get_config',)),
  ],
)
def test_a_bad_config_file_is_one_line(tmp_path, config_text, fragments):
  if config_text is None:
    spec = 'configs/tiyn.py'
  else:
    spec = str(tmp_path / 'broken.py')
    (tmp_path / 'broken.py').write_text(config_text)
  _one_line_error(_main('train', f'--config={spec}', f'--workdir={tmp_path / "run"}'), *fragments)


def test_a_config_variant_that_get_config_refuses_is_one_line(tmp_path):
  _one_line_error(
    _main('train', f'--config={TINY}:bogus', f'--workdir={tmp_path}'),
    'get_config failed',
    "unknown variant 'bogus'",
  )


def test_every_expected_error_shares_one_base():
  from pretrax import checkpoint, faults, hosts, sharding, sweep, tokenizer
  from pretrax.data import sources

  for error in (
    config_lib.ConfigError,
    sources.DataError,
    checkpoint.CheckpointError,
    faults.WorkdirError,
    faults.NonFiniteError,
    hosts.HostsError,
    sharding.ShardingError,
    sweep.SweepError,
    tokenizer.TokenizerError,
    cli.UsageError,
  ):
    assert issubclass(error, errors.PretraxError), error


def _train(workdir, *overrides: str) -> subprocess.CompletedProcess:
  return run_cli(
    'train',
    f'--config={TINY}',
    f'--workdir={workdir}',
    PEAK_FLOPS_ARG,
    '--config.log_every=1',
    '--config.eval_every=1000',
    '--config.eval_batches=1',
    *overrides,
  )


@pytest.mark.slow
def test_a_resume_compares_what_fields_mean_and_still_refuses_real_changes(tmp_path):
  workdir = tmp_path / 'run'
  first = _train(
    workdir, '--config.steps=4', '--config.optim.schedule_steps=8', '--config.checkpoint.every=4'
  )
  assert first.returncode == 0, first.stderr[-2000:]
  # schedule_steps 0 means `steps`: 8, the same schedule as before.
  implied = _train(workdir, '--config.steps=8', '--config.checkpoint.every=4')
  assert implied.returncode == 0, implied.stderr[-2000:]
  assert 'at step 4' in implied.stdout
  steps = [r['step'] for r in metrics.read_metrics(str(workdir)) if 'loss' in r]
  assert steps == list(range(1, 9))  # Each step once: a resume never logs a step twice.
  changed = _train(
    workdir, '--config.steps=12', '--config.optim.schedule_steps=16', '--config.checkpoint.every=4'
  )
  # Both sides as resolved values: the checkpoint's 0 saved as the 8 it meant.
  _one_line_error(changed, 'optim.schedule_steps: 8 -> 16')
  lr = _train(workdir, '--config.steps=12', '--config.optim.lr=0.1')
  _one_line_error(lr, 'optim.lr')


def _resolved(**fields):
  """The base config with `fields` ('optim__lr' for optim.lr), resolved as a run's config is."""
  c = config_lib.base_config()
  for key, value in fields.items():
    section, _, name = key.replace('__', '.').rpartition('.')
    (c[section] if section else c)[name] = value
  return run_config.resolve(c.to_dict())


def _differences(now: dict, before: dict) -> list[str]:
  return run_config.differences(_resolved(**now), _resolved(**before))


def test_a_default_that_stands_for_another_fields_value_compares_by_what_it_means():
  # schedule_steps 0 means `steps`: written out or implied, the same schedule is the same run.
  assert _differences({'steps': 30}, {'steps': 30, 'optim__schedule_steps': 30}) == []
  # A schedule that differs from what the 0 means is named, with the resolved values both sides.
  assert _differences({'steps': 30}, {'steps': 30, 'optim__schedule_steps': 20}) == [
    'optim.schedule_steps: 20 -> 30'
  ]
  assert (
    run_config.differences(
      _resolved(steps=30), _resolved(steps=20, optim__schedule_steps=30), ignore=('steps',)
    )
    == []
  )
  # The model's derived sizes and the data's window stride, likewise.
  embed = _resolved().model.embed_dim
  assert _differences({'model__mlp_dim': 0}, {'model__mlp_dim': 4 * embed}) == []
  assert _differences({'model__mlp_dim': 0}, {'model__mlp_dim': 64}) == [
    f'model.mlp_dim: 64 -> {4 * embed}'
  ]
  seq_len = _resolved().data.seq_len
  assert _differences({'data__window_stride': 0}, {'data__window_stride': seq_len}) == []
  assert _differences({'eval_every': 7}, {'eval_every': 7, 'eval__tasks_every': 7}) == []
  assert _differences({'tokenizer__sentinels': -1}, {'tokenizer__sentinels': 0}) == []
  assert (
    _differences(
      {'objective': 'span_corruption', 'tokenizer__sentinels': -1},
      {'objective': 'span_corruption', 'tokenizer__sentinels': 100},
    )
    == []
  )
  # An older checkpoint's bool remat is the policy it meant.
  older = run_config.from_saved({'model': {'remat': True}})
  assert run_config.differences(_resolved(model__remat='full'), older) == []


def test_paths_are_compared_as_the_files_they_name(tmp_path, monkeypatch):
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'x.txt').write_text('text')
  os.symlink(tmp_path / 'data', tmp_path / 'link')
  monkeypatch.chdir(tmp_path)

  same = [f'{tmp_path}/sub/../data/x.txt', 'data/x.txt', './data//x.txt', 'link/x.txt']
  for path in same:
    assert _differences({'data__path': path}, {'data__path': same[0]}) == [], path
  data = os.path.realpath(tmp_path / 'data')
  assert _differences({'data__path': 'data/x.txt'}, {'data__path': 'data/y.txt'}) == [
    f"data.path: '{data}/y.txt' -> '{data}/x.txt'"
  ]
  assert (
    _differences(
      {'data__mixture': 'web=./data/x.txt:0.7,code=gs://b/c:0.3'},
      {'data__mixture': f'web={tmp_path}/link/x.txt:0.70, code=gs://b/c:.3'},
    )
    == []
  )
  # Buckets have no aliases: kept as written, and different spellings stay different.
  assert _differences({'data__path': 'gs://b/a/../c'}, {'data__path': 'gs://b/c'}) == [
    "data.path: 'gs://b/c' -> 'gs://b/a/../c'"
  ]
  assert _differences({'init_from': 'link:500'}, {'init_from': f'{tmp_path}/data/:500'}) == []
  assert _differences({'init_from': 'data:500'}, {'init_from': 'data:600'}) == [
    f"init_from: '{data}:600' -> '{data}:500'"
  ]


@pytest.mark.slow
def test_a_run_resumes_with_its_corpus_spelled_another_way(tmp_path, corpus_path):
  os.makedirs(tmp_path / 'sub')
  spelled = os.path.join(tmp_path, 'sub', '..', os.path.relpath(corpus_path, tmp_path))
  first = _train(
    tmp_path / 'run',
    '--config.steps=2',
    '--config.checkpoint.every=2',
    f'--config.data.path={spelled}',
  )
  assert first.returncode == 0, first.stderr[-2000:]
  again = _train(
    tmp_path / 'run',
    '--config.steps=4',
    '--config.checkpoint.every=2',
    f'--config.data.path={corpus_path}',
  )
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'at step 2' in again.stdout
  # Through a symlinked directory: the checkpoint's config and the workdir's store both take it.
  os.symlink(os.path.dirname(corpus_path), tmp_path / 'link')
  linked = os.path.join(tmp_path, 'link', os.path.basename(corpus_path))
  third = _train(
    tmp_path / 'run',
    '--config.steps=6',
    '--config.checkpoint.every=2',
    f'--config.data.path={linked}',
  )
  assert third.returncode == 0, third.stderr[-2000:]
  assert 'at step 4' in third.stdout


@pytest.mark.slow
def test_a_metrics_line_cut_mid_write_is_dropped_and_said_not_a_blocked_resume(tmp_path):
  workdir = tmp_path / 'run'
  assert _train(workdir, '--config.steps=4', '--config.checkpoint.every=2').returncode == 0
  path = workdir / 'metrics.jsonl'
  text = path.read_text()
  path.write_text(text[:-20])  # Power lost while the last record was being written.
  with pytest.raises(ValueError):
    json.loads(text[:-20].splitlines()[-1])
  assert len(metrics.read_metrics(str(workdir))) == text.count('\n') - 1
  resumed = _train(workdir, '--config.steps=6', '--config.checkpoint.every=2')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'dropped 1 line(s) cut mid-write' in resumed.stdout
  steps = [r['step'] for r in metrics.read_metrics(str(workdir)) if 'loss' in r]
  assert steps == list(range(1, 7)), steps


@pytest.mark.slow
def test_a_damaged_tokenizer_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  assert _train(workdir, '--config.steps=2').returncode == 0
  model = workdir / 'tokenizer.model'
  model.write_bytes(model.read_bytes()[:300])  # Cut short.
  _one_line_error(
    run_cli('sample', f'--workdir={workdir}', '--length=5'),
    f'{model} is not a SentencePiece model, damaged or cut short',
  )
  # Training writes the workdir's copy again from the store's.
  again = _train(workdir, '--config.steps=3')
  assert again.returncode == 0, again.stderr[-2000:]
  assert run_cli('sample', f'--workdir={workdir}', '--length=5').returncode == 0


@pytest.mark.slow
def test_a_step_that_cannot_fit_the_device_is_refused_before_it_runs(tmp_path):
  result = _train(tmp_path / 'run', '--config.data.seq_len=100000', '--config.steps=1')
  _one_line_error(result, 'the train step needs', 'GiB per device', 'lower data.batch_size')
