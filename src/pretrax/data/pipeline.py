"""Batches from token stores, read by index: the global batch of step k is a function of (seed, k).

A split is one stream of tokens, each document followed by EOS (store.py). A training window is
seq_len + 1 tokens of it starting every `stride` tokens (stride seq_len: every next-token pair is in
one window; stride 1: nanoGPT's windows at every offset). Windows are shuffled by index (Grain's
O(1)-memory shuffle, reshuffled every epoch); with several sources, Grain's index mixture
interleaves them in proportion to their weights. The global batch of step k is rows k*B .. k*B+B-1
of that order, and each process reads its slice, so a run may resume on any number of processes.

A window may hold the end of one document and the start of the next: segment ids restart after
each EOS (attention never crosses a document), positions count from each document's start, and
the prediction across the boundary has no weight. The causal objective is built for a whole batch
at once in NumPy; the others (objectives.py) build each document piece of a row, laid where it was.

A batch is a language-model `Batch` (data/batch.py): every field but labels and label_weights.
"""

from collections.abc import Iterator
import dataclasses

import grain
import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.data import objectives as objectives_lib
from pretrax.data import store as store_lib
from pretrax.data.batch import Batch


@dataclasses.dataclass(frozen=True)
class Windows:
  """Windows of seq_len + 1 tokens every `stride` tokens of one split."""

  split: store_lib.Split
  seq_len: int
  stride: int

  def __len__(self) -> int:
    n = self.split.num_tokens - self.seq_len - 1
    return n // self.stride + 1 if n >= 0 else 0

  def read(self, i: int) -> np.ndarray:
    return self.split.read(i * self.stride, self.seq_len + 1)


def num_eval_windows(split: store_lib.Split, seq_len: int) -> int:
  """Windows every seq_len tokens that cover the held-out split: every next-token pair once."""
  return -(-max(split.num_tokens - 1, 0) // seq_len)


def eval_window(split: store_lib.Split, seq_len: int, i: int) -> tuple[int, int]:
  """(start, length) of held-out window i; the last may be shorter than seq_len + 1."""
  return i * seq_len, min(seq_len + 1, split.num_tokens - i * seq_len)


# ---- Rows -------------------------------------------------------------------------------------


def causal_rows(windows_BxT: np.ndarray, lengths_B: np.ndarray) -> Batch[np.ndarray]:
  """Causal LM rows of a batch of windows (int32, seq_len + 1 wide, the first lengths_B[i] real)."""
  inputs, targets = windows_BxT[:, :-1], windows_BxT[:, 1:]
  seq_len = inputs.shape[1]
  index = np.arange(seq_len, dtype=np.int32)
  real = index[None, :] < (lengths_B[:, None] - 1)
  eos = inputs == tokenizer_lib.EOS_ID
  # A segment starts at 0 and after every EOS; the EOS itself ends the segment before it.
  segment_ids = (np.cumsum(eos, axis=1, dtype=np.int32) - eos + 1) * real
  starts = np.zeros_like(eos)
  starts[:, 0] = True
  starts[:, 1:] = eos[:, :-1]
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return Batch(
    inputs=np.where(real, inputs, 0),
    segment_ids=segment_ids.astype(np.int32),
    positions=positions.astype(np.int32),
    targets=np.where(real, targets, 0),
    weights=(real & ~eos).astype(np.float32),
    prefix=np.zeros_like(inputs),
    objective=np.zeros_like(inputs),
  )


def _pieces(window: np.ndarray) -> list[tuple[int, int]]:
  """(start, end) of each document piece of a window: up to and including its EOS."""
  ends = np.flatnonzero(window[:-1] == tokenizer_lib.EOS_ID) + 1
  bounds = [0, *ends.tolist(), len(window)]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _row_examples(
  window: np.ndarray,
  length: int,
  objectives: objectives_lib.Objectives,
  *,
  seed: int,
  stream: int,
  epoch: int,
  window_id: int,
) -> Iterator[tuple[int, int, objectives_lib.Example]]:
  """(segment, start, example) of each document piece of a window of any objective: the piece's
  example, to be laid where the piece was, seeded by the piece's place in the data."""
  seq_len = len(window) - 1
  masked = objectives.names == ('masked_lm',)
  for segment, (a, b) in enumerate(_pieces(window[:length]), start=1):
    slots = min(b, seq_len) - a  # The last piece's final token is only a target.
    piece = window[a:b][:slots] if masked else window[a:b]
    if len(piece) < (1 if masked else 2):
      continue
    index = window_id * (seq_len + 1) + a
    yield segment, a, objectives.build(piece, seed=seed, stream=stream, epoch=epoch, index=index)


def build_batch(
  windows: list[np.ndarray],
  lengths: list[int],
  objectives: objectives_lib.Objectives,
  *,
  seed: int,
  stream: int,
  epochs: list[int],
  window_ids: list[int],
) -> Batch[np.ndarray]:
  if objectives.names == ('causal_lm',):
    return causal_rows(np.stack(windows), np.asarray(lengths))
  shape = (len(windows), len(windows[0]) - 1)
  # The examples' arrays, as (B, L) columns; they and the layout start as padding (zeros).
  columns = objectives_lib.Example(
    inputs=np.zeros(shape, np.int32),
    targets=np.zeros(shape, np.int32),
    weights=np.zeros(shape, np.float32),
    prefix=np.zeros(shape, np.int32),
    objective=np.zeros(shape, np.int32),
  )
  segment_ids, positions = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  for row, (w, n, e, i) in enumerate(zip(windows, lengths, epochs, window_ids, strict=True)):
    pieces = _row_examples(w, n, objectives, seed=seed, stream=stream, epoch=e, window_id=i)
    for segment, a, example in pieces:
      end = a + len(example.inputs)
      for column, values in zip(columns, example, strict=True):  # Field by field.
        column[row, a:end] = values
      segment_ids[row, a:end] = segment
      positions[row, a:end] = np.arange(end - a)
  return Batch(
    inputs=columns.inputs,
    segment_ids=segment_ids,
    positions=positions,
    targets=columns.targets,
    weights=columns.weights,
    prefix=columns.prefix,
    objective=columns.objective,
  )


# ---- Training and evaluation streams ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
  """One weighted source of a run: its training windows and held-out split."""

  name: str
  weight: float
  train: Windows
  eval: store_lib.Split


def window_order(sources: list[Source], seed: int) -> grain.MapDataset:
  """Index j of the endless training stream -> (source, window id, epoch of that source)."""
  streams = []
  for s, source in enumerate(sources):
    n = len(source.train)
    order = grain.MapDataset.range(n).shuffle(seed=seed + 1_000_003 * s).repeat()
    streams.append(order.map_with_index(lambda j, w, s=s, n=n: (s, int(w), j // n)))
  if len(streams) == 1:
    return streams[0]
  return grain.MapDataset.mix(streams, [source.weight for source in sources])


def train_batches(
  sources: list[Source],
  objectives: objectives_lib.Objectives,
  *,
  global_batch: int,
  seed: int,
  start_step: int,
  process_index: int = 0,
  process_count: int = 1,
  threads: int = 2,
) -> Iterator[Batch[np.ndarray]]:
  """This process's slice of the global batch of every step from `start_step` on."""
  for source in sources:
    if not len(source.train):
      raise ValueError(
        f'source {source.name!r} has fewer training tokens than one window of '
        f'{source.train.seq_len + 1}: use more text or a shorter data.seq_len.'
      )
  order = window_order(sources, seed)
  local = global_batch // process_count
  seq_len = sources[0].train.seq_len

  def batch_at(step: int) -> Batch[np.ndarray]:
    first = step * global_batch + process_index * local
    picks = [order[j] for j in range(first, first + local)]
    windows = [sources[s].train.read(w) for s, w, _ in picks]
    return build_batch(
      windows,
      [seq_len + 1] * local,
      objectives,
      seed=seed,
      stream=objectives_lib.TRAIN_STREAM,
      epochs=[e for _, _, e in picks],
      window_ids=[w for _, w, _ in picks],
    )

  steps = grain.MapDataset.range(start_step, 2**62).map(batch_at)
  return iter(
    steps.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads or 1)
    )
  )


def eval_batches(
  split: store_lib.Split,
  objectives: objectives_lib.Objectives,
  *,
  seq_len: int,
  global_batch: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch[np.ndarray]]:
  """One ordered pass over a held-out split: this process's slice of each global batch, the last
  one padded with empty rows. The examples are the same at every evaluation."""
  count = num_eval_windows(split, seq_len)
  local = global_batch // process_count
  for first in range(0, count, global_batch):
    ids = range(first + process_index * local, first + (process_index + 1) * local)
    windows, lengths = [], []
    for i in ids:
      start, n = eval_window(split, seq_len, i) if i < count else (0, 1)
      window = np.zeros(seq_len + 1, np.int32)
      if i < count:
        window[:n] = split.read(start, n)
      windows.append(window)
      lengths.append(n)
    yield build_batch(
      windows,
      lengths,
      objectives,
      seed=seed,
      stream=objectives_lib.EVAL_STREAM,
      epochs=[0] * local,
      window_ids=list(ids),
    )


def held_out_pieces(split: store_lib.Split, seq_len: int) -> Iterator[np.ndarray]:
  """The held-out split's document pieces of at most seq_len + 1 tokens, in order (for samples)."""
  for i in range(num_eval_windows(split, seq_len)):
    window = split.read(*eval_window(split, seq_len, i))
    for a, b in _pieces(window):
      yield window[a:b]
