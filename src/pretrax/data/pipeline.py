"""Grain pipelines: documents -> tokens -> shuffled windows -> examples -> packed sequences -> batches.

The corpus is tokenized once, in memory, when the pipeline is built (SentencePiece with threads,
~350k tokens/s on two cores); every later stage is a lazy Grain transformation, so the iterator's
state is a few integers that Orbax saves with the model, and a resumed run reads exactly the batches
an uninterrupted one would have.

A document of n tokens (EOS appended) becomes windows of at most L+1 tokens starting every `stride`
tokens. With stride L (the default, and always for evaluation) consecutive windows overlap by one
token, so every next-token pair is a target exactly once; a smaller stride gives more windows with
different contexts (stride 1 is nanoGPT's sampling of windows at every offset). Windows are shuffled
globally (re-shuffled each epoch), turned into examples by the run's objective (`objectives.py`:
causal, prefix LM, span corruption or masked LM, each example's randomness seeded by its identity),
then packed first-fit into rows of L with segment ids (1-based, 0 = padding) and positions, so that
attention never crosses a document and nothing is truncated.

Batch keys, each (batch, L): inputs, targets, segment_ids, positions, prefix, objective (int32) and
weights (float32); see objectives.py for what each means.
"""

import dataclasses

import grain
import numpy as np

from pretrax import config as config_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.data import objectives as objectives_lib

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights', 'prefix', 'objective')


@dataclasses.dataclass(frozen=True)
class TokenWindows:
  """A tokenized corpus cut into windows of at most seq_len + 1 tokens."""
  tokens: np.ndarray  # int32, every document's tokens then EOS, concatenated.
  starts: np.ndarray  # int64, window i is tokens[starts[i]:ends[i]].
  ends: np.ndarray

  def __len__(self) -> int:
    return len(self.starts)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.tokens[self.starts[i]:self.ends[i]]

  @property
  def num_targets(self) -> int:
    return int(np.sum(self.ends - self.starts - 1))


def tokenize_windows(documents: list[str], tok: tokenizer_lib.Tokenizer, seq_len: int,
                     stride: int = 0) -> TokenWindows:
  """Tokenizes `documents` and cuts them into windows of seq_len + 1 tokens every `stride` tokens.

  `stride` 0 means seq_len: every next-token pair is then in exactly one window.
  """
  return windows_of(tok.encode_batch(documents) if documents else [], seq_len, stride)


def windows_of(encoded: list[list[int]], seq_len: int, stride: int = 0) -> TokenWindows:
  """Windows of already-encoded documents (see tokenize_windows)."""
  stride = stride or seq_len
  lengths = np.array([len(ids) + 1 for ids in encoded], np.int64)
  tokens = np.empty(int(lengths.sum()), np.int32)
  doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  starts, ends = [], []
  for ids, start, n in zip(encoded, doc_starts, lengths):
    tokens[start:start + n - 1] = ids
    tokens[start + n - 1] = tokenizer_lib.EOS_ID
    # Windows of L+1 tokens every `stride` tokens; a window of a single token has no target.
    offsets = np.arange(0, n - 1, stride, dtype=np.int64)
    starts.append(start + offsets)
    ends.append(start + np.minimum(offsets + seq_len + 1, n))
  starts_all = np.concatenate(starts) if starts else np.zeros(0, np.int64)
  ends_all = np.concatenate(ends) if ends else np.zeros(0, np.int64)
  return TokenWindows(tokens=tokens, starts=starts_all, ends=ends_all)


def _finish(batch: dict[str, np.ndarray], batch_size: int,
            objectives: objectives_lib.Objectives) -> dict[str, np.ndarray]:
  """Renames the packer's keys, fills the keys that were not packed, and pads a short last batch
  with empty rows."""
  out = {k: batch[k] for k in objectives.packed_keys}
  out['segment_ids'] = batch['inputs_segment_ids']
  out['positions'] = batch['inputs_positions']
  if 'weights' not in out:  # Plain causal LM: every real token is a target.
    out['weights'] = (out['segment_ids'] > 0).astype(np.float32)
  if 'prefix' not in out:  # No prefix objective: the model does not read it.
    out['prefix'] = np.zeros_like(out['inputs'])
  if 'objective' not in out:  # A single objective.
    index = config_lib.OBJECTIVES.index(objectives.names[0])
    out['objective'] = np.full_like(out['inputs'], index)
  missing = batch_size - len(out['inputs'])
  if missing:
    out = {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
           for k, v in out.items()}
  return out


def _packed_batches(ds: grain.MapDataset, objectives: objectives_lib.Objectives, *, seq_len: int,
                    batch_size: int, drop_remainder: bool,
                    worker_count: int) -> grain.IterDataset:
  keys = objectives.packed_keys
  ds = ds.map(lambda example: {k: example[k] for k in keys})
  # Reading a window is a slice of an in-memory array: read-ahead threads would only poll.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={k: seq_len for k in keys}, num_packing_bins=batch_size,
      shuffle_bins=False)
  it = it.batch(batch_size, drop_remainder=drop_remainder)
  it = it.map(lambda b: _finish(b, batch_size, objectives))
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def train_dataset(windows: TokenWindows, objectives: objectives_lib.Objectives, *, seq_len: int,
                  batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                  worker_count: int = 0) -> grain.IterDataset:
  """An endless, seeded stream of this process's share of the training batches.

  `batch_size` is per process. Each process reads a disjoint slice of the windows.
  """
  if len(windows) < process_count:
    raise ValueError(f'the training split has {len(windows)} windows, fewer than '
                     f'{process_count} processes: use more text.')
  ds = grain.MapDataset.range(len(windows))[process_index::process_count]
  epoch_length = len(ds)

  def example(k: int, i: int) -> objectives_lib.Example:  # k: position in the endless stream.
    return objectives.build(windows[int(i)], seed=seed, stream=objectives_lib.TRAIN_STREAM,
                            epoch=k // epoch_length, index=int(i))

  ds = ds.shuffle(seed=seed).repeat().map_with_index(example)
  return _packed_batches(ds, objectives, seq_len=seq_len, batch_size=batch_size,
                         drop_remainder=True, worker_count=worker_count)


def eval_dataset(windows: TokenWindows, objectives: objectives_lib.Objectives, *, seq_len: int,
                 batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """One ordered pass over this process's share of the held-out windows, padded to full batches.

  The examples (masks, spans, splits) are the same at every evaluation of the run.
  """
  ds = grain.MapDataset.range(len(windows))[process_index::process_count]
  ds = ds.map(lambda i: objectives.build(windows[int(i)], seed=seed,
                                         stream=objectives_lib.EVAL_STREAM, epoch=0, index=int(i)))
  return _packed_batches(ds, objectives, seq_len=seq_len, batch_size=batch_size,
                         drop_remainder=False, worker_count=0)

