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

from collections.abc import Callable, Iterator, Sequence
import hashlib
import json
import math
import os
import time

import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import RunConfig
from pretrax.data import corpus, encode, handoff, sources
from pretrax.data import documents as documents_lib
from pretrax.data import plan as plan_lib
from pretrax.data import store as store_lib
from pretrax.data import units as units_lib

_SAMPLE_FILES = 64  # The tokenizer's sample is drawn from at most this many files, spread out.


# ---- Groups and parts -------------------------------------------------------------------------


def groups_of(plan: plan_lib.TokenPlan) -> list[list[int]]:
  """Consecutive files of about one shard's input each (a larger file alone): the grain of sharing
  work between hosts."""
  groups: list[list[int]] = []
  current: list[int] = []
  size = 0
  for i, file in enumerate(plan.files):
    current.append(i)
    size += file.size
    if size >= plan.part_bytes:
      groups.append(current)
      current, size = [], 0
  if current:
    groups.append(current)
  return groups


def _marker(out_dir: str, name: str) -> str:
  return os.path.join(out_dir, store_lib.PARTS_DIR, f'{name}.json')


def _done_parts(out_dir: str, group: int) -> list[dict]:
  """The parts of `group` marked done, in order (contiguous from 0)."""
  done: list[dict] = []
  while os.path.exists(path := _marker(out_dir, store_lib.part_name(group, len(done)))):
    done.append(store_lib.read_json(path))
  return done


def _group_units(plan: plan_lib.TokenPlan, files: list[int], on_bad) -> Iterator[units_lib.Unit]:
  for i in files:
    yield from units_lib.file_units(plan.files[i].path, plan.reading, on_bad)


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


def _with_disk_deltas(units: Iterator[tuple[int, units_lib.Unit]]) -> Iterator[tuple]:
  """((index, on-disk bytes since the previous unit of its file), unit) for progress lines."""
  path, position = None, 0
  for index, unit in units:
    if unit.path != path:
      path, position = unit.path, 0
    yield (index, unit.disk_end - position), unit
    position = unit.disk_end


def prepare_group(
  plan: plan_lib.TokenPlan,
  group: int,
  files: list[int],
  out_dir: str,
  encoder: encode.Encoder,
  progress: _Progress,
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
  on_bad = bad_files.append if plan.skip_bad_records else None
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
      if size >= plan.part_bytes:
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


def tokenizer_sample(
  files: Sequence[sources.InputFile],
  reading: units_lib.Reading,
  skip_bad: bool,
  budget_bytes: int,
) -> Iterator[str]:
  """Training text for the tokenizer: the first training documents of up to _SAMPLE_FILES of
  `files` spread evenly over the corpus, an equal share of `budget_bytes` from each. Takes a plan's
  parts (files, reading, skip_bad_records), not the plan: `pretrax tokenizer` has no store."""
  picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(len(files), _SAMPLE_FILES))})
  share = budget_bytes // len(picks)
  for i in picks:
    taken = 0
    for unit in units_lib.file_units(
      files[i].path, reading, on_bad=(lambda _: None) if skip_bad else None
    ):
      docs = documents_lib.decode_unit(unit, reading, skip_bad=skip_bad)
      for text, split in zip(docs.texts, docs.splits, strict=True):
        if split == units_lib.TRAIN and taken < share:
          text = text[: share - taken]
          taken += len(text)
          yield text
      if taken >= share:
        break


def _tokenizer(
  plan: plan_lib.TokenPlan, out_dir: str, process_index: int, log: Callable[[str], None]
) -> tokenizer_lib.Tokenizer:
  """The store's tokenizer: copied or trained by process 0, waited for by the others."""
  path = os.path.join(out_dir, store_lib.TOKENIZER_FILE)

  def sample(mb: float) -> Iterator[str]:
    return tokenizer_sample(plan.files, plan.reading, plan.skip_bad_records, int(mb * 1e6))

  return handoff.tokenizer_at(path, plan.tokenizer, sample, process_index, log)


def _wait_for_others(out_dir: str, groups: list[list[int]], log: Callable[[str], None]) -> dict:
  """Waits (with no time limit) for the manifest that the process finishing last writes, saying
  now and then which groups are still missing (a process that died must be run again: the same
  command)."""
  manifest_path = os.path.join(out_dir, store_lib.MANIFEST)

  def news() -> str:
    missing = [g for g in range(len(groups)) if not os.path.exists(_marker(out_dir, f'{g:05d}'))]
    return (
      f'prepare: still waiting for {len(missing)} group(s) of other processes (first: '
      f'{missing[:5]}); a process that stopped must be started again with the same command'
    )

  log('prepare: this share is done; waiting for the other processes')
  handoff.wait_for(
    manifest_path, 'the other processes to finish', timeout_s=math.inf, news=news, log=log
  )
  return store_lib.read_json(manifest_path)


# ---- The whole preparation --------------------------------------------------------------------


def _stale(out_dir: str, discard: bool) -> handoff.Stale:
  """A store of another plan: prepared again when `discard`, else refused naming what differs."""
  return handoff.Stale(
    discard=discard,
    refusal=lambda changed: (
      f'{out_dir} holds a store of other inputs or settings ({", ".join(changed)} differ): '
      'use another --output, or delete it to start over.'
    ),
    rebuilding=f'{out_dir} holds a store of other inputs or settings: preparing it again',
  )


def _finalize(
  out_dir: str, plan: plan_lib.TokenPlan, groups: list[list[int]], vocab_size: int
) -> dict | None:
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
    'input_files': len(plan.files),
    'input_bytes': sum(f.size for f in plan.files),
    'plan_sha256': hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest(),
  }
  store_lib.write_json(os.path.join(out_dir, store_lib.MANIFEST), manifest)
  return manifest


def prepare_plan(
  plan: plan_lib.TokenPlan,
  out_dir: str,
  *,
  workers: int,
  process_index: int = 0,
  process_count: int = 1,
  discard_stale: bool = False,
  log: Callable[[str], None] = print,
) -> dict:
  """Prepares this process's share of `plan` into `out_dir`, then waits for the other processes'
  shares; returns the manifest. A store of another plan in `out_dir` is prepared again if
  `discard_stale` (one process, and no checkpoint trained on it), else refused."""
  manifest_path = os.path.join(out_dir, store_lib.MANIFEST)
  # Not handoff.build_once (process 0 builds, the others wait): here every process checks the plan
  # and prepares its share of the groups, and whichever finishes last writes the manifest.
  handoff.check_plan(out_dir, plan.to_json(), _stale(out_dir, discard_stale), log)
  os.makedirs(os.path.join(out_dir, store_lib.PARTS_DIR), exist_ok=True)
  if os.path.exists(manifest_path):
    return store_lib.read_json(manifest_path)
  tok = _tokenizer(plan, out_dir, process_index, log)
  groups = groups_of(plan)
  mine = list(range(process_index, len(groups), process_count))
  total = sum(plan.files[i].size for g in mine for i in groups[g])
  what = f' (process {process_index} of {process_count})' if process_count > 1 else ''
  log(
    f'prepare: {len(plan.files)} file(s), {total / 1e6:,.1f} MB in {len(mine)} group(s) '
    f'here{what}, {workers or "no"} worker process(es), into {out_dir}'
  )
  start = time.perf_counter()
  encoder = encode.Encoder(tok, plan.reading, plan.skip_bad_records, workers)
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
  c: RunConfig,
  out_dir: str,
  *,
  workers: int,
  process_index: int = 0,
  process_count: int = 1,
  log: Callable[[str], None] = print,
) -> dict:
  """Prepares the corpus `c.data` names into a store at `out_dir` (see prepare_plan)."""
  plan = corpus.make_plan(c, corpus.input_files(c, log))
  return prepare_plan(
    plan,
    out_dir,
    workers=workers,
    process_index=process_index,
    process_count=process_count,
    log=log,
  )
