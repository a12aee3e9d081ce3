"""`pretrax prepare`: a corpus streamed into a token store by any number of workers and hosts.

  files -> groups (consecutive files of about one shard, or one larger file; host h of H takes
           groups h, h+H, ...)
        -> units (~1 MB of input, read in order by the main process)
        -> workers (decode, split, tokenize; at most two units each in flight)
        -> parts (~data.shard_mb of input; written, fsynced, renamed, then marked done)
        -> manifest.json (written once every group is done, by whichever host finishes last)

Memory is bounded by the units in flight, never by the corpus. Killed at any moment, the same
command skips the parts already marked done (reading, but not tokenizing, the input before them)
and redoes only those that were in flight. The store's files are byte-identical whatever the number
of workers and hosts, and whether or not a run was interrupted (see store.py).
"""

import collections
from collections.abc import Callable, Iterable, Iterator
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from typing import Any

import numpy as np

from pretrax import config as config_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.data import sources
from pretrax.data import store as store_lib

# A text longer than this (in characters) is tokenized in slices (see encode_texts). Above every
# piece of a text file (at most ~2 MB), so those are tokenized as they always were.
ENCODE_CHARS = 4 << 20
_SAMPLE_FILES = 64  # The tokenizer's sample is drawn from at most this many files, spread out.
_WAIT_S = 5.0  # Poll interval while waiting for other hosts.


# ---- The plan: what is prepared, fixed before any work ----------------------------------------


def input_files(c, log: Callable[[str], None] = print) -> list[sources.InputFile]:
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


def _position_boundary(files: list[sources.InputFile], c) -> int:
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


def tokenizer_spec(c) -> dict:
  """The tokenizer a store is made with: a given file (and its hash), or training settings."""
  tok = c.tokenizer
  if tok.path:
    with open(tok.path, 'rb') as f:
      return {'path': os.path.abspath(tok.path), 'sha256': hashlib.sha256(f.read()).hexdigest()}
  return {
    'model_type': tok.model_type,
    'vocab_size': tok.vocab_size,
    'sentinels': config_lib.num_sentinels(c),
    'sample_mb': tok.sample_mb,
  }


def make_plan(c, files: list[sources.InputFile]) -> dict:
  """Everything the store's bytes depend on; a resume or reuse must find the same."""
  tokenizer = tokenizer_spec(c)
  reading = sources.Reading(
    separator=c.data.separator,
    text_field=c.data.text_field,
    eval_fraction=c.data.eval_fraction,
    position_boundary=_position_boundary(files, c),
  )
  plan = {
    'format': store_lib.FORMAT_VERSION,
    'unit_bytes': sources.UNIT_BYTES,
    'part_bytes': int(c.data.shard_mb * 1e6),
    'files': [dataclasses.astuple(f) for f in files],
    'reading': dataclasses.asdict(reading),
    # The fallback corpus has a few files that are not UTF-8: not ours to fix.
    'skip_bad_records': bool(c.data.skip_bad_records) or _is_stdlib(files),
    'tokenizer': tokenizer,
  }
  return json.loads(json.dumps(plan))  # As plan.json reads back (lists, not tuples).


def _is_stdlib(files: list[sources.InputFile]) -> bool:
  stdlib = set(sources.stdlib_files())
  return bool(files) and all(f.path in stdlib for f in files)


def groups_of(plan: dict) -> list[list[int]]:
  """Consecutive files of about one shard's input each (a larger file alone): the grain of sharing
  work between hosts."""
  groups, current, size = [], [], 0
  for i, (_, file_size, _) in enumerate(plan['files']):
    current.append(i)
    size += file_size
    if size >= plan['part_bytes']:
      groups.append(current)
      current, size = [], 0
  if current:
    groups.append(current)
  return groups


def _reading(plan: dict) -> sources.Reading:
  return sources.Reading(**plan['reading'])


# ---- Encoding units, here or in worker processes ----------------------------------------------


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
  unit: sources.Unit,
  tok: tokenizer_lib.Tokenizer,
  reading: sources.Reading,
  skip_bad: bool,
  num_threads: int = 1,
) -> Encoded:
  docs = sources.decode_unit(unit, reading, skip_bad)
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
_worker: tuple[tokenizer_lib.Tokenizer, sources.Reading, bool] | None = None


def _start_worker(model_proto: bytes, reading: dict, skip_bad: bool) -> None:
  global _worker
  _worker = (tokenizer_lib.Tokenizer(model_proto), sources.Reading(**reading), skip_bad)


def _encode_in_worker(unit: sources.Unit) -> Encoded:
  if _worker is None:
    raise RuntimeError('_encode_in_worker runs only in a pool started with _start_worker')
  return encode_unit(unit, *_worker)


class Encoder:
  """Encodes units in order, in `workers` processes (0: in this one, with SentencePiece's
  threads), with at most two units per worker in flight: the bound on memory."""

  def __init__(
    self, tok: tokenizer_lib.Tokenizer, reading: sources.Reading, skip_bad: bool, workers: int
  ):
    self.tok, self.reading, self.skip_bad, self.workers = tok, reading, skip_bad, workers
    self.pool = None
    if workers > 0:
      context = multiprocessing.get_context('spawn')  # No fork of a process that may hold threads.
      self.pool = context.Pool(
        workers,
        initializer=_start_worker,
        initargs=(tok.model_proto, dataclasses.asdict(reading), skip_bad),
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


# ---- Groups and parts -------------------------------------------------------------------------


def _marker(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, store_lib.PARTS_DIR, f'{name}.json')


def _done_parts(out_dir: str, group: int) -> list[dict]:
  """The parts of `group` marked done, in order (contiguous from 0)."""
  done: list[dict] = []
  while os.path.exists(path := _marker(out_dir, store_lib.part_name(group, len(done)))):
    done.append(store_lib.read_json(path))
  return done


def _group_units(plan: dict, files: list[int], on_bad) -> Iterator[sources.Unit]:
  reading = _reading(plan)
  for i in files:
    yield from sources.file_units(plan['files'][i][0], reading, on_bad)


class _Progress:
  """A line every 10 s: input done (on-disk bytes, as the total counts them), text and token
  rates, and the ETA."""

  def __init__(self, total_disk_bytes: int, log: Callable[[str], None]):
    self.total, self.disk, self.text, self.tokens, self.log = total_disk_bytes, 0, 0, 0, log
    self.start = self.last = time.perf_counter()

  def add(self, disk: int, text: int, tokens: int) -> None:
    self.disk, self.text, self.tokens = self.disk + disk, self.text + text, self.tokens + tokens
    now = time.perf_counter()
    if now - self.last > 10:
      self.last = now
      seconds = max(now - self.start, 1e-9)
      left = max(self.total - self.disk, 0) * seconds / max(self.disk, 1)
      self.log(
        f'prepare: {self.disk / 1e6:,.0f} of {self.total / 1e6:,.0f} MB of input '
        f'({self.text / seconds / 1e6:.2f} MB/s of text, '
        f'{self.tokens / seconds / 1e6:.2f} M tokens/s, ETA {left:.0f} s)'
      )


def _with_disk_deltas(units: Iterator[tuple[int, sources.Unit]]) -> Iterator[tuple]:
  """((index, on-disk bytes since the previous unit of its file), unit) for progress lines."""
  path, position = None, 0
  for index, unit in units:
    if unit.path != path:
      path, position = unit.path, 0
    yield (index, unit.disk_end - position), unit
    position = unit.disk_end


def prepare_group(
  plan: dict, group: int, files: list[int], out_dir: str, encoder: Encoder, progress: _Progress
) -> None:
  """Writes the group's parts that are not marked done, then its group marker."""
  if os.path.exists(_marker(out_dir, f'{group:05d}')):
    return
  done = _done_parts(out_dir, group)
  if done and done[-1]['last']:  # Killed between the last part's marker and the group's.
    store_lib.write_json(_marker(out_dir, f'{group:05d}'), {'parts': done})
    return
  resume_at = done[-1]['units_end'] if done else 0
  dtype = store_lib.token_dtype(encoder.tok.vocab_size)
  bad_files: list[str] = []
  on_bad = bad_files.append if plan['skip_bad_records'] else None
  units = (
    (i, unit) for i, unit in enumerate(_group_units(plan, files, on_bad)) if i >= resume_at
  )  # Units before the resume point are read, not tokenized.
  part, writer, size, bad, empty, end = len(done), None, 0, [], 0, resume_at
  try:
    for (index, disk), unit_size, encoded in encoder.map(_with_disk_deltas(units)):
      if writer is None:
        writer = store_lib.PartWriter(out_dir, group, part, dtype)
      for split in store_lib.SPLITS:
        writer.write(split, encoded.tokens[split], encoded.doc_ends[split])
      size += unit_size
      bad += encoded.bad
      empty += encoded.empty
      progress.add(disk, unit_size, sum(len(t) for t in encoded.tokens.values()))
      end = index + 1
      if size >= plan['part_bytes']:
        done.append(_finish_part(out_dir, writer, group, part, end, bad, empty))
        part, writer, size, bad, empty = part + 1, None, 0, [], 0
  except BaseException:  # A bad record, a dead worker, SIGTERM: the part in progress is dropped.
    if writer is not None:
      writer.abort()
    raise
  if writer is not None:
    done.append(_finish_part(out_dir, writer, group, part, end, bad + bad_files, empty, last=True))
  elif bad_files and done:
    done[-1]['bad'] = done[-1]['bad'] + bad_files
  store_lib.write_json(_marker(out_dir, f'{group:05d}'), {'parts': done})


def _finish_part(
  out_dir: str,
  writer: store_lib.PartWriter,
  group: int,
  part: int,
  units_end: int,
  bad: list[str],
  empty: int,
  last: bool = False,
) -> dict:
  """Closes the part's files, then marks it done: where the next part starts, whether the group
  ends with it, and what it skipped."""
  record = {**writer.close(), 'units_end': units_end, 'last': last, 'bad': bad, 'empty': empty}
  store_lib.write_json(_marker(out_dir, store_lib.part_name(group, part)), record)
  return record


# ---- The tokenizer ----------------------------------------------------------------------------


def tokenizer_sample(plan: dict, budget_bytes: int) -> Iterator[str]:
  """Training text for the tokenizer: the first training documents of up to _SAMPLE_FILES files
  spread evenly over the corpus, an equal share of `budget_bytes` from each."""
  files = plan['files']
  picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(len(files), _SAMPLE_FILES))})
  share = budget_bytes // len(picks)
  reading = _reading(plan)
  skip = plan.get('skip_bad_records', True)
  for i in picks:
    taken = 0
    for unit in sources.file_units(files[i][0], reading, on_bad=(lambda _: None) if skip else None):
      docs = sources.decode_unit(unit, reading, skip_bad=skip)
      for text, split in zip(docs.texts, docs.splits, strict=True):
        if split == sources.TRAIN and taken < share:
          text = text[: share - taken]
          taken += len(text)
          yield text
      if taken >= share:
        break


def _tokenizer(
  plan: dict, out_dir: str, process_index: int, log: Callable[[str], None]
) -> tokenizer_lib.Tokenizer:
  """The store's tokenizer: copied or trained by process 0, waited for by the others."""
  spec = plan['tokenizer']
  path = os.path.join(out_dir, store_lib.TOKENIZER_FILE)
  return tokenizer_at(
    path, spec, lambda: tokenizer_sample(plan, int(spec['sample_mb'] * 1e6)), process_index, log
  )


def tokenizer_at(
  path: str,
  spec: dict,
  sample: Callable[[], Iterable[str]],
  process_index: int,
  log: Callable[[str], None],
) -> tokenizer_lib.Tokenizer:
  """The tokenizer at `path`, written there first by process 0 (a copy of spec['path'], or one
  trained on `sample()` as `spec` says) and waited for by the other processes."""
  if not os.path.exists(path) and process_index == 0:
    if 'path' in spec:
      with open(spec['path'], 'rb') as f:
        proto = f.read()
    else:
      start = time.perf_counter()
      texts = list(sample())  # Bounded by spec['sample_mb'].
      if not any(texts):
        raise sources.DataError(
          'the corpus has no training text to fit a tokenizer on: check '
          'data.path, data.text_field and data.eval_fraction.'
        )
      proto = tokenizer_lib.train(
        texts,
        model_type=spec['model_type'],
        vocab_size=spec['vocab_size'],
        num_sentinels=spec['sentinels'],
      )
      log(
        f'trained a {spec["model_type"]} tokenizer on a sample of at most '
        f'{spec["sample_mb"]} MB in {time.perf_counter() - start:.1f} s'
      )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    store_lib.write_atomic(path, proto)
  wait_for(path, 'process 0 to write the tokenizer')
  return tokenizer_lib.Tokenizer.load(path)


def wait_for(path: str, what: str, timeout_s: float = 24 * 3600) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise sources.DataError(
        f'waited {timeout_s:.0f} s for {what} ({path}): start every '
        'process of the preparation with the same --output.'
      )
    time.sleep(_WAIT_S)


def _wait_for_others(out_dir: str, groups: list[list[int]], log: Callable[[str], None]) -> dict:
  """Waits for the manifest that the process finishing last writes, saying now and then which
  groups are still missing (a process that died must be run again: the same command)."""
  manifest_path = os.path.join(out_dir, store_lib.MANIFEST)
  said = time.monotonic()
  log('prepare: this share is done; waiting for the other processes')
  while not os.path.exists(manifest_path):
    time.sleep(_WAIT_S)
    if time.monotonic() - said > 60:
      said = time.monotonic()
      missing = [g for g in range(len(groups)) if not os.path.exists(_marker(out_dir, f'{g:05d}'))]
      log(
        f'prepare: still waiting for {len(missing)} group(s) of other processes (first: '
        f'{missing[:5]}); a process that stopped must be started again with the same command'
      )
  return store_lib.read_json(manifest_path)


# ---- The whole preparation --------------------------------------------------------------------


def _check_plan(out_dir: str, plan: dict) -> None:
  path = os.path.join(out_dir, store_lib.PLAN)
  if os.path.exists(path):
    before = store_lib.read_json(path)
    if before != plan:
      changed = sorted(k for k in set(before) | set(plan) if before.get(k) != plan.get(k))
      raise sources.DataError(
        f'{out_dir} holds a store of other inputs or settings ({", ".join(changed)} differ): '
        'use another --output, or delete it to start over.'
      )
  else:
    store_lib.write_json(path, plan)


def _finalize(out_dir: str, plan: dict, groups: list[list[int]], vocab_size: int) -> dict | None:
  """Writes the manifest once every group is done; None while some are not."""
  markers = [_marker(out_dir, f'{g:05d}') for g in range(len(groups))]
  if not all(os.path.exists(m) for m in markers):
    return None
  parts = [p for m in markers for p in store_lib.read_json(m)['parts']]
  splits = {}
  for split in store_lib.SPLITS:
    chosen = [
      {'name': p['name'], 'tokens': p['tokens'][split], 'documents': p['documents'][split]}
      for p in parts
      if p['tokens'][split]
    ]
    splits[split] = {
      'parts': chosen,
      'tokens': sum(p['tokens'] for p in chosen),
      'documents': sum(p['documents'] for p in chosen),
    }
  bad = [b for p in parts for b in p['bad']]
  manifest = {
    'format': store_lib.FORMAT_VERSION,
    'vocab_size': vocab_size,
    'dtype': store_lib.token_dtype(vocab_size).name,
    'splits': splits,
    'bad_records': len(bad),
    'bad_examples': bad[:20],
    'empty_documents': sum(p['empty'] for p in parts),
    'input_files': len(plan['files']),
    'input_bytes': sum(f[1] for f in plan['files']),
    'plan_sha256': hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(),
  }
  store_lib.write_json(os.path.join(out_dir, store_lib.MANIFEST), manifest)
  return manifest


def prepare_plan(
  plan: dict,
  out_dir: str,
  *,
  workers: int,
  process_index: int = 0,
  process_count: int = 1,
  log: Callable[[str], None] = print,
) -> dict:
  """Prepares this process's share of `plan` into `out_dir`, then waits for the other processes'
  shares; returns the manifest."""
  manifest_path = os.path.join(out_dir, store_lib.MANIFEST)
  os.makedirs(os.path.join(out_dir, store_lib.PARTS_DIR), exist_ok=True)
  _check_plan(out_dir, plan)
  if os.path.exists(manifest_path):
    return store_lib.read_json(manifest_path)
  tok = _tokenizer(plan, out_dir, process_index, log)
  groups = groups_of(plan)
  mine = list(range(process_index, len(groups), process_count))
  total = sum(plan['files'][i][1] for g in mine for i in groups[g])
  what = f' (process {process_index} of {process_count})' if process_count > 1 else ''
  log(
    f'prepare: {len(plan["files"])} file(s), {total / 1e6:,.1f} MB in {len(mine)} group(s) '
    f'here{what}, {workers or "no"} worker process(es), into {out_dir}'
  )
  start = time.perf_counter()
  encoder = Encoder(tok, _reading(plan), plan['skip_bad_records'], workers)
  progress = _Progress(total, log)
  try:
    for g in mine:
      prepare_group(plan, g, groups[g], out_dir, encoder, progress)
  finally:
    encoder.close()
  manifest = _finalize(out_dir, plan, groups, tok.vocab_size)
  if manifest is None:
    manifest = _wait_for_others(out_dir, groups, log)
  seconds = time.perf_counter() - start
  s = manifest['splits']
  log(
    f'prepared {out_dir}: {s["train"]["tokens"]:,} train / {s["eval"]["tokens"]:,} held-out '
    f'tokens, {s["train"]["documents"] + s["eval"]["documents"]:,} documents, '
    f'{manifest["bad_records"]} bad record(s) skipped, in {seconds:.1f} s'
  )
  for example in manifest['bad_examples'][:3]:
    log(f'  skipped: {example}')
  return manifest


def prepare(
  c,
  out_dir: str,
  *,
  workers: int,
  process_index: int = 0,
  process_count: int = 1,
  log: Callable[[str], None] = print,
) -> dict:
  """Prepares the corpus `c.data` names into a store at `out_dir` (see prepare_plan)."""
  plan = make_plan(c, input_files(c, log))
  return prepare_plan(
    plan,
    out_dir,
    workers=workers,
    process_index=process_index,
    process_count=process_count,
    log=log,
  )
