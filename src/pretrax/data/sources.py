"""Corpus files, streamed: paths -> files -> units of about 1 MB of text -> documents.

Formats, by suffix, mixed freely in one corpus, each read by a kept library:
  .jsonl, .json     JSON lines; the document is the `data.text_field` of each object
  .parquet          the `data.text_field` column (pyarrow, row group by row group)
  anything else     UTF-8 text: a file is one document, or `data.separator` splits it
  + .gz / .zst      on text and JSON lines (gzip, zstandard), decompressed as they stream
Paths are local or on a bucket (`gs://`, through etils.epath / fsspec).

The main process only reads bytes and cuts them into units at line (or separator) boundaries;
`decode_unit`, which runs in the tokenizing workers, parses them into documents. A unit never holds
more than a few MB, so nothing here grows with the corpus. Unit boundaries depend on the bytes
alone, which makes everything downstream the same for any number of workers and hosts.

Held-out documents are chosen by a hash of their text (so exact duplicates share a split), except in
a corpus of a single text document, which is cut by position as nanoGPT cuts Tiny Shakespeare.
"""

from collections.abc import Callable, Iterator
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig

from etils import epath

from pretrax import errors

UNIT_BYTES = 1 << 20  # Text per unit: a worker's task, and the grain of shard boundaries.
_HASH_BYTES = 1 << 20  # A document's split is decided by its first MB.
_PARQUET_BATCH_BYTES = 16 << 20  # Parquet is read in batches of about this much (uncompressed).
_STDLIB_MAX_BYTES = 1_200_000  # The fallback corpus stays small: a fresh clone's quickstart.
TRAIN, EVAL = 0, 1


class DataError(errors.PretraxError, ValueError):
  """Input that cannot be read; the message names the file (and line) and the fix."""


class _Unreadable(Exception):
  """A damaged file (its message names it); file_units decides whether that stops the work."""


# ---- Files ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputFile:
  path: str
  size: int  # Bytes on disk (compressed if it is).
  mtime: float


def file_format(path: str) -> tuple[str, str]:
  """(format, compression): format is text | jsonl | parquet, compression '' | gz | zst."""
  name = path.lower()
  compression = ''
  for suffix in ('.gz', '.zst'):
    if name.endswith(suffix):
      compression, name = suffix[1:], name[: -len(suffix)]
  if name.endswith(('.jsonl', '.json')):
    return 'jsonl', compression
  if name.endswith('.parquet'):
    if compression:
      raise DataError(
        f'{path}: Parquet compresses inside the file; remove the .{compression} layer around it.'
      )
    return 'parquet', ''
  return 'text', compression


def _is_remote(path: str) -> bool:
  return '://' in path


def _expand_remote(part: str) -> list[str]:
  """Files under a bucket path: itself, everything below a directory, or a glob's matches."""
  root = epath.Path(part)
  wildcards = [i for i, ch in enumerate(part) if ch in '*?[']
  if not wildcards:
    if root.is_dir():
      return [str(p) for p in root.rglob('*') if p.is_file()]
    return [part] if root.exists() else []
  base = part[: wildcards[0]].rsplit('/', 1)[0]  # The directory before the first wildcard.
  return [str(p) for p in epath.Path(base).glob(part[len(base) + 1 :]) if p.is_file()]


def expand_paths(spec: str) -> list[str]:
  """Files named by a comma-separated list of files, directories (recursive) and globs, sorted."""
  files: list[str] = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    if _is_remote(part):
      files.extend(_expand_remote(part))
      continue
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      matches = glob.glob(os.path.join(part, '**', '*'), recursive=True)
    else:
      matches = glob.glob(part, recursive=True)
    files.extend(m for m in matches if os.path.isfile(m))
  return sorted(dict.fromkeys(files))


def describe(paths: list[str]) -> list[InputFile]:
  out = []
  for p in paths:
    if _is_remote(p):
      info = epath.Path(p).stat()
      out.append(InputFile(p, int(info.length), float(info.mtime or 0)))
    else:
      info = os.stat(p)
      out.append(InputFile(os.path.abspath(p), info.st_size, info.st_mtime))
  return out


def stdlib_files() -> list[str]:
  """The Python standard library's top-level .py sources, about 1.2 MB of them: a corpus every
  machine already has."""
  root = sysconfig.get_paths()['stdlib']
  out, total = [], 0
  for path in sorted(glob.glob(os.path.join(root, '*.py'))):
    if total >= _STDLIB_MAX_BYTES:
      break
    out.append(path)
    total += os.path.getsize(path)
  return out


# ---- Streams ----------------------------------------------------------------------------------


class _ZstdStream(io.RawIOBase):
  """A .zst file decompressed as it is read, frame after frame. A file cut short is an error
  (zstandard's own stream_reader would just end early)."""

  def __init__(self, raw, path: str):
    import zstandard  # Only needed for .zst input.

    self._zstd, self._raw, self._path = zstandard, raw, path
    self._obj = zstandard.ZstdDecompressor().decompressobj()
    self._buffer, self._fed = b'', False

  def readable(self) -> bool:
    return True

  def readinto(self, target) -> int:
    while not self._buffer:
      chunk = self._raw.read(1 << 18)
      if not chunk:
        if self._fed and not self._obj.eof:
          raise EOFError('the compressed stream ends before its last frame does')
        return 0
      while chunk:
        if self._obj.eof:  # The next frame.
          self._obj = self._zstd.ZstdDecompressor().decompressobj()
        self._fed = True
        self._buffer += self._obj.decompress(chunk)
        chunk = self._obj.unused_data if self._obj.eof else b''
    n = min(len(target), len(self._buffer))
    target[:n] = self._buffer[:n]
    self._buffer = self._buffer[n:]
    return n


def _open_raw(path: str):
  return epath.Path(path).open('rb') if _is_remote(path) else open(path, 'rb')


def open_bytes(path: str, compression: str, raw=None):
  """A binary stream of the file's (decompressed) bytes (read from `raw` if given)."""
  raw = raw or _open_raw(path)
  if compression == 'gz':
    return gzip.GzipFile(fileobj=raw)
  if compression == 'zst':
    return io.BufferedReader(_ZstdStream(raw, path), 1 << 20)
  return raw


def _read_errors() -> tuple[type[Exception], ...]:
  kinds: list[type[Exception]] = [EOFError, OSError, gzip.BadGzipFile]
  try:
    import zstandard

    kinds.append(zstandard.ZstdError)
  except ImportError:
    pass
  return tuple(kinds)


def read_lines(files: list[str]) -> Iterator[tuple[str, int, bytes]]:
  """(file, line number, line) of every non-blank line of the files, local or on a bucket,
  decompressed as they stream: small record files (fine-tuning records, eval tasks)."""
  for path in files:
    try:
      with open_bytes(path, file_format(path)[1]) as stream:
        for number, line in enumerate(stream, start=1):
          if line.strip():
            yield path, number, line
    except _read_errors() as e:
      raise DataError(
        f'{path}: cannot be read ({type(e).__name__}: {e}): check the file.'
      ) from None


# ---- Units ------------------------------------------------------------------------------------


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
    raise DataError(
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
  fmt, compression = file_format(path)
  damage: tuple[type[Exception], ...] = (_Unreadable, *_read_errors())
  try:
    with _open_raw(path) as raw:
      if fmt == 'parquet':
        units = _parquet_units(path, raw, r)
      else:
        stream = open_bytes(path, compression, raw)
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
      raise DataError(
        f'{message}: fix or remove the file, or set '
        '--config.data.skip_bad_records=true to keep what precedes the damage.'
      ) from None
    on_bad(message)


# ---- Documents (in the tokenizing workers) ----------------------------------------------------


@dataclasses.dataclass
class Documents:
  """A unit decoded: texts with, for each, whether it ends its document and its split."""

  texts: list[str]
  ends: list[bool]
  splits: list[int]
  bad: list[str]  # Skipped records, each as 'FILE:LINE: reason'.
  empty: int = 0  # Documents without text, dropped.


def _bad(where: str, reason: str, skip: bool, out: Documents) -> None:
  if not skip:
    raise DataError(
      f'{where}: {reason}: fix the record, or set '
      '--config.data.skip_bad_records=true to skip (and count) such records.'
    )
  out.bad.append(f'{where}: {reason}')


def decode_unit(unit: Unit, r: Reading, skip_bad: bool) -> Documents:
  """The documents of a unit; a bad record raises DataError naming its file and line or row, or
  with `skip_bad` is counted and left out."""
  out = Documents([], [], [], [])
  if unit.kind == 'text':
    assert isinstance(unit.payload, bytes)  # Text and JSONL units hold bytes, parquet ones a list.
    start = 0
    for end, ends_doc, split in unit.pieces:
      piece = unit.payload[start:end]
      where = f'{unit.path}:byte {unit.first + start}'
      start = end
      if b'\x00' in piece:
        _bad(where, 'binary data (NUL bytes) where text was expected', skip_bad, out)
        continue
      try:
        text = piece.decode('utf-8')
      except UnicodeDecodeError as e:
        _bad(
          f'{unit.path}:byte {unit.first + (end - len(piece)) + e.start}',
          f'not UTF-8 text ({e.reason})',
          skip_bad,
          out,
        )
        continue
      _add(out, text, ends_doc, split, whole=False)
    return out
  if unit.kind == 'jsonl':
    assert isinstance(unit.payload, bytes)
    lines = unit.payload.split(b'\n')
    for i, line in enumerate(lines):
      if line.strip():
        _add_record(out, line, f'{unit.path}:{unit.first + i}', r, skip_bad)
    return out
  for i, value in enumerate(unit.payload):
    where = f'{unit.path}:row {unit.first + i}'
    if not isinstance(value, str):
      _bad(where, f'{r.text_field!r} is {type(value).__name__}, not a string', skip_bad, out)
      continue
    _add(out, value, True, EVAL if held_out(value.encode('utf-8'), r.eval_fraction) else TRAIN)
  return out


def _add_record(out: Documents, line: bytes, where: str, r: Reading, skip_bad: bool) -> None:
  try:
    record = json.loads(line)
  except UnicodeDecodeError as e:
    return _bad(where, f'not UTF-8 ({e.reason})', skip_bad, out)
  except ValueError as e:
    return _bad(where, f'malformed JSON ({e})', skip_bad, out)
  if not isinstance(record, dict) or r.text_field not in record:
    return _bad(
      where,
      f'no {r.text_field!r} field (set --config.data.text_field to the field that holds the text)',
      skip_bad,
      out,
    )
  text = record[r.text_field]
  if not isinstance(text, str):
    return _bad(where, f'{r.text_field!r} is {type(text).__name__}, not a string', skip_bad, out)
  _add(out, text, True, EVAL if held_out(text.encode('utf-8'), r.eval_fraction) else TRAIN)


def _add(out: Documents, text: str, ends_doc: bool, split: int, whole: bool = True) -> None:
  if whole and not text:  # A record without text: nothing to learn, nothing to hold out.
    out.empty += 1
    return
  out.texts.append(text)
  out.ends.append(ends_doc)
  out.splits.append(split)
