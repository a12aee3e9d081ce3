"""Corpus files cut into units: files -> blocks -> units of about UNIT_BYTES of input, not decoded.

One reader per format, behind one interface, file_units (documents.decode_unit parses the units):
  text     a file is one document sent in pieces, or `separator` splits it into documents grouped
           into units (a document longer than a unit is sent in pieces)
  jsonl    whole lines, a long record read on until its line ends
  parquet  the text column's values, read in batches of about 16 MB (pyarrow, row group by row
           group)

The main process only reads bytes and cuts them into units at line (or separator) boundaries. A
unit never holds more than a few MB (plus the longest JSON record or Parquet cell), so nothing here
grows with the corpus. Unit boundaries depend on the bytes alone (and on UNIT_BYTES, which the
plan records), which makes everything downstream the same for any number of workers and hosts.

Held-out documents are chosen by a hash of their text (held_out; so exact duplicates share a
split), except in a corpus of a single text document, which is cut by position
(`Reading.position_boundary`) as nanoGPT cuts Tiny Shakespeare.
"""

from collections.abc import Callable, Iterator
import dataclasses
import hashlib

from pretrax.data import sources

UNIT_BYTES = 1 << 20  # Text per unit: a worker's task, and the grain of shard boundaries.
_HASH_BYTES = 1 << 20  # A document's split is decided by its first MB.
_PARQUET_BATCH_BYTES = 16 << 20  # Parquet is read in batches of about this much (uncompressed).
TRAIN, EVAL = 0, 1


class _Unreadable(Exception):
  """A damaged file (its message names it); file_units decides whether that stops the work."""


@dataclasses.dataclass(frozen=True)
class Unit:
  """About UNIT_BYTES of one file's input, not yet decoded.

  text:    `payload` bytes; `pieces` are (end offset, ends a document, split) of each piece.
  jsonl:   `payload` bytes of whole lines; `first` is the first line's number (1-based).
  parquet: `payload` a list of the column's values; `first` is the first row's number (0-based).
  """

  path: str
  kind: str
  first: int
  payload: bytes | list
  size: int  # Input bytes (characters for parquet): what shard boundaries count.
  pieces: tuple[tuple[int, bool, int], ...] = ()
  disk_end: int = 0  # Bytes of the file on disk read so far (compressed, if it is): progress.


@dataclasses.dataclass(frozen=True)
class Reading:
  """How to read every file of a corpus."""

  separator: str = ''
  text_field: str = 'text'
  eval_fraction: float = 0.1
  # > 0: the corpus is one text document, cut at this byte into train / held-out (nanoGPT).
  position_boundary: int = 0


def held_out(text: bytes, eval_fraction: float) -> bool:
  """A document's split, from a hash of its first MB: fixed whatever reads it, and the same for
  duplicates."""
  digest = hashlib.blake2b(text[:_HASH_BYTES], digest_size=8).digest()
  return int.from_bytes(digest, 'little') < eval_fraction * 2.0**64


def _char_boundary(block: bytes, end: int) -> int:
  """The largest offset <= end that does not split a UTF-8 character. At the block's end the next
  bytes are unknown: a multi-byte character there is left whole for the next block."""
  if end >= len(block):
    end = len(block)
    if end == 0 or block[end - 1] < 0x80:
      return end
    end -= 1  # Back to the start of the last character, complete or not.
  while end > 0 and (block[end] & 0xC0) == 0x80:
    end -= 1
  return end


def _read(stream, size: int) -> bytes:
  """`size` bytes, fewer only at the end: a stream may return less per call (a bucket, a
  decompressor), and unit boundaries must depend on the bytes alone."""
  data = stream.read(size)
  if len(data) in (0, size):
    return data
  chunks = [data]
  while size > (got := sum(map(len, chunks))) and (more := stream.read(size - got)):
    chunks.append(more)
  return b''.join(chunks)


def _through_next_cut(stream, block: bytes, cut: bytes, size: int) -> bytes:
  """`block` and what follows it in the stream up to the first `cut` (or the stream's end).

  Chunks are kept in a list and joined once: growing one bytes object would copy a long record
  once per chunk, quadratic in its length."""
  chunks, tail = [block], block[len(block) - len(cut) + 1 :]  # A cut may straddle two chunks.
  while chunk := _read(stream, size):
    chunks.append(chunk)
    if cut in tail + chunk[: len(cut) - 1] or cut in chunk:
      break
    tail = chunk[len(chunk) - len(cut) + 1 :]
  return b''.join(chunks)


def _blocks(
  stream, size: int, cut: bytes = b'\n', head: bytes = b'', whole: bool = False
) -> Iterator[tuple[int, bytes]]:
  """(offset, bytes) blocks of about `size`, each ending just after a `cut`. `head` is what was
  already read from the stream.

  A block that holds no cut is, with `whole`, read on until one comes: a JSON line is one record
  however long, so memory grows with the longest record, never with the file. Without `whole` (a
  text document, sent in pieces) it ends at a character boundary, before any bytes that could be
  the start of a cut completed by the next block."""
  carry, offset = head, 0
  while True:
    chunk = _read(stream, size)
    block = carry + chunk
    if len(chunk) < size:  # The stream's end (_read returns less only there): nothing to cut.
      if block:
        yield offset, block
      return
    found = block.rfind(cut)
    if found < 0 and whole:
      block = _through_next_cut(stream, block, cut, size)
      found = block.rfind(cut)
    if found >= 0:
      end = found + len(cut)
    else:
      end = _char_boundary(block, len(block) - len(cut) + 1)
      if end <= 0:
        end = len(block)
    carry = block[end:]
    yield offset, block[:end]
    offset += end


def _text_units(path: str, stream, r: Reading) -> Iterator[Unit]:
  if r.separator:
    yield from _separated_units(path, stream, r)
    return
  # One document per file, streamed in pieces; its split is decided by its first MB.
  head = _read(stream, _HASH_BYTES)
  split = EVAL if held_out(head, r.eval_fraction) else TRAIN
  previous = None
  for offset, block in _blocks(stream, UNIT_BYTES, head=head):
    if previous is not None:
      yield _text_unit(path, *previous, ends_doc=False, split=split, r=r)
    previous = (offset, block)
  if previous is not None:
    yield _text_unit(path, *previous, ends_doc=True, split=split, r=r)


def _text_unit(
  path: str, offset: int, block: bytes, *, ends_doc: bool, split: int, r: Reading
) -> Unit:
  """A block of a one-document file; with a position boundary, the piece before it is train (and
  ends that part of the document) and the rest held out."""
  b = r.position_boundary
  pieces: tuple[tuple[int, bool, int], ...]
  if b and offset < b < offset + len(block):
    cut = _char_boundary(block, b - offset)
    pieces = ((cut, True, TRAIN), (len(block), ends_doc, EVAL))
  elif b:
    pieces = ((len(block), ends_doc, TRAIN if offset + len(block) <= b else EVAL),)
  else:
    pieces = ((len(block), ends_doc, split),)
  return Unit(path, 'text', offset, block, len(block), pieces)


def _separated_units(path: str, stream, r: Reading) -> Iterator[Unit]:
  """Documents split on the separator, grouped into units; a document longer than a unit is
  sent in pieces (its split is its first piece's)."""
  sep = r.separator.encode('utf-8')
  payload, pieces, unit_start = bytearray(), [], 0
  doc_split = None  # The split of a long document already partly sent.
  full = None  # A unit held back one block: if the file ends there, its last piece ends a document.
  for offset, block in _blocks(stream, UNIT_BYTES, cut=sep):
    if full is not None:
      yield full
      full = None
    parts = block.split(sep)
    ends_last = block.endswith(sep)
    if ends_last:
      parts = parts[:-1]
    for i, part in enumerate(parts):
      ends_doc = ends_last or i < len(parts) - 1
      if not part and ends_doc and doc_split is None:  # Nothing between two separators.
        continue
      if doc_split is None:
        doc_split = EVAL if held_out(part, r.eval_fraction) else TRAIN
      payload += part
      pieces.append((len(payload), ends_doc, doc_split))
      if ends_doc:
        doc_split = None
    if len(payload) >= UNIT_BYTES:
      full = Unit(path, 'text', unit_start, bytes(payload), len(payload), tuple(pieces))
      payload, pieces, unit_start = bytearray(), [], offset + len(block)
  if not pieces and full is not None:
    payload, pieces, unit_start = bytearray(full.payload), list(full.pieces), full.first
  elif full is not None:
    yield full
  if pieces:
    # The file ends a document even without a final separator.
    end, _, split = pieces[-1]
    pieces[-1] = (end, True, split)
    yield Unit(path, 'text', unit_start, bytes(payload), len(payload), tuple(pieces))


def _jsonl_units(path: str, stream) -> Iterator[Unit]:
  line = 1
  for _, block in _blocks(stream, UNIT_BYTES, whole=True):
    yield Unit(path, 'jsonl', line, block, len(block))
    line += block.count(b'\n')


def _parquet_batch_rows(parquet) -> int:
  """Rows per batch read: 1024, or fewer where the file's average row is large (over 16 KB), so
  that a file of many-MB cells is read a few cells at a time (1024 of them could be GBs)."""
  meta = parquet.metadata
  if not meta.num_rows:
    return 1024
  row_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
  return int(min(1024, max(1, _PARQUET_BATCH_BYTES * meta.num_rows // max(row_bytes, 1))))


def _parquet_units(path: str, raw, r: Reading) -> Iterator[Unit]:
  import pyarrow as pa
  import pyarrow.parquet as pq

  try:
    parquet = pq.ParquetFile(raw)
  except (pa.ArrowException, OSError) as e:
    raise _Unreadable(
      f'{path} is not a readable Parquet file ({" ".join(str(e).split())})'
    ) from None
  names = parquet.schema_arrow.names
  if r.text_field not in names:
    raise sources.DataError(
      f'{path} has no column {r.text_field!r} (it has {", ".join(names)}): set '
      '--config.data.text_field to the text column.'
    )
  values, size, first, row = [], 0, 0, 0
  try:
    for batch in parquet.iter_batches(
      batch_size=_parquet_batch_rows(parquet), columns=[r.text_field]
    ):
      column = batch.column(0).to_pylist()
      values.extend(column)
      size += sum(len(v) for v in column if isinstance(v, str))
      row += len(column)
      if size >= UNIT_BYTES:
        yield Unit(path, 'parquet', first, values, size)
        values, size, first = [], 0, row
  except (pa.ArrowException, OSError) as e:
    raise _Unreadable(
      f'{path}: the rows after row {row} are unreadable ({" ".join(str(e).split())})'
    ) from None
  if values:
    yield Unit(path, 'parquet', first, values, size)


def file_units(
  path: str, r: Reading, on_bad: Callable[[str], None] | None = None
) -> Iterator[Unit]:
  """The units of one file, in order. A truncated or corrupt compressed file raises DataError, or
  with `on_bad` is reported to it and ends there."""
  fmt, compression = sources.file_format(path)
  damage: tuple[type[Exception], ...] = (_Unreadable, *sources.read_errors())
  try:
    with sources.open_raw(path) as raw:
      if fmt == 'parquet':
        units = _parquet_units(path, raw, r)
      else:
        stream = sources.open_bytes(path, compression, raw)
        units = _jsonl_units(path, stream) if fmt == 'jsonl' else _text_units(path, stream, r)
      for unit in units:
        yield dataclasses.replace(unit, disk_end=raw.tell())
  except damage as e:
    what = 'truncated or corrupt' if compression else 'unreadable'
    message = (
      str(e)
      if isinstance(e, _Unreadable)
      else f'{path} is {what} ({type(e).__name__}: {" ".join(str(e).split())})'
    )
    if on_bad is None:
      raise sources.DataError(
        f'{message}: fix or remove the file, or set '
        '--config.data.skip_bad_records=true to keep what precedes the damage.'
      ) from None
    on_bad(message)
