"""The launch scripts in launch/, run as a user runs them.

`gcloud`, `srun`, `scontrol`, `ssh` and `curl` are stand-ins put first on PATH: each records its
argv (one JSON line per call) and exits 0, so the tests read exactly what a script would have asked
of a TPU pod or a cluster. The snippets the scripts send to TPU workers and ssh hosts are then run
here with a stand-in `pretrax`, and `launch/local.sh` really trains the tiny config.
"""

import json
import os
import select
import signal
import stat
import subprocess
import sys
import time

import portpicker
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, pretrax_env
from pretrax import metrics

LAUNCH = os.path.join(REPO, 'launch')
TPU = os.path.join(LAUNCH, 'tpu.sh')
SETTINGS = {
  'PRETRAX_TPU_PROJECT': 'proj',
  'PRETRAX_TPU_ZONE': 'us-central2-b',
  'PRETRAX_TPU_NAME': 'pod',
}

RECORDER = f"""#!{sys.executable}
import json, os, subprocess, sys
tool = os.path.basename(sys.argv[0])
env = {{k: v for k, v in os.environ.items() if k.startswith(('JAX_', 'SLURM_'))}}
with open(os.environ['STANDIN_LOG'], 'a') as f:
  f.write(json.dumps({{'tool': tool, 'argv': sys.argv[1:], 'env': env}}) + '\\n')
if tool == 'curl':  # The TPU metadata server: this worker's number.
  print(os.environ.get('STANDIN_WORKER', '0'))
if tool == 'ssh' and os.environ.get('STANDIN_SSH_RUNS'):  # Run the remote command here.
  sys.exit(subprocess.call(['sh', '-c', sys.argv[-1]]))
sys.exit(int(os.environ.get('STANDIN_EXIT_' + tool.upper(), '0')))
"""


def _write_executable(path, text: str) -> str:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


class StandIns:
  """A PATH whose gcloud, srun, scontrol, ssh and curl record their calls."""

  def __init__(self, tmp_path):
    self.bin = tmp_path / 'standins'
    self.bin.mkdir()
    self.log = tmp_path / 'calls.jsonl'
    for tool in ('gcloud', 'srun', 'scontrol', 'ssh', 'curl'):
      _write_executable(self.bin / tool, RECORDER)
    # Nothing of ours or of a cluster this test may itself run in.
    self.env = {
      k: v for k, v in os.environ.items() if not k.startswith(('PRETRAX', 'JAX_', 'SLURM_'))
    }
    self.env.update(
      PATH=f'{self.bin}{os.pathsep}{os.environ["PATH"]}',
      STANDIN_LOG=str(self.log),
      TMPDIR=str(tmp_path),
    )

  def run(self, *args: str, env: dict | None = None, cwd=REPO, timeout: int = 60):
    return subprocess.run(
      list(args),
      cwd=cwd,
      env={**self.env, **(env or {})},
      text=True,
      capture_output=True,
      timeout=timeout,
    )

  def calls(self, tool: str | None = None) -> list[dict]:
    if not self.log.exists():
      return []
    records = [json.loads(line) for line in self.log.read_text().splitlines()]
    return [r for r in records if tool in (None, r['tool'])]

  def clear(self) -> None:
    self.log.unlink(missing_ok=True)


@pytest.fixture
def standins(tmp_path) -> StandIns:
  return StandIns(tmp_path)


def tpu(standins: StandIns, *args: str, env: dict | None = None):
  result = standins.run(TPU, *args, env={**SETTINGS, **(env or {})})
  assert result.returncode == 0, result.stderr
  return [c['argv'] for c in standins.calls('gcloud')]


def remote_command(argv: list[str]) -> str:
  return next(a for a in argv if a.startswith('--command='))[len('--command=') :]


# ---- TPU VMs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'flags,expected',
  [
    (
      [],
      [
        'compute',
        'tpus',
        'tpu-vm',
        'create',
        'pod',
        '--project=proj',
        '--zone=us-central2-b',
        '--accelerator-type=v5litepod-16',
        '--version=v2-alpha-tpuv5-lite',
      ],
    ),
    (
      ['--spot'],
      [
        'compute',
        'tpus',
        'tpu-vm',
        'create',
        'pod',
        '--project=proj',
        '--zone=us-central2-b',
        '--accelerator-type=v5litepod-16',
        '--version=v2-alpha-tpuv5-lite',
        '--spot',
      ],
    ),
    (
      ['--queued', '--spot'],
      [
        'compute',
        'tpus',
        'queued-resources',
        'create',
        'pod',
        '--project=proj',
        '--zone=us-central2-b',
        '--accelerator-type=v5litepod-16',
        '--runtime-version=v2-alpha-tpuv5-lite',
        '--node-id=pod',
        '--spot',
      ],
    ),
    (
      ['--slices=4'],
      [
        'compute',
        'tpus',
        'queued-resources',
        'create',
        'pod',
        '--project=proj',
        '--zone=us-central2-b',
        '--accelerator-type=v5litepod-16',
        '--runtime-version=v2-alpha-tpuv5-lite',
        '--node-count=4',
        '--node-prefix=pod',
      ],
    ),
  ],
)
def test_tpu_create_on_demand_spot_queued_and_multislice(standins, flags, expected):
  calls = tpu(standins, 'create', '--type=v5litepod-16', '--version=v2-alpha-tpuv5-lite', *flags)
  assert calls == [expected]


def test_tpu_settings_come_from_flags_too(standins):
  result = standins.run(TPU, 'delete', '--project=p2', '--zone=z2', '--name=n2')
  assert result.returncode == 0, result.stderr
  assert [c['argv'] for c in standins.calls()] == [
    ['compute', 'tpus', 'tpu-vm', 'delete', 'n2', '--project=p2', '--zone=z2']
  ]


@pytest.mark.parametrize(
  'command,missing',
  [
    (['status'], 'PRETRAX_TPU_PROJECT'),
    (['run', 'configs/tiny.py', 'gs://b/run'], 'PRETRAX_TPU_ZONE'),
    (['delete'], 'PRETRAX_TPU_NAME'),
    (['create', '--version=v'], 'PRETRAX_TPU_TYPE'),
    (['create', '--type=v4-8'], 'PRETRAX_TPU_VERSION'),
  ],
)
def test_tpu_missing_setting_is_one_line_naming_flag_and_variable(standins, command, missing):
  env = {k: v for k, v in SETTINGS.items() if k != missing}
  result = standins.run(TPU, *command, env=env)
  assert result.returncode == 2
  flag = '--' + missing.rsplit('_', 1)[1].lower()
  assert result.stderr.strip() == f'tpu.sh {command[0]}: missing {flag} (or {missing}).'
  assert standins.calls() == []


def test_tpu_missing_settings_are_all_named(standins):
  result = standins.run(TPU, 'create')
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  for flag in ('--project', '--zone', '--name', '--type', '--version'):
    assert f'{flag} (or PRETRAX_TPU_{flag[2:].upper()})' in result.stderr


def test_tpu_setup_installs_the_tpu_extra_on_every_worker(standins, tmp_path):
  calls = tpu(standins, 'setup')
  archive = str(tmp_path / 'pretrax-pod.tar.gz')
  assert os.path.getsize(archive) > 0  # `git archive` of this checkout, really made.
  scp, ssh = calls
  assert scp == [
    'compute',
    'tpus',
    'tpu-vm',
    'scp',
    archive,
    'pod:pretrax.tar.gz',
    '--project=proj',
    '--zone=us-central2-b',
    '--worker=all',
  ]
  assert ssh[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and '--worker=all' in ssh
  install = remote_command(ssh)
  assert 'tar -xzf pretrax.tar.gz -C pretrax' in install
  assert 'python3 -m venv .venv' in install
  assert ".venv/bin/pip install -e '.[tpu]'" in install


def test_tpu_setup_on_a_worker_with_old_python_says_what_to_do(standins, tmp_path):
  old_python = _write_executable(tmp_path / 'python3.10', '#!/bin/sh\nexit 1\n')
  (_, ssh) = tpu(standins, 'setup', f'--python={old_python}')
  home = tmp_path / 'worker'
  home.mkdir()
  os.replace(tmp_path / 'pretrax-pod.tar.gz', home / 'pretrax.tar.gz')  # What scp put there.
  result = subprocess.run(
    ['bash', '-c', remote_command(ssh)], cwd=home, text=True, capture_output=True
  )
  assert result.returncode == 1
  assert 'pretrax needs Python 3.11+' in result.stdout and 'setup --python=' in result.stdout
  assert (home / 'pretrax' / 'pyproject.toml').exists()  # The checkout arrived ...
  assert not (home / 'pretrax' / '.venv').exists()  # ... and nothing half-installed.


def test_tpu_setup_from_git_clones_then_fetches(standins, tmp_path):
  """The --git snippet on a stand-in worker, from this repository, up to the Python check."""
  old_python = _write_executable(tmp_path / 'python3.10', '#!/bin/sh\nexit 1\n')
  (ssh,) = tpu(standins, 'setup', f'--git={REPO}', f'--python={old_python}')
  home = tmp_path / 'worker'
  home.mkdir()
  for _ in range(2):  # A clone, then a fetch into the existing clone.
    result = subprocess.run(
      ['bash', '-c', remote_command(ssh)], cwd=home, text=True, capture_output=True
    )
    assert result.returncode == 1 and 'pretrax needs Python 3.11+' in result.stdout, result.stderr
    assert (home / 'pretrax' / 'launch' / 'tpu.sh').exists()


def test_tpu_setup_from_git_on_every_slice(standins):
  calls = tpu(
    standins,
    'setup',
    '--git=https://example.com/pretrax.git',
    '--ref=v1',
    '--slices=2',
    '--python=python3.11',
  )
  assert [c[4] for c in calls] == ['pod-0', 'pod-1']
  for call in calls:
    assert call[3] == 'ssh' and '--worker=all' in call
    install = remote_command(call)
    assert 'git clone -q https://example.com/pretrax.git pretrax' in install
    assert 'checkout -q --detach v1' in install
    assert 'python3.11 -m venv .venv' in install and "'.[tpu]'" in install


TRAIN = ['configs/gpt2_small.py', 'gs://my-bucket/runs/gpt2', '--config.steps=1000']


def test_tpu_run_is_the_same_train_command_on_all_workers_every_time(standins):
  first = tpu(standins, 'run', *TRAIN)
  assert len(first) == 1
  argv = first[0]
  assert argv[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'pod'] and '--worker=all' in argv
  remote = remote_command(argv)
  assert (
    '.venv/bin/pretrax train --config=configs/gpt2_small.py '
    '--workdir=gs://my-bucket/runs/gpt2 --config.steps=1000'
  ) in remote
  assert 'coordinator' not in remote and 'process_id' not in remote  # JAX finds the workers.
  assert 'tail -c +$from -f --pid=$train $log' in remote  # Worker 0 streams back.

  # A stop (SIGTERM: checkpoint, exit 75), then the same `run`: the identical command resumes.
  standins.clear()
  stop = tpu(standins, 'stop')
  assert len(stop) == 1 and '--worker=all' in stop[0] and 'kill -TERM' in remote_command(stop[0])
  standins.clear()
  assert tpu(standins, 'run', *TRAIN) == first


def test_tpu_multislice_run_starts_every_slice_and_sets_nothing_jax_finds(standins):
  calls = tpu(standins, 'run', *TRAIN, '--config.mesh.dcn_data=2', '--slices=2')
  assert sorted(c[4] for c in calls) == ['pod-0', 'pod-1']
  for call in calls:
    assert '--worker=all' in call
    remote = remote_command(call)
    assert '--config.mesh.dcn_data=2' in remote
    assert 'MEGASCALE' not in remote and 'coordinator' not in remote
  by_node = {c[4]: remote_command(c) for c in calls}
  assert 'tail' in by_node['pod-0'] and 'tail' not in by_node['pod-1']  # One stream: slice 0.


def test_tpu_stop_vm_copy_status_delete(standins):
  assert tpu(standins, 'stop', '--vm')[1] == [
    'compute',
    'tpus',
    'tpu-vm',
    'stop',
    'pod',
    '--project=proj',
    '--zone=us-central2-b',
  ]
  standins.clear()
  assert tpu(standins, 'copy', 'data.txt', 'tpu:pretrax/data.txt') == [
    [
      'compute',
      'tpus',
      'tpu-vm',
      'scp',
      '--recurse',
      'data.txt',
      'pod:pretrax/data.txt',
      '--project=proj',
      '--zone=us-central2-b',
      '--worker=all',
    ]
  ]
  standins.clear()
  assert tpu(standins, 'copy', 'tpu:pretrax/logs', 'here') == [
    [
      'compute',
      'tpus',
      'tpu-vm',
      'scp',
      '--recurse',
      'pod:pretrax/logs',
      'here',
      '--project=proj',
      '--zone=us-central2-b',
      '--worker=0',
    ]
  ]
  standins.clear()
  assert tpu(standins, 'status', '--queued') == [
    [
      'compute',
      'tpus',
      'queued-resources',
      'describe',
      'pod',
      '--project=proj',
      '--zone=us-central2-b',
    ]
  ]
  standins.clear()
  assert tpu(standins, 'delete') == [
    ['compute', 'tpus', 'tpu-vm', 'delete', 'pod', '--project=proj', '--zone=us-central2-b']
  ]
  standins.clear()
  assert tpu(standins, 'delete', '--slices=2') == [
    [
      'compute',
      'tpus',
      'queued-resources',
      'delete',
      'pod',
      '--project=proj',
      '--zone=us-central2-b',
      '--force',
    ]
  ]


def test_tpu_dry_run_prints_every_command_and_runs_none(standins, tmp_path):
  result = standins.run(TPU, 'setup', '--dry-run', env=SETTINGS)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [line.split()[:2] for line in lines] == [['+', 'git'], ['+', 'gcloud'], ['+', 'gcloud']]
  assert standins.calls() == [] and not (tmp_path / 'pretrax-pod.tar.gz').exists()
  result = standins.run(TPU, 'run', *TRAIN, '--dry-run', env=SETTINGS)
  assert result.stdout.startswith('+ gcloud compute tpus tpu-vm ssh pod ')
  assert standins.calls() == []


FAKE_PRETRAX = """#!/bin/sh
# A stand-in for `pretrax train`: says what it was asked, then trains "forever"; SIGTERM ends it
# as pretrax ends: checkpoint saved, status 75.
echo "fake pretrax: $*"
trap 'echo "fake pretrax: saved a checkpoint"; exit 75' TERM
i=0
while [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
"""


def test_tpu_worker_snippets_run_log_and_stop(standins, tmp_path):
  """The shell that `run` and `stop` send to each worker, run here in a stand-in home."""
  run = remote_command(tpu(standins, 'run', *TRAIN)[0])
  standins.clear()
  stop = remote_command(tpu(standins, 'stop')[0])

  homes, workers = {}, {}
  for worker in ('0', '1'):  # Each worker is its own machine: its own home.
    homes[worker] = tmp_path / f'worker{worker}'
    (homes[worker] / 'pretrax' / '.venv' / 'bin').mkdir(parents=True)
    _write_executable(homes[worker] / 'pretrax' / '.venv' / 'bin' / 'pretrax', FAKE_PRETRAX)
    workers[worker] = subprocess.Popen(
      ['bash', '-c', run],
      cwd=homes[worker],
      text=True,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      env={**standins.env, 'STANDIN_WORKER': worker},
    )
  logs = {w: homes[w] / 'pretrax' / 'logs' / f'train-slice0-worker{w}.log' for w in homes}
  deadline = time.time() + 30
  while time.time() < deadline and not all(
    p.exists() and 'fake pretrax: train' in p.read_text() for p in logs.values()
  ):
    time.sleep(0.05)
  # Worker 1's connection dies: its pretrax goes on, writing only to its log.
  workers['1'].kill()
  workers['1'].wait()
  pid = int((homes['1'] / 'pretrax' / 'logs' / 'train.pid').read_text())
  os.kill(pid, 0)  # Still running.
  standins.clear()
  follow = remote_command(tpu(standins, 'logs')[0])
  assert 'tail -n 100 -f --pid=$pid $log' in follow
  followed = subprocess.Popen(
    ['bash', '-c', follow], cwd=homes['0'], text=True, stdout=subprocess.PIPE
  )
  for where in homes.values():
    stopped = subprocess.run(['bash', '-c', stop], cwd=where, text=True, capture_output=True)
    assert 'sent SIGTERM to pretrax' in stopped.stdout, stopped.stdout + stopped.stderr
  out = {w: p.communicate(timeout=30)[0] for w, p in workers.items()}
  assert workers['0'].returncode == 75  # pretrax's status, through `wait`.
  assert 'saved a checkpoint' in followed.communicate(timeout=30)[0]  # `logs` ends with the run.
  assert 'fake pretrax: train --config=configs/gpt2_small.py --workdir=gs://my-bucket' in out['0']
  assert out['1'] == ''  # Only worker 0 streams back ...
  # ... and every worker keeps its own log (worker 1's pretrax, detached from its dead shell,
  # finishes writing on its own time).
  _wait_for_text(logs['1'], 'saved a checkpoint')
  for log in logs.values():
    assert 'saved a checkpoint' in log.read_text()
  again = subprocess.run(['bash', '-c', stop], cwd=homes['0'], text=True, capture_output=True)
  assert 'no pretrax running' in again.stdout


# ---- SLURM -----------------------------------------------------------------------------------

SBATCH = os.path.join(LAUNCH, 'slurm.sbatch')
SLURM_ENV = {
  'SLURM_JOB_ID': '4242',
  'SLURM_NTASKS': '16',
  'SLURM_NNODES': '2',
  'SLURM_NTASKS_PER_NODE': '8',
  'SLURM_PROCID': '0',
  'SLURM_LOCALID': '0',
}


def test_slurm_batch_script_asks_for_a_task_per_gpu_requeue_and_sigterm():
  with open(SBATCH) as f:
    text = f.read()
  directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith('#SBATCH')]
  for wanted in (
    '--ntasks-per-node=8',
    '--gpus-per-node=8',
    '--requeue',
    '--signal=TERM@120',
    '--open-mode=append',
  ):
    assert wanted in directives
  body = text.split('set -euo pipefail', 1)[1]
  assert 'srun --kill-on-bad-exit=1 "${pretrax[@]}" train' in body
  assert '#SBATCH' not in body  # sbatch stops reading directives at the first command.


def test_slurm_batch_body_runs_srun_pretrax_train_with_the_slurm_environment(standins, tmp_path):
  result = standins.run(
    'bash',
    SBATCH,
    'configs/gpt2_small.py',
    '/shared/runs/gpt2',
    '--config.mesh.dcn_data=2',
    env={**SLURM_ENV, 'SLURM_SUBMIT_DIR': str(tmp_path)},
  )
  assert result.returncode == 0, result.stderr
  (srun,) = standins.calls('srun')
  assert srun['argv'] == [
    '--kill-on-bad-exit=1',
    'pretrax',
    'train',
    '--config=configs/gpt2_small.py',
    '--workdir=/shared/runs/gpt2',
    '--config.mesh.dcn_data=2',
  ]
  assert srun['env']['SLURM_NTASKS'] == '16'  # What jax.distributed reads; nothing else set.
  assert srun['env']['JAX_COMPILATION_CACHE_DIR'] == '/shared/runs/gpt2/jax_cache'
  assert 'JAX_LOCAL_DEVICE_IDS' not in srun['env']  # A task per GPU: JAX's own default.
  assert standins.calls('scontrol') == []


def test_slurm_one_process_per_node_drives_all_its_gpus(standins):
  env = {
    **SLURM_ENV,
    'SLURM_NTASKS': '2',
    'SLURM_NTASKS_PER_NODE': '1',
    'SLURM_GPUS_ON_NODE': '4',
    'PRETRAX': '/opt/venv/bin/pretrax',
  }
  result = standins.run('bash', SBATCH, 'configs/llama_1b.py', '/shared/r', env=env)
  assert result.returncode == 0, result.stderr
  (srun,) = standins.calls('srun')
  assert srun['argv'][1] == '/opt/venv/bin/pretrax'
  assert srun['env']['JAX_LOCAL_DEVICE_IDS'] == '0,1,2,3'


def test_slurm_stopped_run_requeues_the_same_job(standins):
  env = {**SLURM_ENV, 'STANDIN_EXIT_SRUN': '75'}
  result = standins.run('bash', SBATCH, 'configs/gpt2_small.py', '/shared/r', env=env)
  assert result.returncode == 75
  assert [c['argv'] for c in standins.calls('scontrol')] == [['requeue', '4242']]
  first = standins.calls('srun')[0]['argv']
  standins.clear()  # The requeued job runs the same script with the same arguments.
  standins.run('bash', SBATCH, 'configs/gpt2_small.py', '/shared/r', env=SLURM_ENV)
  assert standins.calls('srun')[0]['argv'] == first


def _readline(stream, timeout: float) -> str:
  """The next line of a child's output, or an assertion error after `timeout` seconds (a hung
  child must fail the test, not hang the suite)."""
  ready, _, _ = select.select([stream], [], [], timeout)
  assert ready, f'no output within {timeout} s'
  return stream.readline()


def test_slurm_preemption_sigterm_waits_for_the_checkpoint_then_requeues(standins, tmp_path):
  """SLURM signals the whole job: the batch script must outlive the tasks' checkpoint save."""
  slow_bin = tmp_path / 'slow'
  slow_bin.mkdir()
  _write_executable(
    slow_bin / 'srun',
    '#!/bin/sh\n'
    'trap \'sleep 1; echo "task: saved a checkpoint"; exit 75\' TERM\n'
    'echo "task: training"\n'
    'i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n',
  )
  env = {**standins.env, **SLURM_ENV, 'PATH': f'{slow_bin}{os.pathsep}{standins.env["PATH"]}'}
  proc = subprocess.Popen(
    ['bash', SBATCH, 'configs/tiny.py', 'runs/x'],
    env=env,
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    start_new_session=True,
  )
  assert _readline(proc.stdout, timeout=30) == 'task: training\n'
  os.killpg(proc.pid, signal.SIGTERM)  # What SLURM does when it preempts the job.
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 75, err
  assert 'saved a checkpoint' in out and 'waiting for pretrax to save' in err
  assert [c['argv'] for c in standins.calls('scontrol')] == [['requeue', '4242']]


def test_slurm_dry_run_and_missing_arguments(standins, tmp_path):
  # Submitted from a directory without .venv/bin/pretrax, so `pretrax` comes from PATH.
  result = standins.run(
    'bash',
    SBATCH,
    '--dry-run',
    'configs/tiny.py',
    'runs/x',
    env={**SLURM_ENV, 'SLURM_SUBMIT_DIR': str(tmp_path)},
  )
  assert result.returncode == 0 and result.stdout.startswith('+ env JAX_COMPILATION_CACHE_DIR=')
  assert 'srun --kill-on-bad-exit=1 pretrax train --config=configs/tiny.py' in result.stdout
  assert ' XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true' in result.stdout
  assert standins.calls() == []
  # The submitter's own XLA flags come after ours, so theirs win.
  result = standins.run(
    'bash',
    SBATCH,
    '--dry-run',
    'configs/tiny.py',
    'runs/x',
    env={**SLURM_ENV, 'SLURM_SUBMIT_DIR': str(tmp_path), 'XLA_FLAGS': '--xla_dump_to=/tmp/d'},
  )
  assert (
    r' XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true\ --xla_dump_to=/tmp/d srun'
    in result.stdout
  ), result.stdout
  result = standins.run('bash', SBATCH, 'configs/tiny.py')
  assert result.returncode == 2 and 'give CONFIG and WORKDIR' in result.stderr


# ---- Plain multi-node (ssh) ------------------------------------------------------------------

MULTINODE = os.path.join(LAUNCH, 'multinode.sh')


def test_multinode_ssh_commands_carry_coordinator_count_and_rank(standins, tmp_path):
  result = standins.run(
    MULTINODE,
    '--hosts=gpu-a,gpu-b,gpu-c',
    '--port=4321',
    '--dir=/srv/pretrax',
    'configs/gpt2_small.py',
    '/shared/runs/gpt2',
    '--config.mesh.dcn_data=3',
    f'--logs={tmp_path / "logs"}',
  )
  assert result.returncode == 0, result.stderr
  # The hosts start at once: their calls come in any order.
  calls = sorted((c['argv'] for c in standins.calls('ssh')), key=lambda argv: argv[2])
  assert [c[:3] for c in calls] == [['-o', 'BatchMode=yes', h] for h in ('gpu-a', 'gpu-b', 'gpu-c')]
  for i, call in enumerate(calls):
    remote = call[-1]
    assert remote.startswith('cd /srv/pretrax && ')
    assert remote.endswith(
      'env XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true '
      '.venv/bin/pretrax train --config=configs/gpt2_small.py --workdir=/shared/runs/gpt2 '
      '--config.mesh.dcn_data=3 --coordinator_address=gpu-a:4321 --num_processes=3 '
      f'--process_id={i}'
    )


def test_multinode_missing_hosts_is_one_line(standins):
  result = standins.run(MULTINODE, 'configs/tiny.py', 'runs/x')
  assert result.returncode == 2
  assert result.stderr.strip() == (
    'multinode.sh: missing --hosts=H1,H2,... (the first host is the coordinator).'
  )
  assert standins.calls() == []


def test_multinode_first_failure_stops_the_other_hosts(standins, tmp_path):
  """The ssh stand-in runs each host's command here; host 1's pretrax fails at once, and the
  launcher stops host 0's through its pid file (SIGTERM: it saves and exits 75)."""
  _write_executable(
    tmp_path / 'pretrax',
    FAKE_PRETRAX.replace(
      'echo "fake pretrax: $*"',
      'echo "fake pretrax: $*"\ncase "$*" in *process_id=1) exit 3;; esac',
    ),
  )
  port = portpicker.pick_unused_port()
  start = time.monotonic()
  result = standins.run(
    MULTINODE,
    '--hosts=localhost,127.0.0.1',
    f'--port={port}',
    f'--pretrax={tmp_path / "pretrax"}',
    f'--logs={tmp_path / "logs"}',
    'configs/tiny.py',
    str(tmp_path / 'run'),
    env={'STANDIN_SSH_RUNS': '1'},
  )
  assert result.returncode == 3, result.stderr
  assert time.monotonic() - start < 20
  assert 'fake pretrax: saved a checkpoint' in result.stdout  # Host 0 got SIGTERM.
  assert 'process_id=1' in (tmp_path / 'logs' / 'process_1.log').read_text()


# ---- Local CPU -------------------------------------------------------------------------------

LOCAL = os.path.join(LAUNCH, 'local.sh')


def test_local_dry_run_prints_each_process_and_runs_nothing(standins, tmp_path):
  recorder = _write_executable(tmp_path / 'pretrax', RECORDER)
  result = standins.run(
    LOCAL,
    'configs/tiny.py',
    str(tmp_path / 'run'),
    '--processes=2',
    '--devices=4',
    '--dry-run',
    env={'PRETRAX': recorder},
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 2 and all(line.startswith('+ env ') for line in lines)
  for i, line in enumerate(lines):
    assert '--xla_force_host_platform_device_count=4' in line
    assert f'--num_processes=2 --process_id={i}' in line
  assert standins.calls() == [] and not (tmp_path / 'run').exists()


def test_local_first_failure_is_the_exit_status_and_stops_the_others(standins, tmp_path):
  # Process 1 fails once the others are up (their trap set), however slowly this machine starts
  # them: it waits for process 2's first line in its log.
  fails_later = (
    'case "$*" in *process_id=1) i=0; until grep -q "fake pretrax" '
    f'{tmp_path}/run/logs/process_2.log 2>/dev/null || [ $i -gt 100 ]; do '
    'sleep 0.1; i=$((i + 1)); done; sleep 0.2; exit 3;; esac'
  )
  fake = _write_executable(
    tmp_path / 'pretrax',
    FAKE_PRETRAX.replace(
      'trap \'echo "fake pretrax: saved a checkpoint"; exit 75\' TERM',
      'trap \'echo "fake pretrax: saved a checkpoint"; exit 75\' TERM\n' + fails_later,
    ),
  )
  start = time.monotonic()
  result = standins.run(
    LOCAL, 'configs/tiny.py', str(tmp_path / 'run'), '--processes=3', env={'PRETRAX': fake}
  )
  assert result.returncode == 3, result.stderr
  assert time.monotonic() - start < 20
  assert 'fake pretrax: saved a checkpoint' in result.stdout  # Process 0, on the terminal.
  assert 'saved a checkpoint' in (tmp_path / 'run' / 'logs' / 'process_2.log').read_text()


def test_local_sigterm_reaches_every_process(standins, tmp_path):
  fake = _write_executable(tmp_path / 'pretrax', FAKE_PRETRAX)
  proc = subprocess.Popen(
    [LOCAL, 'configs/tiny.py', str(tmp_path / 'run'), '--processes=2'],
    cwd=REPO,
    env={**standins.env, 'PRETRAX': fake},
    text=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  log = tmp_path / 'run' / 'logs' / 'process_1.log'
  deadline = time.time() + 20
  while time.time() < deadline and not (log.exists() and 'fake pretrax' in log.read_text()):
    time.sleep(0.05)
  time.sleep(0.3)  # Let the launcher reach its wait loop.
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 75  # Stopped with a checkpoint, as pretrax reports it.
  assert 'saved a checkpoint' in out and 'saved a checkpoint' in log.read_text()


def _pretrax_env() -> dict[str, str]:
  return dict(pretrax_env(), PRETRAX=f'{sys.executable} -m pretrax.cli', JAX_PLATFORMS='cpu')


def _tiny(corpus_path: str, steps: int) -> list[str]:
  return [
    os.path.join(REPO, 'configs', 'tiny.py'),
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    f'--config.steps={steps}',
    '--config.log_every=1',
    '--config.eval_every=1000',
    f'--config.checkpoint.every={steps}',
    PEAK_FLOPS_ARG,
  ]


@pytest.mark.slow
def test_local_two_processes_train_the_tiny_config(tmp_path, corpus_path):
  config, *overrides = _tiny(corpus_path, 3)
  result = subprocess.run(
    [LOCAL, config, str(tmp_path), '--processes=2', '--devices=2', *overrides],
    cwd=REPO,
    env=_pretrax_env(),
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'joined 2 processes, 4 devices (2 here)' in result.stdout
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path)) if 'loss' in r] == [1, 2, 3]
  assert (tmp_path / 'logs' / 'process_1.log').exists()


@pytest.mark.slow
def test_local_fake_devices_train_on_four(tmp_path, corpus_path):
  config, *overrides = _tiny(corpus_path, 2)
  result = subprocess.run(
    [LOCAL, config, str(tmp_path), '--devices=4', *overrides],
    cwd=REPO,
    env=_pretrax_env(),
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 4, 'fsdp': 1, 'expert': 1, 'tensor': 1}" in result.stdout
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path)) if 'loss' in r] == [1, 2]


@pytest.mark.parametrize('script', ['tpu.sh', 'multinode.sh', 'local.sh', 'slurm.sbatch'])
def test_every_script_has_help_and_parses(script):
  path = os.path.join(LAUNCH, script)
  assert subprocess.run(['bash', '-n', path]).returncode == 0
  result = subprocess.run(['bash', path, '--help'], text=True, capture_output=True)
  assert result.returncode == 0 and script in result.stdout


@pytest.mark.parametrize(
  'command', ['create', 'setup', 'run', 'logs', 'copy', 'status', 'stop', 'delete']
)
def test_every_tpu_command_has_help(command):
  result = subprocess.run(
    [TPU, command, '--help'], text=True, capture_output=True, env={'PATH': os.environ['PATH']}
  )
  assert result.returncode == 0 and f'launch/tpu.sh {command}' in result.stdout


def _wait_for_text(path, text: str, timeout_s: float = 30) -> None:
  deadline = time.time() + timeout_s
  while time.time() < deadline and text not in path.read_text():
    time.sleep(0.05)
