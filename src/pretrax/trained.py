"""A trained model read back from a workdir: its config, tokenizer and parameters, on this machine.

`sample`, `eval` and fine-tuning (`init_from`) all start here. Whatever mesh the run trained on,
the parameters are restored onto the devices at hand: all on `data` (replicated) by default, or
onto the mesh of the run that will use them.
"""

import dataclasses
from typing import Any

import ml_collections

from pretrax import checkpoint
from pretrax import paths
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib

TOKENIZER_FILE = 'tokenizer.model'


@dataclasses.dataclass(frozen=True)
class Trained:
  config: ml_collections.ConfigDict  # The run's config, as its checkpoint saved it.
  step: int
  tok: tokenizer_lib.Tokenizer
  tokenizer_path: str
  run: state_lib.RunState  # Built for this machine's devices (see `load`).
  params: Any


def checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoints of a workdir; FileNotFoundError saying what to do if none."""
  if not paths.path(checkpoint.directory(workdir)).exists():
    raise FileNotFoundError(f'no checkpoints in {workdir}: train there first with '
                            '`pretrax train --workdir=...`.')
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    steps = sorted(mngr.all_steps())
  finally:
    mngr.close()
  if not steps:
    raise FileNotFoundError(f'no finished checkpoint in {checkpoint.directory(workdir)} yet.')
  return steps


def tokenizer_path(workdir: str, c: ml_collections.ConfigDict) -> str:
  """The tokenizer a run kept in its workdir, or the one its config named."""
  saved = paths.join(workdir, TOKENIZER_FILE)
  if paths.path(saved).exists():
    return saved
  if c.tokenizer.path and paths.path(c.tokenizer.path).exists():
    return c.tokenizer.path
  raise FileNotFoundError(f'no tokenizer for the run in {workdir}: neither {saved} nor '
                          f'tokenizer.path={c.tokenizer.path!r} exists.')


def load(workdir: str, step: int | None = None,
         mesh: ml_collections.ConfigDict | None = None) -> Trained:
  """The checkpoint at `step` (default: the latest) of the run in `workdir`.

  `mesh`: a config's mesh section to restore onto (fine-tuning restores straight into its own
  shardings); None puts every local device on `data`.
  """
  steps = checkpoint_steps(workdir)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint at step {step} in {checkpoint.directory(workdir)}; '
                            f'it has steps {steps}.')
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    c = ml_collections.ConfigDict(checkpoint.restore_config(mngr, step))
    path = tokenizer_path(workdir, c)
    tok = tokenizer_lib.Tokenizer.load(path)
    local = ml_collections.ConfigDict(c.to_dict())
    if mesh is None:
      local.mesh.data, local.mesh.fsdp, local.mesh.tensor = -1, 1, 1
      local.mesh.dcn_data, local.mesh.dcn_fsdp = 1, 1
    else:
      local.mesh = ml_collections.ConfigDict(mesh.to_dict())
    local.mesh.rules = local.mesh.get('rules', '')  # Absent from checkpoints of older versions.
    run = state_lib.build(local, tok.vocab_size)
    state, _ = checkpoint.restore(mngr, step, run.abstract)
  finally:
    mngr.close()
  return Trained(config=c, step=step, tok=tok, tokenizer_path=path, run=run,
                 params=state['params'])
