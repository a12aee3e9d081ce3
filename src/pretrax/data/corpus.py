"""The plan of a preparation: the corpus files and every setting the store's bytes depend on.

make_plan fixes, before any work, what is prepared (a plan.TokenPlan): the files (path, size,
mtime), how they are read (units.Reading, with the position boundary of a one-document corpus), the
unit and part sizes, the tokenizer (a file and its hash, or training settings) and whether bad
records are skipped. Two preparations with equal plans write the same bytes: a resume or a reuse is
checked against the plan.json it writes.
"""

from collections.abc import Callable
import hashlib
import os

from pretrax.config_types import RunConfig
from pretrax.data import plan as plan_lib
from pretrax.data import sources
from pretrax.data import store as store_lib
from pretrax.data import units as units_lib


def input_files(c: RunConfig, log: Callable[[str], None] = print) -> list[sources.InputFile]:
  """The corpus files of `c.data` (or its fallback corpus); DataError naming the path if none."""
  files = sources.expand_paths(c.data.path) if c.data.path else []
  if not files and c.data.fallback:
    log(
      f"data.path={c.data.path!r} not found: training on the Python standard library's "
      'sources instead; point --config.data.path at your own text.'
    )
    return sources.describe(sources.stdlib_files())
  if not files:
    raise sources.DataError(
      f'data.path={c.data.path!r} matches no file: point '
      '--config.data.path at files, directories or globs.'
    )
  for path in files:
    sources.file_format(path)  # A format that cannot be, named before any work.
  return sources.describe(files)


def _position_boundary(files: list[sources.InputFile], c: RunConfig) -> int:
  """For a corpus of one plain text document (Tiny Shakespeare), the byte where the held-out
  part starts; 0 for every other corpus (held out by document)."""
  if len(files) != 1 or c.data.separator:
    return 0
  fmt, compression = sources.file_format(files[0].path)
  if fmt != 'text':
    return 0
  size = files[0].size
  if compression:  # Count the decompressed bytes (one streaming pass, no tokenizing).
    with sources.open_bytes(files[0].path, compression) as f:
      size = sum(len(b) for b in iter(lambda: f.read(1 << 22), b''))
  return max(1, int(round(size * (1.0 - c.data.eval_fraction))))


def tokenizer_spec(c: RunConfig) -> plan_lib.TokenizerSpec:
  """The tokenizer a store is made with: a given file (and its hash), or training settings."""
  tok = c.tokenizer
  if tok.path:
    with open(tok.path, 'rb') as f:
      return plan_lib.TokenizerFile(
        path=os.path.abspath(tok.path), sha256=hashlib.sha256(f.read()).hexdigest()
      )
  return plan_lib.TokenizerTraining(
    model_type=tok.model_type,
    vocab_size=tok.vocab_size,
    sentinels=tok.sentinels,
    sample_mb=tok.sample_mb,
  )


def make_plan(c: RunConfig, files: list[sources.InputFile]) -> plan_lib.TokenPlan:
  """Everything the store's bytes depend on; a resume or reuse must find the same."""
  return plan_lib.TokenPlan(
    format=store_lib.FORMAT_VERSION,
    unit_bytes=units_lib.UNIT_BYTES,
    part_bytes=int(c.data.shard_mb * 1e6),
    files=tuple(files),
    reading=units_lib.Reading(
      separator=c.data.separator,
      text_field=c.data.text_field,
      eval_fraction=c.data.eval_fraction,
      position_boundary=_position_boundary(files, c),
    ),
    # The fallback corpus has a few files that are not UTF-8: not ours to fix.
    skip_bad_records=bool(c.data.skip_bad_records) or _is_stdlib(files),
    tokenizer=tokenizer_spec(c),
  )


def _is_stdlib(files: list[sources.InputFile]) -> bool:
  stdlib = {os.path.realpath(f) for f in sources.stdlib_files()}  # As describe names them.
  return bool(files) and all(f.path in stdlib for f in files)
