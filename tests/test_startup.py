"""Start-up (issue 28): the phases a run logs and records before its first step, the compilation
cache that lets a restarted run load its programs instead of compiling them, and the train step
compiling beside the state's initialisation."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, load_config, pretrax_env
from pretrax import metrics, run_config, startup, step_compile, train
from pretrax import state as state_lib


def test_the_clock_sums_its_phases_into_the_record_and_the_line():
  clock = startup.StartupClock(last=0.0)
  clock.seconds = {'imports': 1.0, 'backend': 0.5, 'data': 2.0, 'state': 3.0}
  clock.seconds['compile'] = 0.25
  clock.seconds['first_step'] = 0.25
  clock.step_compile_s = 4.0
  record = clock.record()
  assert record['startup_s'] == 7.0
  assert {k for k in record if k.endswith('_s')} == {
    'startup_s',
    'startup_step_compile_s',
    *(f'startup_{p}_s' for p in startup.PHASES),
  }
  assert record['startup_programs_loaded'] == record['startup_programs_compiled'] == 0
  line = clock.line()
  assert line.startswith('start-up: 7.0 s to the first step (imports 1.0, backend 0.5, data 2.0')
  assert 'first step 0.2' in line and 'compiled in 4.0 s' in line and 'no compilation cache' in line


def test_a_phase_marked_twice_adds_up_and_skip_leaves_time_out(monkeypatch):
  now = iter([10.0, 12.0, 15.0, 16.0])
  monkeypatch.setattr(startup.time, 'perf_counter', lambda: next(now))
  clock = startup.StartupClock(last=9.0)
  clock.mark('data')  # 10 - 9
  clock.skip()  # 12: 10..12 counted nowhere.
  clock.mark('state')  # 15 - 12
  clock.mark('data')  # 16 - 15
  assert clock.seconds == {'data': 2.0, 'state': 3.0}
  assert clock.total == 5.0


def test_imports_count_from_the_process_start():
  """/proc's start time, read right: a process that sleeps 1 s before asking has been up at least
  that long (and not minutes: a wrong field or clock gives nonsense)."""
  script = (
    'import time; time.sleep(1.0); from pretrax import startup; '
    'print(startup._seconds_since_process_start())'
  )
  out = subprocess.run(
    [sys.executable, '-c', script], env=pretrax_env(), capture_output=True, text=True, check=True
  ).stdout
  assert 1.0 <= float(out.split()[-1]) < 30.0, out


def test_cache_directory_settings(monkeypatch, tmp_path):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.delenv('PRETRAX_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert startup.cache_directory('auto', 'w') == str(tmp_path / 'xdg' / 'pretrax' / 'xla')
  monkeypatch.setenv('PRETRAX_CACHE_DIR', str(tmp_path / 'mine'))
  assert startup.cache_directory('auto', 'w') == str(tmp_path / 'mine' / 'xla')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'jax'))
  assert startup.cache_directory('auto', 'w') == str(tmp_path / 'jax')
  assert startup.cache_directory('workdir', 'runs/a') == os.path.join('runs/a', 'xla_cache')
  assert startup.cache_directory('/some/dir', 'runs/a') == '/some/dir'
  assert startup.cache_directory('none', 'runs/a') is None


def _train(workdir, steps: int, cache: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'pretrax.cli',
      'train',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      f'--config.steps={steps}',
      f'--config.compile_cache={cache}',
      '--config.checkpoint.every=2',
      '--config.log_every=1',
      '--config.eval_batches=1',
      '--config.sample.length=0',
      PEAK_FLOPS_ARG,
    ],
    cwd=REPO,
    env=pretrax_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


def _startup_records(workdir) -> list[dict]:
  return [r for r in metrics.read_metrics(str(workdir)) if 'startup_s' in r]


def _losses(workdir) -> dict[int, float]:
  return {r['step']: r['loss'] for r in metrics.read_metrics(str(workdir)) if 'loss' in r}


def test_a_restarted_run_loads_its_programs_from_the_cache_and_trains_the_same(tmp_path):
  """`pretrax train` logs its start-up phases and writes them to metrics.jsonl; restarted with the
  cache the first run filled, it loads its programs instead of compiling them, and the loaded
  step computes exactly what a freshly compiled one does."""
  cache, run = tmp_path / 'cache', tmp_path / 'run'
  first = _train(run, 2, str(cache))
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'start-up: ' in first.stdout and f'compilation cache {cache}' in first.stdout
  (record,) = _startup_records(run)
  assert record['step'] == 1
  phases = [record[f'startup_{p}_s'] for p in startup.PHASES]
  assert all(p >= 0 for p in phases) and record['startup_s'] == pytest.approx(sum(phases))
  assert record['startup_step_compile_s'] > 0
  assert record['startup_programs_loaded'] == 0 and record['startup_programs_compiled'] >= 2
  assert os.listdir(cache)

  uncached = tmp_path / 'uncached'
  shutil.copytree(run, uncached)
  again = _train(run, 4, str(cache))  # Resumes at step 2: restores, then steps 3 and 4.
  assert again.returncode == 0, again.stderr[-3000:]
  restart = _startup_records(run)[-1]
  assert restart['step'] == 3
  # The train step (and the evaluation's) came from the cache; nothing new was compiled.
  assert restart['startup_programs_loaded'] >= 1 and restart['startup_programs_compiled'] == 0

  without = _train(uncached, 4, 'none')
  assert without.returncode == 0, without.stderr[-3000:]
  assert 'no compilation cache' in without.stdout
  cold = _startup_records(uncached)[-1]
  assert cold['startup_programs_loaded'] == cold['startup_programs_compiled'] == 0
  assert _losses(run) == _losses(uncached)  # Steps 1-4, bit for bit.


def test_the_step_compiles_while_the_state_initialises(monkeypatch, tmp_path, corpus_path):
  """The compile starts on its own thread before the state is built on device, and ends after
  that began: neither waits for the other (the order of events, not a timing)."""
  events = []
  real_compile, real_init = step_compile.compile_train_step, state_lib.RunState.init

  def compile_step(c, run):
    events.append('compile starts')
    compiled = real_compile(c, run)
    events.append('compile ends')
    return compiled

  def init(self, seed):
    events.append('init starts')
    # Hold the state back until the compile has begun: it cannot have waited for us.
    while 'compile starts' not in events:
      pass
    state = jax.block_until_ready(real_init(self, seed))
    events.append('init ends')
    return state

  monkeypatch.setattr(step_compile, 'compile_train_step', compile_step)
  monkeypatch.setattr(state_lib.RunState, 'init', init)
  c = load_config('tiny')
  c.data.path, c.steps, c.peak_flops, c.compile_cache = corpus_path, 2, 1e11, 'none'
  result = train.train(run_config.build(c), str(tmp_path))
  assert events.index('compile starts') < events.index('init ends')
  assert events.index('init starts') < events.index('compile ends')
  assert np.isfinite(result['train']['loss'])


def test_a_first_batch_unlike_the_compiled_one_is_refused():
  c = run_config.build(load_config('tiny'), check_data=False)
  run = state_lib.build(c, 64)
  compiled = step_compile.CompiledStep(
    step=lambda *a: None, batch=run.abstract_batch(c), seconds=0.0
  )
  same = jax.tree.map(
    lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), compiled.batch
  )
  step_compile.check_batch(compiled, same)
  longer = same._replace(inputs=jax.numpy.zeros((c.data.batch_size, c.data.seq_len + 1), 'int32'))
  with pytest.raises(AssertionError, match='not the one the train step was compiled for'):
    step_compile.check_batch(compiled, longer)


def test_throughput_records_the_startup_phases(tmp_path, corpus_path):
  """benchmarks/throughput.py's row carries the same phases as train's record."""
  out = tmp_path / 'row.json'
  result = subprocess.run(
    [
      sys.executable,
      'benchmarks/throughput.py',
      '--config=configs/tiny.py',
      f'--config.data.path={corpus_path}',
      '--config.compile_cache=none',
      PEAK_FLOPS_ARG,
      '--steps=1',
      '--warmup=0',
      '--pipeline_batches=1',
      f'--json={out}',
    ],
    cwd=REPO,
    env=pretrax_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(out.read_text())
  phases = [row[f'startup_{p}_s'] for p in startup.PHASES]
  assert all(p >= 0 for p in phases) and row['startup_s'] == pytest.approx(sum(phases))
  assert row['startup_step_compile_s'] == row['compile_s'] > 0
  assert row['startup_over_compile'] == pytest.approx(row['startup_s'] / row['compile_s'])
  assert 'start-up: ' in result.stdout


def test_the_cache_works_where_filelock_is_missing(monkeypatch, tmp_path):
  """JAX caps its cache only with filelock, and a cap without it turns the cache off without a
  word: on a bare install (a GPU image without filelock) the cache stays unbounded, and works."""
  from jax._src import lru_cache

  monkeypatch.setattr(lru_cache, 'filelock', None)
  real_find_spec = startup.importlib.util.find_spec
  monkeypatch.setattr(
    startup.importlib.util,
    'find_spec',
    lambda name, *a: None if name == 'filelock' else real_find_spec(name, *a),
  )
  before_dir = startup._jax_option('jax_compilation_cache_dir')
  before_size = startup._jax_option('jax_compilation_cache_max_size')
  jax.config.update('jax_compilation_cache_max_size', -1)
  try:
    startup.use_compile_cache(str(tmp_path / 'cache'), 'unused')
    jax.jit(lambda x: jnp_sin_sum(x) * 3.0).lower(np.ones(7, np.float32)).compile()
    assert any(n.endswith('-cache') for n in os.listdir(tmp_path / 'cache'))
  finally:
    jax.config.update('jax_compilation_cache_max_size', before_size)
    jax.config.update('jax_compilation_cache_dir', before_dir)
    startup.compilation_cache.reset_cache()


def jnp_sin_sum(x):
  return jax.numpy.sum(jax.numpy.sin(x) ** 3)
