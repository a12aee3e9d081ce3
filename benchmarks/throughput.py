"""Benchmark: the jitted train step of any config alone, and its input pipeline alone.

  python benchmarks/throughput.py --config=configs/NAME.py[:ARG] [--steps=20] [--warmup=3]
      [--pipeline_batches=50] [--segments=1] [--json=PATH] [--flops_only] [--config.KEY=VALUE ...]

The run's state and step are built as `pretrax train` builds them (state.build, step.jit_train_step
with the same shardings); the step is fed one synthetic batch of the configured shape (random token
ids; each row --segments packed documents of random lengths, one full segment by default) that
stays on the device, so only the step is timed. Prints one markdown table row:

- step ms: median over --steps steps after --warmup, each ended by block_until_ready.
- tokens/s: batch x seq_len / step time (every slot is a real token).
- model FLOP/s: metrics.flops_per_token (6 x matmul parameters + 12 x layers x heads x head_dim x
  seq_len; causal attention not halved) x tokens/s.
- peak: the data-sheet bf16 figure per device kind times the device count, or on CPU the measured
  float32 matmul rate (config.peak_flops overrides either); MFU = model FLOP/s / peak.
- memory: the allocator's peak_bytes_in_use where the device reports it (GPU, TPU), else XLA's
  compile-time estimate (arguments + temporaries of the compiled step), marked 'XLA est.'.
- update ms (share): the optimizer's update alone (optim.name; the step's parameters standing in
  for its gradients), jitted into the state's shardings, median over --steps; share = update ms /
  step ms. Inside the step XLA may overlap it with other work: the step time of the same config
  with --config.optim.name=adamw and =muon is the other measure of Muon's cost.
- NS / model FLOPs: Muon's Newton-Schulz matmul FLOPs per step (optim_muon.newton_schulz_flops)
  over the model FLOPs per step above; 0 for adamw. Both are totals over the devices: how evenly
  XLA spreads Newton-Schulz over sharded matrices is what the update time measures.
  --flops_only prints this count for the config without building data or running anything (any
  config, on any machine: an estimate, not a measurement).
- start-up s (first step / compile): the run's start-up phases as `pretrax train` logs them
  (pretrax.startup: imports, backend, data, state, compile, first step; the pipeline's timing is
  left out), their sum, and that sum over the compile time: issue 28's goal is at most 1.5. The
  compilation cache is config.compile_cache, as train's: the JSON row counts the programs it
  loaded and compiled, so a warm cache's compile time is never read as a compile.
- pipeline tokens/s: the real data path alone (the store of data.prepared, else the one built
  from data.path) producing this process's batches of the same shape; 'pipeline / step' divides it
  by the tokens/s the step consumes on this process. Issue 9 wants at least 2.
"""

import json
import statistics
import sys
import tempfile
import time

from absl import app, flags
import jax
import jaxlib
from ml_collections import config_flags
import numpy as np

from pretrax import config as config_lib
from pretrax import (
  config_specs,
  metrics,
  optim_muon,
  plan,
  run_config,
  startup,
  step_compile,
  train,
)
from pretrax import state as state_lib
from pretrax.data.batch import Batch

FLAGS = flags.FLAGS

COLUMNS = (
  'device',
  'jax / jaxlib',
  'config',
  'batch x seq',
  'compile s',
  'step ms',
  'tokens/s',
  'model FLOP/s',
  'peak FLOP/s (source)',
  'MFU',
  'optimizer',
  'update ms (share)',
  'NS / model FLOPs',
  'peak memory',
  'start-up s (first step / compile)',
  'pipeline tokens/s',
  'pipeline / step',
)


def _define_flags() -> None:
  """Defined when run as a script only, so that tests can import synthetic_batch."""
  config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/NAME.py[:ARG]).', lock_config=True
  )
  flags.DEFINE_integer('steps', 20, 'Timed steps (after the warmup).', lower_bound=1)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compiling.', lower_bound=0)
  flags.DEFINE_integer(
    'pipeline_batches',
    50,
    'Batches (and at least 2 s) to time the input pipeline over.',
    lower_bound=1,
  )
  flags.DEFINE_integer(
    'segments',
    1,
    'Documents packed into each row of the synthetic batch, of '
    'random lengths, to time the packed-attention path.',
    lower_bound=1,
  )
  flags.DEFINE_string('json', '', 'Also write the row as JSON to this path.')
  flags.DEFINE_bool(
    'flops_only', False, "Print the optimizer's FLOPs against the model's, and run nothing."
  )
  flags.DEFINE_bool('optimizer', True, "Time the optimizer's update alone too (one more compile).")
  flags.DEFINE_bool(
    'fp8_too',
    False,
    'Then time the same config with model.fp8=true, stepping the same state (FP8 keeps its '
    "tree), as a second row; --json writes it to PATH's name with _fp8 before .json.",
  )


def document_layout(
  rows: int, seq_len: int, segments: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions), each (rows, seq_len): per row `segments` contiguous documents of
  random lengths (at least one token each) numbered 1..segments, positions restarting at 0 at
  each document's first token, as the packer lays them out."""
  if not 1 <= segments <= seq_len:
    raise ValueError(f'--segments={segments} must be between 1 and data.seq_len={seq_len}.')
  segment_ids = np.empty((rows, seq_len), np.int32)
  positions = np.empty((rows, seq_len), np.int32)
  for row in range(rows):
    starts = np.sort(rng.choice(np.arange(1, seq_len), segments - 1, replace=False))
    segment_ids[row] = 1 + np.searchsorted(starts, np.arange(seq_len), side='right')
    positions[row] = np.arange(seq_len) - np.concatenate([[0], starts])[segment_ids[row] - 1]
  return segment_ids, positions


def synthetic_batch(
  c, vocab_size: int, rows: int, rng: np.random.Generator, segments: int = 1
) -> Batch[np.ndarray]:
  """A host language-model batch: random tokens in `segments` documents per row (see
  document_layout); every token is real (weight 1)."""
  shape = (rows, c.data.seq_len)
  objective = config_lib.OBJECTIVES.index(config_specs.objective_mixture(c.objective)[0][0])
  segment_ids, positions = document_layout(rows, c.data.seq_len, segments, rng)
  return Batch(  # inputs before targets: the generator's draws in that order.
    inputs=rng.integers(0, vocab_size, shape, dtype=np.int32),
    segment_ids=segment_ids,
    positions=positions,
    targets=rng.integers(0, vocab_size, shape, dtype=np.int32),
    weights=np.ones(shape, np.float32),
    prefix=np.zeros(shape, np.int32),
    objective=np.full(shape, objective, np.int32),
  )


def time_pipeline(batches, count: int, min_seconds: float = 2.0) -> float:
  """Seconds per batch of `batches` over at least `count` batches and `min_seconds` (small batches
  take microseconds each), after one batch that pays for start-up (threads, files)."""
  next(batches)
  start = time.perf_counter()
  done = 0
  while done < count or time.perf_counter() - start < min_seconds:
    next(batches)
    done += 1
  return (time.perf_counter() - start) / done


def peak_memory(compiled) -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats()  # None on CPU.
  if stats and 'peak_bytes_in_use' in stats:
    return max(d.memory_stats()['peak_bytes_in_use'] for d in jax.local_devices()), 'allocator'
  m = compiled.memory_analysis()  # May be None where a backend has no analysis.
  if m is None:
    return 0, 'unknown'
  return m.argument_size_in_bytes + m.temp_size_in_bytes, 'XLA est.'


def _flops(x: float) -> str:
  return f'{x / 1e12:.1f} T' if x >= 1e12 else f'{x / 1e9:.1f} G'


def optimizer_flops(c, run: state_lib.RunState) -> dict:
  """Newton-Schulz's matmul FLOPs per step against the model's (0 for adamw)."""
  tokens = c.data.batch_size * c.data.seq_len
  model = metrics.flops_per_token(run.model_cfg, c.data.seq_len) * tokens
  ns = 0.0
  if c.optim.name == 'muon':
    params = run.abstract['params']
    ns = optim_muon.newton_schulz_flops(params, run.logical_axes, c.optim.ns_steps)
  return {'flops_per_step': model, 'ns_flops_per_step': ns, 'ns_flop_share': ns / model}


def time_update(run: state_lib.RunState, state, steps: int) -> float:
  """Median seconds of the optimizer's update alone, the parameters standing in for gradients."""
  update = jax.jit(
    lambda s: run.optimizer.update(s['params'], s['opt_state'], s['params']),
    out_shardings=(run.shardings['params'], run.shardings['opt_state']),
  )
  jax.block_until_ready(update(state))  # Compiles.
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(update(state))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(
  c,
  config_name: str,
  steps: int,
  warmup: int,
  pipeline_batches: int,
  segments: int = 1,
  clock: startup.StartupClock | None = None,
  state=None,
  time_optimizer: bool = True,
) -> tuple[dict, object]:
  """One row, and the train state the steps left: the step's speed and memory, the start-up
  phases (`clock` holds those timed before the call), the optimizer's share (unless not
  `time_optimizer`: one compile fewer), the input pipeline's rate. `state`: a train state of the
  same tree to step from instead of initialising one (another variant's: model.fp8 keeps it)."""
  clock = clock or startup.StartupClock.from_now()
  c = run_config.build(c, num_devices=jax.device_count())  # Validated and resolved, as train's.
  with tempfile.TemporaryDirectory(prefix='pretrax-throughput-') as workdir:
    clock.cache_directory = startup.use_compile_cache(c.compile_cache, workdir)
    data = train.load_data(c, workdir)  # Writes the tokenizer into the throwaway workdir.
    clock.mark('data')
    # ---- Input pipeline alone, first: nothing else competes for the host yet.
    pipeline_s = time_pipeline(data.train_batches(0), pipeline_batches)
    clock.skip()  # Timing the pipeline is the benchmark's, not the run's start-up.

  # ---- State and step, as train.py builds them: the step compiles while the state initialises.
  run = state_lib.build(c, data.tok.vocab_size)
  compiling = step_compile.start_compiling(c, run)
  state = jax.block_until_ready(run.init(c.seed) if state is None else state)
  clock.mark('state')
  local_rows = c.data.batch_size // jax.process_count()
  host = synthetic_batch(
    c,
    run.model_cfg.vocab_size,
    local_rows,
    np.random.default_rng(c.seed + jax.process_index()),
    segments,
  )
  batch = jax.make_array_from_process_local_data(run.batch_sharding, host)
  clock.mark('data')  # The synthetic batch on the device.
  compiled_step = compiling.result()
  compiled, compile_s = compiled_step.step, compiled_step.seconds
  clock.mark('compile')
  clock.step_compile_s = compile_s

  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, step_metrics = compiled(state, batch)
    jax.block_until_ready((state, step_metrics))
    if i == 0:
      clock.mark('first_step')
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)

  seq_len = c.data.seq_len
  tokens_per_s = c.data.batch_size * seq_len / step_s
  flops = optimizer_flops(c, run)
  flops_per_step = flops['flops_per_step']
  peak, peak_source = metrics.peak_flops(c.peak_flops)
  memory, memory_source = peak_memory(compiled)
  # After reading the step's peak: it allocates more.
  update_s = time_update(run, state, steps) if time_optimizer else 0.0
  cost = compiled.cost_analysis()  # A dict; a list of one per program in older JAX.
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  pipeline_tokens_per_s = local_rows * seq_len / pipeline_s
  return {
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'config': config_name,
    'batch_size': c.data.batch_size,
    'seq_len': seq_len,
    'segments': segments,
    'compile_s': compile_s,
    'step_ms': 1000 * step_s,
    'steps': steps,
    'warmup': warmup,
    'tokens_per_s': tokens_per_s,
    'model_flops_per_s': flops_per_step / step_s,
    'peak_flops': peak,
    'peak_source': peak_source,
    'mfu': flops_per_step / step_s / peak,
    'optimizer': c.optim.name,
    'update_ms': 1000 * update_s,
    'update_share': update_s / step_s,
    'ns_flops_per_step': flops['ns_flops_per_step'],
    'ns_flop_share': flops['ns_flop_share'],
    'peak_memory_bytes': memory,
    'memory_source': memory_source,
    # XLA's own count of the compiled step beside the formula's, as a sanity check only: it
    # counts what was compiled (the optimizer, elementwise work, no halving or doubling rules).
    'flops_per_step': flops_per_step,
    'xla_flops_per_step': cost.get('flops'),
    # Start-up: each phase's seconds, their sum and the cache's counts (pretrax.startup).
    **clock.record(),
    'startup_over_compile': clock.total / compile_s,  # Issue 28's goal: at most 1.5.
    'pipeline': 'prepared' if c.data.prepared else 'text',
    'pipeline_tokens_per_s': pipeline_tokens_per_s,
    # This process's pipeline against this process's share of the step's tokens.
    'pipeline_ratio': pipeline_tokens_per_s / (tokens_per_s / jax.process_count()),
  }, state


def table(row: dict) -> str:
  cells = (
    f'{row["device_kind"]} x{row["device_count"]}',
    f'{row["jax"]} / {row["jaxlib"]}',
    row['config'],
    f'{row["batch_size"]} x {row["seq_len"]}',
    f'{row["compile_s"]:.1f}',
    f'{row["step_ms"]:.2f}',
    f'{row["tokens_per_s"]:,.0f}',
    _flops(row['model_flops_per_s']),
    f'{_flops(row["peak_flops"])} ({row["peak_source"]})',
    f'{row["mfu"]:.1%}',
    row['optimizer'],
    f'{row["update_ms"]:.2f} ({row["update_share"]:.0%})',
    f'{row["ns_flop_share"]:.2%}',
    f'{row["peak_memory_bytes"] / 2**20:,.1f} MiB ({row["memory_source"]})',
    f'{row["startup_s"]:.1f} ({row["startup_over_compile"]:.1f}x)',
    f'{row["pipeline_tokens_per_s"]:,.0f} ({row["pipeline"]})',
    f'{row["pipeline_ratio"]:.1f}x',
  )
  return '\n'.join(
    [
      '| ' + ' | '.join(COLUMNS) + ' |',
      '|' + ' --- |' * len(COLUMNS),
      '| ' + ' | '.join(cells) + ' |',
    ]
  )


def flops_estimate(c) -> str:
  """The optimizer's FLOPs for the config at its batch, counted on abstract state (no data, no
  device work: any config builds on a CPU)."""
  c = run_config.build(c, check_data=False)
  c = run_config.on_local_devices(c)  # The count does not depend on the mesh.
  f = optimizer_flops(c, state_lib.build(c, plan.vocab_size(c)))
  return (
    f'optim.name={c.optim.name}, ns_steps={c.optim.ns_steps}, batch {c.data.batch_size} x '
    f'{c.data.seq_len}: model {f["flops_per_step"]:.3g} FLOPs per step, Newton-Schulz '
    f"{f['ns_flops_per_step']:.3g} ({f['ns_flop_share']:.2%} of the model's)"
  )


def main(argv: list[str]) -> None:
  del argv
  clock = startup.StartupClock.from_process_start()
  clock.mark('imports')
  if FLAGS.config is None:
    sys.exit('benchmarks/throughput.py: --config=configs/NAME.py[:ARG] is required.')
  name = config_flags.get_config_filename(FLAGS['config'])
  overrides = config_flags.get_override_values(FLAGS['config'])
  overrides = ' '.join(f'{k}={v}' for k, v in overrides.items())
  if FLAGS.flops_only:
    print(flops_estimate(FLAGS.config), flush=True)
    return
  segments = f'segments={FLAGS.segments}' if FLAGS.segments > 1 else ''
  jax.device_count()  # Starts the backend.
  clock.mark('backend')
  label = ' '.join(filter(None, [name, overrides, segments]))
  args = (FLAGS.steps, FLAGS.warmup, FLAGS.pipeline_batches, FLAGS.segments)
  row, state = benchmark(FLAGS.config, label, *args, clock, time_optimizer=FLAGS.optimizer)
  print(clock.line(), flush=True)
  print(table(row), flush=True)
  _write(row, FLAGS.json)
  if FLAGS.fp8_too:
    c = FLAGS.config.copy_and_resolve_references()
    c.model.fp8 = True
    fp8_row, _ = benchmark(
      c, f'{label} model.fp8=True', *args, state=state, time_optimizer=FLAGS.optimizer
    )
    print(table(fp8_row).splitlines()[-1], flush=True)
    print(
      f'fp8 / {c.model.dtype}: {fp8_row["tokens_per_s"] / row["tokens_per_s"]:.3f}x tokens/s',
      flush=True,
    )
    _write(fp8_row, FLAGS.json and FLAGS.json.removesuffix('.json') + '_fp8.json')


def _write(row: dict, path: str) -> None:
  if path:
    with open(path, 'w') as f:
      json.dump(row, f, indent=1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
