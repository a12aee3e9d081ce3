"""The memory-fit check that refuses a train step before it runs: its boundary, on a real compiled
step whose parameters and optimizer state outweigh its activations (so a check that left them
out would pass a step that cannot fit)."""

import re

import pytest

from conftest import load_config
from pretrax import config as config_lib
from pretrax import run_config, step_compile
from pretrax import state as state_lib


def test_the_fit_check_counts_parameters_and_optimizer_state_to_the_byte():
  c = load_config('tiny')
  # A wide vocabulary, one short sequence: the embedding table and its two Adam moments are most
  # of the step's memory; its activations (8 positions) are little.
  c.data.batch_size, c.data.seq_len, c.model.vocab_size = 1, 8, 32768
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, c.model.vocab_size)
  # Compiled as train compiles it (on abstract inputs: nothing is allocated); that call checks
  # against this machine's memory, which such a small step fits.
  a = step_compile.compile_train_step(c, run).step.memory_analysis()
  # Worked out here from XLA's fields, not by plan.peak_bytes: the donated state is an argument
  # and an output in the same buffers (the alias), so it counts once.
  need = (
    a.argument_size_in_bytes
    + a.output_size_in_bytes
    - a.alias_size_in_bytes
    + a.temp_size_in_bytes
    + a.generated_code_size_in_bytes
  )
  # Parameters, optimizer state and batch outweigh the temporaries (measured: 26 MB to 18 MB; the
  # gradients and updates, each table-sized, are most of the temporaries).
  assert a.argument_size_in_bytes > a.temp_size_in_bytes, (
    a.argument_size_in_bytes,
    a.temp_size_in_bytes,
  )

  with pytest.raises(config_lib.ConfigError) as refused:
    step_compile.check_step_fits(a, need - 1)
  message = str(refused.value)
  assert re.search(r'needs [\d.]+ GiB per device \([\d.]+ GiB of it activations', message), message
  for fix in (
    'lower data.batch_size or data.seq_len',
    'raise optim.grad_accum_steps',
    'model.remat=full',
    'shard over more devices',
    '`pretrax plan`',
  ):
    assert fix in message, (fix, message)
  step_compile.check_step_fits(a, need)  # Exactly enough.
  step_compile.check_step_fits(a, need + 1)
