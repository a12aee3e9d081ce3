"""Orbax checkpoints holding the train state, the data iterator's position and the config.

Layout: DIR/checkpoints/<step>/{state,data,config}. Saves are asynchronous: the loop goes on while
the arrays are written into a temporary directory, renamed to <step> once complete, so a step
directory is always a whole checkpoint.
"""

import glob
import os
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

_TMP_MARKER = '.orbax-checkpoint-tmp'


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  if not read_only:
    remove_partial(workdir)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
  )
  return ocp.CheckpointManager(directory(workdir), options=options)


def remove_partial(workdir: str) -> list[str]:
  """Deletes what saves cut short (a killed process) left: `<step>.orbax-checkpoint-tmp*`
  directories, never a step to restore from. Done here, synchronously, rather than by Orbax's
  background clean-up, which races with a process that exits soon after starting."""
  if jax.process_index() != 0:
    return []
  partial = glob.glob(os.path.join(glob.escape(directory(workdir)), f'*{_TMP_MARKER}*'))
  for path in partial:
    shutil.rmtree(path, ignore_errors=True)
  return partial


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         config: dict[str, Any]) -> None:
  """Starts saving; the previous save is waited for first, so at most one is in flight."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      config=ocp.args.JsonSave(config),
  ), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any | None = None) -> tuple[Any, dict[str, Any]]:
  """Restores the state onto the shardings in `abstract_state`, and the iterator in place."""
  items = {
      'state': ocp.args.StandardRestore(abstract_state),
      'config': ocp.args.JsonRestore(),
  }
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored['state'], restored['config']


def restore_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
