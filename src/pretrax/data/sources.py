"""Text sources: paths and globs to files, files to documents, documents to a train/eval split."""

from collections.abc import Callable
import glob
import os
import sysconfig

# The fallback corpus is capped so that a fresh clone's quickstart stays a few minutes long.
_STDLIB_MAX_CHARS = 1_200_000


class DataError(ValueError):
  """Text that cannot be read; the message names the file and the fix."""


def expand_paths(spec: str) -> list[str]:
  """Files named by a comma-separated list of files, directories (recursive) and globs, sorted."""
  files: list[str] = []
  for part in (p.strip() for p in spec.split(',')):
    if not part:
      continue
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      matches = glob.glob(os.path.join(part, '**', '*'), recursive=True)
    else:
      matches = glob.glob(part, recursive=True)
    files.extend(m for m in matches if os.path.isfile(m))
  return sorted(dict.fromkeys(files))


def stdlib_files() -> list[str]:
  """The Python standard library's top-level .py sources: a corpus every machine already has."""
  root = sysconfig.get_paths()['stdlib']
  return sorted(glob.glob(os.path.join(root, '*.py')))


def read_documents(files: list[str], separator: str = '', max_chars: int = 0,
                   on_bad_file: Callable[[str, str], None] | None = None) -> list[str]:
  """One document per file, or each file split on `separator`; empty documents are dropped.

  An empty, binary or non-UTF-8 file raises DataError naming it, or, with `on_bad_file`, is
  reported to it as (path, reason) and skipped.
  """
  documents: list[str] = []
  total = 0
  for path in files:
    reason = None
    try:
      with open(path, encoding='utf-8') as f:
        text = f.read()
    except UnicodeDecodeError as e:
      reason = f'is not UTF-8 text ({e.reason} at byte {e.start})'
    else:
      if not text:
        reason = 'is empty'
      elif '\x00' in text:
        reason = 'is binary (it holds NUL bytes)'
    if reason:
      if on_bad_file is None:
        raise DataError(f'{path} {reason}: fix it, leave it out of data.path, or set '
                        '--config.data.skip_bad_files=true to skip such files.')
      on_bad_file(path, reason)
      continue
    parts = text.split(separator) if separator else [text]
    for part in parts:
      if part:
        documents.append(part)
        total += len(part)
    if max_chars and total >= max_chars:
      break
  return documents


def read_stdlib_documents() -> list[str]:
  # Some standard-library files are empty (package markers) or not UTF-8: not ours to fix.
  return read_documents(stdlib_files(), max_chars=_STDLIB_MAX_CHARS,
                        on_bad_file=lambda path, reason: None)


def split_by_position(documents: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
  """The last `eval_fraction` of the characters, in order, is held out (as nanoGPT splits).

  The document that straddles the boundary is cut there, so a single-file corpus splits too.
  """
  total = sum(len(d) for d in documents)
  boundary = int(round(total * (1.0 - eval_fraction)))
  train, held_out, seen = [], [], 0
  for doc in documents:
    if seen + len(doc) <= boundary:
      train.append(doc)
    elif seen >= boundary:
      held_out.append(doc)
    else:
      cut = boundary - seen
      train.append(doc[:cut])
      held_out.append(doc[cut:])
    seen += len(doc)
  return [d for d in train if d], [d for d in held_out if d]


def read_configured(c, log: Callable[[str], None]) -> tuple[list[str], list[str]]:
  """(files, documents) of `c.data`: its paths, or the fallback corpus when they match nothing
  (validate() allows that only with a fallback). Raises DataError for a corpus without text."""
  files = expand_paths(c.data.path) if c.data.path else []
  if files:
    bad_files: list[str] = []

    def on_bad(path: str, reason: str) -> None:
      bad_files.append(f'{path} {reason}')

    documents = read_documents(files, c.data.separator,
                               on_bad_file=on_bad if c.data.skip_bad_files else None)
    if bad_files:
      log(f'skipped {len(bad_files)} bad file(s) (data.skip_bad_files): {"; ".join(bad_files[:5])}'
          + (' ...' if len(bad_files) > 5 else ''))
  else:
    files = stdlib_files()
    documents = read_stdlib_documents()
    log(f'data.path={c.data.path!r} not found: training on the Python standard library\'s '
        f'sources instead; point --config.data.path at any text file.')
  if not documents:
    raise DataError(f'data.path={c.data.path!r} holds no text: give it a non-empty file.')
  return files, documents
