"""Corpus files and their bytes: paths -> files -> (decompressed) byte streams.

Formats, by suffix, mixed freely in one corpus (file_format names them; units.py cuts each):
  .jsonl, .json     JSON lines; the document is the `data.text_field` of each object
  .parquet          the `data.text_field` column
  anything else     UTF-8 text: a file is one document, or `data.separator` splits it
  + .gz / .zst      on text and JSON lines (gzip, zstandard), decompressed as they stream
Paths are local or on a bucket (`gs://`, through etils.epath / fsspec).

The layer under everything that reads a corpus: it imports nothing of pretrax.data. Streams are
read as they decompress, never a whole file at once; a compressed file cut short raises one of
read_errors() rather than ending early.

DataError, the error of every input that cannot be read, lives here so that every layer above can
raise it.
"""

from collections.abc import Iterator
import dataclasses
import glob
import gzip
import io
import os
import sysconfig

from etils import epath

from pretrax import errors

_STDLIB_MAX_BYTES = 1_200_000  # The fallback corpus stays small: a fresh clone's quickstart.


class DataError(errors.PretraxError, ValueError):
  """Input that cannot be read; the message names the file (and line) and the fix."""


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
  """Each file with its size and mtime. A local path is resolved to the file it names (symlinks,
  '..'): a store's plan, like a resume's config check, takes two spellings of a corpus as one."""
  out = []
  for p in paths:
    if _is_remote(p):
      info = epath.Path(p).stat()
      out.append(InputFile(p, int(info.length), float(info.mtime or 0)))
    else:
      info = os.stat(p)
      out.append(InputFile(os.path.realpath(p), info.st_size, info.st_mtime))
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


def open_raw(path: str):
  return epath.Path(path).open('rb') if _is_remote(path) else open(path, 'rb')


def open_bytes(path: str, compression: str, raw=None):
  """A binary stream of the file's (decompressed) bytes (read from `raw` if given)."""
  raw = raw or open_raw(path)
  if compression == 'gz':
    return gzip.GzipFile(fileobj=raw)
  if compression == 'zst':
    return io.BufferedReader(_ZstdStream(raw, path), 1 << 20)
  return raw


def read_errors() -> tuple[type[Exception], ...]:
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
    except read_errors() as e:
      raise DataError(
        f'{path}: cannot be read ({type(e).__name__}: {e}): check the file.'
      ) from None
