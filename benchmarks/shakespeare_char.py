"""Benchmark: train configs/shakespeare_char.py (nanoGPT's CPU baby GPT) and print a table.

  .venv/bin/python benchmarks/shakespeare_char.py [--steps=2000] [--workdir=DIR]

Measures, in one process and side by side: the usable matmul peak of this machine, the jitted
step alone (forward, forward+backward, full step with the AdamW update) on a real batch, then the
whole training run (data pipeline, logging, evaluation and checkpoints included) to its final
validation loss. MFU = model FLOP/s / measured matmul peak; model FLOPs are
`pretrax.metrics.flops_per_token` (6N + 12 L H T, attention not halved for causality).
nanoGPT's published figure for this model is a validation loss of about 1.88 after 2000 steps.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

from flax import nnx
import jax
import jax.numpy as jnp

from pretrax import config as config_lib
from pretrax import loss as loss_lib
from pretrax import metrics, run_config, train
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax.config_types import RunConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # For the optional PyTorch reference beside this file.

NANOGPT_VAL_LOSS = 1.88  # nanoGPT README, this model after 2000 iterations.


def interleaved_median_ms(fns: dict, rounds: int = 10, per_round: int = 8) -> dict[str, float]:
  """Median ms per call of each function, timed in alternating rounds so drift hits all alike."""
  times = {name: [] for name in fns}
  for fn in fns.values():
    for _ in range(3):
      fn()
  for _ in range(rounds):
    for name, fn in fns.items():
      for _ in range(per_round):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  return {name: 1000 * statistics.median(t) for name, t in times.items()}


def step_timings(c: RunConfig) -> dict[str, float]:
  """The jitted pieces alone, on a real batch of the configured shape."""
  data = train.load_data(c, tempfile.mkdtemp(prefix='pretrax-bench-'))  # Builds the store.
  batches = data.train_batches(0)
  batch = next(batches)
  tok = data.tok
  batch = jax.tree.map(jnp.asarray, batch)
  run = state_lib.build(c, tok.vocab_size)
  state = run.init(c.seed)

  def loss(p):
    m = nnx.merge(run.model_def, p)
    logits = m(batch.inputs, batch.segment_ids, batch.positions)
    sums = loss_lib.cross_entropy(logits, batch.targets, batch.weights)
    return sums['loss_sum'] / sums['weight_sum']

  forward = jax.jit(loss)
  forward_backward = jax.jit(jax.grad(loss))
  full_step = step_lib.jit_train_step(
    run.model_def, run.optimizer, run.schedule, step_lib.StepConfig()
  )
  holder = {'state': state}  # The step donates its state: thread it through.

  def one_step():
    holder['state'], step_metrics = full_step(holder['state'], batch)
    return step_metrics

  size = 2048
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  fns = {
    # The peak is timed in the same rounds as the steps, so both see the same machine.
    'matmul_ms': lambda: jax.block_until_ready(matmul(a)),
    'forward_ms': lambda: jax.block_until_ready(forward(holder['state']['params'])),
    'forward_backward_ms': lambda: jax.block_until_ready(
      forward_backward(holder['state']['params'])
    ),
    'step_ms': lambda: jax.block_until_ready(one_step()),
    # The host's share of a training step: window -> example -> packing -> batch.
    'input_batch_ms': lambda: next(batches),
  }
  try:
    import torch_reference  # Optional: only where torch is installed.

    # nanoGPT's own vocabulary: the 65 characters of Tiny Shakespeare (ours adds 256 byte pieces).
    fns['torch_step_ms'] = torch_reference.make_step(
      vocab=65, context=c.data.seq_len, batch=c.data.batch_size
    )
  except ImportError:
    pass
  timings = interleaved_median_ms(fns)
  timings['vocab_size'] = tok.vocab_size
  timings['peak_flops'] = 2.0 * size**3 / (timings['matmul_ms'] / 1000)
  return timings


def result_mfu(c: RunConfig, step_ms: float, peak: float, vocab_size: int) -> float:
  model_cfg = run_config.model_config(c, vocab_size)
  flops = metrics.flops_per_token(model_cfg, c.data.seq_len) * c.data.batch_size * c.data.seq_len
  return flops / (step_ms / 1000) / peak


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--steps', type=int, default=2000, help='training steps; 0 times the jitted step only'
  )
  parser.add_argument('--workdir', default='')
  args = parser.parse_args()

  cfg = config_lib.load(os.path.join(HERE, '..', 'configs', 'shakespeare_char.py'))
  # --steps=0 times the jitted step alone; a valid config still needs a step to schedule.
  cfg.steps = max(args.steps, 1)
  cfg.sample.length = 0
  cfg.log_every = 50
  cfg.eval_every = cfg.steps
  timings = step_timings(run_config.build(cfg, num_devices=jax.device_count()))
  peak = cfg.peak_flops = timings['peak_flops']
  c = run_config.build(cfg, num_devices=jax.device_count())  # With the measured peak.
  step_mfu = result_mfu(c, timings['step_ms'], peak, timings['vocab_size'])
  if not args.steps:
    for key, value in timings.items():
      if key.endswith('_ms'):
        print(f'{key}: {value:.1f}')
    print(f'step MFU {step_mfu:.1%} of {peak / 1e9:.0f} GFLOP/s')
    return

  workdir = args.workdir or tempfile.mkdtemp(prefix='pretrax-bench-')
  start = time.perf_counter()
  result = train.train(c, workdir)
  wall = time.perf_counter() - start
  records = [r for r in metrics.read_metrics(workdir) if 'loss' in r]
  # Intervals after the first exclude compilation; each record's rate covers its interval.
  loop_ms = statistics.median(
    1000 * c.data.batch_size * c.data.seq_len / r['tokens_per_s'] for r in records[1:]
  )
  tokens_per_step = c.data.batch_size * c.data.seq_len
  flops_per_step = result['flops_per_step']
  val_loss = result['eval']['eval_loss']

  rows = [
    (
      'device',
      f'{jax.devices()[0].device_kind} x{jax.device_count()}, '
      f'{os.cpu_count()} cores, jax {jax.__version__}',
    ),
    ('matmul peak (2048^3 float32, median, interleaved)', f'{peak / 1e9:.1f} GFLOP/s'),
    ('model FLOPs per step', f'{flops_per_step / 1e9:.3f} GFLOP'),
    ('forward (jitted, median)', f'{timings["forward_ms"]:.1f} ms'),
    ('forward + backward (jitted, median)', f'{timings["forward_backward_ms"]:.1f} ms'),
    ('train step with AdamW (jitted, median)', f'{timings["step_ms"]:.1f} ms'),
    ('train loop ms/step (median of 50-step intervals)', f'{loop_ms:.1f} ms'),
    *(
      [
        (
          'PyTorch nanoGPT-architecture step (eager, vocab 65)',
          f'{timings["torch_step_ms"]:.1f} ms',
        ),
        (
          'pretrax step / PyTorch step (same run, interleaved)',
          f'{timings["step_ms"] / timings["torch_step_ms"]:.2f}',
        ),
      ]
      if 'torch_step_ms' in timings
      else []
    ),
    ('tokens/s (train loop)', f'{tokens_per_step / loop_ms * 1000:,.0f}'),
    ('model FLOP/s (train loop)', f'{flops_per_step / loop_ms * 1000 / 1e9:.1f} GFLOP/s'),
    ('MFU (train loop, vs measured peak)', f'{flops_per_step / loop_ms * 1000 / peak:.1%}'),
    ('MFU (step alone)', f'{step_mfu:.1%}'),
    ('compile time', f'{result["compile_s"]:.1f} s'),
    ('steps / wall time (all included)', f'{c.steps} / {wall:.0f} s'),
    (f'final val loss (step {c.steps})', f'{val_loss:.4f}'),
    ('nanoGPT reference val loss', f'{NANOGPT_VAL_LOSS:.2f}'),
  ]
  width = max(len(k) for k, _ in rows)
  print(f'\n| {"metric":<{width}} | value |\n|{"-" * (width + 2)}|-------|')
  for key, value in rows:
    print(f'| {key:<{width}} | {value} |')
  if c.steps == 2000:
    verdict = 'meets' if val_loss <= NANOGPT_VAL_LOSS else 'misses'
    print(f'\nval loss {val_loss:.4f} {verdict} the target <= {NANOGPT_VAL_LOSS}')


if __name__ == '__main__':
  main()
