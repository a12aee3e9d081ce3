"""The training loop: config -> tokenizer -> data -> state -> step -> metrics -> eval -> save.

Running `train` again on the same workdir resumes from the latest checkpoint: the same parameters,
optimizer state, data position and step, so the run continues as if it had never stopped.
"""

from collections.abc import Iterable
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
from pretrax.data import dataset
from pretrax.data import objectives as objectives_lib

# Fields that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = ('steps', 'log_every', 'eval_every', 'eval_batches', 'peak_flops',
                     'checkpoint', 'sample', 'data.worker_count', 'data.prepare_workers', 'fault',
                     'optim.skip_nonfinite', 'mesh', 'profile_steps',
                     # Attention backends and recomputation change speed and memory only.
                     'model.attention_backend', 'model.remat')
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
  # ---- Config -------------------------------------------------------------------------------
  latest = mngr.latest_step()
  if latest is not None:
    try:
      saved_config = checkpoint.restore_config(mngr, latest)
    except Exception:  # Damaged: the restore below names the damage (and may fall back).
      saved_config = None
    if saved_config is not None:
      _check_resumable(c, saved_config, latest)

  # ---- Tokenizer and data -------------------------------------------------------------------
  data = load_data(c, workdir, has_checkpoints=latest is not None)
  tok, objectives, seq_len = data.tok, data.objectives, c.data.seq_len
  if c.objective != 'causal_lm':
    log(f'objective: {c.objective}')

  # ---- State: fresh, or restored with the data position -------------------------------------
  run = state_lib.build(c, tok.vocab_size)
  if latest is None:
    state = run.init(c.seed)
    start = 0
  else:
    state = _restore_newest_intact(c, workdir, mngr, run.abstract)
    start = int(state['step'])
    log(f'resumed from {checkpoint.directory(workdir)}/{start} at step {start}')
  train_iter = data.train_batches(start)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract))
  faults.check_free_space(workdir, state_bytes, c.checkpoint.keep)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract['params']))
  log(f'model: {c.model.flavour}, {num_params:,} parameters, mesh '
      f'{dict(run.mesh.shape)}')

  # ---- Steps --------------------------------------------------------------------------------
  batch_sharding = run.batch_sharding
  train_step = step_lib.jit_train_step(run.model_def, run.optimizer, run.schedule,
                                       step_lib.step_config(c),
                                       activation_sharding=run.activation_sharding,
                                       out_shardings=(run.shardings, None))
  eval_step = step_lib.jit_eval_step(run.model_def, len(objectives.names),
                                     activation_sharding=run.activation_sharding)
  bytes_per_token = jnp.asarray(tok.bytes_per_token())
  baseline_id = jnp.int32(data.baseline_id)

  def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}

  def evaluate_set(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, Any]:
    sums = None
    for i, batch in enumerate(batches):
      if c.eval_batches and i >= c.eval_batches:
        break
      out = jax.device_get(eval_step(state['params'], to_global(batch), bytes_per_token,
                                     baseline_id))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    return sums

  def evaluate() -> dict[str, float]:
    per_source = {name: evaluate_set(batches()) for name, batches in data.eval_sets.items()}
    sums = jax.tree.map(lambda *x: sum(x), *per_source.values())
    weight = max(float(sums['weight_sum']), 1.0)
    loss = float(sums['loss_sum']) / weight
    result = {'eval_loss': loss, 'eval_perplexity': float(np.exp(min(loss, 50.0))),
              'eval_accuracy': float(sums['correct_sum']) / weight,
              'eval_baseline_accuracy': float(sums['baseline_correct_sum']) / weight}
    if c.objective == 'causal_lm':  # Bits per byte of text only mean something for plain LM.
      result['eval_bits_per_byte'] = (float(sums['loss_sum']) / np.log(2)
                                      / max(float(sums['byte_sum']), 1.0))
    for name in objectives.names if len(objectives.names) > 1 else ():
      k = config_lib.OBJECTIVES.index(name)
      result[f'eval_loss_{name}'] = (float(sums['group_loss_sum'][k])
                                     / max(float(sums['group_weight_sum'][k]), 1.0))
    for name, source_sums in per_source.items() if len(per_source) > 1 else ():
      result[f'eval_loss_{name}'] = (float(source_sums['loss_sum'])
                                     / max(float(source_sums['weight_sum']), 1.0))
    return result

  # ---- Loop ---------------------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)
  if writer.torn:
    log(f'metrics.jsonl: dropped {writer.torn} line(s) cut mid-write by a crash; the steps they '
        'held are written again as the run goes on')
  config_json = json.loads(c.to_json())
  peak, peak_source = metrics_lib.peak_flops(c.peak_flops)
  flops_per_step = metrics_lib.flops_per_token(run.model_cfg, seq_len) * c.data.batch_size * seq_len
  tokens_per_step = c.data.batch_size * seq_len
  last_train: dict[str, Any] = {}
  last_eval: dict[str, Any] = {}
  pending: tuple[int, Any] | None = None  # (step, device metrics): fetched a step late.
  compile_s = 0.0
  clock = {'time': time.perf_counter(), 'step': start}
  trace = _StepTrace(c.profile_steps, workdir)

  skipped = spikes = 0  # Updates skipped (non-finite values, loss spikes) since the last record.

  def flush() -> None:
    """Fetches the pending step's metrics (every step: a non-finite loss must stop the run before
    anything saves it); writes and prints them every log_every steps."""
    nonlocal pending, last_train, skipped, spikes
    if pending is None:
      return
    step, device_metrics = pending
    pending = None
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    skipped += int(values.pop('skipped', 0))
    spikes += int(values.pop('spike', 0))
    bad = [k for k in ('loss', 'grad_norm') if not np.isfinite(values[k])]
    if bad and not c.optim.skip_nonfinite:
      raise faults.NonFiniteError(
          f'{" and ".join(bad)} went non-finite at step {step} ({values[bad[0]]}); stopped '
          f'without saving, the last checkpoint is step {mngr.latest_step()}. Fix the cause and '
          'run the same command, or set --config.optim.skip_nonfinite=true to skip such steps.')
    if step % c.log_every and step != c.steps:
      return
    now = time.perf_counter()
    seconds = (now - clock['time']) / max(step - clock['step'], 1)
    clock.update(time=now, step=step)
    record = {'step': step, **values, 'tokens_per_s': tokens_per_step / seconds,
              'mfu': flops_per_step / seconds / peak}
    if c.optim.skip_nonfinite or c.optim.spike_window:
      record['skipped_steps'] = skipped
      skipped = 0
    if c.optim.spike_window:
      record['spike_steps'] = spikes
      spikes = 0
    writer.write(record)
    last_train = record
    log(metrics_lib.progress_line(step=step, total=c.steps, loss=values['loss'], lr=values['lr'],
                                  tokens_per_s=record['tokens_per_s'], mfu=record['mfu'],
                                  ms_per_step=1000 * seconds, eta_s=seconds * (c.steps - step)))

  try:
    if start < c.steps:
      first_batch = to_global(next(train_iter))
      compile_start = time.perf_counter()
      train_step = train_step.lower(state, first_batch).compile()
      compile_s = time.perf_counter() - compile_start
      _check_fits(train_step)
      log(f'compiled the train step in {compile_s:.1f} s; '
          f'MFU against {peak / 1e9:,.0f} GFLOP/s ({peak_source})')
      clock['time'] = time.perf_counter()
      batch = first_batch
      for step in range(start, c.steps):
        if step > start:
          batch = to_global(next(train_iter))
        if step + 1 == c.fault.poison_step:  # Fault injection for tests: NaN in one batch.
          batch = {**batch, 'weights': batch['weights'] * jnp.nan}
        trace.before(step + 1, state)
        state, device_metrics = train_step(state, batch)
        trace.after(step + 1, state)
        flush()
        pending = (step + 1, device_metrics)
        done = step + 1
        if done % c.eval_every == 0 or done == c.steps:
          flush()
          last_eval = {'step': done, **evaluate()}
          writer.write(last_eval)
          log(_eval_line(done, last_eval))
          clock['time'] = time.perf_counter()  # Evaluation time is not training time.
        saving = done % c.checkpoint.every == 0 or done == c.steps
        if saving:
          flush()
          writer.flush()  # On a bucket, metrics.jsonl is uploaded before the checkpoint commits.
          checkpoint.save(mngr, done, state, None, config_json)
        if done < c.steps and stop.should_stop(done):
          flush()
          if not saving:
            writer.flush()
            checkpoint.save(mngr, done, state, None, config_json)
          raise faults.Stopped(done, stop.received or 'a stop signal')
      flush()
    else:
      log(f'already at step {start} of {c.steps}: nothing to train (raise --config.steps to go on).')
  finally:
    trace.close()
    try:
      checkpoint.wait(mngr)
    finally:
      writer.close()

  text = ''
  if c.sample.length and c.objective == 'masked_lm':
    examples = []
    for i, window in enumerate(data.held_out_pieces()):
      if sum(len(e['inputs']) for e in examples) >= c.sample.length:
        break
      examples.append(objectives.build(window, seed=c.seed, stream=objectives_lib.EVAL_STREAM,
                                       epoch=0, index=i))
    text = sample_lib.fill_in(run.model_def, state['params'], tok, examples)
    log(f'---- masked-token predictions on held-out text ----\n{text}\n----')
  elif c.sample.length:
    text = sample_lib.generate(run.model_def, state['params'], tok, c.sample.prompt,
                               length=c.sample.length, seq_len=seq_len,
                               temperature=c.sample.temperature, top_k=c.sample.top_k, seed=c.seed)
    log(f'---- sample (temperature {c.sample.temperature}) ----\n{text}\n----')
  log(f'outputs in {paths.path(workdir)}: metrics.jsonl, TensorBoard events, checkpoints/, '
      f'{TOKENIZER_FILE}')
  return {'train': last_train, 'eval': last_eval, 'state': state, 'compile_s': compile_s,
          'peak_flops': peak, 'flops_per_step': flops_per_step, 'sample': text}


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
  """The run's tokenizer and batches (see data/dataset.py); the tokenizer is kept in the workdir
  for `sample` and `export`. (Also used by benchmarks/throughput.py to time the pipeline alone.)"""
  data = dataset.load(c, workdir, process_index=jax.process_index(),
                      process_count=jax.process_count(), has_checkpoints=has_checkpoints, log=log)
  if jax.process_index() == 0:
    data.tok.save(paths.join(workdir, TOKENIZER_FILE))
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


def _restore_newest_intact(c: ml_collections.ConfigDict, workdir: str, mngr, abstract) -> Any:
  """The newest checkpoint's state; with checkpoint.fallback, damaged ones are set aside and the
  next older one is tried. Never returns a state that differs from what was saved."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, _ = checkpoint.restore(mngr, step, abstract)
      return state
    except checkpoint.CheckpointError as e:
      if not c.checkpoint.fallback:
        raise checkpoint.CheckpointError(
            f'{e}: set --config.checkpoint.fallback=true to resume from the newest intact '
            'checkpoint instead.') from None
      moved = checkpoint.set_aside(workdir, step) if jax.process_index() == 0 else ''
      log(f'{e}; moved it to {moved} and trying the one before (checkpoint.fallback)')
      mngr.reload()
  raise checkpoint.CheckpointError(f'no intact checkpoint in {checkpoint.directory(workdir)}: '
                                   'use a new --workdir to start over.')


def _eval_line(step: int, e: dict[str, float]) -> str:
  parts = [f'loss {e["eval_loss"]:.4f}', f'perplexity {e["eval_perplexity"]:.2f}']
  if 'eval_bits_per_byte' in e:
    parts.append(f'{e["eval_bits_per_byte"]:.3f} bits/byte')
  parts.append(f'accuracy {e["eval_accuracy"]:.3f} (most frequent token: '
               f'{e["eval_baseline_accuracy"]:.3f})')
  parts += [f'{k[len("eval_"):]} {v:.4f}' for k, v in e.items() if k.startswith('eval_loss_')]
  return f'eval at step {step}: ' + ', '.join(parts)


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _check_resumable(c: ml_collections.ConfigDict, saved: dict[str, Any], step: int) -> None:
  now, before = _flatten(json.loads(c.to_json())), _flatten(saved)
  # A default that stands for another field's value (schedule_steps 0 = steps) is compared by
  # what it means: written out or implied, the same schedule is the same run.
  now_meant, before_meant = config_lib.implied(now), config_lib.implied(before)
  # A field that a newer version added is absent from older checkpoints: fine at its default.
  defaults = _flatten(json.loads(config_lib.base_config().to_json()))
  changed = [k for k in sorted(set(now) | set(before))
             if now.get(k) != before.get(k) and now_meant.get(k) != before_meant.get(k)
             and not (k not in before and k in defaults and now.get(k) == defaults[k])
             and not any(k == f or k.startswith(f + '.') for f in RESUMABLE_CHANGES)]
  if changed:
    def shown(raw: dict, meant: dict, k: str) -> str:
      return f'{raw.get(k)!r}' + (f' (means {meant[k]!r})' if meant.get(k) != raw.get(k) else '')

    detail = ', '.join(f'{k}: {shown(before, before_meant, k)} -> {shown(now, now_meant, k)}'
                       for k in changed)
    raise config_lib.ConfigError(
        f'the checkpoint at step {step} was trained with a different config ({detail}): '
        'use a new --workdir, or the same values to resume.')
