"""Benchmark: the data layer at scale (`pretrax prepare`, the token store, the batch pipeline).

  .venv/bin/python benchmarks/data_scale.py [--sizes_gb=0.5,2] [--quick] [--out=PATH]
      [--workers=2] [--raw_mb=300] [--keep_data]

Takes about 8 minutes on 2 CPU cores at the default sizes (0.5 and 2 GB) and needs ~4 GB of free
disk under --root (/tmp/bench); --quick (20 and 80 MB) takes about 1 minute. Steps, all measured
in this run:

1. Synthetic corpora, one per size (GB = 1e9 bytes of UTF-8 document text): paragraphs of Tiny
   Shakespeare (../shared/data/tinyshakespeare.txt; else the Python standard library's sources),
   each in 16 variants with a share of their words shuffled, drawn at random into documents of
   0.5-8 KB, written in thirds as .jsonl.zst, .jsonl.gz and .parquet files of up to ~96 MB of text.
   A corpus is reused while its description (corpus.json) matches.
2. One BPE tokenizer of 8192 pieces (100 sentinels, for span corruption), trained by
   `pretrax tokenizer` on a sample of the smaller corpus, used by every run below.
3. `pretrax prepare --workers=N` of each corpus in a subprocess: wall time, input MB/s (document
   text, uncompressed), tokens/s (train + held-out tokens of the manifest, EOS included), the peak
   of RssAnon + RssShmem summed over the whole process tree (sampled every 0.2 s; mapped file pages
   are not counted), and bytes per token on disk (.tokens + .docs).
4. Raw SentencePiece on the same documents (the first --raw_mb MB of each corpus, spread over its
   files, read into memory first): `encode(docs, num_threads=N)` in chunks of ~16 MB, and the ratio
   prepare MB/s / raw MB/s (goal >= 0.85).
5. On the smaller corpus: prepare killed (SIGKILL to its process group) at 60% of the uninterrupted
   wall time, then run again to the end; total time / uninterrupted (goal <= 1.3), and whether the
   data files are byte-identical (sha256) to the uninterrupted store. When that corpus is at most
   --one_worker_max_gb, a 1-worker store is compared too.
6. Seconds from a fresh `python` process's start to its first training batch (64 x 1024, causal)
   from the larger store: imports, Store open, train_batches, next().
7. Batch pipeline tokens/s per objective at 64 x 1024 (threads=2) from the larger store, in this
   process, beside the consumption of one 8-GPU node (CONSUMPTION_TOKENS_PER_S).

Prints Markdown tables (and writes them to --out if given), with a fingerprint of src/ at the start
and the end (the code measured must not change during the run). The corpora and stores are deleted
at the end unless --keep_data.
"""

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'tiny.py')
SHAKESPEARE = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt'))
# The figure: an 8-GPU node training gpt2_small at its throughput goal consumes about
# 4M tokens/s, so one host process must supply at least that many.
CONSUMPTION_TOKENS_PER_S = 4_000_000
PREPARE_RATIO_GOAL = 0.85  # prepare MB/s / raw SentencePiece MB/s, at least.
RESUME_RATIO_GOAL = 1.3  # Killed + resumed wall time / uninterrupted, at most.
MB = 1e6
GB = 1e9
FORMATS = ('jsonl.zst', 'jsonl.gz', 'parquet')
VARIANTS = 16  # Perturbed copies of each source paragraph: BPE never sees one text everywhere.
SHUFFLED_WORDS = 0.3  # Share of a variant's words put in a random order.
DOC_BYTES = (500, 8000)  # Document lengths, log-uniform between these.
MAX_FILE_BYTES = 96 * MB  # Text per corpus file, at most.
ENCODE_CHUNK_BYTES = 16 * MB  # Documents per raw encode call.
SEQ_LEN, BATCH = 1024, 64
OBJECTIVES = (
  'causal_lm',
  'masked_lm',
  'span_corruption',
  'prefix_lm',
  'causal_lm:2,span_corruption:1,prefix_lm:1',
)


# ---- Synthetic corpora ------------------------------------------------------------------------


def source_paragraphs() -> tuple[list[str], str]:
  """Paragraphs (blocks between blank lines) of Tiny Shakespeare, else of the stdlib sources."""
  if os.path.exists(SHAKESPEARE):
    with open(SHAKESPEARE, encoding='utf-8') as f:
      texts, origin = [f.read()], 'Tiny Shakespeare'
  else:
    root = sysconfig.get_paths()['stdlib']
    names = sorted(n for n in os.listdir(root) if n.endswith('.py'))
    texts, origin = [], 'Python stdlib sources'
    for name in names:
      with open(os.path.join(root, name), encoding='utf-8', errors='replace') as f:
        texts.append(f.read())
  paragraphs = [p.strip('\n') for t in texts for p in t.split('\n\n')]
  return [p for p in paragraphs if p.strip()], origin


def perturbed(paragraph: str, rng: np.random.Generator) -> str:
  """The paragraph with a random share of its words moved among themselves (line breaks kept)."""
  lines = [line.split(' ') for line in paragraph.split('\n')]
  where = [(i, j) for i, words in enumerate(lines) for j in range(len(words))]
  chosen = [where[k] for k in np.flatnonzero(rng.random(len(where)) < SHUFFLED_WORDS)]
  moved = [lines[i][j] for i, j in chosen]
  for (i, j), k in zip(chosen, rng.permutation(len(moved)), strict=True):
    lines[i][j] = moved[k]
  return '\n'.join(' '.join(words) for words in lines)


_pool: np.ndarray | None = None  # Perturbed paragraphs, in each generating process.
_pool_bytes: np.ndarray | None = None


def _start_generator() -> None:
  global _pool, _pool_bytes
  paragraphs, _ = source_paragraphs()
  rng = np.random.default_rng(1234)  # One pool for every file and process.
  pool = [perturbed(p, rng) for _ in range(VARIANTS) for p in paragraphs]
  _pool = np.array(pool, dtype=object)
  _pool_bytes = np.array([len(p.encode('utf-8')) + 2 for p in pool], np.int64)


def documents(seed: int, target_bytes: float, batch_bytes: float):
  """Batches of random documents, about `batch_bytes` each, until `target_bytes` of text."""
  rng = np.random.default_rng(seed)
  made = 0
  while made < target_bytes:
    batch, size = [], 0
    while size < batch_bytes and made + size < target_bytes:
      want = math.exp(rng.uniform(math.log(DOC_BYTES[0]), math.log(DOC_BYTES[1])))
      picks = rng.integers(0, len(_pool), 64)
      count = int(np.searchsorted(np.cumsum(_pool_bytes[picks]), want)) + 1
      doc = '\n\n'.join(_pool[picks[:count]])
      batch.append(doc)
      size += len(doc.encode('utf-8'))
    made += size
    yield batch, size


def write_file(task: tuple[str, str, int, float]) -> tuple[int, int]:
  """Writes one corpus file; (text bytes, documents) it holds."""
  path, fmt, seed, target = task
  total, count = 0, 0
  tmp = path + '.partial'
  if fmt == 'parquet':
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([('text', pa.string())])
    with pq.ParquetWriter(tmp, schema) as writer:
      for batch, size in documents(seed, target, 8 * MB):
        writer.write_table(pa.table({'text': batch}, schema=schema))
        total, count = total + size, count + len(batch)
  else:
    with open(tmp, 'wb') as raw:
      if fmt == 'jsonl.gz':
        stream = gzip.GzipFile(fileobj=raw, mode='wb', compresslevel=6)
      else:
        import zstandard

        stream = zstandard.ZstdCompressor(level=3).stream_writer(raw)
      with stream:
        for batch, size in documents(seed, target, 4 * MB):
          stream.write(''.join(json.dumps({'text': d}) + '\n' for d in batch).encode('utf-8'))
          total, count = total + size, count + len(batch)
  os.replace(tmp, path)
  return total, count


@dataclasses.dataclass
class Corpus:
  name: str
  root: str
  files: list[str]
  text_bytes: int
  documents: int
  disk_bytes: int
  seconds: float  # To generate (0 when reused).
  origin: str

  @property
  def pattern(self) -> str:
    return os.path.join(self.root, 'files')


def make_corpus(root: str, size_gb: float, seed: int, processes: int) -> Corpus:
  """The corpus of `size_gb` under `root`, generated unless a matching one is there."""
  name = f'{size_gb:g}gb'
  out = os.path.join(root, f'corpus-{name}')
  spec_path = os.path.join(out, 'corpus.json')
  count = max(len(FORMATS), math.ceil(size_gb * GB / MAX_FILE_BYTES))
  count = max(6, count + (-count) % len(FORMATS))  # Every format, equally often.
  per_file = size_gb * GB / count
  _, origin = source_paragraphs()
  spec = {
    'size_gb': size_gb,
    'seed': seed,
    'files': count,
    'origin': origin,
    'variants': VARIANTS,
    'doc_bytes': DOC_BYTES,
  }
  if os.path.exists(spec_path):
    with open(spec_path) as f:
      saved = json.load(f)
    if saved['spec'] == spec:
      return Corpus(
        name,
        out,
        saved['files'],
        saved['text_bytes'],
        saved['documents'],
        saved['disk_bytes'],
        0.0,
        origin,
      )
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(os.path.join(out, 'files'))
  tasks = [
    (
      os.path.join(out, 'files', f'part-{i:04d}.{FORMATS[i % len(FORMATS)]}'),
      FORMATS[i % len(FORMATS)],
      seed * 100_003 + i,
      per_file,
    )
    for i in range(count)
  ]
  start = time.perf_counter()
  with multiprocessing.get_context('spawn').Pool(processes, _start_generator) as pool:
    results = pool.map(write_file, tasks, chunksize=1)
  seconds = time.perf_counter() - start
  files = [t[0] for t in tasks]
  saved = {
    'spec': spec,
    'files': files,
    'text_bytes': sum(r[0] for r in results),
    'documents': sum(r[1] for r in results),
    'disk_bytes': sum(os.path.getsize(f) for f in files),
  }
  with open(spec_path, 'w') as f:
    json.dump(saved, f)
  return Corpus(
    name, out, files, saved['text_bytes'], saved['documents'], saved['disk_bytes'], seconds, origin
  )


def read_documents(path: str, budget: float) -> list[str]:
  """The first documents of a corpus file, about `budget` bytes of text (our own reader, not
  pretrax's: the baseline must not share its code)."""
  docs, size = [], 0
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=['text']):
      for text in batch.column(0).to_pylist():
        docs.append(text)
        size += len(text.encode('utf-8'))
        if size >= budget:
          return docs
    return docs
  if path.endswith('.gz'):
    stream = gzip.open(path, 'rb')
  else:
    import zstandard

    stream = zstandard.ZstdDecompressor().stream_reader(open(path, 'rb'))
  with stream:
    for line in io.BufferedReader(stream, 1 << 20):
      text = json.loads(line)['text']
      docs.append(text)
      size += len(text.encode('utf-8'))
      if size >= budget:
        break
  return docs


# ---- Process trees ----------------------------------------------------------------------------


def tree_pids(root: int) -> list[int]:
  """`root` and all its descendants, from the parent ids in /proc/*/stat."""
  children: dict[int, list[int]] = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        stat = f.read()
    except OSError:
      continue
    ppid = int(stat[stat.rindex(')') + 2 :].split()[1])  # The name may hold spaces.
    children.setdefault(ppid, []).append(int(entry))
  out, todo = [], [root]
  while todo:
    pid = todo.pop()
    out.append(pid)
    todo.extend(children.get(pid, []))
  return out


def private_rss(pid: int) -> int:
  """RssAnon + RssShmem of one process in bytes (file-backed pages, e.g. mmapped stores, are
  page cache, not the process's memory); 0 once it is gone."""
  total = 0
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith(('RssAnon:', 'RssShmem:')):
          total += int(line.split()[1]) * 1024
  except OSError:
    return 0
  return total


class PeakMemory:
  """Samples a process tree's private memory every `interval` s in a thread; `peak` in bytes."""

  def __init__(self, pid: int, interval: float = 0.2):
    self.pid, self.interval, self.peak, self.samples = pid, interval, 0, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, sum(private_rss(p) for p in tree_pids(self.pid)))
      self.samples += 1
      self._stop.wait(self.interval)

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.peak


class CpuMeter:
  """CPU seconds of the whole machine beside this process's own (its threads, and the children
  it has waited for) over a measurement: `other_cores` is the load of everything else on the
  machine (e.g. tests running beside the benchmark), the noise in a figure."""

  def __init__(self):
    self.start_wall, self.start_busy, self.start_own = time.perf_counter(), busy_s(), own_s()

  def other_cores(self) -> float:
    wall = time.perf_counter() - self.start_wall
    other = (busy_s() - self.start_busy) - (own_s() - self.start_own)
    return max(other, 0.0) / wall


def busy_s() -> float:
  """CPU seconds the machine spent not idle since boot (/proc/stat)."""
  with open('/proc/stat') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def own_s() -> float:
  total = 0.0
  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
    usage = resource.getrusage(who)
    total += usage.ru_utime + usage.ru_stime
  return total


# ---- Preparing --------------------------------------------------------------------------------


def prepare_command(corpus: Corpus, out: str, tokenizer: str, workers: int) -> list[str]:
  return [
    sys.executable,
    '-m',
    'pretrax.cli',
    'prepare',
    f'--config={CONFIG}',
    f'--output={out}',
    f'--workers={workers}',
    f'--config.data.path={corpus.pattern}',
    '--config.tokenizer.model_type=bpe',
    '--config.tokenizer.vocab_size=8192',
    f'--config.tokenizer.path={tokenizer}',
  ]


@dataclasses.dataclass
class Run:
  seconds: float
  peak_bytes: int
  returncode: int
  other_cores: float
  error: str = ''  # The last line of the log when it failed.


def run_tree(command: list[str], log_path: str, kill_after: float | None = None) -> Run:
  """Runs `command` in its own process group, sampling its tree's memory; with `kill_after`,
  SIGKILLs the whole group after that many seconds."""
  with open(log_path, 'ab') as log:
    log_start = log.tell()
    cpu = CpuMeter()
    start = time.perf_counter()
    process = subprocess.Popen(
      command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    memory = PeakMemory(process.pid)
    try:
      process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      os.killpg(process.pid, signal.SIGKILL)  # The workers too, as a crash or OOM would.
      process.wait()
    seconds = time.perf_counter() - start
    peak = memory.stop()
    other = cpu.other_cores()
  wait_for_group_exit(process.pid)
  error = ''
  if process.returncode > 0:
    with open(log_path, 'rb') as f:
      f.seek(log_start)
      lines = f.read().decode('utf-8', 'replace').strip().splitlines()
    error = lines[-1] if lines else f'exit status {process.returncode}'
  return Run(seconds, peak, process.returncode, other, error)


def wait_for_group_exit(pgid: int, timeout: float = 30.0) -> None:
  """Waits until no process of the group is left (orphaned workers die after their parent)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.1)


def data_files(store: str) -> list[str]:
  return sorted(n for n in os.listdir(store) if n.endswith(('.tokens', '.docs')))


def digests(store: str) -> dict[str, str]:
  out = {}
  for name in data_files(store):
    h = hashlib.sha256()
    with open(os.path.join(store, name), 'rb') as f:
      for block in iter(lambda: f.read(1 << 24), b''):
        h.update(block)
    out[name] = h.hexdigest()
  return out


@dataclasses.dataclass
class Prepared:
  corpus: Corpus
  store: str
  run: Run
  tokens: int
  store_bytes: int
  raw_mb_s: float = 0.0
  raw_tokens_s: float = 0.0
  raw_mb: float = 0.0
  raw_other_cores: float = 0.0

  @property
  def mb_s(self) -> float:
    return self.corpus.text_bytes / MB / self.run.seconds


def prepare_store(corpus: Corpus, root: str, tokenizer: str, workers: int, log) -> Prepared:
  store = os.path.join(root, 'stores', corpus.name)
  shutil.rmtree(store, ignore_errors=True)
  log(f'preparing {corpus.name} into {store}')
  run = run_tree(
    prepare_command(corpus, store, tokenizer, workers),
    os.path.join(root, 'logs', f'prepare-{corpus.name}.log'),
  )
  if run.returncode != 0:
    raise RuntimeError(f'pretrax prepare failed: {run.error}')
  with open(os.path.join(store, 'manifest.json')) as f:
    splits = json.load(f)['splits']
  tokens = splits['train']['tokens'] + splits['eval']['tokens']
  size = sum(os.path.getsize(os.path.join(store, n)) for n in data_files(store))
  return Prepared(corpus, store, run, tokens, size)


def raw_baseline(p: Prepared, tokenizer: str, raw_mb: float, threads: int) -> None:
  """Raw SentencePiece MB/s over the corpus' first documents (read beforehand, not timed)."""
  import sentencepiece as spm

  budget = min(raw_mb * MB, p.corpus.text_bytes)
  docs = [d for f in p.corpus.files for d in read_documents(f, budget / len(p.corpus.files))]
  sizes = [len(d.encode('utf-8')) for d in docs]
  chunks, chunk, size = [], [], 0
  for doc, n in zip(docs, sizes, strict=True):
    chunk.append(doc)
    size += n
    if size >= ENCODE_CHUNK_BYTES:
      chunks.append(chunk)
      chunk, size = [], 0
  chunks += [chunk] if chunk else []
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  cpu = CpuMeter()
  start = time.perf_counter()
  tokens = 0
  for chunk in chunks:
    tokens += sum(len(ids) for ids in sp.encode(chunk, num_threads=threads))
  seconds = time.perf_counter() - start
  p.raw_mb = sum(sizes) / MB
  p.raw_mb_s = p.raw_mb / seconds
  p.raw_tokens_s = tokens / seconds
  p.raw_other_cores = cpu.other_cores()


@dataclasses.dataclass
class Resume:
  killed_at: float
  killed_run: Run
  finish_run: Run
  uninterrupted: float
  identical: bool | None  # None: the resumed run failed, nothing to compare.
  files: int
  parts_before_finish: int

  @property
  def ratio(self) -> float:
    return (self.killed_run.seconds + self.finish_run.seconds) / self.uninterrupted


def killed_and_resumed(p: Prepared, root: str, tokenizer: str, workers: int, log) -> Resume:
  store = p.store + '-resumed'
  shutil.rmtree(store, ignore_errors=True)
  command = prepare_command(p.corpus, store, tokenizer, workers)
  log_path = os.path.join(root, 'logs', f'resume-{p.corpus.name}.log')
  kill_at = 0.6 * p.run.seconds
  log(f'preparing {p.corpus.name} again, killed after {kill_at:.1f} s, then resumed')
  killed = run_tree(command, log_path, kill_after=kill_at)
  parts = len([n for n in os.listdir(os.path.join(store, 'parts')) if n.endswith('.json')])
  finished = run_tree(command, log_path)
  expected = digests(p.store)
  identical = digests(store) == expected if finished.returncode == 0 else None
  return Resume(kill_at, killed, finished, p.run.seconds, identical, len(expected), parts)


def one_worker_identical(p: Prepared, root: str, tokenizer: str, log) -> tuple[bool, float]:
  store = p.store + '-1worker'
  shutil.rmtree(store, ignore_errors=True)
  log(f'preparing {p.corpus.name} with 1 worker')
  run = run_tree(
    prepare_command(p.corpus, store, tokenizer, 1),
    os.path.join(root, 'logs', f'1worker-{p.corpus.name}.log'),
  )
  if run.returncode != 0:
    raise RuntimeError(f'the 1-worker prepare failed: {run.error}')
  return digests(p.store) == digests(store), run.seconds


# ---- Reading ----------------------------------------------------------------------------------

# Run in a fresh interpreter: everything a training process does before its first batch.
_FIRST_BATCH = """
import json, sys, time
started = float(sys.argv[1])
from pretrax import config as config_lib
from pretrax import run_config
from pretrax import tokenizer as tokenizer_lib
from pretrax.data import objectives, pipeline, store
imported = time.time()
s = store.Store(sys.argv[2])
c = config_lib.load(sys.argv[3])
c.data.seq_len = int(sys.argv[4])
c = run_config.build(c, check_data=False)
tok = tokenizer_lib.Tokenizer.load(s.tokenizer_path)
objs = objectives.Objectives.from_config(c, tok)
source = pipeline.Source('data', 1.0, pipeline.Windows(s.split('train'), c.data.seq_len,
                                                       c.data.seq_len), s.split('eval'))
batches = pipeline.train_batches([source], objs, global_batch=int(sys.argv[5]), seed=0,
                                 start_step=0, threads=2)
batch = next(batches)
done = time.time()
print(json.dumps({'imports': imported - started, 'total': done - started,
                  'shape': list(batch.inputs.shape)}), flush=True)
"""


def first_batch_seconds(store: str) -> dict:
  """Seconds from a fresh process's start to its first batch (the process is then killed)."""
  started = time.time()
  process = subprocess.Popen(
    [sys.executable, '-c', _FIRST_BATCH, repr(started), store, CONFIG, str(SEQ_LEN), str(BATCH)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  line = process.stdout.readline()
  os.killpg(process.pid, signal.SIGKILL)  # Grain's prefetch threads would keep reading.
  process.wait()
  if not line:
    raise RuntimeError('the first-batch process printed nothing')
  return json.loads(line)


@dataclasses.dataclass
class Throughput:
  objective: str
  batches: int
  seconds: float
  other_cores: float

  @property
  def tokens_s(self) -> float:
    return self.batches * BATCH * SEQ_LEN / self.seconds


def pipeline_throughput(
  store_path: str,
  objective: str,
  min_batches: int,
  min_seconds: float,
  max_seconds: float,
  warmup: int = 3,
) -> Throughput:
  """Batches of one objective from a store, timed after `warmup` batches: at least
  `min_batches` and `min_seconds` (so the prefetched batches weigh little), at most
  `max_seconds`."""
  from pretrax import config as config_lib
  from pretrax import run_config
  from pretrax import tokenizer as tokenizer_lib
  from pretrax.data import objectives, pipeline, store

  s = store.Store(store_path)
  c = config_lib.load(CONFIG)
  c.objective = objective
  c.data.seq_len = SEQ_LEN
  c = run_config.build(c, check_data=False)
  objs = objectives.Objectives.from_config(c, tokenizer_lib.Tokenizer.load(s.tokenizer_path))
  source = pipeline.Source(
    'data', 1.0, pipeline.Windows(s.split('train'), SEQ_LEN, SEQ_LEN), s.split('eval')
  )
  batches = pipeline.train_batches(
    [source], objs, global_batch=BATCH, seed=0, start_step=0, threads=2
  )
  for _ in range(warmup):
    next(batches)
  cpu = CpuMeter()
  start = time.perf_counter()
  count = 0
  while True:
    elapsed = time.perf_counter() - start
    if elapsed >= max_seconds or (count >= min_batches and elapsed >= min_seconds):
      break
    batch = next(batches)
    assert batch.inputs.shape == (BATCH, SEQ_LEN), batch.inputs.shape
    count += 1
  return Throughput(objective, count, time.perf_counter() - start, cpu.other_cores())


# ---- Report -----------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def verdict(ok: bool) -> str:
  return 'yes' if ok else '**no**'


def preparation_table(prepared: list[Prepared], workers: int) -> str:
  rows = []
  for p in prepared:
    c = p.corpus
    ratio = p.mb_s / p.raw_mb_s
    rows.append(
      [
        c.name,
        f'{len(c.files)} ({", ".join(FORMATS)})',
        f'{c.documents:,}',
        f'{c.text_bytes / MB:,.0f}',
        f'{c.disk_bytes / MB:,.0f}',
        f'{p.tokens:,}',
        f'{p.run.seconds:.1f}',
        f'{p.mb_s:.2f}',
        f'{p.tokens / p.run.seconds / 1e6:.2f}',
        f'{p.run.peak_bytes / MB:,.0f}',
        f'{p.store_bytes / p.tokens:.3f}',
        f'{c.text_bytes / p.tokens:.2f}',
        f'{p.raw_mb_s:.2f} ({p.raw_mb:.0f} MB, {p.raw_tokens_s / 1e6:.2f} M tok/s)',
        f'{ratio:.2f}',
        verdict(ratio >= PREPARE_RATIO_GOAL),
        f'{p.run.other_cores:.2f} / {p.raw_other_cores:.2f}',
      ]
    )
  header = [
    'corpus',
    'files',
    'documents',
    'text MB',
    'on disk MB',
    'tokens',
    f'prepare s ({workers} workers)',
    'MB/s',
    'M tokens/s',
    'peak tree RSS MB',
    'store bytes/token',
    'text bytes/token',
    'raw SentencePiece MB/s',
    'prepare / raw',
    f'>= {PREPARE_RATIO_GOAL}',
    'other load, cores (prepare / raw)',
  ]
  return table(header, rows)


def resume_table(r: Resume, name: str, one_worker: tuple[bool, float] | None) -> str:
  killed = r.killed_run
  how = (
    'killed'
    if killed.returncode == -signal.SIGKILL
    else f'**finished before the kill** (exit status {killed.returncode})'
  )
  rows = [
    ['uninterrupted prepare', f'{r.uninterrupted:.1f} s'],
    [
      f'first run, SIGKILL to its process group at {r.killed_at:.1f} s',
      f'{how} after {killed.seconds:.1f} s ({r.parts_before_finish} part/group markers written)',
    ],
  ]
  finish = r.finish_run
  if finish.returncode != 0:
    rows.append(
      ['same command again', f'**failed** after {finish.seconds:.1f} s: `{finish.error}`']
    )
  else:
    rows += [
      [
        'same command again, to the end',
        f'{finish.seconds:.1f} s (other load {finish.other_cores:.2f} cores)',
      ],
      [
        'total / uninterrupted',
        f'{r.ratio:.2f} (goal <= {RESUME_RATIO_GOAL}: {verdict(r.ratio <= RESUME_RATIO_GOAL)})',
      ],
      [
        'data files byte-identical to the uninterrupted store',
        f'{verdict(bool(r.identical))} ({r.files} .tokens/.docs files, sha256)',
      ],
    ]
  if one_worker is None:
    rows.append(['1-worker store byte-identical', 'not run at this size (see the tests)'])
  else:
    rows.append(
      [
        '1-worker store byte-identical',
        f'{verdict(one_worker[0])} (1 worker: {one_worker[1]:.1f} s)',
      ]
    )
  return table([f'kill and resume ({name})', 'value'], rows)


def reading_table(name: str, first: dict, results: list[Throughput]) -> str:
  rows = [
    [
      'first training batch, fresh process',
      f'{first["total"]:.2f} s',
      '',
      '',
      f'(imports {first["imports"]:.2f} s; causal_lm, {BATCH} x {SEQ_LEN})',
    ]
  ]
  for t in results:
    ratio = t.tokens_s / CONSUMPTION_TOKENS_PER_S
    goal = f'goal >= 1: {verdict(ratio >= 1)}' if t.objective == 'causal_lm' else ''
    rows.append(
      [
        t.objective,
        f'{t.tokens_s / 1e6:.2f} M tokens/s',
        f'{CONSUMPTION_TOKENS_PER_S / 1e6:.1f} M tokens/s',
        f'{ratio:.2f}',
        f'{t.batches} batches in {t.seconds:.1f} s ({1e3 * t.seconds / t.batches:.0f} '
        f'ms/batch, other load {t.other_cores:.2f} cores) {goal}',
      ]
    )
  header = [
    f'reading the {name} store ({BATCH} x {SEQ_LEN}, threads=2, 1 process)',
    'supplies',
    'consumption (8-GPU node)',
    'supply / consumption',
    'notes',
  ]
  return table(header, rows)


def source_fingerprint() -> str:
  """A short hash of src/**/*.py: which code a run measured."""
  h = hashlib.sha256()
  for folder, dirs, names in sorted(os.walk(os.path.join(REPO, 'src'))):
    dirs.sort()
    for name in sorted(n for n in names if n.endswith('.py')):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, REPO).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()[:12]


def environment() -> str:
  import sentencepiece

  return (
    f'{os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, '
    f'sentencepiece {sentencepiece.__version__}, numpy {np.__version__}'
  )


# ---- Main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes_gb', default='0.5,2', help='Corpus sizes, GB of text (1e9 B).')
  parser.add_argument(
    '--quick', action='store_true', help='Sizes 0.02,0.08 and a 20 MB raw baseline: a few minutes.'
  )
  parser.add_argument('--root', default='/tmp/bench', help='Where corpora and stores go.')
  parser.add_argument('--out', default='', help='Also write the tables to this file.')
  parser.add_argument('--workers', type=int, default=2, help='pretrax prepare --workers.')
  parser.add_argument('--raw_mb', type=float, default=300, help='Text for the raw baseline.')
  parser.add_argument('--sample_mb', type=float, default=16, help='Tokenizer training sample.')
  parser.add_argument(
    '--one_worker_max_gb',
    type=float,
    default=0.5,
    help='Compare a 1-worker store when the smaller corpus is at most this.',
  )
  parser.add_argument('--keep_data', action='store_true', help='Keep corpora and stores.')
  args = parser.parse_args()
  if args.quick:
    args.sizes_gb, args.raw_mb = '0.02,0.08', min(args.raw_mb, 20)
  return args


def train_tokenizer(corpus: Corpus, root: str, sample_mb: float, log) -> tuple[str, float]:
  path = os.path.join(root, f'bpe8192-{corpus.name}.model')
  log(f'training the tokenizer on {sample_mb:g} MB of {corpus.name}')
  start = time.perf_counter()
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pretrax.cli',
      'tokenizer',
      f'--input={corpus.pattern}',
      f'--output={path}',
      '--model_type=bpe',
      '--vocab_size=8192',
      f'--sample_mb={sample_mb:g}',
      '--sentinels=100',
    ],
    cwd=REPO,
    check=True,
    stdout=subprocess.DEVNULL,
  )
  return path, time.perf_counter() - start


def main() -> None:
  args = parse_args()
  start = time.perf_counter()
  code_before = source_fingerprint()

  def log(message: str) -> None:
    print(f'[{time.perf_counter() - start:7.1f} s] {message}', flush=True)

  sizes = sorted(float(s) for s in args.sizes_gb.split(','))
  os.makedirs(os.path.join(args.root, 'logs'), exist_ok=True)
  corpora = []
  for i, size in enumerate(sizes):
    log(f'corpus of {size:g} GB')
    corpora.append(make_corpus(args.root, size, seed=i + 1, processes=os.cpu_count() or 1))
    c = corpora[-1]
    log(
      f'  {len(c.files)} files, {c.documents:,} documents, {c.text_bytes / MB:,.0f} MB of '
      f'text, {c.disk_bytes / MB:,.0f} MB on disk, generated in {c.seconds:.1f} s'
    )
  tokenizer, tokenizer_s = train_tokenizer(corpora[0], args.root, args.sample_mb, log)
  log(f'  tokenizer trained in {tokenizer_s:.1f} s')

  prepared = []
  for corpus in corpora:
    p = prepare_store(corpus, args.root, tokenizer, args.workers, log)
    log(f'  {p.run.seconds:.1f} s, {p.mb_s:.2f} MB/s, peak {p.run.peak_bytes / MB:,.0f} MB')
    raw_baseline(p, tokenizer, args.raw_mb, args.workers)
    log(f'  raw SentencePiece: {p.raw_mb_s:.2f} MB/s over {p.raw_mb:.0f} MB')
    prepared.append(p)

  small, large = prepared[0], prepared[-1]
  resume = killed_and_resumed(small, args.root, tokenizer, args.workers, log)
  log(f'  resume ratio {resume.ratio:.2f}, identical: {resume.identical}')
  one_worker = None
  if small.corpus.text_bytes <= args.one_worker_max_gb * GB * 1.01:
    one_worker = one_worker_identical(small, args.root, tokenizer, log)

  log('first batch from a fresh process')
  first = first_batch_seconds(large.store)
  throughput = []
  for objective in OBJECTIVES:
    log(f'pipeline: {objective}')
    throughput.append(
      pipeline_throughput(large.store, objective, min_batches=30, min_seconds=5, max_seconds=30)
    )
    log(f'  {throughput[-1].tokens_s / 1e6:.2f} M tokens/s')

  total = time.perf_counter() - start
  corpus_s = sum(c.seconds for c in corpora)
  code_after = source_fingerprint()
  code = (
    f'src/ fingerprint {code_before}, unchanged during the run'
    if code_after == code_before
    else f'**src/ changed during the run** (fingerprint {code_before} -> {code_after})'
  )
  command = ' '.join(['.venv/bin/python', 'benchmarks/data_scale.py', *sys.argv[1:]])
  report = '\n\n'.join(
    [
      f'## Data layer at scale ({", ".join(c.name for c in corpora)})',
      f'Command: `{command}`. {environment()}; {code}. Corpora: {corpora[0].origin} '
      f'paragraphs, perturbed, in documents of {DOC_BYTES[0]}-{DOC_BYTES[1]} B (generated in '
      f'{corpus_s:.0f} s). One BPE tokenizer of 8192 pieces trained on {args.sample_mb:g} MB in '
      f'{tokenizer_s:.0f} s. MB = 1e6 bytes of document text, uncompressed; tokens include one EOS '
      f'per document. The stores are read just after being written (in the page cache). Whole '
      f'benchmark: {total / 60:.1f} min.',
      preparation_table(prepared, args.workers),
      resume_table(resume, small.corpus.name, one_worker),
      reading_table(large.corpus.name, first, throughput),
    ]
  )
  print('\n' + report)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(report + '\n')
    log(f'wrote {args.out}')
  if not args.keep_data:
    for c in corpora:
      shutil.rmtree(c.root, ignore_errors=True)
    shutil.rmtree(os.path.join(args.root, 'stores'), ignore_errors=True)


if __name__ == '__main__':
  main()
