"""Benchmark: `pretrax prepare` on corpora with very long records, memory against record and corpus.

  .venv/bin/python benchmarks/long_records.py [--quick] [--workers=2] [--out=PATH] [--root=DIR]

About 6 minutes on 2 CPU cores (--quick: about 1); needs ~2 GB of free disk under --root.
Each corpus is four files of Tiny Shakespeare's paragraphs, shuffled (else Python's stdlib sources):
  filler.jsonl.zst   short records (0.5-8 KB), FILLER MB of them
  long.jsonl         one JSON record of RECORD MB between two short ones
  cells.parquet      one cell of CELL MB among 200 short rows
  book.txt           one text document of BOOK MB with no newline at all
Three corpora: `base`; `larger` (4x the filler and 3x the book, the same record and cell); and
`longer record` (base with a 4x longer JSON record). `pretrax prepare --workers=N` runs on each
in a subprocess, with the peak of RssAnon + RssShmem summed over its whole process tree (workers
included, sampled every 0.2 s). Then, on `base`: a 0-worker store and a store SIGKILLed at half time
and resumed, compared byte for byte (sha256 of every .tokens and .docs file) with the N-worker one.

What it shows: the peak does not grow with the corpus (larger ~ base), and grows with the longest
JSON record by a few times its size (a record is parsed whole, so its worker holds its bytes and its
text; it is tokenized in slices of 4 M characters); the book streams in pieces and costs nothing
extra.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data_scale  # noqa: E402  (its corpus text, process-tree sampler and digests)

REPO = data_scale.REPO
MiB = 1 << 20
SIZES = {  # MB of UTF-8 text: filler, record, cell, book.
  'base': (32, 32, 16, 64),
  'larger': (128, 32, 16, 256),
  'longer record': (32, 128, 16, 64),
}
QUICK_SIZES = {'base': (16, 8, 8, 24), 'larger': (64, 8, 8, 72), 'longer record': (16, 32, 8, 24)}


def text_of(rng: np.random.Generator, paragraphs: list[str], size: int, sep: str) -> str:
  """About `size` characters of paragraphs drawn at random, joined by `sep`."""
  mean = sum(len(p) for p in paragraphs[:2000]) / min(len(paragraphs), 2000) + len(sep)
  pieces, total = [], 0
  while total < size:
    chosen = [paragraphs[i] for i in rng.integers(0, len(paragraphs), int(size / mean) + 4)]
    pieces.append(sep.join(chosen))
    total += len(pieces[-1]) + len(sep)
  return sep.join(pieces)[:size]


def short_records(rng: np.random.Generator, paragraphs: list[str], size: int) -> list[str]:
  out, total = [], 0
  while total < size:
    doc = text_of(rng, paragraphs, int(np.exp(rng.uniform(np.log(500), np.log(8000)))), '\n\n')
    out.append(doc)
    total += len(doc)
  return out


def make_corpus(root: str, sizes: tuple[int, int, int, int], paragraphs: list[str]) -> float:
  """Writes the four files under `root`; MB of text written."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  filler_mb, record_mb, cell_mb, book_mb = sizes
  rng = np.random.default_rng(0)
  os.makedirs(root)
  with open(os.path.join(root, 'filler.jsonl.zst'), 'wb') as raw:
    with zstandard.ZstdCompressor().stream_writer(raw) as f:
      for doc in short_records(rng, paragraphs, filler_mb * 10**6):
        f.write((json.dumps({'text': doc}) + '\n').encode())
  record = text_of(rng, paragraphs, record_mb * 10**6, '\n\n')
  with open(os.path.join(root, 'long.jsonl'), 'w', encoding='utf-8') as f:
    for doc in ('a short record before', record, 'a short record after'):
      f.write(json.dumps({'text': doc}) + '\n')
  del record
  rows = short_records(rng, paragraphs, 200 * 2000)[:200]
  rows.insert(100, text_of(rng, paragraphs, cell_mb * 10**6, '\n\n'))
  pq.write_table(pa.table({'text': rows}), os.path.join(root, 'cells.parquet'))
  del rows
  with open(os.path.join(root, 'book.txt'), 'w', encoding='utf-8') as f:
    for _ in range(book_mb // 4):  # In pieces: the benchmark holds no whole book either.
      f.write(text_of(rng, paragraphs, 4 * 10**6, ' ').replace('\n', ' '))
  return float(sum(sizes))


def prepare(
  corpus: str,
  out: str,
  tokenizer: str,
  workers: int,
  log_path: str,
  kill_after: float | None = None,
) -> data_scale.Run:
  command = [
    sys.executable,
    '-m',
    'pretrax.cli',
    'prepare',
    f'--config={data_scale.CONFIG}',
    f'--output={out}',
    f'--workers={workers}',
    f'--config.data.path={corpus}',
    f'--config.tokenizer.path={tokenizer}',
    '--config.data.shard_mb=16',
  ]
  return data_scale.run_tree(command, log_path, kill_after=kill_after)


def train_tokenizer(corpus: str, path: str) -> None:
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pretrax.cli',
      'tokenizer',
      f'--input={os.path.join(corpus, "filler.jsonl.zst")}',
      f'--output={path}',
      '--model_type=bpe',
      '--vocab_size=8192',
      '--sample_mb=8',
    ],
    cwd=REPO,
    check=True,
    stdout=subprocess.DEVNULL,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--root', default='/tmp/bench_long_records')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  shutil.rmtree(args.root, ignore_errors=True)
  os.makedirs(os.path.join(args.root, 'logs'))
  paragraphs, origin = data_scale.source_paragraphs()
  sizes = QUICK_SIZES if args.quick else SIZES
  tokenizer = os.path.join(args.root, 'bpe8192.model')
  rows, stores = [], {}
  for name, size in sizes.items():
    corpus = os.path.join(args.root, 'corpora', name.replace(' ', '_'))
    text_mb = make_corpus(corpus, size, paragraphs)
    if not os.path.exists(tokenizer):
      train_tokenizer(corpus, tokenizer)
    store = os.path.join(args.root, 'stores', name.replace(' ', '_'))
    run = prepare(
      corpus, store, tokenizer, args.workers, os.path.join(args.root, 'logs', 'prepare.log')
    )
    assert run.returncode == 0, run.error
    stores[name] = (corpus, store, run)
    rows.append(
      f'| {name} | {size[0]} | {size[1]} | {size[2]} | {size[3]} | {text_mb:.0f} | '
      f'{run.peak_bytes / MiB:,.0f} | {run.seconds:.0f} | {text_mb / run.seconds:.1f} |'
    )
    print(rows[-1], flush=True)
  corpus, store, run = stores['base']
  expected = data_scale.digests(store)
  zero = os.path.join(args.root, 'stores', 'base_0_workers')
  assert (
    prepare(corpus, zero, tokenizer, 0, os.path.join(args.root, 'logs', 'zero.log')).returncode == 0
  )
  killed_path = os.path.join(args.root, 'stores', 'base_killed')
  killed = prepare(
    corpus,
    killed_path,
    tokenizer,
    args.workers,
    os.path.join(args.root, 'logs', 'killed.log'),
    kill_after=run.seconds / 2,
  )
  parts_done = len(os.listdir(os.path.join(killed_path, 'parts')))
  resumed = prepare(
    corpus, killed_path, tokenizer, args.workers, os.path.join(args.root, 'logs', 'killed.log')
  )
  assert resumed.returncode == 0, resumed.error
  same_zero = data_scale.digests(zero) == expected
  same_resumed = data_scale.digests(killed_path) == expected
  with open(os.path.join(store, 'manifest.json')) as f:
    manifest = json.load(f)
  lines = [
    f'Text: {origin}; {args.workers} worker processes; BPE 8192; data.shard_mb=16; '
    f'{os.cpu_count()} cores; {time.strftime("%Y-%m-%d")}.',
    '',
    '| corpus | filler MB | JSON record MB | Parquet cell MB | book MB (no newline) | text MB '
    '| peak MiB (process tree) | wall s | MB/s |',
    '|---|---|---|---|---|---|---|---|---|',
    *rows,
    '',
    f'base: {manifest["bad_records"]} bad records; {len(expected)} data files; byte-identical '
    f'with 0 workers: {same_zero}; SIGKILLed at {killed.seconds:.0f} s ({parts_done} part '
    f'markers done) and resumed in {resumed.seconds:.0f} s: byte-identical: {same_resumed}.',
  ]
  report = '\n'.join(lines)
  print(report)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(report + '\n')
  shutil.rmtree(args.root, ignore_errors=True)
  sys.exit(0 if same_zero and same_resumed and not manifest['bad_records'] else 1)


if __name__ == '__main__':
  main()
