"""Fine-tuning records -> an example store on disk -> packed batches, read by index.

The sft and classification objectives read records, one JSON object per line (.jsonl / .json,
also .gz / .zst):

  sft             {"prompt": P, "response": R}: the model reads P then R then EOS, and the loss is
                  on R and the EOS (so it learns to stop). Or a chat:
                  {"messages": [{"role": "system" | "user" | "assistant", "content": C}, ...]},
                  laid out by this template, one line per message:
                      ROLE: CONTENT\n            (e.g. "user: Hi\nassistant: Hello!\n")
                  then EOS; the loss is on each assistant CONTENT with its newline, and on the EOS
                  when the chat ends with the assistant.
  classification  {"text": T, "label": L}: an encoder reads T and EOS; a pooled head predicts L.

(The field names are settings: finetune.prompt_field, ..., data.text_field.) A record without its
fields, with an empty response, or with a label outside `finetune.labels` stops the run with one
line naming the file and line, or with `data.skip_bad_records` is skipped and counted.

The store (WORKDIR/data) holds, per split, the token ids of every example back to back (uint16, or
uint32 for large vocabularies), per-token loss weights (uint8, sft), the examples' offsets and
label indices (classification). It is written once, streaming, then memory-mapped, so the records
never sit in memory. It is reused while the files, fields and tokenizer settings are unchanged; without
tokenizer.path (and without init_from, whose tokenizer a fine-tune uses) a tokenizer is trained on
the training records' text.

Batches: examples longer than data.seq_len are cut to fit (the end is lost: raise data.seq_len
if the log says many were). Training examples are shuffled once by the seed and packed in that
order into rows (each example whole in one row, in its own segment); the rows are then shuffled
every epoch, so the batch of step k is a function of (seed, k), as in pre-training. Held-out
examples are packed in file order and read once per evaluation.
"""

from collections.abc import Callable, Iterator
import dataclasses
import json
import os
import shutil

import grain
import ml_collections
import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.data import prepare as prepare_lib
from pretrax.data import sources
from pretrax.data import store as store_lib

ROLES = ('system', 'user', 'assistant')
MAX_SEGMENTS = 64  # Classification: at most this many examples in a row (the head's pooling width).
_TOKENIZER_SAMPLE_RECORDS = 200_000


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where an objective finds its parts in a record."""
  objective: str  # sft | classification
  prompt: str = 'prompt'
  response: str = 'response'
  messages: str = 'messages'
  text: str = 'text'
  label: str = 'label'
  labels: tuple[str, ...] = ()  # The label set; () = the training records' distinct labels.

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'Fields':
    f = c.finetune
    labels = tuple(x.strip() for x in f.labels.split(',') if x.strip())
    return cls(objective=c.objective, prompt=f.prompt_field, response=f.response_field,
               messages=f.messages_field, text=c.data.text_field, label=f.label_field,
               labels=labels)


class BadRecord(Exception):
  """A record this objective cannot use; the message says why."""


# ---- Records -> token ids ----------------------------------------------------------------------


def read_lines(files: list[str]) -> Iterator[tuple[str, bytes]]:
  """('FILE:LINE', line) for every non-blank line of the files, decompressed as they stream."""
  for path in files:
    compression = sources.file_format(path)[1]
    try:
      with sources.open_bytes(path, compression) as stream:
        for number, line in enumerate(stream, start=1):
          if line.strip():
            yield f'{path}:{number}', line
    except sources._read_errors() as e:  # pylint: disable=protected-access
      raise sources.DataError(f'{path}: cannot be read ({type(e).__name__}: {e}): check the '
                              'file or remove it from data.path.') from None


def _string(record: dict, field: str, what: str) -> str:
  if field not in record:
    raise BadRecord(f'no {field!r} field ({what}; set finetune.*_field or data.text_field to the '
                    'field that holds it)')
  value = record[field]
  if not isinstance(value, str):
    raise BadRecord(f'{field!r} is {type(value).__name__}, not a string')
  return value


def chat_parts(messages, where_field: str) -> list[tuple[str, bool]]:
  """(text, trained on) pieces of a chat by the template in the module docstring."""
  if not isinstance(messages, list) or not messages:
    raise BadRecord(f'{where_field!r} is not a non-empty list of messages')
  parts = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or m.get('role') not in ROLES or not isinstance(m.get('content'), str):
      raise BadRecord(f'message {i} is not {{"role": one of {", ".join(ROLES)}, "content": '
                      'a string}')
    assistant = m['role'] == 'assistant'
    parts += [(f'{m["role"]}: ', False), (m['content'] + '\n', assistant)]
  if not any(trained and text.strip() for text, trained in parts):
    raise BadRecord('no assistant message with content: nothing to learn')
  return parts


def sft_parts(record: dict, f: Fields) -> list[tuple[str, bool]]:
  """(text, trained on) pieces of an sft record, in order; EOS follows them."""
  if f.messages in record and f.prompt not in record:
    return chat_parts(record[f.messages], f.messages)
  prompt = _string(record, f.prompt, 'the prompt')
  response = _string(record, f.response, 'the response')
  if not response:
    raise BadRecord(f'empty {f.response!r}: nothing to learn')
  return [(prompt, False), (response, True)]


def encode_sft(parts: list[tuple[str, bool]],
               tok: tokenizer_lib.Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(ids, weights): each part encoded on its own, then EOS, weighted as its part (the EOS as the
  last part). Encoding parts apart keeps the prompt's ids the same whatever the response is."""
  ids, weights = [], []
  for (text, trained), encoded in zip(parts, tok.encode_batch([t for t, _ in parts])):
    ids += encoded
    weights += [trained] * len(encoded)
  ids.append(tokenizer_lib.EOS_ID)
  weights.append(parts[-1][1])
  return np.asarray(ids), np.asarray(weights, np.uint8)


def parse(line: bytes) -> dict:
  try:
    record = json.loads(line)
  except UnicodeDecodeError as e:
    raise BadRecord(f'not UTF-8 ({e.reason})') from None
  except ValueError as e:
    raise BadRecord(f'malformed JSON ({e})') from None
  if not isinstance(record, dict):
    raise BadRecord(f'a JSON {type(record).__name__}, not an object')
  return record


def label_of(record: dict, f: Fields) -> str:
  """The record's label as a string (JSON numbers and booleans too: 1 and "1" are one label)."""
  if f.label not in record:
    raise BadRecord(f'no {f.label!r} field (set finetune.label_field to the field that holds '
                    'the label)')
  value = record[f.label]
  if isinstance(value, bool):
    value = str(value).lower()
  if not isinstance(value, (str, int, float)) or isinstance(value, float) and not value.is_integer():
    raise BadRecord(f'{f.label!r} is {value!r}: a label is a string or an integer')
  label = str(int(value)) if isinstance(value, float) else str(value)
  if f.labels and label not in f.labels:
    raise BadRecord(f'label {label!r} is not in finetune.labels ({",".join(f.labels)})')
  return label


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


def _encode_record(line: bytes, f: Fields, tok: tokenizer_lib.Tokenizer):
  record = parse(line)
  if f.objective == 'sft':
    ids, weights = encode_sft(sft_parts(record, f), tok)
    return ids, weights, None
  text = _string(record, f.text, 'the text')
  label = label_of(record, f)
  return np.asarray(tok.encode(text) + [tokenizer_lib.EOS_ID]), None, label


def write_store(plan: dict, out_dir: str, tok: tokenizer_lib.Tokenizer, f: Fields, *,
                skip_bad: bool, log: Callable[[str], None]) -> dict:
  """Encodes every record into the store at out_dir; its manifest, written last, marks it whole."""
  dtype = store_lib.token_dtype(tok.vocab_size)
  writers = {s: _SplitWriter(out_dir, s, dtype, f.objective) for s in ('train', 'eval')}
  bad: list[str] = []
  for split, where, line in _split_lines(plan):
    try:
      writers[split].add(*_encode_record(line, f, tok))
    except BadRecord as e:
      if not skip_bad:
        raise sources.DataError(f'{where}: {e}: fix the record, or set '
                                '--config.data.skip_bad_records=true to skip (and count) such '
                                'records.') from None
      bad.append(f'{where}: {e}')
  labels = list(f.labels) or sorted(set(writers['train'].labels))
  unseen = sorted(set(writers['eval'].labels) - set(labels))
  if unseen:
    raise sources.DataError(f'held-out records have labels no training record has: {unseen[:5]}; '
                            'list every label in --config.finetune.labels.')
  index = {x: i for i, x in enumerate(labels)}
  splits = {s: w.close(index) for s, w in writers.items()}
  manifest = {'splits': splits, 'dtype': np.dtype(dtype).name, 'labels': labels,
              'skipped': len(bad), 'skipped_examples': bad[:20]}
  store_lib.write_json(os.path.join(out_dir, store_lib.MANIFEST), manifest)
  if bad:
    log(f'skipped {len(bad)} bad record(s) (data.skip_bad_records), e.g. {bad[0]}')
  return manifest


def build(c: ml_collections.ConfigDict, out_dir: str, *, process_index: int,
          has_checkpoints: bool, log: Callable[[str], None]) -> tokenizer_lib.Tokenizer:
  """Writes (or reuses) the store of the run's records at out_dir; process 0 writes it, the
  others wait for it. Returns its tokenizer."""
  plan = make_plan(c)
  plan_path = os.path.join(out_dir, store_lib.PLAN)
  manifest_path = os.path.join(out_dir, store_lib.MANIFEST)
  if process_index == 0:
    if os.path.exists(plan_path) and store_lib.read_json(plan_path) != plan:
      if has_checkpoints:
        raise sources.DataError(f'{out_dir} holds the examples of other records or settings than '
                                'the ones this run\'s checkpoints trained on: use a new --workdir, '
                                'or the same data and settings to resume.')
      log(f'{out_dir} holds examples of other records or settings: encoding them again')
      shutil.rmtree(out_dir)
    if not os.path.exists(manifest_path):
      os.makedirs(out_dir, exist_ok=True)
      store_lib.write_json(plan_path, plan)
      fields = Fields.from_config(c)
      tok = prepare_lib.tokenizer_at(
          os.path.join(out_dir, store_lib.TOKENIZER_FILE), plan['tokenizer'],
          lambda: training_texts(plan, fields, int(c.tokenizer.sample_mb * 1e6)), 0, log)
      write_store(plan, out_dir, tok, fields, skip_bad=c.data.skip_bad_records, log=log)
  prepare_lib.wait_for(manifest_path, 'process 0 to encode the fine-tuning records')
  return tokenizer_lib.Tokenizer.load(os.path.join(out_dir, store_lib.TOKENIZER_FILE))


def _split_lines(plan: dict) -> Iterator[tuple[str, str, bytes]]:
  """(split, where, line) of every record: eval files are held out whole; without them a record
  is held out by a hash of its bytes, the same on every machine."""
  for where, line in read_lines([p for p, _, _ in plan['files']]):
    if plan['eval_files']:
      yield 'train', where, line
    else:
      held = sources.held_out(line.strip(), plan['eval_fraction'])
      yield ('eval' if held else 'train'), where, line
  for where, line in read_lines([p for p, _, _ in plan['eval_files']]):
    yield 'eval', where, line


def make_plan(c: ml_collections.ConfigDict) -> dict:
  """What a store is built from: two runs with equal plans share a store."""
  def described(spec: str) -> list:
    return [[x.path, x.size, x.mtime] for x in sources.describe(sources.expand_paths(spec))]

  files = described(c.data.path)
  if not files:
    raise sources.DataError(f'data.path={c.data.path!r} matches no file: point it at the JSON '
                            'lines records to fine-tune on.')
  return {'kind': 'examples', 'files': files,
          'eval_files': described(c.finetune.eval_path) if c.finetune.eval_path else [],
          'eval_fraction': c.data.eval_fraction,
          'fields': json.loads(json.dumps(dataclasses.asdict(Fields.from_config(c)))),
          'tokenizer': prepare_lib.tokenizer_spec(c)}


def training_texts(plan: dict, f: Fields, budget_bytes: int) -> Iterator[str]:
  """Texts of the first training records, up to a budget: what a new tokenizer learns from."""
  taken = 0
  for i, (split, _, line) in enumerate(_split_lines(plan)):
    if taken >= budget_bytes or i >= _TOKENIZER_SAMPLE_RECORDS:
      return
    if split != 'train':
      continue
    try:
      record = parse(line)
      texts = ([t for t, _ in sft_parts(record, f)] if f.objective == 'sft'
               else [_string(record, f.text, 'the text')])
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
    self.tokens = (np.memmap(os.path.join(path, f'{split}.tokens'), dtype, 'r', shape=(count,))
                   if count else np.zeros(0, dtype))
    self.weights = None
    self.labels = None
    if objective == 'sft' and count:
      self.weights = np.memmap(os.path.join(path, f'{split}.weights'), np.uint8, 'r',
                               shape=(count,))
    if objective == 'classification':
      self.labels = np.load(os.path.join(path, f'{split}.labels.npy'))

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def ids(self, i: int) -> np.ndarray:
    return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]], np.int32)

  def loss_weights(self, i: int) -> np.ndarray:
    return np.asarray(self.weights[self.offsets[i]:self.offsets[i + 1]], np.float32)


def packed_length(objective: str, length, seq_len: int):
  """Positions an example of `length` ids fills in a row (ints or arrays of them): sft predicts
  n-1 next tokens, an encoder reads n; either at most seq_len."""
  return np.minimum(length, seq_len + 1) - 1 if objective == 'sft' else np.minimum(length, seq_len)


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


def _empty_rows(objective: str, rows: int, seq_len: int) -> dict[str, np.ndarray]:
  shape = (rows, seq_len)
  out = {k: np.zeros(shape, np.int32) for k in ('inputs', 'segment_ids', 'positions')}
  if objective == 'sft':
    out.update(targets=np.zeros(shape, np.int32), weights=np.zeros(shape, np.float32),
               prefix=np.zeros(shape, np.int32), objective=np.zeros(shape, np.int32))
  else:
    segments = min(MAX_SEGMENTS, seq_len)
    out.update(labels=np.zeros((rows, segments), np.int32),
               label_weights=np.zeros((rows, segments), np.float32))
  return out


def build_rows(split: ExampleSplit, rows: list[list[int]], seq_len: int) -> dict[str, np.ndarray]:
  """A batch whose row r packs the examples rows[r], each in its own segment."""
  out = _empty_rows(split.objective, len(rows), seq_len)
  for r, examples in enumerate(rows):
    at = 0
    for segment, i in enumerate(examples, start=1):
      ids = split.ids(i)
      n = int(packed_length(split.objective, len(ids), seq_len))
      if split.objective == 'sft':
        out['inputs'][r, at:at + n] = ids[:n]
        out['targets'][r, at:at + n] = ids[1:n + 1]
        out['weights'][r, at:at + n] = split.loss_weights(i)[1:n + 1]
      else:
        out['inputs'][r, at:at + n] = ids[:n]
        out['labels'][r, segment - 1] = split.labels[i]
        out['label_weights'][r, segment - 1] = 1.0
      out['segment_ids'][r, at:at + n] = segment
      out['positions'][r, at:at + n] = np.arange(n)
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
    return self.order[self.starts[r]:self.starts[r + 1]].tolist()


def packing(split: ExampleSplit, seq_len: int, seed: int | None) -> Packing:
  """The split packed into rows; shuffled first by `seed`, in file order for None."""
  n = len(split)
  order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
  lengths = packed_length(split.objective, split.lengths(), seq_len)
  max_per_row = min(MAX_SEGMENTS, seq_len) if split.objective == 'classification' else seq_len
  return Packing(order, pack(order, lengths, seq_len, max_per_row))


def train_batches(split: ExampleSplit, rows: Packing, *, seq_len: int, global_batch: int,
                  seed: int, start_step: int, process_index: int = 0, process_count: int = 1,
                  threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """This process's slice of the global batch of every step from `start_step` on: rows in an
  order reshuffled every epoch, by index."""
  if not len(rows):
    raise sources.DataError('no training examples: check data.path and the record fields.')
  order = grain.MapDataset.range(len(rows)).shuffle(seed=seed + 7).repeat()
  local = global_batch // process_count

  def batch_at(step: int) -> dict[str, np.ndarray]:
    first = step * global_batch + process_index * local
    return build_rows(split, [rows.row(int(order[j])) for j in range(first, first + local)],
                      seq_len)

  steps = grain.MapDataset.range(start_step, 2**62).map(batch_at)
  return iter(steps.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                      prefetch_buffer_size=2 * threads or 1)))


def eval_batches(split: ExampleSplit, rows: Packing, *, seq_len: int, global_batch: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over the held-out rows, the last global batch padded with empty rows."""
  local = global_batch // process_count
  for first in range(0, len(rows), global_batch):
    ids = range(first + process_index * local, first + (process_index + 1) * local)
    yield build_rows(split, [rows.row(r) if r < len(rows) else [] for r in ids], seq_len)
