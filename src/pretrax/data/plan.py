"""The plan of a store: everything its bytes depend on, fixed before any work, frozen and typed.

Two kinds of store are prepared from a plan: the token store of pre-training (TokenPlan, made by
corpus.make_plan) and the example store of fine-tuning records (ExamplePlan, examples.make_plan).
Both name their input files and their tokenizer (a given file and its hash, or the settings to
train one); a token plan adds how the files are read and cut, an example plan where its held-out
records come from and the records' fields.

A plan is written into its store as plan.json (to_json) and a later preparation compares its own
to_json() with that file, key by key: the JSON is the contract with every store already on disk,
so its keys and values stay exactly as they were (a token plan.json predates `kind` and has none).
from_json reads one back.
"""

import dataclasses
from typing import Any, ClassVar

from pretrax.data import records, sources
from pretrax.data import units as units_lib


@dataclasses.dataclass(frozen=True)
class TokenizerFile:
  """A tokenizer given as a file: its absolute path and the sha256 of its bytes."""

  path: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class TokenizerTraining:
  """A tokenizer trained on a sample of the store's training text (at most sample_mb MB)."""

  model_type: str
  vocab_size: int
  sentinels: int
  sample_mb: float


TokenizerSpec = TokenizerFile | TokenizerTraining


def tokenizer_to_json(spec: TokenizerSpec) -> dict[str, Any]:
  return dataclasses.asdict(spec)


def tokenizer_from_json(d: dict[str, Any]) -> TokenizerSpec:
  return TokenizerFile(**d) if 'path' in d else TokenizerTraining(**d)


def _files_to_json(files: tuple[sources.InputFile, ...]) -> list[list]:
  return [[f.path, f.size, f.mtime] for f in files]


def _files_from_json(entries: list[list]) -> tuple[sources.InputFile, ...]:
  return tuple(sources.InputFile(path, size, mtime) for path, size, mtime in entries)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What every store's plan names: its input files, in order, and its tokenizer."""

  KIND: ClassVar[str]

  files: tuple[sources.InputFile, ...]
  tokenizer: TokenizerSpec


@dataclasses.dataclass(frozen=True)
class TokenPlan(Plan):
  """A token store's plan: the files read as `reading` says, in units of unit_bytes, into parts
  of about part_bytes of input each, in store format `format`."""

  KIND: ClassVar[str] = 'tokens'

  format: int
  unit_bytes: int
  part_bytes: int
  reading: units_lib.Reading
  skip_bad_records: bool

  def to_json(self) -> dict[str, Any]:
    return {
      'format': self.format,
      'unit_bytes': self.unit_bytes,
      'part_bytes': self.part_bytes,
      'files': _files_to_json(self.files),
      'reading': dataclasses.asdict(self.reading),
      'skip_bad_records': self.skip_bad_records,
      'tokenizer': tokenizer_to_json(self.tokenizer),
    }

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'TokenPlan':
    if 'kind' in d:
      raise ValueError(f'not a token store plan: kind {d["kind"]!r}')
    return cls(
      files=_files_from_json(d['files']),
      tokenizer=tokenizer_from_json(d['tokenizer']),
      format=d['format'],
      unit_bytes=d['unit_bytes'],
      part_bytes=d['part_bytes'],
      reading=units_lib.Reading(**d['reading']),
      skip_bad_records=d['skip_bad_records'],
    )


def _fields_to_json(fields: records.Fields) -> dict[str, Any]:
  """The fields as JSON; the layout settings only when set, so that the stores written before
  they existed still match their plan."""
  d = {**dataclasses.asdict(fields), 'labels': list(fields.labels)}
  return {k: v for k, v in d.items() if v or k not in ('text_pair', 'template')}


@dataclasses.dataclass(frozen=True)
class ExamplePlan(Plan):
  """An example store's plan: records of `files` (held out by hash at eval_fraction, unless
  eval_files gives the held-out records) read through `fields`."""

  KIND: ClassVar[str] = 'examples'

  eval_files: tuple[sources.InputFile, ...]
  eval_fraction: float
  fields: records.Fields

  def to_json(self) -> dict[str, Any]:
    return {
      'kind': self.KIND,
      'files': _files_to_json(self.files),
      'eval_files': _files_to_json(self.eval_files),
      'eval_fraction': self.eval_fraction,
      'fields': _fields_to_json(self.fields),
      'tokenizer': tokenizer_to_json(self.tokenizer),
    }

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'ExamplePlan':
    if d.get('kind') != cls.KIND:
      raise ValueError(f'not an example store plan: kind {d.get("kind")!r}')
    return cls(
      files=_files_from_json(d['files']),
      tokenizer=tokenizer_from_json(d['tokenizer']),
      eval_files=_files_from_json(d['eval_files']),
      eval_fraction=d['eval_fraction'],
      fields=records.Fields(**{**d['fields'], 'labels': tuple(d['fields']['labels'])}),
    )


def from_json(d: dict[str, Any]) -> TokenPlan | ExamplePlan:
  """The plan a plan.json holds (a token plan has no `kind`: it came first)."""
  return ExamplePlan.from_json(d) if d.get('kind') == ExamplePlan.KIND else TokenPlan.from_json(d)
