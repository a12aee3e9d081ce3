"""Export: a pretrax checkpoint as a transformers model directory with its tokenizer.

The parameters are restored one at a time (each checked against the checkpoint's fingerprint),
mapped by `hf_tensors` and written by `safetensors` one tensor at a time, so an export never holds
the whole model; the directory appears whole or not at all.
"""

from collections.abc import Callable
import functools
import json
import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np

from pretrax import checkpoint, paths, run_config
from pretrax import state as state_lib
from pretrax import workdir as workdir_lib
from pretrax.config_types import ModelConfig
from pretrax.interop import hf_arch, hf_tensors, hf_tokenizer, safetensors
from pretrax.model import stack

DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}


# ---------------------------------------------------------------------------------------------
# A checkpoint's parameters, read one at a time.


def _bit_sum(x: np.ndarray) -> int:
  """checkpoint.fingerprint's sum for one array, on the host."""
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  return int(np.sum(np.ascontiguousarray(x).view(width), dtype=np.uint64) % 2**32)


class CheckpointParams:
  """The parameters of one saved train state, each restored on its own (as a host array) and
  checked against the fingerprint taken when it was saved; nothing else is loaded.

  Addressed unrolled ('blocks/3/attn/q') whatever the layout: a stacked checkpoint's
  (model.scan_layers) 'stack/attn/q' reads as its layers, the last stacked array read kept
  (`source` says which one a path comes from, so that a caller can read each one once)."""

  def __init__(self, state_dir: str, bit_sums: list[int]):
    self._dir = state_dir
    self._checkpointer = checkpoint.ocp.PyTreeCheckpointer()
    try:
      tree = self._checkpointer.metadata(state_dir).item_metadata.tree
    except Exception as e:  # Missing or garbled metadata: Orbax raises many kinds.
      raise checkpoint.CheckpointError(
        f'{state_dir} is damaged: its metadata is unreadable ({type(e).__name__}).'
      ) from None
    # The fingerprint lists every array of the state in jax.tree order: params come after the
    # keys that sort before 'params'.
    offset = sum(len(jax.tree.leaves(tree[k])) for k in sorted(tree) if k < 'params')
    if len(jax.tree.leaves(tree)) != len(bit_sums):
      raise checkpoint.CheckpointError(
        f'{state_dir} does not match its fingerprint: the checkpoint is damaged.'
      )
    self._leaves = {}
    for i, (keypath, meta) in enumerate(jax.tree_util.tree_flatten_with_path(tree['params'])[0]):
      keys = tuple(getattr(k, 'key', k) for k in keypath)
      self._leaves[state_lib.param_path(keypath)] = (keys, meta, bit_sums[offset + i])
    # Unrolled path -> (stacked path, layer in the stack), for a stacked checkpoint's layers.
    layers = {p: np.zeros(meta.shape[0]) for p, (_, meta, _) in self._leaves.items()}
    first = stack.first_of(layers, num_layers=0)  # Where its stack starts, if it has one.
    self._slices = {
      path: (stacked, j)
      for stacked, x in layers.items()
      if stacked.startswith(stack.STACK + '/')
      for j, path in enumerate(stack.to_unrolled({stacked: x}, first))
    }

  def source(self, path: str) -> str:
    """The saved array that holds `path` (itself unless it is a layer of a stacked one)."""
    return self._slices[path][0] if path in self._slices else path

  def shape(self, path: str) -> tuple[int, ...]:
    if path in self._slices:
      return tuple(self._leaves[self._slices[path][0]][1].shape[1:])
    return tuple(self._leaves[path][1].shape)

  def paths(self) -> list[str]:
    return [p for p in self._leaves if p.split('/')[0] != stack.STACK] + list(self._slices)

  def read(self, path: str) -> np.ndarray:
    if path in self._slices:
      stacked, j = self._slices[path]
      return self._read_saved(stacked)[j]
    return self._read_saved(path)

  # The last few (a fused tensor's sources: GPT-2's c_attn reads q, k and v), not the model.
  @functools.lru_cache(maxsize=4)  # noqa: B019 (dropped with the reader)
  def _read_saved(self, path: str) -> np.ndarray:
    keys, _, expected = self._leaves[path]
    # The same nesting as the saved tree, down to this one leaf.
    item: dict[str, Any] | None = None
    restore_args: dict[str, Any] | None = None
    for key in reversed(keys):
      item = {key: 0 if item is None else item}
      restore_args = {
        key: checkpoint.ocp.RestoreArgs(restore_type=np.ndarray)
        if restore_args is None
        else restore_args
      }
    try:
      restored = self._checkpointer.restore(
        self._dir,
        args=checkpoint.ocp.args.PyTreeRestore(
          item={'params': item}, restore_args={'params': restore_args}, partial_restore=True
        ),
      )
    except Exception as e:  # TensorStore raises many kinds; all mean "unreadable".
      raise checkpoint.CheckpointError(
        f'{self._dir}: parameter {path} is unreadable '
        f'({type(e).__name__}); the checkpoint is damaged.'
      ) from None
    array = restored['params']
    for key in keys:
      array = array[key]
    if _bit_sum(array) != expected:
      raise checkpoint.CheckpointError(
        f'{self._dir}: parameter {path} differs from what was saved; the checkpoint is damaged.'
      )
    return array


def _refuse_nonzero(params: CheckpointParams, m: ModelConfig, arch: str) -> None:
  """ConversionError, before anything is written, for a parameter `arch` has no place for that is
  not zero: a router bias (aux-loss-free balancing) would choose other experts than Mixtral's
  router does, so the exported model would compute something else."""
  for path in hf_tensors.zero_params(m, arch):
    if np.any(params.read(path) != 0):
      raise hf_arch.refuse(
        f'{path} is not zero (model.moe.bias_rate={m.moe.bias_rate} balanced the experts with '
        f'it) and {arch} has no router bias, so it would choose other experts',
        'export a run trained with model.moe.bias_rate=0, or with model.moe.score=sigmoid '
        f'({hf_arch.GLM4_MOE} has the bias).',
      )


def _saved_step(workdir: str, step: int | None) -> tuple[int, dict]:
  """The step to export (the latest if None) and its saved config and fingerprint."""
  if not paths.path(checkpoint.directory(workdir)).exists():
    raise FileNotFoundError(
      f'no checkpoints in {workdir}: train there first with `pretrax train --workdir=...`.'
    )
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(
        f'no checkpoint at step {step} in {checkpoint.directory(workdir)}; '
        f'it has steps {sorted(mngr.all_steps())}.'
      )
    saved = mngr.restore(
      step,
      args=checkpoint.ocp.args.Composite(
        config=checkpoint.ocp.args.JsonRestore(), fingerprint=checkpoint.ocp.args.JsonRestore()
      ),
    )
  finally:
    mngr.close()
  return step, saved


def export(
  workdir: str,
  out_dir: str,
  *,
  step: int | None = None,
  dtype: str = 'float32',
  max_shard_bytes: int = 5 << 30,
  log: Callable[[str], None] = print,
) -> str:
  """Writes the run's checkpoint (the latest, or `step`) as a transformers model directory with
  its tokenizer. The directory appears whole or not at all. Returns the architecture."""
  if dtype not in DTYPES:
    raise hf_arch.ConversionError(f'--dtype={dtype} is not one of {", ".join(DTYPES)}.')
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise hf_arch.ConversionError(f'{out_dir} is not empty: export into a new --out directory.')
  step, saved = _saved_step(workdir, step)
  c = run_config.from_saved(saved['config'])
  if c.objective == 'classification':
    raise hf_arch.ConversionError(
      f'{workdir} is a classifier: no transformers model has its head (the '
      'mean of the states, then a pooler): export the run it started from.'
    )
  params = CheckpointParams(
    paths.join(checkpoint.directory(workdir), str(step), 'state'), saved['fingerprint']['bit_sums']
  )
  m = run_config.model_config(c, params.shape('embed/embedding')[0])
  arch = hf_arch.architecture(m)
  _refuse_nonzero(params, m, arch)
  tokenizer_path = workdir_lib.find_tokenizer(workdir, c.data.prepared, c.tokenizer.path)
  target = np.dtype(DTYPES[dtype])
  # The last parameter read, kept: each expert is a tensor of its own, and an (E, ...) parameter's
  # experts are written one after another.
  read = functools.lru_cache(maxsize=1)(lambda path: params.read(path).astype(np.float32))

  def compute(t: hf_tensors.Tensor) -> np.ndarray:
    # A tensor's sources are all ours or all None (a bias the model does not have): no mix.
    sources = [s for s in t.sources if s is not None]
    if not sources:
      return np.zeros(t.shape, target)
    return t.to_hf(*(read(s) for s in sources)).astype(target)

  tensors = hf_tensors.tensor_map(m, arch)

  def stacked_source(t: hf_tensors.Tensor) -> str:  # '' for an unrolled checkpoint's tensors.
    first = next((s for s in t.sources if s is not None), None)
    return '' if first is None or params.source(first) == first else params.source(first)

  # A stacked checkpoint's layers grouped by the array they come from, so that each is read once
  # (CheckpointParams keeps the last few); an unrolled one's order unchanged (a stable sort).
  tensors.sort(key=stacked_source)
  specs = [
    safetensors.TensorSpec(t.name, t.shape, target, functools.partial(compute, t)) for t in tensors
  ]
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out_dir))}.partial')
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    files = safetensors.write(partial, specs, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(partial, 'config.json'), 'w') as f:
      json.dump(hf_arch.hf_config(m, arch, dtype), f, indent=2)
    files += hf_tokenizer.save(
      paths.path(tokenizer_path).read_bytes(), partial, model_max_length=m.max_len
    )
    with open(os.path.join(partial, 'pretrax.json'), 'w') as f:
      json.dump(
        {'workdir': str(paths.path(workdir)), 'step': step, 'config': saved['config']}, f, indent=2
      )
    if os.path.exists(out_dir):
      os.rmdir(out_dir)  # Empty, checked above.
    os.rename(partial, out_dir)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  size = sum(s.nbytes for s in specs)
  log(
    f'exported step {step} of {workdir} as {arch} ({size / 2**20:.1f} MiB of {dtype} weights, '
    f'{len(specs)} tensors) to {out_dir}: ' + ', '.join(['config.json'] + files)
  )
  return arch
