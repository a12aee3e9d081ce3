"""Units decoded into documents, in the tokenizing workers: bytes or values -> texts with splits.

decode_unit parses one unit that units.file_units cut: UTF-8 text pieces, JSON lines (the
`text_field` of each object) or Parquet values. It depends on the unit alone, so any worker may
decode any unit and the result is the same. A bad record (not UTF-8, NUL bytes, malformed JSON, no
text field, not a string) raises DataError naming its file and line, byte or row, or with
`skip_bad` is counted (`Documents.bad`) and left out; a record with empty text is dropped and
counted (`Documents.empty`).
"""

import dataclasses
import json

from pretrax.data import sources
from pretrax.data import units as units_lib


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
    raise sources.DataError(
      f'{where}: {reason}: fix the record, or set '
      '--config.data.skip_bad_records=true to skip (and count) such records.'
    )
  out.bad.append(f'{where}: {reason}')


def decode_unit(unit: units_lib.Unit, r: units_lib.Reading, skip_bad: bool) -> Documents:
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
    _add(
      out,
      value,
      True,
      units_lib.EVAL
      if units_lib.held_out(value.encode('utf-8'), r.eval_fraction)
      else units_lib.TRAIN,
    )
  return out


def _add_record(
  out: Documents, line: bytes, where: str, r: units_lib.Reading, skip_bad: bool
) -> None:
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
  _add(
    out,
    text,
    True,
    units_lib.EVAL
    if units_lib.held_out(text.encode('utf-8'), r.eval_fraction)
    else units_lib.TRAIN,
  )


def _add(out: Documents, text: str, ends_doc: bool, split: int, whole: bool = True) -> None:
  if whole and not text:  # A record without text: nothing to learn, nothing to hold out.
    out.empty += 1
    return
  out.texts.append(text)
  out.ends.append(ends_doc)
  out.splits.append(split)
