"""A workdir on a bucket (gs://...), against a local GCS (tests/gcs_server.py): the same real
`pretrax train` processes as on a disk write their checkpoints through Orbax/TensorStore and the
rest through etils/gcsfs; a stop and a resume give the run a local disk gives, bit for bit."""

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

from etils import epath
from faults import test_faults
from faults.test_faults import (
  STOPPED,
  assert_same_run,
  one_line_error,
  start,
  train_args,
  wait_until,
)
import jax
import portpicker
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, load_config, run_cli
from pretrax import faults, metrics, run_config, sample, train
from pretrax.interop import hf_export, hf_import

BUCKET = 'pretrax-test'

# The faults tests' 40 steps on a local disk, never stopped: what a bucket run must reproduce.
straight = test_faults.straight


@pytest.fixture(scope='module')
def gcs():
  """gs://pretrax-test on a local server, reachable from this process and its children."""
  port = portpicker.pick_unused_port()
  server = subprocess.Popen(
    [sys.executable, os.path.join(REPO, 'tests', 'gcs_server.py'), str(port), BUCKET],
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(url + '/', timeout=1).read()
      break
    except OSError:
      assert server.poll() is None and time.time() < deadline, 'the GCS test server did not start'
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL')}
  os.environ['STORAGE_EMULATOR_HOST'] = url  # gcsfs and google-cloud-storage (TensorBoard).
  os.environ['TENSORSTORE_GCS_HTTP_URL'] = url  # Orbax's TensorStore.
  logging.getLogger('gcsfs').setLevel(logging.ERROR)  # "No credentials": none are needed here.
  yield f'gs://{BUCKET}'
  server.terminate()
  server.wait()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.mark.slow
def test_a_bucket_run_is_locked_stops_resumes_and_matches_a_local_run(
  gcs, straight, tmp_path, corpus_path
):
  local, workdir = straight, f'{gcs}/run'  # The same 40 steps on a local disk, never stopped.
  args = train_args(workdir, corpus_path, '--config.steps=40', '--config.checkpoint.every=10')
  proc = start(args)
  wait_until(lambda: epath.Path(f'{workdir}/checkpoints/10/commit_success.txt').exists(), proc)
  # Frozen, the run holds its lease without renewing it: a second run must still be refused.
  proc.send_signal(signal.SIGSTOP)
  one_line_error(
    run_cli(*args, timeout=120), 'in use by a live run', f'pid {proc.pid}', 'heartbeat'
  )
  proc.send_signal(signal.SIGTERM)  # Preemption: save, release the lease, exit 75.
  proc.send_signal(signal.SIGCONT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == STOPPED, err[-2000:]
  line = [err_line for err_line in err.splitlines() if err_line.startswith('pretrax train:')][-1]
  stopped = int(line.split('after step ')[1].split(';')[0])
  assert 10 <= stopped < 40, line
  assert not epath.Path(f'{workdir}/lock').exists()

  # What a save cut short leaves on a bucket: a step directory without Orbax's commit file.
  partial = epath.Path(f'{workdir}/checkpoints/99')
  (partial / 'state').mkdir(parents=True, exist_ok=True)
  (partial / 'state' / 'junk').write_text('half a checkpoint')

  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f'resumed from {workdir}/checkpoints/{stopped} at step {stopped}' in resumed.stdout
  assert f'outputs in {workdir}:' in resumed.stdout
  assert not partial.exists()
  assert_same_run(local, workdir, 40)  # Same losses at every step, same final parameters.
  names = [p.name for p in epath.Path(workdir).iterdir()]
  assert 'tokenizer.model' in names and 'lock' not in names
  assert sum(n.startswith('events.out.tfevents') for n in names) == 2  # One per process.

  # Reading a bucket run back: greedy samples and Hugging Face exports equal the local run's, and
  # an export imports into a bucket workdir.
  def greedy(w):
    return sample.from_workdir(str(w), 'ROMEO:', length=20, temperature=0.0)

  assert greedy(workdir) == greedy(local)
  for run in (local, workdir):
    hf_export.export(str(run), str(tmp_path / f'hf_{run is local}'), log=lambda _: None)

  def exported(name):
    return (tmp_path / name / 'model.safetensors').read_bytes()

  assert exported('hf_True') == exported('hf_False')
  c = load_config('tiny')
  c.data.path, c.data.fallback = corpus_path, ''
  run = run_config.build(c, check_data=False)
  hf_import.import_model(str(tmp_path / 'hf_False'), run, f'{gcs}/imported', log=lambda _: None)
  assert epath.Path(f'{gcs}/imported/checkpoints/0/commit_success.txt').exists()
  assert (
    epath.Path(f'{gcs}/imported/tokenizer.model').read_bytes()
    == epath.Path(f'{workdir}/tokenizer.model').read_bytes()
  )


def test_a_lease_refuses_a_live_owner_and_takes_over_a_stale_one(gcs, monkeypatch):
  workdir = f'{gcs}/lease'
  held = faults.BucketLease(workdir).acquire()
  try:
    with pytest.raises(faults.WorkdirError, match=f'in use by a live run \\({held.owner}'):
      faults.BucketLease(workdir).acquire()
  finally:
    held.release()
  assert held.read() is None  # Released: the lock object is gone.

  # A run that died without releasing: its heartbeat stops, and after STALE_S the lease is free.
  dead = faults.BucketLease(workdir)
  dead.path.write_text(
    f'{{"owner": "pid 1 on lost-vm", "token": "x", "heartbeat": {time.time() - 61}}}'
  )
  taker = faults.BucketLease(workdir).acquire()
  assert taker.read()['token'] == taker.token
  taker.release()

  monkeypatch.setattr(faults.BucketLease, 'HEARTBEAT_S', 0.05)
  beating = faults.BucketLease(workdir).acquire()
  first = beating.read()['heartbeat']
  deadline = time.time() + 20  # Renewed while the run lives: polled, not a fixed sleep.
  while (beating.read() or {}).get('heartbeat', first) <= first:
    assert time.time() < deadline, 'the heartbeat was not renewed'
    time.sleep(0.05)
  beating.release()


def test_a_missing_bucket_fails_before_training_and_makes_nothing_locally(
  gcs, tiny_config, tmp_path, monkeypatch
):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(faults.WorkdirError, match='gs://no-such-bucket/run is not writable'):
    train.train(
      run_config.build(tiny_config, num_devices=jax.device_count()), 'gs://no-such-bucket/run'
    )
  assert os.listdir(tmp_path) == []  # No local "gs:" directory.


@pytest.mark.slow
def test_two_local_processes_train_and_resume_on_a_bucket(gcs, tmp_path, corpus_path):
  """Both processes write their checkpoint shards and Grain positions to the bucket; process 0
  writes the rest. Logs of process 1 stay local (local-logs/), the bucket is not a directory."""
  workdir = f'{gcs}/two'
  env = dict(os.environ, PRETRAX=f'{sys.executable} -m pretrax.cli', JAX_PLATFORMS='cpu')
  for steps in (3, 5):  # Then resumed, by the same two processes.
    result = subprocess.run(
      [
        os.path.join(REPO, 'launch', 'local.sh'),
        os.path.join(REPO, 'configs', 'tiny.py'),
        workdir,
        '--processes=2',
        f'--config.data.path={corpus_path}',
        '--config.data.fallback=',
        f'--config.steps={steps}',
        '--config.log_every=1',
        '--config.eval_every=1000',
        '--config.checkpoint.every=3',
        PEAK_FLOPS_ARG,
      ],
      cwd=tmp_path,
      env=env,
      text=True,
      capture_output=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from' in result.stdout and 'at step 3' in result.stdout
  assert [r['step'] for r in metrics.read_metrics(workdir) if 'loss' in r] == [1, 2, 3, 4, 5]
  steps = sorted(p.name for p in epath.Path(f'{workdir}/checkpoints').iterdir())
  assert steps == ['3', '5']
  assert (tmp_path / 'local-logs' / 'process_1.log').exists()
  assert not (tmp_path / 'gs:').exists()


def test_a_profile_of_a_bucket_run_is_uploaded(gcs, corpus_path):
  """jax.profiler writes local files; a bucket run's trace lands in WORKDIR/profile all the same."""
  workdir = f'{gcs}/profiled'
  result = run_cli(
    *train_args(workdir, corpus_path, '--config.steps=3', '--config.profile_steps=2:1')
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'profile of steps 2-2 in {workdir}/profile' in result.stdout
  traces = list(epath.Path(f'{workdir}/profile').glob('plugins/profile/*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().length > 0, traces


def test_a_bucket_workdir_without_the_gcs_extra_names_it(tmp_path, corpus_path):
  """What a user of the plain install (no gcsfs) sees: one line naming the extra to install."""
  stub = tmp_path / 'stub' / 'gcsfs'
  stub.mkdir(parents=True)
  (stub / '__init__.py').write_text('raise ImportError("No module named gcsfs")\n')
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(filter(None, [str(stub.parent), os.environ.get('PYTHONPATH')])),
  )
  result = subprocess.run(
    [sys.executable, '-m', 'pretrax.cli', *train_args('gs://bucket/run', corpus_path)],
    cwd=tmp_path,
    env=env,
    text=True,
    capture_output=True,
    timeout=300,
  )
  one_line_error(
    result, 'gs://bucket/run needs a package that is not installed', 'pip install "pretrax[gcs]"'
  )
  assert not (tmp_path / 'gs:').exists()


@pytest.mark.slow
def test_a_bucket_run_killed_outright_has_the_metrics_of_its_committed_checkpoints(
  gcs, corpus_path
):
  """metrics.jsonl on a bucket is uploaded before each checkpoint commits: SIGKILL (no flush at
  exit) must still leave the records of every committed step."""
  workdir = f'{gcs}/killed'
  proc = start(
    train_args(workdir, corpus_path, '--config.steps=400', '--config.checkpoint.every=10')
  )
  wait_until(lambda: epath.Path(f'{workdir}/checkpoints/10/commit_success.txt').exists(), proc)
  proc.kill()
  proc.communicate(timeout=60)
  committed = [
    int(p.name)
    for p in epath.Path(f'{workdir}/checkpoints').iterdir()
    if (p / 'commit_success.txt').exists()
  ]
  steps = [r['step'] for r in metrics.read_metrics(workdir) if 'loss' in r]
  assert committed and steps[: max(committed)] == list(range(1, max(committed) + 1)), (
    committed,
    steps,
  )


def test_a_corpus_on_a_bucket_prepares_into_the_store_of_the_same_files_on_disk(gcs, tmp_path):
  import gzip
  import json

  import pyarrow as pa
  import pyarrow.parquet as pq

  from pretrax import config as config_lib
  from pretrax.data import prepare, store

  docs = [f'document {i}: ' + 'some words ' * (i % 13 + 1) for i in range(300)]
  local = tmp_path / 'corpus'
  local.mkdir()
  (local / 'a.jsonl.gz').write_bytes(
    gzip.compress(''.join(json.dumps({'text': d}) + '\n' for d in docs[:150]).encode())
  )
  pq.write_table(pa.table({'text': docs[150:]}), str(local / 'b.parquet'), row_group_size=40)
  for name in ('a.jsonl.gz', 'b.parquet'):
    epath.Path(f'{gcs}/corpus/{name}').write_bytes((local / name).read_bytes())

  def prepared(path: str, out) -> store.Store:
    c = config_lib.base_config()
    c.data.path, c.tokenizer.model_type = path, 'char'
    prepare.prepare(run_config.build(c, check_data=False), str(out), workers=0, log=lambda _: None)
    return store.Store(str(out))

  remote = prepared(f'{gcs}/corpus/*', tmp_path / 'remote')
  on_disk = prepared(str(local), tmp_path / 'disk')
  assert remote.manifest['input_files'] == 2
  for split in ('train', 'eval'):
    a, b = remote.split(split), on_disk.split(split)
    assert a.num_tokens > 100
    assert (a.read(0, a.num_tokens) == b.read(0, b.num_tokens)).all()
