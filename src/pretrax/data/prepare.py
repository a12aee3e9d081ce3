"""`pretrax prepare`: tokenize and pack a corpus once into ArrayRecord shards of fixed-length rows.

Training on prepared data reads rows by index, so the global batch of step k is a pure function of
(seed, k) and each process takes its slice of it: a run resumed on another number of processes or
devices sees exactly the batches it would have seen (the text pipeline's iterator state belongs to
its process count).

Layout of DIR:
  meta.json              seq_len, rows and tokens per split, the config's data fields, shard names
  tokenizer.model        the SentencePiece model the rows were encoded with
  train-00000-of-0000N.array_record, eval-...: one record per row, int32 (4, seq_len):
                         inputs, targets, segment_ids (1-based, 0 = padding), positions

A row holds whole windows (see pipeline.tokenize_windows): a full window of seq_len + 1 tokens alone,
shorter ones (document ends) packed best-fit. A short window of m tokens is given m slots although
causal LM uses m - 1, so that any objective's example (masked LM keeps all m) fits where it was.
"""

import bisect
import json
import multiprocessing
import os
import time
from collections.abc import Callable

import grain
import numpy as np

from pretrax import config as config_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.data import objectives as objectives_lib
from pretrax.data import pipeline

META_FILE = 'meta.json'
TOKENIZER_FILE = 'tokenizer.model'
FORMAT_VERSION = 1
FIELDS = ('inputs', 'targets', 'segment_ids', 'positions')
_CHUNK_DOCS = 256  # Documents per tokenizing task: small enough for steady progress lines.


def pack_rows(windows: pipeline.TokenWindows, seq_len: int) -> list[list[int]]:
  """Window indices per row: full windows alone, the rest best-fit decreasing by slot count."""
  lengths = windows.ends - windows.starts
  rows = [[int(i)] for i in np.flatnonzero(lengths > seq_len)]
  short = np.flatnonzero(lengths <= seq_len)
  short = short[np.argsort(-lengths[short], kind='stable')]
  free_sizes: list[int] = []  # Sorted distinct free space of the open rows.
  rows_with_free: dict[int, list[int]] = {}  # Free space -> rows (indices into `rows`).
  for i in short:
    need = int(lengths[i])
    k = bisect.bisect_left(free_sizes, need)
    if k < len(free_sizes):
      free = free_sizes[k]
      row = rows_with_free[free].pop()
      if not rows_with_free[free]:
        del free_sizes[k], rows_with_free[free]
      rows[row].append(int(i))
    else:
      free, row = seq_len, len(rows)
      rows.append([int(i)])
    left = free - need
    if left > 0:
      if left not in rows_with_free:
        bisect.insort(free_sizes, left)
        rows_with_free[left] = []
      rows_with_free[left].append(row)
  return rows


def row_array(windows: pipeline.TokenWindows, row: list[int], seq_len: int) -> np.ndarray:
  """The (4, seq_len) int32 record of one row: causal inputs and targets of each window."""
  out = np.zeros((4, seq_len), np.int32)
  offset = 0
  for segment, i in enumerate(row, start=1):
    window = windows[i]
    n = len(window) - 1
    out[0, offset:offset + n] = window[:-1]
    out[1, offset:offset + n] = window[1:]
    out[2, offset:offset + n] = segment
    out[3, offset:offset + n] = np.arange(n)
    offset += len(window) if len(window) <= seq_len else n
  return out


def row_windows(row: np.ndarray) -> list[tuple[int, np.ndarray]]:
  """(offset, window tokens) of each window in a record: the inverse of row_array."""
  inputs, targets, segment_ids = row[0], row[1], row[2]
  starts = np.flatnonzero((segment_ids > 0)
                          & (np.concatenate([[0], segment_ids[:-1]]) != segment_ids))
  out = []
  for start in starts:
    end = start + int(np.sum(segment_ids[start:] == segment_ids[start]))
    out.append((int(start), np.concatenate([inputs[start:end], targets[end - 1:end]])))
  return out


# ---- Reading rows into batches ----------------------------------------------------------------


def row_example(row: np.ndarray, objectives: objectives_lib.Objectives, *, seed: int, stream: int,
                epoch: int, row_id: int) -> dict[str, np.ndarray]:
  """One packed row of pipeline.BATCH_KEYS from a (4, L) record: the objective's example of each
  window, laid where the window was, seeded by the window's place in the data."""
  inputs, targets, segment_ids, positions = row
  if objectives.names == ('causal_lm',):
    return {'inputs': inputs, 'targets': targets, 'segment_ids': segment_ids,
            'positions': positions, 'weights': (segment_ids > 0).astype(np.float32),
            'prefix': np.zeros_like(inputs),
            'objective': np.full_like(inputs, config_lib.OBJECTIVES.index('causal_lm'))}
  seq_len = len(inputs)
  out = _empty_row(seq_len)
  for segment, (offset, window) in enumerate(row_windows(row), start=1):
    example = objectives.build(window, seed=seed, stream=stream, epoch=epoch,
                               index=row_id * (seq_len + 1) + offset)
    n = len(example['inputs'])
    for k in ('inputs', 'targets', 'weights', 'prefix', 'objective'):
      out[k][offset:offset + n] = example[k]
    out['segment_ids'][offset:offset + n] = segment
    out['positions'][offset:offset + n] = np.arange(n)
  return out


def _empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """A row of padding: segment 0, weight 0."""
  return {k: np.zeros(seq_len, np.float32 if k == 'weights' else np.int32)
          for k in pipeline.BATCH_KEYS}


def _stack(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in pipeline.BATCH_KEYS}


def prepared_train_dataset(rows: grain.MapDataset, objectives: objectives_lib.Objectives, *,
                           global_batch: int, seed: int, start_step: int, process_index: int = 0,
                           process_count: int = 1) -> grain.IterDataset:
  """This process's slice of the global batch of every step from `start_step` on.

  The global batch of step k is rows k*B .. k*B+B-1 of a seeded shuffle of all rows (re-shuffled
  each epoch): a function of (seed, k) only, so the process count may change between runs.
  """
  n = len(rows)
  order = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
  local = global_batch // process_count

  def batch_at(step: int) -> dict[str, np.ndarray]:
    first = step * global_batch + process_index * local
    examples = []
    for j in range(first, first + local):
      row_id = int(order[j])
      examples.append(row_example(rows[row_id], objectives, seed=seed,
                                  stream=objectives_lib.TRAIN_STREAM, epoch=j // n, row_id=row_id))
    return _stack(examples)

  steps = grain.MapDataset.range(start_step, 2**62).map(batch_at)
  # Threads read ahead: the records come from files now, not from memory.
  return steps.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def prepared_eval_batches(rows: grain.MapDataset, objectives: objectives_lib.Objectives, *,
                          global_batch: int, seed: int, process_index: int = 0,
                          process_count: int = 1):
  """One ordered pass over the held-out rows: this process's slice of each global batch, the last
  one padded with empty rows."""
  n, local = len(rows), global_batch // process_count
  empty = _empty_row(rows[0].shape[1])
  for first in range(0, n, global_batch):
    ids = range(first + process_index * local, first + (process_index + 1) * local)
    yield _stack([row_example(rows[i], objectives, seed=seed, stream=objectives_lib.EVAL_STREAM,
                              epoch=0, row_id=i) if i < n else empty for i in ids])

# ---- Tokenizing in worker processes ------------------------------------------------------------

_worker_tokenizer: tokenizer_lib.Tokenizer | None = None


def _start_worker(model_proto: bytes) -> None:
  global _worker_tokenizer
  _worker_tokenizer = tokenizer_lib.Tokenizer(model_proto)


def _encode_chunk(documents: list[str]) -> list[list[int]]:
  return _worker_tokenizer.encode_batch(documents)


def encode_parallel(documents: list[str], tok: tokenizer_lib.Tokenizer, workers: int,
                    log: Callable[[str], None], what: str) -> list[list[int]]:
  """Token ids of every document, in order, encoded by `workers` processes with progress lines."""
  chunks = [documents[i:i + _CHUNK_DOCS] for i in range(0, len(documents), _CHUNK_DOCS)]
  total_chars = sum(len(d) for d in documents)
  encoded: list[list[int]] = []
  start, last_line, done_chars = time.perf_counter(), 0.0, 0
  context = multiprocessing.get_context('spawn')  # No fork of a process that may hold threads.
  with context.Pool(workers, initializer=_start_worker, initargs=(tok.model_proto,)) as pool:
    for chunk, ids in zip(chunks, pool.imap(_encode_chunk, chunks)):
      encoded.extend(ids)
      done_chars += sum(len(d) for d in chunk)
      now = time.perf_counter()
      if now - last_line > 5 or done_chars == total_chars:
        last_line = now
        rate = done_chars / max(now - start, 1e-9)
        log(f'{what}: tokenized {done_chars / 1e6:,.1f} of {total_chars / 1e6:,.1f} M characters '
            f'({rate / 1e6:.2f} M chars/s, ETA {(total_chars - done_chars) / rate:.0f} s)')
  return encoded


# ---- Writing and reading ----------------------------------------------------------------------


def write_split(out_dir: str, split: str, windows: pipeline.TokenWindows, seq_len: int,
                num_shards: int, log: Callable[[str], None]) -> dict:
  from array_record.python import array_record_module

  rows = pack_rows(windows, seq_len)
  num_shards = max(1, min(num_shards, len(rows)))
  names = [f'{split}-{k:05d}-of-{num_shards:05d}.array_record' for k in range(num_shards)]
  bounds = np.linspace(0, len(rows), num_shards + 1).astype(int)
  real = 0
  for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
    writer = array_record_module.ArrayRecordWriter(os.path.join(out_dir, name), 'group_size:1')
    for row in rows[lo:hi]:
      array = row_array(windows, row, seq_len)
      real += int(np.sum(array[2] > 0))
      writer.write(array.tobytes())
    writer.close()
  log(f'{split}: {len(rows):,} rows of {seq_len} in {num_shards} shard(s), '
      f'{real / max(len(rows) * seq_len, 1):.1%} of slots hold a target')
  return {'shards': names, 'rows': len(rows), 'targets': real}


def prepare(c, out_dir: str, workers: int, log: Callable[[str], None] = print) -> dict:
  """Reads the config's corpus, tokenizes it (its tokenizer.path, or one trained on the train
  split), packs both splits and writes them to `out_dir`; returns the metadata."""
  from pretrax.data import sources

  os.makedirs(out_dir, exist_ok=True)
  started = time.perf_counter()
  files, documents = sources.read_configured(c, log)
  train_docs, eval_docs = sources.split_by_position(documents, c.data.eval_fraction)
  tok = tokenizer_lib.from_config(c, train_docs, log)
  tok.save(os.path.join(out_dir, TOKENIZER_FILE))
  seq_len = c.data.seq_len
  meta = {'format': FORMAT_VERSION, 'seq_len': seq_len, 'vocab_size': tok.vocab_size,
          'source_files': len(files), 'documents': len(documents),
          'data': {k: c.data[k] for k in ('path', 'separator', 'window_stride', 'eval_fraction')},
          'splits': {}}
  counts = np.zeros(tok.vocab_size, np.int64)
  for split, docs, stride in (('train', train_docs, c.data.window_stride), ('eval', eval_docs, 0)):
    windows = pipeline.windows_of(encode_parallel(docs, tok, workers, log, split), seq_len, stride)
    if not len(windows):
      raise sources.DataError(f'the {split} split of data.path={c.data.path!r} is empty: use more '
                              'text or change data.eval_fraction.')
    if split == 'train':
      counts += np.bincount(windows.tokens, minlength=tok.vocab_size)
    meta['splits'][split] = write_split(out_dir, split, windows, seq_len, workers, log)
  counts[tok.special_ids()] = 0
  meta['most_frequent_token'] = int(np.argmax(counts))
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(meta, f, indent=1)
  log(f'prepared {out_dir} in {time.perf_counter() - started:.1f} s')
  return meta


class PreparedData:
  """A prepared directory opened for reading: rows by index, per split."""

  def __init__(self, path: str):
    from pretrax.data import sources

    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
      raise sources.DataError(f'data.prepared={path!r} has no {META_FILE}: make it with '
                              '`pretrax prepare --config=... --output=DIR`.')
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.path = path
    self.seq_len = int(self.meta['seq_len'])
    self.tokenizer_path = os.path.join(path, TOKENIZER_FILE)

  def rows(self, split: str):
    """A random-access source of (4, seq_len) int32 rows."""
    paths = [os.path.join(self.path, name) for name in self.meta['splits'][split]['shards']]
    source = grain.sources.ArrayRecordDataSource(paths)
    seq_len = self.seq_len
    return grain.MapDataset.source(source).map(
        lambda record: np.frombuffer(record, np.int32).reshape(4, seq_len))
