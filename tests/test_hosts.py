"""Several real JAX processes on this machine, joined through `jax.distributed` on localhost, each
with 4 fake CPU devices: what a TPU pod or a GPU cluster runs, proven on one CPU."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, built_once, fake_devices_env, pretrax_env, run_cli
from pretrax import checkpoint, metrics

TINY = os.path.join(REPO, 'configs', 'tiny.py')
STEPS, HALF = 12, 6


def run_processes(
  num_processes: int, args: list[str], devices_each: int = 4, timeout: int = 400
) -> list[subprocess.CompletedProcess]:
  """`pretrax ARGS` as one job of `num_processes` processes; waits for all of them."""
  if num_processes == 1:
    return [
      subprocess.run(
        [sys.executable, '-m', 'pretrax.cli', *args],
        cwd=REPO,
        text=True,
        capture_output=True,
        timeout=timeout,
        env=fake_devices_env(devices_each),
      )
    ]
  port = portpicker.pick_unused_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'pretrax.cli',
        *args,
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={num_processes}',
        f'--process_id={i}',
        '--distributed_timeout=120',
      ],
      cwd=REPO,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=fake_devices_env(devices_each),
    )
    for i in range(num_processes)
  ]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  return results


def assert_ok(results: list[subprocess.CompletedProcess]) -> None:
  for i, r in enumerate(results):
    assert r.returncode == 0, (i, r.stderr[-3000:])


def losses(workdir) -> dict[int, float]:
  records = [(r['step'], r['loss']) for r in metrics.read_metrics(str(workdir)) if 'loss' in r]
  steps = [s for s, _ in records]
  assert steps == sorted(set(steps)), f'a step logged twice or out of order: {steps}'
  return dict(records)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, corpus_path) -> str:
  def build(out):
    result = run_cli(
      'prepare',
      f'--config={TINY}',
      f'--config.data.path={corpus_path}',
      '--config.data.fallback=',
      f'--output={out}',
      '--workers=2',
    )
    assert result.returncode == 0, result.stderr[-2000:]

  return built_once(tmp_path_factory, 'hosts_prepared', build)  # Once for all workers.


def train_args(workdir, prepared: str, steps: int, *overrides: str) -> list[str]:
  return [
    'train',
    f'--config={TINY}',
    f'--workdir={workdir}',
    f'--config.data.prepared={prepared}',
    f'--config.steps={steps}',
    f'--config.optim.schedule_steps={STEPS}',
    '--config.log_every=1',
    '--config.eval_every=1000',
    f'--config.checkpoint.every={HALF}',
    '--config.mesh.fsdp=2',
    PEAK_FLOPS_ARG,
    *overrides,
  ]


@pytest.fixture(scope='module')
def one_process(tmp_path_factory, prepared) -> str:
  """The reference: all 12 steps in one process with 8 devices. Made once for all workers."""

  def build(workdir):
    assert_ok(run_processes(1, train_args(workdir, prepared, STEPS), devices_each=8))
    assert sorted(losses(workdir)) == list(range(1, STEPS + 1))

  return built_once(tmp_path_factory, 'hosts_one_process', build)


def assert_same_losses(workdir, reference) -> None:
  got, want = losses(workdir), losses(reference)
  assert sorted(got) == sorted(want), (sorted(got), sorted(want))
  # Other device counts sum in other orders: equal to float32 rounding, not bit for bit.
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-5
  )


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path, prepared, one_process):
  # Each process a node: the outer data axis crosses processes (a hybrid DCN mesh).
  hybrid = ('--config.mesh.dcn_data=2',)
  results = run_processes(2, train_args(tmp_path, prepared, HALF, *hybrid))
  assert_ok(results)
  assert 'joined 2 processes, 8 devices (4 here)' in results[0].stdout
  assert "mesh {'data': 4, 'fsdp': 2, 'expert': 1, 'tensor': 1}" in results[0].stdout
  assert not results[1].stdout.strip() or 'step' not in results[1].stdout  # Only process 0 logs.
  assert checkpoint.manager(str(tmp_path), read_only=True).all_steps() == [HALF]
  saved_at_half = tmp_path.parent / 'two_then_one'
  shutil.copytree(tmp_path, saved_at_half)

  assert_ok(run_processes(2, train_args(tmp_path, prepared, STEPS, *hybrid)))
  assert_same_losses(tmp_path, one_process)

  # Saved by two processes, resumed by one: the same global batches, the same losses.
  assert_ok(run_processes(1, train_args(saved_at_half, prepared, STEPS), devices_each=8))
  assert_same_losses(saved_at_half, one_process)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two(tmp_path, prepared, one_process):
  workdir = tmp_path / 'run'
  shutil.copytree(one_process, workdir)
  shutil.rmtree(workdir / 'checkpoints' / str(STEPS))  # Back to the checkpoint at HALF.
  result = run_processes(2, train_args(workdir, prepared, STEPS))
  assert_ok(result)
  assert f'at step {HALF}' in result[0].stdout
  assert_same_losses(workdir, one_process)


@pytest.mark.slow
def test_a_run_on_raw_text_resumes_on_another_process_count(tmp_path, corpus_path):
  """Two processes build the workdir's store together and train; one process resumes: the same
  global batches, so the losses match a run that never stopped."""

  def args(workdir, steps):
    return [
      'train',
      f'--config={TINY}',
      f'--workdir={workdir}',
      f'--config.data.path={corpus_path}',
      PEAK_FLOPS_ARG,
      f'--config.steps={steps}',
      '--config.optim.schedule_steps=4',
      '--config.checkpoint.every=2',
      '--config.eval_every=1000',
      '--config.log_every=1',
    ]

  assert_ok(run_processes(2, args(tmp_path / 'split', 2), devices_each=1))
  resumed = run_processes(1, args(tmp_path / 'split', 4), devices_each=2)
  assert_ok(resumed)
  assert 'at step 2' in resumed[0].stdout and 'prepare:' not in resumed[0].stdout
  assert_ok(run_processes(1, args(tmp_path / 'straight', 4), devices_each=2))
  assert_same_losses(tmp_path / 'split', tmp_path / 'straight')


def test_a_fine_tune_on_two_processes_matches_one_and_scores_its_tasks(tmp_path, corpus_path):
  """sft records encoded by process 0 and packed by (seed, step): two processes take the same
  global batches as one; the in-loop downstream task is scored on the sharded parameters."""
  records = tmp_path / 'qa.jsonl'
  records.write_text(
    ''.join(f'{{"prompt": "{i} is {i % 7}? ", "response": "{i % 7}"}}\n' for i in range(300))
  )
  task = tmp_path / 'mc.jsonl'
  task.write_text('{"context": "3 is 3? ", "choices": ["3", "5"], "gold": 0}\n')

  def args(workdir):
    return [
      'train',
      f'--config={TINY}',
      f'--workdir={workdir}',
      '--config.objective=sft',
      f'--config.data.path={records}',
      PEAK_FLOPS_ARG,
      '--config.steps=6',
      '--config.log_every=1',
      '--config.eval_every=3',
      f'--config.eval.tasks={task}',
    ]

  assert_ok(run_processes(2, args(tmp_path / 'two'), devices_each=1))
  assert_ok(run_processes(1, args(tmp_path / 'one'), devices_each=2))
  assert_same_losses(tmp_path / 'two', tmp_path / 'one')
  for workdir in ('two', 'one'):
    scored = [r for r in metrics.read_metrics(str(tmp_path / workdir)) if 'task_mc_acc' in r]
    assert [r['step'] for r in scored] == [3, 6]


def test_unreachable_coordinator_fails_fast_with_one_line(tmp_path):
  port = portpicker.pick_unused_port()
  start = time.monotonic()
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'pretrax.cli',
      'train',
      f'--config={TINY}',
      f'--workdir={tmp_path}',
      f'--coordinator_address=127.0.0.1:{port}',
      '--num_processes=2',
      '--process_id=1',
      '--distributed_timeout=3',
    ],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=120,
    env=pretrax_env(),
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert f'cannot reach the coordinator at 127.0.0.1:{port} within 3 s' in result.stderr
  assert 'Traceback' not in result.stderr
  assert time.monotonic() - start < 60


@pytest.mark.slow
def test_sigterm_on_every_host_stops_all_processes_at_one_step_with_a_checkpoint(
  tmp_path, prepared
):
  """A preemption: the cluster sends SIGTERM to every process. JAX's coordination service agrees
  on one step; every process saves its shards there and exits 75."""
  port = portpicker.pick_unused_port()
  args = train_args(tmp_path, prepared, 5000) + ['--config.optim.schedule_steps=5000']
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'pretrax.cli',
        *args,
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
        '--distributed_timeout=120',
      ],
      cwd=REPO,
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      env=fake_devices_env(4),
    )
    for i in range(2)
  ]
  deadline = time.time() + 300
  metrics_file = tmp_path / 'metrics.jsonl'
  while time.time() < deadline and not (
    metrics_file.exists() and metrics_file.read_text().count('"loss"') >= 3
  ):
    assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=300) for p in procs]
  lines = []
  for p, (_, err) in zip(procs, outputs, strict=True):
    assert p.returncode == 75, err[-3000:]
    lines.append(
      [err_line for err_line in err.splitlines() if err_line.startswith('pretrax train:')][-1]
    )
  steps = {int(line.split('after step ')[1].split(';')[0]) for line in lines}
  assert len(steps) == 1, lines  # The same step on both.
  stopped = steps.pop()
  assert 3 <= stopped < 5000
  assert checkpoint.manager(str(tmp_path), read_only=True).latest_step() == stopped
  assert max(losses(tmp_path)) == stopped
