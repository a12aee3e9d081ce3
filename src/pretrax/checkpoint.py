"""Orbax checkpoints holding the train state and the config; the checks a resume makes.

The data position is the step itself: batches are read by index. Layout:
DIR/checkpoints/<step>/{state,config,fingerprint,topology}. Saves are asynchronous: the loop goes
on while the arrays are written into a temporary directory, renamed to <step> once complete, so a
step directory is always a whole checkpoint. DIR may be a bucket (gs://...): there Orbax writes
<step> in place and marks it whole with a commit file (see `remove_partial`).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from pretrax import config as config_lib
from pretrax import errors, paths, run_config
from pretrax import workdir as workdir_lib
from pretrax.config_types import RunConfig

_TMP_MARKER = '.orbax-checkpoint-tmp'
_COMMIT_FILE = 'commit_success.txt'  # Orbax's mark of a whole checkpoint on a bucket.


def directory(workdir: str) -> str:
  """WORKDIR/checkpoints: absolute when local, as written for a bucket (gs://...)."""
  return workdir_lib.checkpoints(workdir)


def manager(
  workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
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
  """Deletes what saves cut short (a killed process) left, never a step to restore from. Done
  here, synchronously, rather than by Orbax's background clean-up, which races with a process that
  exits soon after starting.

  On a disk Orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when whole. A bucket has no
  rename: Orbax writes `<step>` in place and writes `commit_success.txt` into it last, so there a
  step without that file is partial.
  """
  if jax.process_index() != 0:
    return []
  where = paths.path(directory(workdir))
  if not where.exists():
    return []
  if paths.is_remote(workdir):
    partial = [p for p in where.iterdir() if p.name.isdigit() and not (p / _COMMIT_FILE).exists()]
  else:
    partial = [p for p in where.iterdir() if _TMP_MARKER in p.name]
  for path in partial:
    path.rmtree(missing_ok=True)
  return [str(p) for p in partial]


class CheckpointError(errors.PretraxError, RuntimeError):
  """A checkpoint that cannot be trusted; the message names the step and the damage."""


def fingerprint(state: Any) -> list[int]:
  """Per array, the wrapping uint32 sum of its bit patterns: exact, independent of how the array
  is sharded or summed, and changed by any damage a restore could silently turn into zeros."""
  return [int(x) for x in jax.device_get(_bit_sums(jax.tree.leaves(state)))]


@jax.jit
def _bit_sums(leaves: list[jax.Array]) -> list[jax.Array]:
  def bits(x: jax.Array) -> jax.Array:
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)

  return [jnp.sum(bits(x), dtype=jnp.uint32) for x in leaves]


def topology() -> dict[str, int]:
  """The processes and devices that wrote a checkpoint, for the record: any count may resume it
  (batches depend on the step alone)."""
  return {'process_count': jax.process_count(), 'device_count': jax.device_count()}


def save(mngr: ocp.CheckpointManager, step: int, state: Any, config: dict[str, Any]) -> None:
  """Starts saving; the previous save is waited for first, so at most one is in flight."""
  items = dict(
    state=ocp.args.StandardSave(state),
    config=ocp.args.JsonSave(config),
    fingerprint=ocp.args.JsonSave({'bit_sums': fingerprint(state)}),
    topology=ocp.args.JsonSave(topology()),
  )
  try:  # Waits for the previous save first: its failure surfaces here.
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
  except Exception as e:
    raise _save_failed(mngr, e) from None


def _shorten(text: str, keep: int = 300) -> str:
  """Both ends of a long message: storage errors say what failed first and why (disk full, file
  too large, permission) last."""
  return text if len(text) <= keep else f'{text[: keep // 3]} ... {text[-2 * keep // 3 :]}'


def wait(mngr: ocp.CheckpointManager) -> None:
  """Blocks until the save in flight has committed; a failed one raises CheckpointError."""
  try:
    mngr.wait_until_finished()
  except Exception as e:
    raise _save_failed(mngr, e) from None


def _save_failed(mngr: ocp.CheckpointManager, error: Exception) -> CheckpointError:
  detail = _shorten(' '.join(str(error).split()))
  return CheckpointError(
    f'saving a checkpoint failed ({type(error).__name__}: {detail}); the newest complete '
    f'checkpoint, step {mngr.latest_step()}, is untouched: free disk space or fix the storage, '
    'then run the same command to resume from it.'
  )


def restore(
  mngr: ocp.CheckpointManager, step: int, abstract_state: Any
) -> tuple[Any, dict[str, Any]]:
  """Restores the state onto the shardings in `abstract_state`, then checks the arrays against
  the fingerprint taken when they were saved.

  Raises CheckpointError naming the step and the damage.
  """
  items = {
    'state': ocp.args.StandardRestore(abstract_state),
    'config': ocp.args.JsonRestore(),
    'fingerprint': ocp.args.JsonRestore(),
  }
  where = f'checkpoint {step} in {mngr.directory}'
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # Orbax and TensorStore raise many kinds; all mean "unreadable".
    detail = _shorten(' '.join(str(e).split()))
    raise CheckpointError(f'{where} is damaged ({type(e).__name__}: {detail})') from None
  expected = restored['fingerprint']['bit_sums']
  actual = fingerprint(restored['state'])
  # Not strict: a different number of arrays is damage too, which the length term counts.
  differ = sum(a != b for a, b in zip(actual, expected, strict=False))
  bad = differ + abs(len(actual) - len(expected))
  if bad:
    raise CheckpointError(
      f'{where} is damaged: {bad} of {len(expected)} arrays differ from what was saved'
    )
  return restored['state'], restored['config']


def set_aside(workdir: str, step: int) -> str:
  """Moves a damaged step out of the way (to WORKDIR/damaged_checkpoints/), keeping it to study."""
  target = paths.path(workdir_lib.damaged_checkpoint(workdir, step))
  if target.exists():
    target.rmtree()
  paths.move_tree(paths.join(directory(workdir), str(step)), target)
  return str(target)


def restore_config(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


# ---- Resuming: is it the same run, and which checkpoint is intact ------------------------------

# Fields that may change between a run and its resumption; any other change is refused.
RESUMABLE_CHANGES = (
  'steps',
  'log_every',
  'eval_every',
  'eval_batches',
  'eval',
  'peak_flops',
  'checkpoint',
  'sample',
  'data.worker_count',
  'data.prepare_workers',
  'fault',
  'optim.skip_nonfinite',
  'mesh',
  'profile_steps',
  'compile_cache',
  # Attention kernels, recomputation and loss chunking change speed and
  # memory only.
  'model.attention_backend',
  'model.remat',
  'model.loss_chunk',
  'model.max_segments',
)


def check_resumable(mngr: ocp.CheckpointManager, c: RunConfig) -> None:
  """Raises ConfigError naming the fields if the latest checkpoint was trained with another
  config than `c`, except fields that may change. Both configs are resolved (a default that
  stands for another field's value is compared by what it means), the saved one brought forward
  from its version by run_config.from_saved."""
  step = mngr.latest_step()
  if step is None:
    return
  try:
    saved = restore_config(mngr, step)
  except Exception:  # Damaged: the restore names the damage (and may fall back).
    return
  before = run_config.from_saved(saved)
  if before.optim.name != c.optim.name:  # Its optimizer state has another structure.
    raise config_lib.ConfigError(
      f'the checkpoint at step {step} was trained with optim.name={before.optim.name}, not '
      f'{c.optim.name}: set --config.optim.name={before.optim.name} to resume, or use a new '
      f'--workdir (--config.init_from=<this workdir> starts {c.optim.name} from its weights).'
    )
  if before.model.scan_layers != c.model.scan_layers:  # Its params and optimizer state are laid
    # out otherwise (stacked or per layer); init_from converts the weights, not the moments.
    raise config_lib.ConfigError(
      f'the checkpoint at step {step} was trained with model.scan_layers='
      f'{before.model.scan_layers}: set --config.model.scan_layers={before.model.scan_layers} to '
      'resume, or use a new --workdir with --config.init_from=<this workdir> (its weights, '
      'converted, with a fresh optimizer).'
    )
  changed = run_config.differences(c, before, ignore=RESUMABLE_CHANGES)
  if changed:
    raise config_lib.ConfigError(
      f'the checkpoint at step {step} was trained with a different config ({", ".join(changed)}): '
      'use a new --workdir, or the same values to resume.'
    )


def restore_newest_intact(
  mngr: ocp.CheckpointManager,
  workdir: str,
  abstract_state: Any,
  *,
  fallback: bool,
  log: Callable[[str], None],
) -> Any:
  """The newest checkpoint's state; with `fallback`, damaged ones are set aside and the next
  older one is tried. Never returns a state that differs from what was saved."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, _ = restore(mngr, step, abstract_state)
      return state
    except CheckpointError as e:
      if not fallback:
        raise CheckpointError(
          f'{e}: set --config.checkpoint.fallback=true to resume from the '
          'newest intact checkpoint instead.'
        ) from None
      moved = set_aside(workdir, step) if jax.process_index() == 0 else ''
      log(f'{e}; moved it to {moved} and trying the one before (checkpoint.fallback)')
      mngr.reload()
  raise CheckpointError(
    f'no intact checkpoint in {directory(workdir)}: use a new --workdir to start over.'
  )
