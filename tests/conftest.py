"""Shared fixtures: small real text, tiny configs, and a way to run the CLI."""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

# Bit-exact comparisons (resume, accumulation) need deterministic reductions on GPUs too; CPUs
# already are. Set before JAX starts, and inherited by the CLI subprocesses.
_DETERMINISTIC = '--xla_gpu_deterministic_ops=true'
if _DETERMINISTIC not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_DETERMINISTIC}'.strip()

# The suite runs the same few tiny programs in many processes: compile each once, on disk (keyed by
# the program, JAX version and flags, so a stale entry is never used). Inherited by subprocesses.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'pretrax-tests-jax-cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt'))

# On a CPU, a run measures the matmul peak for its MFU figure (six 1024x1024 matmuls: ~0.2 s per
# run, more on a busy machine) unless config.peak_flops gives it. Runs whose tests are about other
# things give it; the quickstart and benchmarks/throughput.py still measure, as a user's runs do.
PEAK_FLOPS = 1e11
PEAK_FLOPS_ARG = f'--config.peak_flops={PEAK_FLOPS:g}'


def load_config(name: str, arg: str | None = None):
  """A config from configs/NAME.py, as `--config=configs/NAME.py[:ARG]` would load it."""
  from pretrax import config

  return config.load(os.path.join(REPO, 'configs', f'{name}.py'), arg)


def built_once(tmp_path_factory, name: str, build) -> str:
  """A directory that `build(path)` fills once per test session, for every pytest-xdist worker.

  Workers each run their own session and module fixtures, and --dist worksteal may split a
  module's tests between them: the expensive runs that fixtures make (reused read-only, or copied)
  would otherwise be made twice. The first worker to ask builds under a lock; the others wait and
  reuse the result. Paths are shared too, so a run saved by one worker resumes on another with the
  same config (data.path, data.prepared).
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # The session's directory, above each worker's own.
  path, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)  # Whatever a failed attempt left.
      path.mkdir()
      build(path)
      done.touch()
  return str(path)


@pytest.fixture(scope='session')
def corpus_path(tmp_path_factory) -> str:
  """~200 KB of real text: Tiny Shakespeare where ../shared has it, else Python's own sources."""

  def build(out):
    if os.path.exists(SHAKESPEARE):
      with open(SHAKESPEARE, encoding='utf-8') as f:
        text = f.read(200_000)
    else:
      from pretrax.data import sources

      text = ''
      for path in sources.stdlib_files():
        with open(path, 'rb') as f:
          text += f.read().decode('utf-8', errors='replace')
      text = text[:200_000]
    (out / 'corpus.txt').write_text(text, encoding='utf-8')

  return os.path.join(built_once(tmp_path_factory, 'corpus', build), 'corpus.txt')


@pytest.fixture
def tiny_config(corpus_path):
  c = load_config('tiny')
  c.data.path = corpus_path
  c.data.fallback = ''
  c.peak_flops = PEAK_FLOPS
  return c


def make_store(
  tmp_path,
  documents: list[str],
  *,
  model_type: str = 'char',
  workers: int = 0,
  sentinels: int = 0,
  **data,
):
  """A token store of `documents` (one JSON-lines file, prepared in this process)."""
  import json

  from pretrax import config, run_config
  from pretrax.data import prepare, store

  corpus = tmp_path / 'docs.jsonl'
  corpus.write_text(''.join(json.dumps({'text': d}) + '\n' for d in documents))
  c = config.base_config()
  c.data.path = str(corpus)
  c.tokenizer.model_type, c.tokenizer.vocab_size, c.tokenizer.sentinels = model_type, 300, sentinels
  for k, v in data.items():
    c.data[k] = v
  run = run_config.resolve(c.to_dict())  # Below the command line: resolved, not validated.
  prepare.prepare(run, str(tmp_path / 'store'), workers=workers, log=lambda _: None)
  return store.Store(str(tmp_path / 'store'))


def pretrax_env(*python_path: str) -> dict[str, str]:
  """The environment of a pretrax process the tests start: this one's, with `python_path` first
  on PYTHONPATH."""
  python_path = os.pathsep.join(filter(None, [*python_path, os.environ.get('PYTHONPATH')]))
  return dict(os.environ, PYTHONPATH=python_path)


def run_cli(*args: str, cwd: str = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
  """Runs `pretrax ARGS` in a subprocess, as a user would."""
  return subprocess.run(
    [sys.executable, '-m', 'pretrax.cli', *args],
    cwd=cwd,
    text=True,
    capture_output=True,
    timeout=timeout,
    env=pretrax_env(),
  )


def fake_devices_env(devices: int) -> dict[str, str]:
  """The environment of a process with `devices` fake CPU devices (fixed when JAX starts) that can
  import the tests' helpers."""
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}'
  return dict(
    pretrax_env(os.path.join(REPO, 'tests')), JAX_PLATFORMS='cpu', XLA_FLAGS=flags.strip()
  )


def run_python(script: str, devices: int, timeout: int = 600) -> str:
  """Runs `script` in a fresh Python with `devices` fake CPU devices; returns its stdout."""
  import textwrap

  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(script)],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=timeout,
    env=fake_devices_env(devices),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Involuntary full rematerialization' not in result.stderr  # Shardings XLA can follow.
  return result.stdout


def require(module: str):
  """`module`, imported; else the test fails (never skips) with the command that installs it.

  The dev extras install what the tests compare against (torch, transformers): a run without them
  must not pass by checking less, as a skip would let it.
  """
  import importlib

  try:
    return importlib.import_module(module)
  except ImportError as e:
    missing = e  # Failed outside the handler, so the report is the one line, not the chain.
  pytest.fail(f"{module} is not installed ({missing}): pip install -e '.[dev]'", pytrace=False)
