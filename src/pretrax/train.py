"""The training loop: config -> tokenizer -> data -> state -> step -> metrics -> eval -> save.

Running `train` again on the same workdir resumes from the latest checkpoint: the same parameters,
optimizer state, data position and step, so the run continues as if it had never stopped.
"""

from collections.abc import Callable, Iterable, Iterator
import copy
import dataclasses
import itertools
import json
import shutil
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pretrax import checkpoint
from pretrax import config as config_lib
from pretrax import faults
from pretrax import metrics as metrics_lib
from pretrax import paths
from pretrax import plan as plan_lib
from pretrax import sample as sample_lib
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax import trained
from pretrax.data import dataset
from pretrax.data import objectives as objectives_lib
from pretrax.downstream import scoring
from pretrax.downstream import tasks as tasks_lib

TOKENIZER_FILE = 'tokenizer.model'


def log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def train(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final train and eval metrics.

  Raises faults.Stopped after saving when a SIGTERM or SIGINT asked it to stop.
  """
  config_lib.validate(c, num_devices=jax.device_count())
  faults.check_writable(workdir)
  with faults.WorkdirLock(workdir), faults.StopSignals() as stop:
    mngr = checkpoint.manager(workdir, keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)
    try:
      return _train(c, workdir, stop, mngr)
    finally:
      # However the run ends (done, stopped, an error), a save in flight commits first and the
      # manager's threads end: a checkpoint is complete or absent, never half-written.
      try:
        checkpoint.wait(mngr)
      finally:
        mngr.close()


def _train(c: ml_collections.ConfigDict, workdir: str, stop: faults.StopSignals,
           mngr: checkpoint.ocp.CheckpointManager) -> dict[str, Any]:
  # ---- Config and data ----------------------------------------------------------------------
  checkpoint.check_resumable(mngr, c)
  data = load_data(c, workdir, has_checkpoints=mngr.latest_step() is not None)
  if c.objective != 'causal_lm':
    log(f'objective: {c.objective}')

  # ---- State: fresh, or the newest intact checkpoint ----------------------------------------
  run = state_lib.build(c, data.tok.vocab_size, num_classes=len(data.labels))
  state, start = _initial_state(c, workdir, mngr, run)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract))
  faults.check_free_space(workdir, state_bytes, c.checkpoint.keep)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract['params']))
  log(f'model: {c.model.flavour}, {num_params:,} parameters, mesh {dict(run.mesh.shape)}')

  # ---- Steps, bookkeeping, the loop ---------------------------------------------------------
  evaluate = Evaluator(c, _evaluator(c, run, data), _task_scorer(c, run, data))
  run_log = RunLog.create(c, workdir, run, start, latest_step=mngr.latest_step)
  trace = _StepTrace(c.profile_steps, workdir)
  compile_s = 0.0
  try:
    if start < c.steps:
      batches = _global_batches(c, run, data, start)
      first = next(batches)
      train_step, compile_s = _compiled_train_step(c, run, state, first)
      log(f'compiled the train step in {compile_s:.1f} s; MFU against '
          f'{run_log.peak / 1e9:,.0f} GFLOP/s ({run_log.peak_source})')
      run_log.restart_clock()
      state = _loop(c, state, start, itertools.chain([first], batches), train_step, evaluate,
                    run_log,
                    lambda step, s: checkpoint.save(mngr, step, s, run_log.config_json),
                    stop, trace)
    else:
      log(f'already at step {start} of {c.steps}: nothing to train (raise --config.steps to go on).')
  finally:
    trace.close()
    try:
      checkpoint.wait(mngr)
    finally:
      run_log.writer.close()

  text = _final_sample(c, run, state['params'], data)
  log(f'outputs in {paths.path(workdir)}: metrics.jsonl, TensorBoard events, checkpoints/, '
      f'{TOKENIZER_FILE}')
  return {'train': run_log.last_train, 'eval': run_log.last_eval, 'state': state,
          'compile_s': compile_s, 'peak_flops': run_log.peak,
          'flops_per_step': run_log.flops_per_step, 'sample': text}


def _loop(c: ml_collections.ConfigDict, state: Any, start: int,
          batches: Iterator[dict[str, jax.Array]], train_step: Callable, evaluate: 'Evaluator',
          run_log: 'RunLog', save: Callable[[int, Any], None], stop: faults.StopSignals,
          trace: '_StepTrace') -> Any:
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


def _initial_state(c: ml_collections.ConfigDict, workdir: str,
                   mngr: checkpoint.ocp.CheckpointManager,
                   run: state_lib.RunState) -> tuple[Any, int]:
  """(state, step): a fresh initialisation (or `init_from`'s parameters with a fresh optimizer),
  or the newest intact checkpoint."""
  if mngr.latest_step() is None:
    if c.init_from:
      return run.state_from(trained.initial_params(c, run, log)), 0
    return run.init(c.seed), 0
  state = checkpoint.restore_newest_intact(mngr, workdir, run.abstract,
                                           fallback=c.checkpoint.fallback, log=log)
  start = int(state['step'])
  log(f'resumed from {checkpoint.directory(workdir)}/{start} at step {start}')
  return state, start


def _global_batches(c: ml_collections.ConfigDict, run: state_lib.RunState,
                    data: dataset.RunData, start: int) -> Iterator[dict[str, jax.Array]]:
  """This process's batches from step `start` on, as global arrays over the mesh."""
  batches = data.train_batches(start)
  if c.fault.poison_step:
    batches = faults.poisoned(batches, c.fault.poison_step, start)
  for batch in batches:
    yield {k: jax.make_array_from_process_local_data(run.batch_sharding, v)
           for k, v in batch.items()}


def _compiled_train_step(c: ml_collections.ConfigDict, run: state_lib.RunState, state: Any,
                         first_batch: dict[str, jax.Array]) -> tuple[Callable, float]:
  """The train step compiled for the run's batches, refused if it cannot fit a device; and the
  seconds compiling took."""
  step_fn = step_lib.jit_train_step(run.model_def, run.optimizer, run.schedule,
                                    step_lib.step_config(c),
                                    activation_sharding=run.activation_sharding,
                                    out_shardings=(run.shardings, None))
  started = time.perf_counter()
  compiled = step_fn.lower(state, first_batch).compile()
  seconds = time.perf_counter() - started
  _check_fits(compiled)
  return compiled, seconds


# ---- Evaluation -------------------------------------------------------------------------------


def _evaluator(c: ml_collections.ConfigDict, run: state_lib.RunState,
               data: dataset.RunData) -> Callable[[Any], dict[str, float]]:
  """params -> the held-out metrics of every source (at most c.eval_batches batches each)."""
  eval_step = step_lib.jit_eval_step(run.model_def, len(data.objectives.names),
                                     activation_sharding=run.activation_sharding)
  bytes_per_token = jnp.asarray(data.tok.bytes_per_token())
  baseline_id = jnp.int32(data.baseline_id)

  def sums_of(params: Any, batches: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
    sums = None
    for i, batch in enumerate(batches):
      if c.eval_batches and i >= c.eval_batches:
        break
      batch = {k: jax.make_array_from_process_local_data(run.batch_sharding, v)
               for k, v in batch.items()}
      out = jax.device_get(eval_step(params, batch, bytes_per_token, baseline_id))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    return sums

  def evaluate(params: Any) -> dict[str, float]:
    per_source = {name: sums_of(params, batches()) for name, batches in data.eval_sets.items()}
    return eval_record(c, data.objectives.names, per_source)

  return evaluate


def _task_scorer(c: ml_collections.ConfigDict, run: state_lib.RunState,
                 data: dataset.RunData) -> Callable[[Any], dict[str, float]] | None:
  """params -> the downstream tasks' metrics (eval.tasks), or None when there are none. The tasks
  are read once; the scoring function compiles once per batch shape."""
  if not c.eval.tasks:
    return None
  tasks = tasks_lib.load_all([n.strip() for n in c.eval.tasks.split(',') if n.strip()],
                             c.eval.limit or None)
  log(f'downstream tasks every {c.eval.tasks_every or c.eval_every} steps: '
      + ', '.join(f'{t.name} ({len({r.doc_id for r in t.requests})} questions)' for t in tasks))

  def score(params: Any) -> dict[str, float]:
    results = scoring.score_tasks(run.model_def, params, data.tok, tasks, seq_len=c.data.seq_len,
                                  batch_tokens=_TASK_BATCH_TOKENS)
    return {f'task_{name.replace(":", "_")}_{k}': float(v) for name, metrics in results.items()
            for k, v in metrics.items() if k in ('acc', 'acc_norm', 'bpb', 'chance')}

  return score


_TASK_BATCH_TOKENS = 4096  # In-loop scoring: logits of this many tokens at once, beside the state.


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """What is evaluated at a step: the held-out loss every eval_every steps, the downstream tasks
  every eval.tasks_every (default eval_every), both at the last step."""
  c: ml_collections.ConfigDict
  held_out: Callable[[Any], dict[str, float]]
  tasks: Callable[[Any], dict[str, float]] | None

  def _tasks_due(self, step: int) -> bool:
    every = self.c.eval.tasks_every or self.c.eval_every
    return self.tasks is not None and (step % every == 0 or step == self.c.steps)

  def due(self, step: int) -> bool:
    return step % self.c.eval_every == 0 or step == self.c.steps or self._tasks_due(step)

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    record = {}
    if step % self.c.eval_every == 0 or step == self.c.steps:
      record.update(self.held_out(params))
    if self._tasks_due(step):
      record.update(self.tasks(params))
    return record


def eval_record(c: ml_collections.ConfigDict, objective_names: tuple[str, ...],
                per_source: dict[str, dict[str, Any]]) -> dict[str, float]:
  """The eval metrics from the summed eval-step outputs of each source."""
  sums = jax.tree.map(lambda *x: sum(x), *per_source.values())
  weight = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / weight
  result = {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 50.0))),
            'eval_accuracy': float(sums['correct_sum']) / weight,
            'eval_baseline_accuracy': float(sums['baseline_correct_sum']) / weight}
  if c.objective in ('causal_lm', 'sft'):  # Bits per byte mean something for plain text only.
    result['eval_bits_per_byte'] = (float(sums['loss_sum']) / np.log(2)
                                    / max(float(sums['byte_sum']), 1.0))
  if c.objective == 'sft':  # Responses that greedy decoding from their prompts gives exactly.
    result['eval_exact_match'] = float(sums['exact_sum']) / max(float(sums['answer_sum']), 1.0)
  for name in objective_names if len(objective_names) > 1 else ():
    k = config_lib.OBJECTIVES.index(name)
    result[f'eval_loss_{name}'] = (float(sums['group_loss_sum'][k])
                                   / max(float(sums['group_weight_sum'][k]), 1.0))
  for name, source_sums in per_source.items() if len(per_source) > 1 else ():
    result[f'eval_loss_{name}'] = (float(source_sums['loss_sum'])
                                   / max(float(source_sums['weight_sum']), 1.0))
  return result


# ---- Metrics: the run's bookkeeping -----------------------------------------------------------


@dataclasses.dataclass
class RunLog:
  """What the loop records: each step's metrics fetched a step late (so dispatch stays ahead) and
  checked for non-finite values, written and printed every log_every steps with rates; the
  updates skipped since the last record; the last train and eval records."""
  c: ml_collections.ConfigDict
  writer: metrics_lib.MetricsWriter
  latest_step: Callable[[], int | None]  # The newest checkpoint, for the non-finite message.
  config_json: dict[str, Any]
  tokens_per_step: int
  flops_per_step: float
  peak: float
  peak_source: str
  clock: tuple[float, int]  # (time, step) the rates are measured from.
  pending: tuple[int, Any] | None = None  # (step, device metrics) not fetched yet.
  skipped: int = 0
  spikes: int = 0
  last_train: dict[str, Any] = dataclasses.field(default_factory=dict)
  last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, c: ml_collections.ConfigDict, workdir: str, run: state_lib.RunState,
             start: int, latest_step: Callable[[], int | None]) -> 'RunLog':
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start,
                                       enabled=jax.process_index() == 0)
    if writer.torn:
      log(f'metrics.jsonl: dropped {writer.torn} line(s) cut mid-write by a crash; the steps '
          'they held are written again as the run goes on')
    peak, peak_source = metrics_lib.peak_flops(c.peak_flops)
    tokens = c.data.batch_size * c.data.seq_len
    return cls(c=c, writer=writer, latest_step=latest_step,
               config_json=json.loads(c.to_json()), tokens_per_step=tokens,
               flops_per_step=metrics_lib.flops_per_token(run.model_cfg, c.data.seq_len) * tokens,
               peak=peak, peak_source=peak_source, clock=(time.perf_counter(), start))

  def restart_clock(self) -> None:
    """Time from here on is training time (not compiling, not evaluating)."""
    self.clock = (time.perf_counter(), self.clock[1])

  def push(self, step: int, device_metrics: Any) -> None:
    self.drain()
    self.pending = (step, device_metrics)

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
          'run the same command, or set --config.optim.skip_nonfinite=true to skip such steps.')

  def _write_train(self, step: int, values: dict[str, float]) -> None:
    now = time.perf_counter()
    seconds = (now - self.clock[0]) / max(step - self.clock[1], 1)
    self.clock = (now, step)
    record = {'step': step, **values, 'tokens_per_s': self.tokens_per_step / seconds,
              'mfu': self.flops_per_step / seconds / self.peak}
    o = self.c.optim
    if o.skip_nonfinite or o.spike_window:
      record['skipped_steps'], self.skipped = self.skipped, 0
    if o.spike_window:
      record['spike_steps'], self.spikes = self.spikes, 0
    self.writer.write(record)
    self.last_train = record
    log(metrics_lib.progress_line(step=step, total=self.c.steps, loss=values['loss'],
                                  lr=values['lr'], tokens_per_s=record['tokens_per_s'],
                                  mfu=record['mfu'], ms_per_step=1000 * seconds,
                                  eta_s=seconds * (self.c.steps - step)))

  def write_eval(self, step: int, result: dict[str, float]) -> None:
    self.last_eval = {'step': step, **result}
    self.writer.write(self.last_eval)
    log(_eval_line(step, self.last_eval))
    self.restart_clock()  # Evaluation time is not training time.


def _final_sample(c: ml_collections.ConfigDict, run: state_lib.RunState, params: Any,
                  data: dataset.RunData) -> str:
  """What the run prints at its end: generated text, or a masked LM's fill-ins on held-out text."""
  if not c.sample.length:
    return ''
  if c.objective == 'masked_lm':
    examples = []
    for i, window in enumerate(data.held_out_pieces()):
      if sum(len(e['inputs']) for e in examples) >= c.sample.length:
        break
      examples.append(data.objectives.build(window, seed=c.seed,
                                            stream=objectives_lib.EVAL_STREAM, epoch=0, index=i))
    text = sample_lib.fill_in(run.model_def, params, data.tok, examples)
    log(f'---- masked-token predictions on held-out text ----\n{text}\n----')
    return text
  if c.objective == 'sft':
    text = _answers(c, run, params, data)
    log(f'---- greedy answers to held-out prompts ----\n{text}\n----')
    return text
  if c.objective == 'classification':
    return ''
  text = sample_lib.generate(run.model_def, params, data.tok, c.sample.prompt,
                             length=c.sample.length, seq_len=c.data.seq_len,
                             temperature=c.sample.temperature, top_k=c.sample.top_k, seed=c.seed)
  log(f'---- sample (temperature {c.sample.temperature}) ----\n{text}\n----')
  return text


def _answers(c: ml_collections.ConfigDict, run: state_lib.RunState, params: Any,
             data: dataset.RunData, count: int = 3) -> str:
  """An sft run's greedy answers to its first held-out prompts, beside the expected ones."""
  lines = []
  for ids, weights in itertools.islice(data.held_out_pieces(), count):
    first = int(np.argmax(weights > 0))  # The response starts at the first weighted token.
    prompt, expected = data.tok.decode(ids[:first]), data.tok.decode(ids[first:])
    answer = sample_lib.generate(run.model_def, params, data.tok, prompt,
                                 length=min(len(ids) - first + 8, c.sample.length),
                                 seq_len=c.data.seq_len, temperature=0.0)[len(prompt):]
    lines += [f'prompt:   {prompt!r}', f'answer:   {answer!r}', f'expected: {expected!r}']
  return '\n'.join(lines)


class _StepTrace:
  """A jax.profiler trace of the steps `profile_steps` names (1-based, as logged), into
  WORKDIR/profile (one subdirectory per process when there are several). The profiler writes
  local files: for a bucket workdir it writes to a temporary directory, uploaded when it ends."""

  def __init__(self, spec: str, workdir: str):
    self.steps = config_lib.profile_steps(spec)
    self.dir = paths.join(workdir, 'profile')
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
    if self.active and step == self.steps[1]:
      jax.block_until_ready(state)  # The last traced step finishes inside the trace.
      self.close()
      log(f'profile of steps {self.steps[0]}-{step} in {self.dir} '
          '(open with TensorBoard\'s profile plugin or xprof)')

  def close(self) -> None:
    """Ends a trace still open (a run that ended or failed inside the traced steps)."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      if self.local_dir != self.dir:
        paths.upload_tree(self.local_dir, self.dir)
        shutil.rmtree(self.local_dir, ignore_errors=True)


def load_data(c: ml_collections.ConfigDict, workdir: str,
              has_checkpoints: bool = False) -> dataset.RunData:
  """The run's tokenizer and batches (see data/dataset.py); the tokenizer (and a classifier's
  labels) are kept in the workdir for `sample`, `eval` and `export`. A run that starts from
  another's parameters (init_from) uses that run's tokenizer unless tokenizer.path names one.
  (Also used by benchmarks/throughput.py to time the pipeline alone.)"""
  if c.init_from and not c.tokenizer.path:
    c = copy.deepcopy(c)
    c.tokenizer.path = trained.source_tokenizer(c.init_from)
  data = dataset.load(c, workdir, process_index=jax.process_index(),
                      process_count=jax.process_count(), has_checkpoints=has_checkpoints, log=log)
  if jax.process_index() == 0:
    data.tok.save(paths.join(workdir, TOKENIZER_FILE))
    if c.objective == 'classification':
      paths.path(paths.join(workdir, trained.LABELS_FILE)).write_text(json.dumps(list(data.labels)))
  return data


def _check_fits(compiled) -> None:
  """Refuses a step that cannot fit a device, before it runs out of memory mid-step."""
  analysis = compiled.memory_analysis()
  have = plan_lib.device_memory_bytes(jax.local_devices()[0])
  if analysis is None or have is None:
    return
  need, temp = plan_lib.peak_bytes(analysis), int(analysis.temp_size_in_bytes)
  if need > have:
    gib = 1 << 30
    raise config_lib.ConfigError(
        f'the train step needs {need / gib:,.1f} GiB per device ({temp / gib:,.1f} GiB of it '
        f'activations and other temporaries) and a device has {have / gib:,.1f} GiB: lower '
        'data.batch_size or data.seq_len, raise optim.grad_accum_steps, set model.remat=full, or '
        'shard over more devices (see `pretrax plan`).')


def _eval_line(step: int, e: dict[str, float]) -> str:
  tasks = [f'{k[len("task_"):-len("_acc")]} accuracy {v:.3f} (chance '
           f'{e[k[:-len("acc")] + "chance"]:.3f})' for k, v in e.items()
           if k.startswith('task_') and k.endswith('_acc')]
  if 'eval_loss' not in e:
    return f'downstream at step {step}: ' + ', '.join(tasks)
  parts = [f'loss {e["eval_loss"]:.4f}', f'perplexity {e["eval_perplexity"]:.2f}']
  if 'eval_bits_per_byte' in e:
    parts.append(f'{e["eval_bits_per_byte"]:.3f} bits/byte')
  if 'eval_exact_match' in e:
    parts.append(f'exact match {e["eval_exact_match"]:.3f}')
  parts.append(f'accuracy {e["eval_accuracy"]:.3f} (most frequent token: '
               f'{e["eval_baseline_accuracy"]:.3f})')
  parts += [f'{k[len("eval_"):]} {v:.4f}' for k, v in e.items() if k.startswith('eval_loss_')]
  return f'eval at step {step}: ' + ', '.join(parts + tasks)


