"""A run's data: its token store(s), prepared before or built (and reused) in the workdir, and
the batches read from them.

There is one data path. `data.prepared` names stores that `pretrax prepare` wrote; otherwise the
run prepares `data.path` (or each source of `data.mixture`) into WORKDIR/data with the same
streaming code, every process taking its share, and reuses that store while the inputs and the
tokenizer settings are unchanged. A bucket workdir keeps its store in a local cache directory.
"""

from collections.abc import Callable, Iterable, Iterator
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import os

import numpy as np

from pretrax import config as config_lib
from pretrax import paths
from pretrax import tokenizer as tokenizer_lib
from pretrax import workdir as workdir_lib
from pretrax.config_types import RunConfig, Source
from pretrax.data import corpus, examples, handoff, pipeline, sources
from pretrax.data import objectives as objectives_lib
from pretrax.data import plan as plan_lib
from pretrax.data import prepare as prepare_lib
from pretrax.data import store as store_lib
from pretrax.data.batch import Batch

SMALL_CORPUS_BYTES = (
  64 << 20
)  # Below this, tokenizing in worker processes costs more than it saves.


@dataclasses.dataclass(frozen=True)
class RunData:
  tok: tokenizer_lib.Tokenizer
  objectives: objectives_lib.Objectives
  sources: list[pipeline.Source]
  baseline_id: int  # The most frequent non-special training token: the accuracy floor.
  train_batches: Callable[[int], Iterator[Batch[np.ndarray]]]  # Start step -> batches.
  eval_sets: dict[str, Callable[[], Iterable[Batch[np.ndarray]]]]  # Source -> one pass.
  # Held-out document pieces of at most seq_len + 1 tokens (sft: (ids, loss weights) of examples).
  held_out_pieces: Callable[[], Iterable[np.ndarray | tuple[np.ndarray, np.ndarray]]]
  labels: tuple[str, ...] = ()  # The classification objective's label set, in index order.


def store_root(c: RunConfig, workdir: str) -> str:
  if c.data.prepared:
    return c.data.prepared
  if paths.is_remote(workdir):  # Memory-mapped reading needs a local disk.
    cache = os.environ.get('PRETRAX_CACHE', os.path.expanduser('~/.cache/pretrax'))
    return os.path.join(cache, 'stores', hashlib.sha256(workdir.encode()).hexdigest()[:16])
  return workdir_lib.data_dir(workdir)


def _store_dir(root: str, name: str) -> str:
  """A mixture source's store is a subdirectory of the root; a single source's is the root."""
  return os.path.join(root, name) if name else root


def _source_config(c: RunConfig, path: str, tokenizer_path: str) -> RunConfig:
  """`c` for one source of its mixture: that source's path (a mixture's sources have no fallback
  corpus) and, if given, the mixture's shared tokenizer."""
  fallback = c.data.fallback if not c.data.mixture else ''
  data = dataclasses.replace(c.data, path=path, fallback=fallback)
  tokenizer = dataclasses.replace(c.tokenizer, path=tokenizer_path or c.tokenizer.path)
  return dataclasses.replace(c, data=data, tokenizer=tokenizer)


@contextlib.contextmanager
def _locked(root: str):
  """Processes of one machine building the same local store take turns. The lock file sits
  beside the store, not in it: a stale store is deleted whole while the lock is held."""
  os.makedirs(os.path.dirname(root), exist_ok=True)
  with open(f'{root}.lock', 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def build(
  c: RunConfig,
  root: str,
  *,
  process_index: int,
  process_count: int,
  has_checkpoints: bool,
  log: Callable[[str], None],
) -> None:
  """Prepares (or finishes, or reuses) the run's stores under `root`."""
  specs = c.data.sources
  plans = []
  for source in specs:
    cs = _source_config(c, source.path, '')
    plans.append(corpus.make_plan(cs, corpus.input_files(cs, log)))
  tokenizer_path = c.tokenizer.path
  if c.data.mixture and not tokenizer_path:  # One tokenizer for every source.
    tokenizer_path = os.path.join(root, store_lib.TOKENIZER_FILE)
    _shared_tokenizer(plans, [s.weight for s in specs], tokenizer_path, process_index, log)
    plans = [
      corpus.make_plan(_source_config(c, s.path, tokenizer_path), list(plan.files))
      for s, plan in zip(specs, plans, strict=True)
    ]
  total = sum(f.size for plan in plans for f in plan.files)
  workers = c.data.prepare_workers
  if workers < 0:
    workers = (os.cpu_count() or 1) if total > SMALL_CORPUS_BYTES else 0
  for source, plan in zip(specs, plans, strict=True):
    prepare_lib.prepare_plan(
      plan,
      _store_dir(root, source.name),
      workers=workers,
      process_index=process_index,
      process_count=process_count,
      # A store of other inputs or settings is prepared again, unless a checkpoint trained on it
      # (or other processes may be reading it): then prepare_plan refuses it, naming what differs.
      discard_stale=not has_checkpoints and process_count == 1,
      log=log,
    )


def _shared_tokenizer(
  plans: list[plan_lib.TokenPlan],
  weights: list[float],
  path: str,
  process_index: int,
  log: Callable[[str], None],
) -> None:
  """One tokenizer for a mixture: trained on each source's sample in proportion to its weight."""

  def sample(mb: float) -> Iterator[str]:
    shares = [int(mb * 1e6 * w / sum(weights)) for w in weights]
    return (
      t
      for plan, share in zip(plans, shares, strict=True)
      for t in prepare_lib.tokenizer_sample(plan.files, plan.reading, plan.skip_bad_records, share)
    )

  handoff.tokenizer_at(path, plans[0].tokenizer, sample, process_index, log)


def load(
  c: RunConfig,
  workdir: str,
  *,
  process_index: int,
  process_count: int,
  has_checkpoints: bool,
  log: Callable[[str], None],
) -> RunData:
  """The run's tokenizer, objectives and batches, building its stores first if need be."""
  if c.objective in config_lib.FINETUNE_OBJECTIVES:
    return load_examples(
      c,
      workdir,
      process_index=process_index,
      process_count=process_count,
      has_checkpoints=has_checkpoints,
      log=log,
    )
  root = store_root(c, workdir)
  if not c.data.prepared:
    if paths.is_remote(workdir):
      with _locked(root):
        build(c, root, process_index=0, process_count=1, has_checkpoints=has_checkpoints, log=log)
    else:
      build(
        c,
        root,
        process_index=process_index,
        process_count=process_count,
        has_checkpoints=has_checkpoints,
        log=log,
      )
  specs = c.data.sources
  stores = [store_lib.Store(_store_dir(root, s.name)) for s in specs]
  if c.tokenizer.path and c.data.prepared:
    log('tokenizer.path is ignored: a prepared store comes with its tokenizer')
  tok = _one_tokenizer(specs, stores)
  seq_len = c.data.seq_len
  run_sources = _run_sources(c, specs, stores)
  _log_stores(specs, stores, tok, seq_len, run_sources, log)
  objectives = objectives_lib.Objectives.from_config(c, tok)
  where = dict(
    global_batch=c.data.batch_size,
    seed=c.seed,
    process_index=process_index,
    process_count=process_count,
  )
  return RunData(
    tok=tok,
    objectives=objectives,
    sources=run_sources,
    baseline_id=stores[0].most_frequent_token(tok),
    train_batches=lambda start: pipeline.train_batches(
      run_sources, objectives, start_step=start, threads=c.data.worker_count, **where
    ),
    eval_sets={
      s.name: functools.partial(pipeline.eval_batches, s.eval, objectives, seq_len=seq_len, **where)
      for s in run_sources
    },
    held_out_pieces=lambda: pipeline.held_out_pieces(run_sources[0].eval, seq_len),
  )


def _one_tokenizer(
  specs: tuple[Source, ...], stores: list[store_lib.Store]
) -> tokenizer_lib.Tokenizer:
  """The tokenizer every source's store was made with; DataError if two differ."""
  tok = tokenizer_lib.Tokenizer.load(stores[0].tokenizer_path)
  for source, store in zip(specs, stores, strict=True):
    with open(store.tokenizer_path, 'rb') as f:
      if f.read() != tok.model_proto:
        raise sources.DataError(
          f'the stores of {specs[0].name} and {source.name} were tokenized '
          'differently: prepare every source with one tokenizer.'
        )
  return tok


def _run_sources(
  c: RunConfig, specs: tuple[Source, ...], stores: list[store_lib.Store]
) -> list[pipeline.Source]:
  """Each source's training windows and held-out split, with its weight; ConfigError for a store
  too small to give one window or anything to evaluate on."""
  seq_len = c.data.seq_len
  run_sources = [
    pipeline.Source(
      spec.name or 'data',
      spec.weight,
      pipeline.Windows(s.split('train'), seq_len, c.data.window_stride),
      s.split('eval'),
    )
    for spec, s in zip(specs, stores, strict=True)
  ]
  for source in run_sources:
    if not len(source.train) or source.eval.num_tokens < 2:
      raise config_lib.ConfigError(
        f'the store of {source.name} has {source.train.split.num_tokens:,} training and '
        f'{source.eval.num_tokens:,} held-out tokens: it needs a window of '
        f'data.seq_len+1={seq_len + 1} to train and some text held out; use more text or '
        'change data.eval_fraction.'
      )
  return run_sources


def _log_stores(specs, stores, tok, seq_len, run_sources, log) -> None:
  for spec, store, source in zip(specs, stores, run_sources, strict=True):
    s = store.manifest['splits']
    label = f'{spec.name} (weight {spec.weight:g}): ' if spec.name else ''
    log(
      f'data: {label}{store.path}: {s["train"]["tokens"]:,} train / {s["eval"]["tokens"]:,} '
      f'held-out tokens ({s["train"]["documents"]:,} / {s["eval"]["documents"]:,} documents), '
      f'{len(source.train):,} training windows of {seq_len + 1}; vocab {tok.vocab_size}'
    )


def load_examples(
  c: RunConfig,
  workdir: str,
  *,
  process_index: int,
  process_count: int,
  has_checkpoints: bool,
  log: Callable[[str], None],
) -> RunData:
  """A fine-tuning run's data: its records encoded into an example store (data/examples.py)."""
  root = store_root(c, workdir)
  if paths.is_remote(workdir):
    with _locked(root):
      tok = examples.build(c, root, process_index=0, has_checkpoints=has_checkpoints, log=log)
  else:
    tok = examples.build(
      c, root, process_index=process_index, has_checkpoints=has_checkpoints, log=log
    )
  manifest = store_lib.read_json(os.path.join(root, store_lib.MANIFEST))
  train, held = (examples.ExampleSplit(root, s, manifest, c.objective) for s in ('train', 'eval'))
  if not len(train) or not len(held):
    raise config_lib.ConfigError(
      f'{c.objective} needs training and held-out records; the store in {root} has {len(train)} '
      f'and {len(held)}: add records, set finetune.eval_path, or change data.eval_fraction.'
    )
  seq_len, seed = c.data.seq_len, c.seed
  train_rows = examples.packing(train, seq_len, seed)
  eval_rows = examples.packing(held, seq_len, None)
  longer = int(np.sum(train.lengths() > examples.longest(c.objective, seq_len)))
  log(
    f'data: {root}: {len(train):,} training / {len(held):,} held-out {c.objective} examples in '
    f'{len(train_rows):,} / {len(eval_rows):,} packed rows of {seq_len}'
    + (f'; {longer:,} training examples cut to fit data.seq_len' if longer else '')
    + (f'; labels {manifest["labels"]}' if c.objective == 'classification' else '')
  )
  where = dict(
    seq_len=seq_len,
    global_batch=c.data.batch_size,
    process_index=process_index,
    process_count=process_count,
  )
  return RunData(
    tok=tok,
    objectives=objectives_lib.Objectives.from_config(c, tok),
    sources=[],
    baseline_id=_most_frequent_answer(train, tok),
    train_batches=lambda start: examples.train_batches(
      train, train_rows, seed=seed, start_step=start, threads=c.data.worker_count, **where
    ),
    eval_sets={'data': lambda: examples.eval_batches(held, eval_rows, **where)},
    held_out_pieces=lambda: (
      ((held.ids(i), held.loss_weights(i)) for i in range(len(held)))
      if c.objective == 'sft'
      else iter(())
    ),
    labels=tuple(manifest['labels']),
  )


def _most_frequent_answer(
  split: examples.ExampleSplit, tok: tokenizer_lib.Tokenizer, sample: int = 1 << 22
) -> int:
  """The accuracy floor's guess: the most frequent label, or the most frequent token that an sft
  response has (in a bounded read of the first tokens)."""
  if split.labels is not None:
    return int(np.argmax(np.bincount(split.labels))) if len(split.labels) else 0
  if split.weights is None:
    raise ValueError(f'the {split.objective} split has neither labels nor loss weights')
  n = min(sample, len(split.tokens))
  tokens = np.asarray(split.tokens[:n])[np.asarray(split.weights[:n]) > 0]
  return int(np.argmax(np.bincount(tokens, minlength=tok.vocab_size)))
