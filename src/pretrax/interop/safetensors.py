"""The safetensors format, written one tensor at a time and read lazily.

A file is an 8-byte little-endian header size, a JSON header naming each tensor's dtype, shape and
byte range, then the raw little-endian bytes. The `safetensors` package wants every tensor of a
file in memory before it writes; writing the format directly lets an export hold one tensor at a
time however large the model is. Above `max_shard_bytes` tensors go to several files listed in
`model.safetensors.index.json`, the layout `transformers` loads.
"""

from collections.abc import Callable
import json
import os
import struct

import ml_dtypes
import numpy as np

_TO_NAME = {
  np.dtype(np.float32): 'F32',
  np.dtype(ml_dtypes.bfloat16): 'BF16',
  np.dtype(np.float16): 'F16',
  np.dtype(np.float64): 'F64',
  np.dtype(np.int64): 'I64',
  np.dtype(np.int32): 'I32',
}
_FROM_NAME = {name: dtype for dtype, name in _TO_NAME.items()}
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


class TensorSpec:
  """A tensor to write: its name, shape, dtype, and how to compute it when its turn comes."""

  def __init__(
    self, name: str, shape: tuple[int, ...], dtype: np.dtype, compute: Callable[[], np.ndarray]
  ):
    self.name, self.shape, self.dtype, self.compute = name, tuple(shape), np.dtype(dtype), compute

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if shards[-1] and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards


def _write_file(path: str, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
  header: dict[str, object] = {'__metadata__': metadata}
  offset = 0
  for spec in specs:
    header[spec.name] = {
      'dtype': _TO_NAME[spec.dtype],
      'shape': list(spec.shape),
      'data_offsets': [offset, offset + spec.nbytes],
    }
    offset += spec.nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # The format asks for 8-byte aligned tensor data.
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for spec in specs:
      array = np.ascontiguousarray(spec.compute(), dtype=spec.dtype)
      if array.shape != spec.shape:
        raise ValueError(f'{spec.name}: computed shape {array.shape}, declared {spec.shape}')
      f.write(array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes())


def write(out_dir: str, specs: list[TensorSpec], *, max_shard_bytes: int) -> list[str]:
  """Writes `specs` as one model.safetensors, or shards plus an index past `max_shard_bytes`.
  Each tensor is computed, written and dropped in turn. Returns the files written."""
  shards = _shards(specs, max_shard_bytes)
  metadata = {'format': 'pt'}  # transformers checks for it.
  if len(shards) == 1:
    _write_file(os.path.join(out_dir, SINGLE_FILE), shards[0], metadata)
    return [SINGLE_FILE]
  names = [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards, strict=True):
    _write_file(os.path.join(out_dir, name), shard, metadata)
    weight_map.update({spec.name: name for spec in shard})
  index = {'metadata': {'total_size': sum(s.nbytes for s in specs)}, 'weight_map': weight_map}
  with open(os.path.join(out_dir, INDEX_FILE), 'w') as f:
    json.dump(index, f, indent=2)
  return names + [INDEX_FILE]


class Reader:
  """The tensors of a model directory (one file or an index of shards), memory-mapped: a tensor
  is read from disk only when asked for."""

  def __init__(self, model_dir: str):
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.exists(os.path.join(model_dir, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise FileNotFoundError(
        f'no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}: save the model '
        'with `save_pretrained(..., safe_serialization=True)`.'
      )
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(model_dir, name)
      with open(path, 'rb') as f:
        size = struct.unpack('<Q', f.read(8))[0]
        header = json.loads(f.read(size))
      header.pop('__metadata__', None)
      for tensor, info in header.items():
        self._where[tensor] = (path, info, 8 + size)

  def names(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][1]['shape'])

  def read(self, name: str) -> np.ndarray:
    path, info, data_start = self._where[name]
    if info['dtype'] not in _FROM_NAME:
      raise ValueError(
        f'{name}: dtype {info["dtype"]} is not supported; save the model in '
        'float32, float16 or bfloat16.'
      )
    start, end = info['data_offsets']
    dtype = _FROM_NAME[info['dtype']].newbyteorder('<')
    if start == end:
      return np.zeros(info['shape'], dtype)
    mapped = np.memmap(
      path, dtype=dtype, mode='r', offset=data_start + start, shape=tuple(info['shape'])
    )
    return np.array(mapped)
