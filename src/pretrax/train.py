"""The training loop: config -> tokenizer -> data -> state -> step -> metrics -> eval -> save.

Running `train` again on the same workdir resumes from the latest checkpoint: the same parameters,
optimizer state, data position and step, so the run continues as if it had never stopped.
"""

from collections.abc import Callable, Iterator
from concurrent import futures
import dataclasses
import itertools
import json
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np

from pretrax import (
  checkpoint,
  config_check,
  config_specs,
  faults,
  paths,
  run_config,
  saved_run,
  step_compile,
  train_eval,
)
from pretrax import metrics as metrics_lib
from pretrax import sample as sample_lib
from pretrax import startup as startup_lib
from pretrax import state as state_lib
from pretrax import workdir as workdir_lib
from pretrax.config_types import RunConfig
from pretrax.data import dataset
from pretrax.data import objectives as objectives_lib
from pretrax.data.batch import Batch
from pretrax.model import fp8 as fp8_lib


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def train(
  c: RunConfig, workdir: str, clock: startup_lib.StartupClock | None = None
) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final train and eval metrics. `c` is
  built (validated, resolved) by run_config.build for this run's devices. `clock` holds the
  start-up phases the caller timed (the CLI: imports and backend); None: timed from here.

  Raises faults.Stopped after saving when a SIGTERM or SIGINT asked it to stop.
  """
  clock = clock or startup_lib.StartupClock.from_now()
  faults.check_writable(workdir)
  # Before anything compiles: JAX opens its cache at a process's first compile.
  clock.cache_directory = startup_lib.use_compile_cache(c.compile_cache, workdir)
  with faults.WorkdirLock(workdir), faults.StopSignals() as stop:
    mngr = checkpoint.manager(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    try:
      return _train(c, workdir, stop, mngr, clock)
    finally:
      # However the run ends (done, stopped, an error), a save in flight commits first and the
      # manager's threads end: a checkpoint is complete or absent, never half-written.
      try:
        checkpoint.wait(mngr)
      finally:
        mngr.close()


def _train(
  c: RunConfig,
  workdir: str,
  stop: faults.StopSignals,
  mngr: checkpoint.ocp.CheckpointManager,
  clock: startup_lib.StartupClock,
) -> dict[str, Any]:
  # ---- Config and data ----------------------------------------------------------------------
  checkpoint.check_resumable(mngr, c)
  for caution in config_check.cautions(c, fp8_gains=fp8_lib.gains_on(jax.devices()[0])):
    log(f'warning: {caution}')
  data = load_data(c, workdir, has_checkpoints=mngr.latest_step() is not None)
  if c.objective != 'causal_lm':
    log(f'objective: {c.objective}')
  clock.mark('data')

  # ---- State: fresh, or the newest intact checkpoint, while the step compiles ---------------
  run = state_lib.build(c, data.tok.vocab_size, num_classes=len(data.labels))
  latest = mngr.latest_step()
  compiling = step_compile.start_compiling(c, run) if latest is None or latest < c.steps else None
  state, start = _initial_state(
    c, workdir, mngr, run, saved_run.label_pieces(data.tok, data.labels)
  )
  _check_space_and_describe(c, workdir, run)
  run_log = RunLog.create(c, workdir, run, start, mngr.latest_step, clock)  # On CPU: the peak.
  jax.block_until_ready(state)  # Initialised or restored on device: the phase's real end.
  clock.mark('state')

  # ---- Steps, bookkeeping, the loop ---------------------------------------------------------
  evaluate = train_eval.Evaluator(
    c, train_eval.held_out(c, run, data), train_eval.task_scorer(c, run, data, log)
  )
  trace = _StepTrace(c.profile_steps, workdir)
  compile_s = 0.0
  try:
    if start < c.steps:
      assert compiling is not None  # Started unless the newest checkpoint had every step.
      batches, compiled = _first_batch_and_step(c, run, data, start, compiling, clock)
      compile_s = compiled.seconds
      log(
        f'compiled the train step in {compile_s:.1f} s (beside the state and data); MFU '
        f'against {run_log.peak / 1e9:,.0f} GFLOP/s ({run_log.peak_source})'
      )
      run_log.restart_clock()
      state = _loop(
        c,
        state,
        start,
        batches,
        compiled.step,
        evaluate,
        run_log,
        lambda step, s: checkpoint.save(mngr, step, s, run_log.config_json),
        stop,
        trace,
      )
    else:
      log(
        f'already at step {start} of {c.steps}: nothing to train (raise --config.steps to go on).'
      )
  finally:
    trace.close()
    try:
      checkpoint.wait(mngr)
    finally:
      run_log.writer.close()

  text = _final_sample(c, run, state['params'], data)
  log(
    f'outputs in {paths.path(workdir)}: metrics.jsonl, TensorBoard events, checkpoints/, '
    f'{workdir_lib.TOKENIZER_FILE}'
  )
  return {
    'train': run_log.last_train,
    'eval': run_log.last_eval,
    'state': state,
    'compile_s': compile_s,
    'peak_flops': run_log.peak,
    'flops_per_step': run_log.flops_per_step,
    'sample': text,
  }


def _check_space_and_describe(c: RunConfig, workdir: str, run: state_lib.RunState) -> None:
  """Refuses a workdir without room for the checkpoints kept; logs the model's size and mesh."""
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract))
  faults.check_free_space(workdir, state_bytes, c.checkpoint.keep)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract['params']))
  log(f'model: {c.model.flavour}, {num_params:,} parameters, mesh {dict(run.mesh.shape)}')


def _first_batch_and_step(
  c: RunConfig,
  run: state_lib.RunState,
  data: dataset.RunData,
  start: int,
  compiling: 'futures.Future[step_compile.CompiledStep]',
  clock: startup_lib.StartupClock,
) -> tuple[Iterator[Batch[jax.Array]], step_compile.CompiledStep]:
  """The batches from step `start` on (the first one fetched) and the compiled step, once it is
  done and checked against that first batch; the clock marks both waits."""
  batches = _global_batches(c, run, data, start)
  first = next(batches)
  clock.mark('data')  # The held-out split, the tasks and the first batch: data again.
  compiled = compiling.result()
  step_compile.check_batch(compiled, first)
  clock.mark('compile')  # What is left of it once the state and data are ready.
  clock.step_compile_s = compiled.seconds
  return itertools.chain([first], batches), compiled


def _loop(
  c: RunConfig,
  state: Any,
  start: int,
  batches: Iterator[Batch[jax.Array]],
  train_step: Callable,
  evaluate: train_eval.Evaluator,
  run_log: 'RunLog',
  save: Callable[[int, Any], None],
  stop: faults.StopSignals,
  trace: '_StepTrace',
) -> Any:
  """Steps start+1 .. c.steps: step -> log -> eval -> save, stopping (saved) on a signal."""
  for step in range(start + 1, c.steps + 1):  # 1-based, as logged.
    batch = next(batches)
    trace.before(step, state)
    state, device_metrics = train_step(state, batch)
    trace.after(step, state)
    run_log.push(step, device_metrics)  # Fetches the previous step's: dispatch stays ahead.
    if evaluate.due(step):
      run_log.drain()
      run_log.write_eval(step, evaluate(step, state['params']))
    stopping = step < c.steps and stop.should_stop(step)
    if step % c.checkpoint.every == 0 or step == c.steps or stopping:
      run_log.drain()  # A non-finite loss stops the run before anything saves it.
      run_log.writer.flush()  # On a bucket, metrics.jsonl is uploaded before the save commits.
      save(step, state)
    if stopping:
      raise faults.Stopped(step, stop.received or 'a stop signal')
  run_log.drain()
  return state


def _initial_state(
  c: RunConfig,
  workdir: str,
  mngr: checkpoint.ocp.CheckpointManager,
  run: state_lib.RunState,
  label_pieces: list[int],
) -> tuple[Any, int]:
  """(state, step): a fresh initialisation (or `init_from`'s parameters with a fresh optimizer,
  a classifier's from its `label_pieces`), or the newest intact checkpoint."""
  if mngr.latest_step() is None:
    if c.init_from:
      return run.state_from(saved_run.initial_params(c, run, log, label_pieces)), 0
    return run.init(c.seed), 0
  state = checkpoint.restore_newest_intact(
    mngr, workdir, run.abstract, fallback=c.checkpoint.fallback, log=log
  )
  start = int(state['step'])
  log(f'resumed from {checkpoint.directory(workdir)}/{start} at step {start}')
  return state, start


def _global_batches(
  c: RunConfig, run: state_lib.RunState, data: dataset.RunData, start: int
) -> Iterator[Batch[jax.Array]]:
  """This process's batches from step `start` on, as global arrays over the mesh."""
  batches = data.train_batches(start)
  if c.fault.poison_step:
    batches = faults.poisoned(batches, c.fault.poison_step, start)
  for batch in batches:
    yield jax.make_array_from_process_local_data(run.batch_sharding, batch)


# ---- Metrics: the run's bookkeeping -----------------------------------------------------------


@dataclasses.dataclass
class RunLog:
  """What the loop records: each step's metrics fetched a step late (so dispatch stays ahead) and
  checked for non-finite values, written and printed every log_every steps with rates; the
  updates skipped since the last record; the last train and eval records."""

  c: RunConfig
  writer: metrics_lib.MetricsWriter
  latest_step: Callable[[], int | None]  # The newest checkpoint, for the non-finite message.
  config_json: dict[str, Any]
  tokens_per_step: int
  flops_per_step: float
  peak: float
  peak_source: str
  clock: tuple[float, int]  # (time, step) the rates are measured from.
  # Marks the first step's end and writes the start-up record then; None once written.
  startup: startup_lib.StartupClock | None = None
  pending: tuple[int, Any] | None = None  # (step, device metrics) not fetched yet.
  skipped: int = 0
  spikes: int = 0
  last_train: dict[str, Any] = dataclasses.field(default_factory=dict)
  last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def create(
    cls,
    c: RunConfig,
    workdir: str,
    run: state_lib.RunState,
    start: int,
    latest_step: Callable[[], int | None],
    startup: startup_lib.StartupClock | None = None,
  ) -> 'RunLog':
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
    if writer.torn:
      log(
        f'metrics.jsonl: dropped {writer.torn} line(s) cut mid-write by a crash; the steps '
        'they held are written again as the run goes on'
      )
    peak, peak_source = metrics_lib.peak_flops(c.peak_flops)
    tokens = c.data.batch_size * c.data.seq_len
    return cls(
      c=c,
      writer=writer,
      latest_step=latest_step,
      config_json=run_config.to_dict(c),
      tokens_per_step=tokens,
      flops_per_step=metrics_lib.flops_per_token(run.model_cfg, c.data.seq_len) * tokens,
      peak=peak,
      peak_source=peak_source,
      clock=(time.perf_counter(), start),
      startup=startup,
    )

  def restart_clock(self) -> None:
    """Time from here on is training time (not compiling, not evaluating)."""
    self.clock = (time.perf_counter(), self.clock[1])

  def push(self, step: int, device_metrics: Any) -> None:
    self.drain()
    self.pending = (step, device_metrics)
    if self.startup is not None:  # The first step of this process: start-up ends here.
      jax.block_until_ready(device_metrics)
      self.startup.mark('first_step')
      self.writer.write({'step': step, **self.startup.record()})
      log(self.startup.line())
      self.startup = None
      self.clock = (time.perf_counter(), step)  # Its time is start-up, not the training rate.

  def drain(self) -> None:
    """Fetches the pending step's metrics (every step: a non-finite loss must stop the run before
    anything saves it); writes and prints them every log_every steps."""
    if self.pending is None:
      return
    step, device_metrics = self.pending
    self.pending = None
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    self.skipped += int(values.pop('skipped', 0))
    self.spikes += int(values.pop('spike', 0))
    self._check_finite(step, values)
    if step % self.c.log_every == 0 or step == self.c.steps:
      self._write_train(step, values)

  def _check_finite(self, step: int, values: dict[str, float]) -> None:
    bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(values[k])]
    if bad and not self.c.optim.skip_nonfinite:
      raise faults.NonFiniteError(
        f'{" and ".join(bad)} went non-finite at step {step} ({values[bad[0]]}); stopped '
        f'without saving, the last checkpoint is step {self.latest_step()}. Fix the cause and '
        'run the same command, or set --config.optim.skip_nonfinite=true to skip such steps.'
      )

  def _write_train(self, step: int, values: dict[str, float]) -> None:
    now = time.perf_counter()
    seconds = (now - self.clock[0]) / max(step - self.clock[1], 1)
    self.clock = (now, step)
    record = {
      'step': step,
      **values,
      'tokens_per_s': self.tokens_per_step / seconds,
      'mfu': self.flops_per_step / seconds / self.peak,
    }
    o = self.c.optim
    if o.skip_nonfinite or o.spike_window:
      record['skipped_steps'], self.skipped = self.skipped, 0
    if o.spike_window:
      record['spike_steps'], self.spikes = self.spikes, 0
    self.writer.write(record)
    self.last_train = record
    log(
      metrics_lib.progress_line(
        step=step,
        total=self.c.steps,
        loss=values['loss'],
        lr=values['lr'],
        tokens_per_s=record['tokens_per_s'],
        mfu=record['mfu'],
        ms_per_step=1000 * seconds,
        eta_s=seconds * (self.c.steps - step),
        imbalance=values.get('moe_imbalance'),
      )
    )

  def write_eval(self, step: int, result: dict[str, float]) -> None:
    self.last_eval = {'step': step, **result}
    self.writer.write(self.last_eval)
    guess = 'label' if self.c.objective == 'classification' else 'token'
    log(train_eval.eval_line(step, self.last_eval, guess))
    self.restart_clock()  # Evaluation time is not training time.


def _final_sample(c: RunConfig, run: state_lib.RunState, params: Any, data: dataset.RunData) -> str:
  """What the run prints at its end: generated text, or a masked LM's fill-ins on held-out text."""
  if not c.sample.length:
    return ''
  if c.objective == 'masked_lm':
    examples: list[objectives_lib.Example] = []
    for i, window in enumerate(data.held_out_pieces()):
      assert isinstance(window, np.ndarray)  # A window of text; sft's pieces are pairs.
      if sum(len(e.inputs) for e in examples) >= c.sample.length:
        break
      examples.append(
        data.objectives.build(
          window, seed=c.seed, stream=objectives_lib.EVAL_STREAM, epoch=0, index=i
        )
      )
    text = sample_lib.fill_in(run.model_def, params, data.tok, examples)
    log(f'---- masked-token predictions on held-out text ----\n{text}\n----')
    return text
  if c.objective == 'sft':
    text = _answers(c, run, params, data)
    log(f'---- greedy answers to held-out prompts ----\n{text}\n----')
    return text
  if c.objective == 'classification':
    return ''
  text = sample_lib.generate(
    run.model_def,
    params,
    data.tok,
    c.sample.prompt,
    length=c.sample.length,
    seq_len=c.data.seq_len,
    temperature=c.sample.temperature,
    top_k=c.sample.top_k,
    seed=c.seed,
  )
  log(f'---- sample (temperature {c.sample.temperature}) ----\n{text}\n----')
  return text


def _answers(
  c: RunConfig,
  run: state_lib.RunState,
  params: Any,
  data: dataset.RunData,
  count: int = 3,
) -> str:
  """An sft run's greedy answers to its first held-out prompts, beside the expected ones."""
  lines = []
  for ids, weights in itertools.islice(data.held_out_pieces(), count):
    first = int(np.argmax(weights > 0))  # The response starts at the first weighted token.
    prompt, expected = data.tok.decode(ids[:first]), data.tok.decode(ids[first:])
    answer = sample_lib.generate(
      run.model_def,
      params,
      data.tok,
      prompt,
      length=min(len(ids) - first + 8, c.sample.length),
      seq_len=c.data.seq_len,
      temperature=0.0,
    )[len(prompt) :]
    lines += [f'prompt:   {prompt!r}', f'answer:   {answer!r}', f'expected: {expected!r}']
  return '\n'.join(lines)


class _StepTrace:
  """A jax.profiler trace of the steps `profile_steps` names (1-based, as logged), into
  WORKDIR/profile (one subdirectory per process when there are several). The profiler writes
  local files: for a bucket workdir it writes to a temporary directory, uploaded when it ends."""

  def __init__(self, spec: str, workdir: str):
    self.steps = config_specs.profile_steps(spec)
    self.dir = workdir_lib.profile_dir(workdir)
    if jax.process_count() > 1:  # Processes on one host would otherwise share a file name.
      self.dir = paths.join(self.dir, f'process_{jax.process_index()}')
    self.local_dir = self.dir
    if self.steps and paths.is_remote(workdir):
      self.local_dir = tempfile.mkdtemp(prefix='pretrax-profile-')
    self.active = False

  def before(self, step: int, state: Any) -> None:
    if self.steps and step == self.steps[0]:
      jax.block_until_ready(state)  # The earlier steps finish outside the trace.
      jax.profiler.start_trace(self.local_dir)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if self.active and self.steps and step == self.steps[1]:
      jax.block_until_ready(state)  # The last traced step finishes inside the trace.
      self.close()
      log(
        f'profile of steps {self.steps[0]}-{step} in {self.dir} '
        "(open with TensorBoard's profile plugin or xprof)"
      )

  def close(self) -> None:
    """Ends a trace still open (a run that ended or failed inside the traced steps)."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      if self.local_dir != self.dir:
        paths.upload_tree(self.local_dir, self.dir)
        shutil.rmtree(self.local_dir, ignore_errors=True)


def load_data(c: RunConfig, workdir: str, has_checkpoints: bool = False) -> dataset.RunData:
  """The run's tokenizer and batches (see data/dataset.py); the tokenizer (and a classifier's
  labels) are kept in the workdir for `sample`, `eval` and `export`. A run that starts from
  another's parameters (init_from) uses that run's tokenizer unless tokenizer.path names one.
  (Also used by benchmarks/throughput.py to time the pipeline alone.)"""
  if c.init_from and not c.tokenizer.path:
    source = saved_run.source_tokenizer(c.init_from)
    c = dataclasses.replace(c, tokenizer=dataclasses.replace(c.tokenizer, path=source))
  data = dataset.load(
    c,
    workdir,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    has_checkpoints=has_checkpoints,
    log=log,
  )
  if jax.process_index() == 0:
    data.tok.save(workdir_lib.tokenizer_file(workdir))
    if c.objective == 'classification':
      labels = paths.path(workdir_lib.labels_file(workdir))
      labels.write_text(json.dumps(list(data.labels)))
  return data
