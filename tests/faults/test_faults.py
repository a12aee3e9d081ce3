"""Real `pretrax train` processes, hurt on purpose. After each fault the same command resumes to the
parameters of a run that was never hurt (bit for bit on CPU), or the run fails with the expected
one-line error."""

import glob
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, built_once, pretrax_env, run_cli
from pretrax import checkpoint, faults, metrics, run_config, tokenizer
from pretrax import state as state_lib

TINY = os.path.join(REPO, 'configs', 'tiny.py')
STOPPED = 75  # faults.STOPPED_EXIT_CODE


def train_args(workdir, corpus_path, *overrides: str) -> list[str]:
  return [
    'train',
    f'--config={TINY}',
    f'--workdir={workdir}',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    '--config.log_every=1',
    '--config.eval_every=1000',
    PEAK_FLOPS_ARG,
    *overrides,
  ]


def start(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, '-m', 'pretrax.cli', *args],
    cwd=REPO,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=pretrax_env(),
  )


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      return
    time.sleep(0.01)
  raise AssertionError(f'condition not reached; exit {proc.poll()}')


def logged_steps(workdir) -> list[int]:
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return []
  return [r['step'] for r in metrics.read_metrics(str(workdir)) if 'loss' in r]


def final_params(workdir, step: int):
  mngr = checkpoint.manager(str(workdir), read_only=True)
  c = run_config.from_saved(checkpoint.restore_config(mngr, step))
  tok = tokenizer.Tokenizer.load(os.path.join(workdir, 'tokenizer.model'))
  run = state_lib.build(c, tok.vocab_size)
  state, _ = checkpoint.restore(mngr, step, run.abstract)
  mngr.close()
  return jax.device_get(state['params'])


def assert_same_run(a, b, steps: int) -> None:
  """Same losses at every step and the same final parameters, bit for bit."""

  # Lists, not {step: loss}: a step logged twice after a resume must show.
  def losses(w):
    return [(r['step'], r['loss']) for r in metrics.read_metrics(str(w)) if 'loss' in r]

  assert losses(a) == losses(b)
  assert [s for s, _ in losses(b)] == list(range(1, steps + 1)), 'a step missing or logged twice'
  pa, pb = jax.tree.leaves(final_params(a, steps)), jax.tree.leaves(final_params(b, steps))
  for x, y in zip(pa, pb, strict=True):
    np.testing.assert_array_equal(x, y)


def one_line_error(result, *fragments: str) -> None:
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith('pretrax ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope='module')
def straight(tmp_path_factory, corpus_path):
  """A 40-step run that nothing interrupts, to compare the hurt runs with (made once for all
  workers)."""

  def build(workdir):
    result = run_cli(
      *train_args(workdir, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
    )
    assert result.returncode == 0, result.stderr[-2000:]

  return built_once(tmp_path_factory, 'faults_straight', build)


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_stop_signal_saves_and_the_same_command_resumes_exactly(
  straight, tmp_path, corpus_path, signum
):
  # A different stop step per signal, the same on every run (a failure names it: `at`).
  at = random.Random(int(signum)).randint(3, 25)
  args = train_args(tmp_path, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
  proc = start(args)
  wait_until(lambda: any(s >= at for s in logged_steps(tmp_path)), proc)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == STOPPED, (at, err[-2000:])
  line = [err_line for err_line in err.splitlines() if err_line.startswith('pretrax train:')][-1]
  stopped = int(line.split('after step ')[1].split(';')[0])
  assert at <= stopped < 40 and 'Resume with the same command: pretrax train' in line, line
  assert stopped in checkpoint.manager(str(tmp_path), read_only=True).all_steps()

  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'at step {stopped}' in resumed.stdout
  assert_same_run(straight, tmp_path, 40)


@pytest.mark.slow
def test_a_live_workdir_is_locked_and_a_killed_run_leaves_no_lock(straight, tmp_path, corpus_path):
  args = train_args(tmp_path, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
  proc = start(args)
  wait_until(lambda: any(s >= 12 for s in logged_steps(tmp_path)), proc)
  # Freeze the run so it is still alive, holding the lock, when the second process gets there:
  # a fast machine would otherwise finish all 40 steps while the second one imports JAX.
  proc.send_signal(signal.SIGSTOP)
  one_line_error(run_cli(*args), 'in use by a live run', f'pid {proc.pid}')
  proc.kill()
  proc.wait()
  resumed = run_cli(*args)  # The kernel released the dead run's lock.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert_same_run(straight, tmp_path, 40)


@pytest.mark.slow
def test_non_finite_loss_stops_naming_step_and_metric_then_resumes(straight, tmp_path, corpus_path):
  args = train_args(tmp_path, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
  one_line_error(
    run_cli(*args, '--config.fault.poison_step=17'),
    'loss',
    'non-finite at step 17',
    'last checkpoint is step 10',
  )
  assert checkpoint.manager(str(tmp_path), read_only=True).all_steps() == [10]
  resumed = run_cli(*args)  # The bad batch is gone: the run goes on from step 10.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert_same_run(straight, tmp_path, 40)


@pytest.mark.slow
def test_non_finite_updates_are_skipped_and_counted_when_asked(tmp_path, corpus_path):
  result = run_cli(
    *train_args(
      tmp_path,
      corpus_path,
      '--config.steps=12',
      '--config.fault.poison_step=5',
      '--config.optim.skip_nonfinite=true',
    )
  )
  assert result.returncode == 0, result.stderr[-2000:]
  records = {r['step']: r for r in metrics.read_metrics(str(tmp_path)) if 'loss' in r}
  assert [s for s, r in records.items() if r['skipped_steps']] == [5]
  assert np.isnan(records[5]['loss']) and np.isfinite(records[12]['loss'])
  for leaf in jax.tree.leaves(final_params(tmp_path, 12)):
    assert np.all(np.isfinite(leaf))


@pytest.mark.slow
def test_killed_during_an_async_save_resumes_from_the_last_complete_one(tmp_path, corpus_path):
  # A model large enough (~5M parameters, ~60 MB of state) that a save takes a while.
  big = [
    '--config.model.embed_dim=256',
    '--config.model.num_layers=6',
    '--config.steps=12',
    '--config.checkpoint.every=4',
    '--config.checkpoint.keep=5',
  ]
  straight_dir = tmp_path / 'straight'
  assert run_cli(*train_args(straight_dir, corpus_path, *big)).returncode == 0
  hurt = tmp_path / 'hurt'
  args = train_args(hurt, corpus_path, *big)
  proc = start(args)

  def partial():
    return glob.glob(str(hurt / 'checkpoints' / '8.orbax-checkpoint-tmp*'))

  wait_until(partial, proc)
  proc.kill()  # SIGKILL while step 8's checkpoint is being written.
  proc.wait()
  assert partial(), 'the save finished before the kill: the window was not hit'
  assert checkpoint.manager(str(hurt), read_only=True).all_steps() == [4]

  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'at step 4' in resumed.stdout
  assert not partial(), 'the partial checkpoint was not cleaned up'
  assert_same_run(straight_dir, hurt, 12)


@pytest.mark.slow
def test_a_save_that_cannot_write_stops_the_run_and_keeps_the_previous_checkpoint(
  straight, tmp_path, corpus_path
):
  args = train_args(tmp_path, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
  assert (
    run_cli(
      *args[:-2],
      '--config.steps=10',
      '--config.optim.schedule_steps=40',
      '--config.checkpoint.every=10',
    ).returncode
    == 0
  )
  # Resumed under a kernel limit of 200 KB per file (a fifth of the state), ignoring SIGXFSZ: the
  # save's writes then fail with EFBIG, as writes to a full disk fail with ENOSPC. The save at 20
  # fails, not a simulation in our code. (A shell sets the limit: no fork hooks in this process.)
  command = ' '.join(
    shlex.quote(a)
    for a in [sys.executable, '-m', 'pretrax.cli', *args, '--config.optim.schedule_steps=40']
  )
  result = subprocess.run(
    ['bash', '-c', f'trap "" XFSZ; ulimit -f 195; exec {command}'],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=600,
    env=pretrax_env(),
  )
  # Orbax logs the failure from its threads (with tracebacks); the last line is ours.
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  for fragment in (
    'pretrax train: error: saving a checkpoint failed',
    'step 10, is untouched',
    'run the same command',
  ):
    assert fragment in last, (fragment, last)
  # The storage's own words: the OS error, or TensorStore's when the limit hits a metadata write
  # first (which one depends on the order of the save's concurrent writes).
  assert 'File too large' in last or 'Error writing' in last, last
  assert 'Event loop is closed' not in result.stderr
  assert checkpoint.manager(str(tmp_path), read_only=True).all_steps() == [10]
  resumed = run_cli(*args, '--config.optim.schedule_steps=40')  # Space again: on from step 10.
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'at step 10' in resumed.stdout
  assert_same_run(straight, tmp_path, 40)


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_a_damaged_checkpoint_is_named_and_fallback_resumes_from_an_intact_one(
  straight, tmp_path, corpus_path, damage
):
  args = train_args(tmp_path, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
  # Stop at 30 on the straight run's schedule, then damage checkpoint 30's arrays.
  assert (
    run_cli(
      *args[:-1],
      '--config.steps=30',
      '--config.optim.schedule_steps=40',
      '--config.checkpoint.every=10',
    ).returncode
    == 0
  )
  arrays = sorted(
    glob.glob(str(tmp_path / 'checkpoints' / '30' / 'state' / '*' / 'd' / '*')), key=os.path.getsize
  )
  assert arrays
  for path in arrays if damage == 'delete' else arrays[-1:]:
    if damage == 'delete':
      os.remove(path)
    else:
      os.truncate(path, os.path.getsize(path) // 2)
  resume = [*args, '--config.optim.schedule_steps=40']

  failed = run_cli(*resume)
  assert failed.returncode == 2, failed.stderr[-2000:]
  # Searched in all of stderr: when array files are missing, TensorStore's threads may print
  # a traceback ("Event loop is closed") into the middle of our line (a known wart).
  error = failed.stderr[failed.stderr.index('pretrax train: error: checkpoint 30') :]
  assert 'is damaged' in error and 'checkpoint.fallback=true' in error

  resumed = run_cli(*resume, '--config.checkpoint.fallback=true')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert 'at step 20' in resumed.stdout and os.path.isdir(tmp_path / 'damaged_checkpoints' / '30')
  assert_same_run(straight, tmp_path, 40)


def test_a_checkpoint_fingerprint_catches_changed_arrays(tmp_path):
  """What Orbax reads back as fill values instead of failing must not pass as the saved state."""
  state = {
    'w': jnp.arange(6, dtype=jnp.float32),
    'b': jnp.ones(3, jnp.bfloat16),
    'step': jnp.int32(7),
  }
  before = checkpoint.fingerprint(state)
  assert before == checkpoint.fingerprint(jax.tree.map(jnp.copy, state))
  assert before != checkpoint.fingerprint({**state, 'w': state['w'].at[3].set(0.0)})
  assert before != checkpoint.fingerprint({**state, 'b': jnp.zeros(3, jnp.bfloat16)})


@pytest.mark.parametrize(
  'name, content, fragment',
  [
    ('latin1.txt', 'caf\u00e9'.encode('latin-1') * 50, 'not UTF-8'),
    ('binary.bin', bytes(range(256)) * 4, 'binary data'),
    ('zeros.bin', b'\x00' * 500, 'binary data'),
  ],
)
def test_bad_data_files_fail_before_training(tmp_path, corpus_path, name, content, fragment):
  bad = tmp_path / name
  bad.write_bytes(content)
  result = run_cli(*train_args(tmp_path / 'run', f'{corpus_path},{bad}', '--config.steps=2'))
  one_line_error(result, str(bad), fragment, 'skip_bad_records')
  assert not glob.glob(str(tmp_path / 'run' / 'checkpoints' / '*')), 'it trained anyway'


def test_bad_files_are_skipped_and_counted_when_asked(tmp_path, corpus_path):
  (tmp_path / 'empty.txt').write_bytes(b'')  # No text: nothing to skip, nothing to learn.
  (tmp_path / 'zeros.bin').write_bytes(b'\x00' * 10)
  (tmp_path / 'latin1.txt').write_bytes('caf\u00e9'.encode('latin-1'))
  result = run_cli(
    *train_args(
      tmp_path / 'run',
      f'{corpus_path},{tmp_path}/empty.txt,{tmp_path}/zeros.bin,{tmp_path}/latin1.txt',
      '--config.steps=2',
      '--config.data.skip_bad_records=true',
      # Paragraphs as documents: some of them held out whatever the hash.
      '--config.data.separator=\n\n',
    )
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert '2 bad record(s) skipped' in result.stdout
  assert 'zeros.bin:byte 0: binary data' in result.stdout
  manifest = json.loads((tmp_path / 'run' / 'data' / 'manifest.json').read_text())
  assert manifest['bad_records'] == 2


def test_too_little_disk_for_the_kept_checkpoints_fails_before_training(tmp_path, monkeypatch):
  monkeypatch.setattr(faults, '_free_bytes', lambda path: 300 << 20)
  faults.check_free_space(str(tmp_path), 50 << 20, keep=3)  # 4 x 50 MiB fit in 300.
  with pytest.raises(
    faults.WorkdirError,
    match=r'has 300 MiB free but 5 \+ 1 checkpoints of 60 '
    r'MiB need 360 MiB: free space',
  ):
    faults.check_free_space(str(tmp_path), 60 << 20, keep=5)


def test_a_second_ctrl_c_quits_at_once():
  with faults.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGINT)  # The first asks for a stop at the end of the step.
    wait_until(lambda: stop.received == 'SIGINT', _Alive())
    assert stop.should_stop(1)
    with pytest.raises(KeyboardInterrupt):  # The second does not wait for it.
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)


class _Alive:
  """wait_until's process argument, for a condition in this process."""

  def poll(self):
    return None


def test_a_glob_that_matches_nothing_fails_before_training(tmp_path):
  one_line_error(
    run_cli(*train_args(tmp_path, str(tmp_path / 'nothing' / '*.txt'))), 'matches no file'
  )


def test_an_unwritable_workdir_fails_before_training(tmp_path, corpus_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  one_line_error(run_cli(*train_args(blocker / 'run', corpus_path)), 'is not writable', '--workdir')


def test_a_read_only_workdir_fails_before_training(tmp_path, corpus_path):
  workdir = tmp_path / 'ro'
  workdir.mkdir()
  # Permission bits do not stop root; the immutable attribute does (where the filesystem has it).
  workdir.chmod(0o500)
  as_root = os.geteuid() == 0
  if as_root and (
    not shutil.which('chattr')
    or subprocess.run(['chattr', '+i', str(workdir)], capture_output=True).returncode
  ):
    # Root, on a filesystem without the immutable attribute (common in containers): /proc's
    # directories exist and refuse new files even to root.
    one_line_error(run_cli(*train_args('/proc/1', corpus_path)), 'is not writable', '/proc/1')
    return
  try:
    one_line_error(run_cli(*train_args(workdir, corpus_path)), 'is not writable')
  finally:
    if as_root:
      subprocess.run(['chattr', '-i', str(workdir)], check=True)
    workdir.chmod(0o700)
