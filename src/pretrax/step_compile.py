"""The train step, compiled before the first batch exists: on a thread of its own, from the run's
abstract state and batch (so that it compiles while the state initialises or restores and the
data opens), and refused before it runs if it cannot fit a device."""

from collections.abc import Callable
from concurrent import futures
import dataclasses
import time

import jax

from pretrax import config as config_lib
from pretrax import plan as plan_lib
from pretrax import state as state_lib
from pretrax.config_types import RunConfig
from pretrax.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """The train step compiled for the run's abstract state and batch, and how long that took."""

  step: Callable
  batch: Batch[jax.ShapeDtypeStruct]  # What it was compiled for.
  seconds: float


def start_compiling(c: RunConfig, run: state_lib.RunState) -> 'futures.Future[CompiledStep]':
  """Compiles the train step on a thread of its own, from the abstract state and batch: the step
  compiles while the state is initialised or restored and the data opens, and start-up pays the
  longer of the two rather than their sum. XLA compiles without holding the GIL; JAX and NNX keep
  their tracing state per thread.

  The future raises what compiling raised, or StepTooLarge when the step cannot fit a device."""
  pool = futures.ThreadPoolExecutor(1, thread_name_prefix='pretrax-compile')
  future = pool.submit(compile_train_step, c, run)
  pool.shutdown(wait=False)  # The thread ends with the compile.
  return future


def compile_train_step(c: RunConfig, run: state_lib.RunState) -> CompiledStep:
  """The train step as `train` runs it, compiled for the run's abstract state and batch."""
  batch = run.abstract_batch(c)
  started = time.perf_counter()
  compiled = run.jit_train_step(c).lower(run.abstract, batch).compile()
  seconds = time.perf_counter() - started
  check_fits(compiled)
  return CompiledStep(compiled, batch, seconds)


def check_batch(compiled: CompiledStep, batch: Batch[jax.Array]) -> None:
  """The first batch is what the step was compiled for (else calling it would fail, later and
  less clearly): a batch layout that RunState.abstract_batch does not know is a bug to fix there."""
  got = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), batch)
  want = jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), compiled.batch)
  if got != want:
    raise AssertionError(
      f'the first batch {got} is not the one the train step was compiled for ({want})'
    )


def check_fits(compiled) -> None:
  """Refuses a step that cannot fit a device, before it runs out of memory mid-step."""
  analysis = compiled.memory_analysis()
  have = plan_lib.device_memory_bytes(jax.local_devices()[0])
  if analysis is not None and have is not None:  # Either can be unknown: then run and see.
    check_step_fits(analysis, have)


def check_step_fits(analysis, have: int) -> None:
  """Raises ConfigError unless a step with XLA's memory analysis `analysis` (its parameters,
  optimizer state, batch, outputs, temporaries and code) fits in `have` bytes per device."""
  need, temp = plan_lib.peak_bytes(analysis), int(analysis.temp_size_in_bytes)
  if need > have:
    gib = 1 << 30
    raise config_lib.ConfigError(
      f'the train step needs {need / gib:,.1f} GiB per device ({temp / gib:,.1f} GiB of it '
      f'activations and other temporaries) and a device has {have / gib:,.1f} GiB: lower '
      'data.batch_size or data.seq_len, raise optim.grad_accum_steps, set model.remat=full, or '
      'shard over more devices (see `pretrax plan`).'
    )
