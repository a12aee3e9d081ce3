"""Units encoded into token ids, in this process or in a pool of worker processes.

  unit -> documents.decode_unit -> texts -> SentencePiece ids -> per split: tokens (EOS after
  each finished document) and where those documents end (Encoded)

Encoder.map yields the units' encodings in the order the units came (the oldest in flight first),
whatever the number of workers, with at most two units per worker in flight: the bound on memory.
Workers are spawned, never forked, and hold the tokenizer, the Reading and skip_bad. A unit's
encoding depends on the unit and the tokenizer alone, so the store's bytes do not depend on the
workers.
"""

import collections
from collections.abc import Iterator
import dataclasses
import multiprocessing
import os
from typing import Any

import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.data import documents as documents_lib
from pretrax.data import store as store_lib
from pretrax.data import units as units_lib

# A text longer than this (in characters) is tokenized in slices (see encode_texts). Above every
# piece of a text file (at most ~2 MB), so those are tokenized as they always were.
ENCODE_CHARS = 4 << 20


@dataclasses.dataclass
class Encoded:
  """A unit tokenized: per split, its tokens (EOS after each finished document) and where those
  documents end."""

  tokens: dict[str, np.ndarray]
  doc_ends: dict[str, np.ndarray]
  bad: list[str]
  empty: int


def text_slices(text: str, size: int) -> list[str]:
  """`text` in slices of at most `size` characters, each ending at a line end where it has one
  (else at a space, else anywhere)."""
  slices, start = [], 0
  while len(text) - start > size:
    end = text.rfind('\n', start, start + size) + 1
    if end <= start:
      end = text.rfind(' ', start, start + size) + 1
    if end <= start:
      end = start + size
    slices.append(text[start:end])
    start = end
  slices.append(text[start:])
  return slices


def encode_texts(tok: tokenizer_lib.Tokenizer, texts: list[str], num_threads: int) -> list:
  """Each text's token ids (an array of the store's dtype).

  SentencePiece keeps ~30 bytes of state per character of each input it encodes, and a list of ids
  costs ~36 bytes a token: a text longer than ENCODE_CHARS (a many-MB JSON record or Parquet cell)
  is encoded slice by slice (text_slices), each slice's ids turned into an array at once, so a
  record costs about its own size, not 40 times it. Shorter texts, every text piece of a text file
  included, are encoded whole."""
  dtype = store_lib.token_dtype(tok.vocab_size)
  short = [i for i, t in enumerate(texts) if len(t) <= ENCODE_CHARS]
  out: list = [None] * len(texts)
  if short:
    for i, ids in zip(
      short, tok.encode_batch([texts[i] for i in short], num_threads=num_threads), strict=True
    ):
      out[i] = np.array(ids, dtype)
  for i, text in enumerate(texts):
    if out[i] is None:
      out[i] = np.concatenate(
        [np.array(tok.encode(piece), dtype) for piece in text_slices(text, ENCODE_CHARS)]
      )
  return out


def encode_unit(
  unit: units_lib.Unit,
  tok: tokenizer_lib.Tokenizer,
  reading: units_lib.Reading,
  skip_bad: bool,
  num_threads: int = 1,
) -> Encoded:
  docs = documents_lib.decode_unit(unit, reading, skip_bad)
  ids = encode_texts(tok, docs.texts, num_threads)
  dtype = store_lib.token_dtype(tok.vocab_size)
  eos = np.array([tokenizer_lib.EOS_ID], dtype)
  tokens, doc_ends = {}, {}
  for k, split in enumerate(store_lib.SPLITS):
    chosen = [i for i, s in enumerate(docs.splits) if s == k]
    # A finished document is followed by EOS; a piece of one still going on is not.
    pieces = [p for i in chosen for p in ((ids[i], eos) if docs.ends[i] else (ids[i],))]
    tokens[split] = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    lengths = np.array([len(ids[i]) + docs.ends[i] for i in chosen], np.int64)
    doc_ends[split] = np.cumsum(lengths)[np.array([docs.ends[i] for i in chosen], bool)]
  return Encoded(tokens, doc_ends, docs.bad, docs.empty)


# (tokenizer, reading, skip_bad) in a worker process.
_worker: tuple[tokenizer_lib.Tokenizer, units_lib.Reading, bool] | None = None


def _start_worker(model_proto: bytes, reading: units_lib.Reading, skip_bad: bool) -> None:
  global _worker
  _worker = (tokenizer_lib.Tokenizer(model_proto), reading, skip_bad)


def _encode_in_worker(unit: units_lib.Unit) -> Encoded:
  if _worker is None:
    raise RuntimeError('_encode_in_worker runs only in a pool started with _start_worker')
  return encode_unit(unit, *_worker)


class Encoder:
  """Encodes units in order, in `workers` processes (0: in this one, with SentencePiece's
  threads), with at most two units per worker in flight: the bound on memory."""

  def __init__(
    self, tok: tokenizer_lib.Tokenizer, reading: units_lib.Reading, skip_bad: bool, workers: int
  ):
    self.tok, self.reading, self.skip_bad, self.workers = tok, reading, skip_bad, workers
    self.pool = None
    if workers > 0:
      context = multiprocessing.get_context('spawn')  # No fork of a process that may hold threads.
      self.pool = context.Pool(
        workers,
        initializer=_start_worker,
        initargs=(tok.model_proto, reading, skip_bad),
      )

  def map(self, items: Iterator[tuple]) -> Iterator[tuple]:
    """(meta, unit) -> (meta, unit.size, Encoded), in order."""
    if self.pool is None:
      threads = os.cpu_count() or 1
      for meta, unit in items:
        yield meta, unit.size, encode_unit(unit, self.tok, self.reading, self.skip_bad, threads)
      return
    pending: collections.deque[tuple[Any, int, multiprocessing.pool.AsyncResult[Encoded]]] = (
      collections.deque()
    )
    for meta, unit in items:
      pending.append((meta, unit.size, self.pool.apply_async(_encode_in_worker, (unit,))))
      while len(pending) >= 2 * self.workers:
        meta_, size, result = pending.popleft()
        yield meta_, size, result.get()
    while pending:
      meta_, size, result = pending.popleft()
      yield meta_, size, result.get()

  def close(self) -> None:
    if self.pool is not None:
      self.pool.terminate()
      self.pool.join()
