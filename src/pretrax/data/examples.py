"""Fine-tuning records -> an example store on disk -> packed batches, read by index.

The sft and classification objectives read records (data/records.py: JSON lines of prompts and
responses, chats, or texts and labels). A bad record stops the run with one line naming the file
and line, or with `data.skip_bad_records` is skipped and counted.

The store (WORKDIR/data) holds, per split, the token ids of every example back to back (uint16, or
uint32 for large vocabularies), per-token loss weights (uint8, sft), the examples' offsets and
label indices (classification). It is written once, streaming, then memory-mapped, so the records
never sit in memory. It is reused while the files, fields and tokenizer settings are unchanged;
without tokenizer.path (and without init_from, whose tokenizer a fine-tune uses) a tokenizer is
trained on the training records' text.

Batches: examples longer than data.seq_len are cut to fit (the end is lost: raise data.seq_len
if the log says many were). Training examples are shuffled once by the seed and packed in that
order into rows (each example whole in one row, in its own segment); the rows are then shuffled
every epoch, so the batch of step k is a function of (seed, k), as in pre-training. Held-out
examples are packed in file order and read once per evaluation.
"""

from collections.abc import Callable, Iterator
import dataclasses
import os

import grain
import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import RunConfig
from pretrax.data import corpus, handoff, records, sources
from pretrax.data import plan as plan_lib
from pretrax.data import store as store_lib
from pretrax.data import units as units_lib
from pretrax.data.batch import Batch
from pretrax.data.records import BadRecord, Fields

MAX_SEGMENTS = 64  # Classification: at most this many examples in a row (the head's pooling width).
_TOKENIZER_SAMPLE_RECORDS = 200_000


# ---- The store ---------------------------------------------------------------------------------


class _SplitWriter:
  """Appends one split's examples to its files."""

  def __init__(self, out_dir: str, split: str, dtype: np.dtype, objective: str):
    self.dir, self.split, self.dtype, self.objective = out_dir, split, dtype, objective
    self.tokens = open(os.path.join(out_dir, f'{split}.tokens'), 'wb')
    self.weights = open(os.path.join(out_dir, f'{split}.weights'), 'wb')
    self.lengths: list[int] = []
    self.labels: list[str] = []

  def add(self, ids: np.ndarray, weights: np.ndarray | None, label: str | None) -> None:
    self.tokens.write(ids.astype(self.dtype).tobytes())
    if weights is not None:
      self.weights.write(weights.tobytes())
    self.lengths.append(len(ids))
    if label is not None:
      self.labels.append(label)

  def close(self, label_index: dict[str, int]) -> dict:
    self.tokens.close()
    self.weights.close()
    offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
    np.save(os.path.join(self.dir, f'{self.split}.offsets.npy'), offsets)
    if self.objective == 'classification':
      labels = np.array([label_index[x] for x in self.labels], np.int32)
      np.save(os.path.join(self.dir, f'{self.split}.labels.npy'), labels)
    return {'examples': len(self.lengths), 'tokens': int(offsets[-1])}


def write_store(
  plan: plan_lib.ExamplePlan,
  out_dir: str,
  tok: tokenizer_lib.Tokenizer,
  *,
  skip_bad: bool,
  log: Callable[[str], None],
) -> dict:
  """Encodes every record into the store at out_dir; its manifest, written last, marks it whole."""
  f = plan.fields
  dtype = store_lib.token_dtype(tok.vocab_size)
  writers = {s: _SplitWriter(out_dir, s, dtype, f.objective) for s in ('train', 'eval')}
  bad: list[str] = []
  for split, where, line in _split_lines(plan):
    try:
      writers[split].add(*records.encode_record(line, f, tok))
    except BadRecord as e:
      if not skip_bad:
        raise sources.DataError(
          f'{where}: {e}: fix the record, or set '
          '--config.data.skip_bad_records=true to skip (and count) such '
          'records.'
        ) from None
      bad.append(f'{where}: {e}')
  labels = list(f.labels) or sorted(set(writers['train'].labels))
  unseen = sorted(set(writers['eval'].labels) - set(labels))
  if unseen:
    raise sources.DataError(
      f'held-out records have labels no training record has: {unseen[:5]}; '
      'list every label in --config.finetune.labels.'
    )
  index = {x: i for i, x in enumerate(labels)}
  splits = {s: w.close(index) for s, w in writers.items()}
  manifest = {
    'splits': splits,
    'dtype': np.dtype(dtype).name,
    'labels': labels,
    'skipped': len(bad),
    'skipped_examples': bad[:20],
  }
  store_lib.write_json(os.path.join(out_dir, store_lib.MANIFEST), manifest)
  if bad:
    log(f'skipped {len(bad)} bad record(s) (data.skip_bad_records), e.g. {bad[0]}')
  return manifest


def build(
  c: RunConfig,
  out_dir: str,
  *,
  process_index: int,
  has_checkpoints: bool,
  log: Callable[[str], None],
) -> tokenizer_lib.Tokenizer:
  """Writes (or reuses) the store of the run's records at out_dir (handoff.build_once: process 0
  writes it, the others wait for it). Returns its tokenizer."""
  plan = make_plan(c)
  tokenizer_path = os.path.join(out_dir, store_lib.TOKENIZER_FILE)

  def encode() -> None:
    tok = handoff.tokenizer_at(
      tokenizer_path, plan.tokenizer, lambda mb: training_texts(plan, int(mb * 1e6)), 0, log
    )
    write_store(plan, out_dir, tok, skip_bad=c.data.skip_bad_records, log=log)

  stale = handoff.Stale(
    discard=not has_checkpoints,
    refusal=lambda _: (
      f'{out_dir} holds the examples of other records or settings than '
      "the ones this run's checkpoints trained on: use a new --workdir, "
      'or the same data and settings to resume.'
    ),
    rebuilding=f'{out_dir} holds examples of other records or settings: encoding them again',
  )
  handoff.build_once(
    out_dir,
    plan.to_json(),
    stale=stale,
    build=encode,
    process_index=process_index,
    what='encode the fine-tuning records',
    log=log,
  )
  return tokenizer_lib.Tokenizer.load(tokenizer_path)


def _split_lines(plan: plan_lib.ExamplePlan) -> Iterator[tuple[str, str, bytes]]:
  """(split, where, line) of every record: eval files are held out whole; without them a record
  is held out by a hash of its bytes, the same on every machine."""
  for path, number, line in sources.read_lines([f.path for f in plan.files]):
    held = not plan.eval_files and units_lib.held_out(line.strip(), plan.eval_fraction)
    yield ('eval' if held else 'train'), f'{path}:{number}', line
  for path, number, line in sources.read_lines([f.path for f in plan.eval_files]):
    yield 'eval', f'{path}:{number}', line


def make_plan(c: RunConfig) -> plan_lib.ExamplePlan:
  """What a store is built from: two runs with equal plans share a store."""

  def described(spec: str) -> tuple[sources.InputFile, ...]:
    return tuple(sources.describe(sources.expand_paths(spec))) if spec else ()

  files = described(c.data.path)
  if not files:
    raise sources.DataError(
      f'data.path={c.data.path!r} matches no file: point it at the JSON '
      'lines records to fine-tune on.'
    )
  return plan_lib.ExamplePlan(
    files=files,
    eval_files=described(c.finetune.eval_path),
    eval_fraction=c.data.eval_fraction,
    fields=Fields.from_config(c),
    tokenizer=corpus.tokenizer_spec(c),
  )


def training_texts(plan: plan_lib.ExamplePlan, budget_bytes: int) -> Iterator[str]:
  """Texts of the first training records, up to a budget: what a new tokenizer learns from."""
  f = plan.fields
  taken = 0
  for i, (split, _, line) in enumerate(_split_lines(plan)):
    if taken >= budget_bytes or i >= _TOKENIZER_SAMPLE_RECORDS:
      return
    if split != 'train':
      continue
    try:
      record = records.parse(line)
      texts = (
        [t for t, _ in records.sft_parts(record, f)]
        if f.objective == 'sft'
        else records.texts_of(record, f)
      )
    except BadRecord:
      continue
    taken += sum(len(t) for t in texts)
    yield from texts


# ---- Reading back ------------------------------------------------------------------------------


class ExampleSplit:
  """One split of a store, memory-mapped: example i's ids, loss weights and label."""

  def __init__(self, path: str, split: str, manifest: dict, objective: str):
    self.objective = objective
    self.offsets = np.load(os.path.join(path, f'{split}.offsets.npy'))
    count = int(self.offsets[-1])
    dtype = np.dtype(manifest['dtype'])
    self.tokens = (
      np.memmap(os.path.join(path, f'{split}.tokens'), dtype, 'r', shape=(count,))
      if count
      else np.zeros(0, dtype)
    )
    self.weights = None
    self.labels = None
    if objective == 'sft' and count:
      self.weights = np.memmap(
        os.path.join(path, f'{split}.weights'), np.uint8, 'r', shape=(count,)
      )
    if objective == 'classification':
      self.labels = np.load(os.path.join(path, f'{split}.labels.npy'))

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def ids(self, i: int) -> np.ndarray:
    return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]], np.int32)

  def loss_weights(self, i: int) -> np.ndarray:
    if self.weights is None:
      raise ValueError(f'a {self.objective} split without tokens holds no loss weights')
    return np.asarray(self.weights[self.offsets[i] : self.offsets[i + 1]], np.float32)


def longest(objective: str, seq_len: int) -> int:
  """The most ids of an example a row holds whole: sft predicts n-1 next tokens of n, an encoder
  reads n."""
  return seq_len + 1 if objective == 'sft' else seq_len


def packed_length(objective: str, length, seq_len: int):
  """Positions an example of `length` ids fills in a row (ints or arrays of them), cut to fit."""
  kept = np.minimum(length, longest(objective, seq_len))
  return kept - 1 if objective == 'sft' else kept


def pack(order: np.ndarray, lengths: np.ndarray, seq_len: int, max_per_row: int) -> np.ndarray:
  """Row starts (into `order`, plus the end) when the examples in `order` fill rows of seq_len
  positions one after another, a new row when the next does not fit or the row is full."""
  starts, used, count = [0], 0, 0
  for k, i in enumerate(order):
    n = int(lengths[i])
    if count and (used + n > seq_len or count == max_per_row):
      starts.append(k)
      used, count = 0, 0
    used, count = used + n, count + 1
  starts.append(len(order))
  return np.asarray(starts if len(order) else [0], np.int64)


def _empty_rows(objective: str, rows: int, seq_len: int) -> Batch[np.ndarray]:
  """A batch of padding: an sft batch has the language-model fields (prefix and objective stay 0:
  causal attention, one objective), a classification batch a label slot per example of a row."""
  shape = (rows, seq_len)
  inputs, segment_ids, positions = (np.zeros(shape, np.int32) for _ in range(3))
  if objective == 'sft':
    return Batch(
      inputs,
      segment_ids,
      positions,
      targets=np.zeros(shape, np.int32),
      weights=np.zeros(shape, np.float32),
      prefix=np.zeros(shape, np.int32),
      objective=np.zeros(shape, np.int32),
    )
  segments = min(MAX_SEGMENTS, seq_len)
  return Batch(
    inputs,
    segment_ids,
    positions,
    labels=np.zeros((rows, segments), np.int32),
    label_weights=np.zeros((rows, segments), np.float32),
  )


def build_rows(split: ExampleSplit, rows: list[list[int]], seq_len: int) -> Batch[np.ndarray]:
  """A batch whose row r packs the examples rows[r], each in its own segment."""
  out = _empty_rows(split.objective, len(rows), seq_len)
  for r, examples in enumerate(rows):
    at = 0
    for segment, i in enumerate(examples, start=1):
      ids = split.ids(i)
      n = int(packed_length(split.objective, len(ids), seq_len))
      out.inputs[r, at : at + n] = ids[:n]
      if out.targets is not None and out.weights is not None:  # sft: the next tokens, weighted.
        out.targets[r, at : at + n] = ids[1 : n + 1]
        out.weights[r, at : at + n] = split.loss_weights(i)[1 : n + 1]
      if out.labels is not None and out.label_weights is not None:  # Classification: the label.
        assert split.labels is not None  # Every split but sft's is classification's: labelled.
        out.labels[r, segment - 1] = split.labels[i]
        out.label_weights[r, segment - 1] = 1.0
      out.segment_ids[r, at : at + n] = segment
      out.positions[r, at : at + n] = np.arange(n)
      at += n
  return out


@dataclasses.dataclass(frozen=True)
class Packing:
  """A split's examples in rows: row r holds order[starts[r]:starts[r + 1]]."""

  order: np.ndarray
  starts: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1

  def row(self, r: int) -> list[int]:
    return self.order[self.starts[r] : self.starts[r + 1]].tolist()


def packing(split: ExampleSplit, seq_len: int, seed: int | None) -> Packing:
  """The split packed into rows; shuffled first by `seed`, in file order for None."""
  n = len(split)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  lengths = packed_length(split.objective, split.lengths(), seq_len)
  max_per_row = min(MAX_SEGMENTS, seq_len) if split.objective == 'classification' else seq_len
  return Packing(order, pack(order, lengths, seq_len, max_per_row))


def train_batches(
  split: ExampleSplit,
  rows: Packing,
  *,
  seq_len: int,
  global_batch: int,
  seed: int,
  start_step: int,
  process_index: int = 0,
  process_count: int = 1,
  threads: int = 2,
) -> Iterator[Batch[np.ndarray]]:
  """This process's slice of the global batch of every step from `start_step` on: rows in an
  order reshuffled every epoch, by index."""
  if not len(rows):
    raise sources.DataError('no training examples: check data.path and the record fields.')
  order = grain.MapDataset.range(len(rows)).shuffle(seed=seed + 7).repeat()
  local = global_batch // process_count

  def batch_at(step: int) -> Batch[np.ndarray]:
    first = step * global_batch + process_index * local
    return build_rows(
      split, [rows.row(int(order[j])) for j in range(first, first + local)], seq_len
    )

  steps = grain.MapDataset.range(start_step, 2**62).map(batch_at)
  return iter(
    steps.to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads or 1)
    )
  )


def eval_batches(
  split: ExampleSplit,
  rows: Packing,
  *,
  seq_len: int,
  global_batch: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[Batch[np.ndarray]]:
  """One ordered pass over the held-out rows, the last global batch padded with empty rows."""
  local = global_batch // process_count
  for first in range(0, len(rows), global_batch):
    ids = range(first + process_index * local, first + (process_index + 1) * local)
    yield build_rows(split, [rows.row(r) if r < len(rows) else [] for r in ids], seq_len)
