"""`pretrax prepare` and the token store: formats, byte-identical stores whatever the workers, hosts
and interruptions, bad input named in one line, mixtures in proportion, reuse in a workdir."""

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, pretrax_env, run_cli
from pretrax import config, metrics, run_config, tokenizer
from pretrax.data import corpus, pipeline, prepare, sources, store
from pretrax.data import units as units_lib

TINY = os.path.join(REPO, 'configs', 'tiny.py')


@pytest.fixture(scope='module')
def documents(corpus_path) -> list[str]:
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read()
  return [d for d in text.split('\n\n') if d.strip()][:400]


def _config(path: str, **data) -> config.ml_collections.ConfigDict:
  c = config.base_config()
  c.data.path = path
  c.tokenizer.model_type, c.tokenizer.vocab_size = 'bpe', 400
  for k, v in data.items():
    c.data[k] = v
  return c


def _resolved(c: config.ml_collections.ConfigDict):
  """`c` as the run config that preparing takes (resolved, not validated: these are the store's
  own tests, below the command line)."""
  return run_config.resolve(c.to_dict())


def _prepare(c, out, workers: int = 0, **kw) -> store.Store:
  prepare.prepare(_resolved(c), str(out), workers=workers, log=lambda _: None, **kw)
  return store.Store(str(out))


def _data_files(path) -> dict[str, str]:
  """sha256 of every data file of a store (the .tokens and .docs)."""
  names = sorted(n for n in os.listdir(path) if n.endswith(('.tokens', '.docs')))
  return {n: hashlib.sha256(open(os.path.join(path, n), 'rb').read()).hexdigest() for n in names}


def _jsonl(docs: list[str], field: str = 'text') -> str:
  return ''.join(json.dumps({field: d, 'id': i}) + '\n' for i, d in enumerate(docs))


def _write_formats(root, docs: list[str]) -> None:
  """The same documents in every format: a fifth each."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  import zstandard

  parts = np.array_split(np.arange(len(docs)), 5)
  chunk = [[docs[i] for i in p] for p in parts]
  (root / 'a.txt').write_text('<|doc|>'.join(chunk[0]), encoding='utf-8')
  (root / 'b.jsonl').write_text(_jsonl(chunk[1]), encoding='utf-8')
  (root / 'c.json.gz').write_bytes(gzip.compress(_jsonl(chunk[2]).encode()))
  (root / 'd.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(_jsonl(chunk[3]).encode()))
  pq.write_table(pa.table({'text': chunk[4]}), str(root / 'e.parquet'), row_group_size=7)


def test_every_format_and_compression_gives_the_ids_of_plain_text(tmp_path, documents):
  (tmp_path / 'mixed').mkdir()
  _write_formats(tmp_path / 'mixed', documents)
  c = _config(str(tmp_path / 'mixed'), separator='<|doc|>')
  mixed = _prepare(c, tmp_path / 'store')
  # Reference: each document as its own plain text file, in the same order.
  (tmp_path / 'plain').mkdir()
  for i, d in enumerate(documents):
    (tmp_path / 'plain' / f'{i:04d}.txt').write_text(d, encoding='utf-8')
  c = _config(str(tmp_path / 'plain'), eval_fraction=0.1)
  c.tokenizer.path = mixed.tokenizer_path
  plain = _prepare(c, tmp_path / 'plain_store')
  for split in ('train', 'eval'):
    a, b = mixed.split(split), plain.split(split)
    assert a.num_tokens > 1000
    np.testing.assert_array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
  s = mixed.manifest['splits']
  assert s['train']['documents'] + s['eval']['documents'] == len(documents)
  assert mixed.manifest['dtype'] == 'uint16'
  tok = tokenizer.Tokenizer.load(mixed.tokenizer_path)
  train = mixed.split('train')
  text = tok.decode(t for t in train.read(0, train.num_tokens) if t != tokenizer.EOS_ID)
  assert text == ''.join(d for d in documents if not units_lib.held_out(d.encode(), 0.1))


def test_the_store_is_byte_identical_for_any_number_of_workers(tmp_path, documents, monkeypatch):
  # Units of 16 KB (cut in this process; the workers only decode them): groups of ~20 units each,
  # far more than the 2 in flight per worker, from files whose texts all differ, so a unit that
  # comes back out of order changes the bytes.
  monkeypatch.setattr(units_lib, 'UNIT_BYTES', 1 << 14)
  (tmp_path / 'in').mkdir()
  for k in range(6):
    (tmp_path / 'in' / f'{k}.jsonl').write_text(
      _jsonl([f'{k}.{i} {d}' for i, d in enumerate(documents[k::2] * 2)])
    )
  c = _config(str(tmp_path / 'in'), shard_mb=0.1)
  stores = {w: _prepare(c, tmp_path / f'workers{w}', workers=w) for w in (0, 2, 3)}
  run = _resolved(c)
  plan = corpus.make_plan(run, corpus.input_files(run))
  units = [
    sum(1 for f in g for _ in units_lib.file_units(plan.files[f].path, plan.reading))
    for g in prepare.groups_of(plan)
  ]
  assert len(units) >= 2 and min(units) > 2 * 3, units
  assert len(stores[0].manifest['splits']['train']['parts']) >= 3
  for w in (2, 3):
    assert _data_files(stores[w].path) == _data_files(stores[0].path), w
    assert stores[w].manifest['splits'] == stores[0].manifest['splits']


def test_two_processes_prepare_one_store_identical_to_one_process(tmp_path, documents):
  (tmp_path / 'in').mkdir()
  for k in range(4):
    (tmp_path / 'in' / f'{k}.jsonl').write_text(_jsonl(documents[k::4] * 2))
  common = [
    'prepare',
    f'--config={TINY}',
    f'--config.data.path={tmp_path / "in"}',
    '--config.tokenizer.model_type=bpe',
    '--config.tokenizer.vocab_size=400',
    '--config.data.shard_mb=0.01',
    '--workers=0',
  ]  # A group per file: work for both.
  alone = run_cli(*common, f'--output={tmp_path / "alone"}')
  assert alone.returncode == 0, alone.stderr[-2000:]
  env = pretrax_env()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'pretrax.cli',
        *common,
        f'--output={tmp_path / "joint"}',
        '--num_processes=2',
        f'--process_id={i}',
      ],
      cwd=REPO,
      text=True,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
    )
    for i in range(2)
  ]
  deadline = time.monotonic() + 300
  while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
    if any(p.poll() not in (None, 0) for p in procs):  # One failed: the other would wait.
      break
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
  outs = [p.communicate() for p in procs]
  for p, (out, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, (out[-2000:], err[-2000:])
  assert 'process 1 of 2' in outs[1][0] and 'process 0 of 2' in outs[0][0]
  assert _data_files(tmp_path / 'alone') == _data_files(tmp_path / 'joint')


def _finished_parts(out) -> dict[str, tuple[int, int]]:
  """(inode, mtime in ns) of every data file of the parts marked done: a resume must leave them."""
  done = [n[: -len('.json')] for n in os.listdir(out / 'parts') if '-' in n]
  stats = {}
  for name in os.listdir(out):
    if name.endswith(('.tokens', '.docs')) and name.split('-', 1)[1].rsplit('.', 1)[0] in done:
      info = os.stat(out / name)
      stats[name] = (info.st_ino, info.st_mtime_ns)
  return stats


def test_a_sigkilled_prepare_resumes_inside_a_group_to_the_same_bytes(tmp_path, documents):
  # Two multi-MB compressed files, small on disk: one group of ~8 parts, so the kill lands inside
  # it, after some of its parts are done.
  (tmp_path / 'in').mkdir()
  for k in range(2):
    lines = _jsonl([f'{k}.{i} {d}' for i, d in enumerate(documents[k::2] * 60)]).encode()
    assert len(lines) > 2_000_000
    (tmp_path / 'in' / f'{k}.jsonl.gz').write_bytes(gzip.compress(lines, mtime=0))
  args = [
    'prepare',
    f'--config={TINY}',
    f'--config.data.path={tmp_path / "in"}',
    '--config.tokenizer.model_type=bpe',
    '--config.tokenizer.vocab_size=400',
    '--config.data.shard_mb=1.0',
    '--workers=1',
  ]
  whole = run_cli(*args, f'--output={tmp_path / "whole"}')
  assert whole.returncode == 0, whole.stderr[-2000:]
  assert os.listdir(tmp_path / 'whole' / 'parts').count('00000.json') == 1  # One group.
  out = tmp_path / 'killed'
  proc = subprocess.Popen(
    [sys.executable, '-m', 'pretrax.cli', *args, f'--output={out}'],
    cwd=REPO,
    env=pretrax_env(),
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 120
  while len(os.listdir(out / 'parts') if (out / 'parts').exists() else []) < 2:
    assert proc.poll() is None and time.monotonic() < deadline, 'finished before the kill'
    time.sleep(0.01)
  os.killpg(proc.pid, signal.SIGKILL)  # The workers too, mid-part.
  proc.wait()
  with pytest.raises(sources.DataError, match='did not finish: run the same'):
    store.Store(str(out))
  finished = _finished_parts(out)
  assert finished and not (out / 'parts' / '00000.json').exists()  # Inside the group.
  resumed = run_cli(*args, f'--output={out}')
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert _data_files(out) == _data_files(tmp_path / 'whole')
  assert {k: v for k, v in _finished_parts(out).items() if k in finished} == finished


def test_a_resume_inside_a_group_keeps_its_finished_parts_and_makes_the_same_bytes(
  tmp_path, documents
):
  lines = _jsonl([f'{i} {d}' for i, d in enumerate(documents * 80)]).encode()
  (tmp_path / 'in.jsonl.gz').write_bytes(gzip.compress(lines, mtime=0))
  c = _config(str(tmp_path / 'in.jsonl.gz'), shard_mb=1.5)  # ~2 units of ~1 MB a part.
  whole = _prepare(c, tmp_path / 'whole')
  parts = sorted(n[: -len('.json')] for n in os.listdir(tmp_path / 'whole' / 'parts') if '-' in n)
  assert len(parts) >= 3, parts
  # What a kill during the third part leaves: two parts marked done, the third half written.
  out = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'whole', out)
  os.remove(out / store.MANIFEST)
  os.remove(out / 'parts' / '00000.json')
  for name in parts[2:]:
    os.remove(out / 'parts' / f'{name}.json')
    for split in store.SPLITS:
      for kind in ('tokens', 'docs'):
        os.replace(out / f'{split}-{name}.{kind}', out / f'{split}-{name}.{kind}.tmp')
  finished = _finished_parts(out)
  assert len(finished) == 2 * 2 * 2  # Two parts, two splits, two files each.
  again = _prepare(c, out)
  assert _data_files(again.path) == _data_files(whole.path)
  assert again.manifest['splits'] == whole.manifest['splits']
  assert {k: v for k, v in _finished_parts(out).items() if k in finished} == finished


def test_a_kill_between_the_last_shard_and_its_group_marker_redoes_nothing(tmp_path, documents):
  (tmp_path / 'in.jsonl').write_text(_jsonl(documents * 4))
  c = _config(str(tmp_path / 'in.jsonl'))  # One shard, closed when its group's input ends.
  whole = _prepare(c, tmp_path / 'store')
  files, splits = _data_files(whole.path), whole.manifest['splits']
  # What such a kill leaves: every shard marked done, no group marker, no manifest.
  os.remove(tmp_path / 'store' / 'parts' / '00000.json')
  os.remove(tmp_path / 'store' / 'manifest.json')
  again = _prepare(c, tmp_path / 'store')
  assert _data_files(again.path) == files and again.manifest['splits'] == splits


@pytest.mark.parametrize(
  'name, content, where, what',
  [
    ('bad.jsonl', b'{"text": "fine"}\n{"text": "cut\n', 'bad.jsonl:2', 'malformed JSON'),
    ('field.jsonl', b'{"text": "a"}\n{"body": "b"}\n', 'field.jsonl:2', "no 'text' field"),
    ('type.jsonl', b'{"text": "a"}\n\n{"text": 7}\n', 'type.jsonl:3', "'text' is int"),
    ('latin.txt', 'caf\xe9'.encode('latin-1'), 'latin.txt:byte 3', 'not UTF-8'),
    (
      'cut.jsonl.gz',
      gzip.compress(b'{"text": "a"}\n' * 500, mtime=0)[:-30],
      'cut.jsonl.gz',
      'truncated or corrupt',
    ),
    ('cut.jsonl.zst', None, 'cut.jsonl.zst', 'truncated or corrupt'),
    ('broken.parquet', b'PAR1 not really parquet', 'broken.parquet', 'not a readable Parquet'),
  ],
  ids=['malformed', 'no-field', 'not-a-string', 'not-utf8', 'cut-gz', 'cut-zst', 'bad-parquet'],
)
# (Named ids: bytes in an id would make pytest-xdist workers disagree on the test names.)
def test_bad_input_is_named_with_its_line_or_skipped_and_counted(
  tmp_path, name, content, where, what
):
  if content is None:
    import zstandard

    content = zstandard.ZstdCompressor().compress(b'{"text": "a"}\n' * 5000)[:-20]
  (tmp_path / 'in').mkdir()
  (tmp_path / 'in' / name).write_bytes(content)
  (tmp_path / 'in' / 'good.jsonl').write_text(_jsonl(['some good text'] * 50))
  c = _config(str(tmp_path / 'in'))
  c.tokenizer.model_type = 'char'
  with pytest.raises(sources.DataError) as error:
    _prepare(c, tmp_path / 'strict')
  message = str(error.value)
  assert where in message and what in message and 'skip_bad_records' in message, message
  c.data.skip_bad_records = True
  skipped = _prepare(c, tmp_path / 'lenient')
  assert skipped.manifest['bad_records'] >= 1
  assert where in skipped.manifest['bad_examples'][0]


def test_bad_input_ends_prepare_with_one_line_and_exit_2(tmp_path):
  (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\n{"text": 1\n')
  result = run_cli(
    'prepare',
    f'--config={TINY}',
    f'--config.data.path={tmp_path / "bad.jsonl"}',
    f'--output={tmp_path / "out"}',
    '--workers=1',
  )
  assert result.returncode == 2
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith('pretrax ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert 'bad.jsonl:2' in lines[0] and 'skip_bad_records' in lines[0]


def test_an_explicit_path_that_matches_nothing_is_an_error_not_the_fallback(tmp_path):
  result = run_cli(
    'train',
    f'--config={TINY}',
    f'--workdir={tmp_path / "run"}',
    f'--config.data.path={tmp_path / "missing.txt"}',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'missing.txt' in result.stderr and 'Traceback' not in result.stderr


def test_mixture_shares_are_within_1_percent_of_their_weights_over_10000_batches(
  tmp_path, documents
):
  sources_ = []
  for name, docs in (
    ('web', documents[:200]),
    ('code', documents[200:300]),
    ('books', documents[300:]),
  ):
    (tmp_path / f'{name}.jsonl').write_text(_jsonl(docs))
    c = _config(str(tmp_path / f'{name}.jsonl'))
    c.tokenizer.model_type = 'char'
    s = _prepare(c, tmp_path / name)
    sources_.append(s)
  weights = {'web': 0.7, 'code': 0.2, 'books': 0.1}
  run = [
    pipeline.Source(n, weights[n], pipeline.Windows(s.split('train'), 64, 64), s.split('eval'))
    for n, s in zip(weights, sources_, strict=True)
  ]
  order = pipeline.window_order(run, seed=0)
  batch = 12
  picks = np.array([order[j][0] for j in range(10_000 * batch)])
  shares = np.bincount(picks, minlength=3) / len(picks)
  for k, w in enumerate(weights.values()):
    assert abs(shares[k] - w) < 0.01, (shares, weights)
  # Within an epoch of a source, no window comes twice.
  web = [w for s, w, e in (order[j] for j in range(3000)) if s == 0 and e == 0]
  assert len(web) > 100 and len(set(web)) == len(web)


@pytest.mark.slow
def test_a_run_on_a_mixture_reports_eval_loss_per_source_and_reuses_its_stores(tmp_path, documents):
  for name, docs in (('prose', documents[:300]), ('verse', documents[300:])):
    (tmp_path / f'{name}.jsonl').write_text(_jsonl(docs))
  workdir = tmp_path / 'run'
  args = [
    'train',
    f'--config={TINY}',
    f'--workdir={workdir}',
    '--config.steps=4',
    f'--config.data.mixture=prose={tmp_path / "prose.jsonl"}:0.75,'
    f'verse={tmp_path / "verse.jsonl"}:0.25',
    '--config.eval_every=4',
    '--config.peak_flops=1e11',
  ]
  first = run_cli(*args)
  assert first.returncode == 0, first.stderr[-2000:]
  evals = [r for r in metrics.read_metrics(str(workdir)) if 'eval_loss' in r]
  assert {'eval_loss_prose', 'eval_loss_verse'} <= set(evals[-1])
  assert 'prepared' in first.stdout
  again = run_cli(*args[:-1], '--config.steps=6', '--config.peak_flops=1e11')
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'prepare:' not in again.stdout  # The stores are reused, not prepared again.


def test_the_tokenizer_trains_on_a_bounded_sample_from_across_the_files(tmp_path, documents):
  (tmp_path / 'in').mkdir()
  for k in range(10):
    (tmp_path / 'in' / f'{k}.jsonl').write_text(_jsonl([f'file{k} ' + d for d in documents]))
  c = _config(str(tmp_path / 'in'))
  run = _resolved(c)
  plan = corpus.make_plan(run, corpus.input_files(run))
  sample = list(prepare.tokenizer_sample(plan.files, plan.reading, plan.skip_bad_records, 50_000))
  assert 45_000 <= sum(len(t) for t in sample) <= 50_000
  assert {t.split(' ')[0] for t in sample if t.startswith('file')} == {
    f'file{k}' for k in range(10)
  }
  whole = {f'file{k} ' + d for k in range(10) for d in documents}
  assert not any(units_lib.held_out(t.encode(), 0.1) for t in sample if t in whole)


def test_a_single_text_document_is_split_by_position_like_nanogpt(tmp_path):
  text = ''.join(chr(97 + i % 26) for i in range(10_000))
  (tmp_path / 'one.txt').write_text(text)
  c = _config(str(tmp_path / 'one.txt'))
  c.tokenizer.model_type = 'char'
  s = _prepare(c, tmp_path / 'store')
  tok = tokenizer.Tokenizer.load(s.tokenizer_path)
  train, held = s.split('train'), s.split('eval')
  assert tok.decode(train.read(0, train.num_tokens)[:-1]) == text[:9000]
  assert tok.decode(held.read(0, held.num_tokens)[:-1]) == text[9000:]


def test_a_store_of_other_inputs_is_refused_not_mixed(tmp_path, documents):
  (tmp_path / 'a.jsonl').write_text(_jsonl(documents[:50]))
  c = _config(str(tmp_path / 'a.jsonl'))
  c.tokenizer.model_type = 'char'
  _prepare(c, tmp_path / 'store')
  c.data.eval_fraction = 0.2
  with pytest.raises(sources.DataError, match='other inputs or settings .*reading'):
    _prepare(c, tmp_path / 'store')


def test_training_on_a_missing_prepared_directory_names_the_command(tmp_path):
  result = run_cli(
    'train',
    f'--config={TINY}',
    f'--workdir={tmp_path / "run"}',
    f'--config.data.prepared={tmp_path / "nope"}',
  )
  assert result.returncode == 2
  assert 'pretrax prepare' in result.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in result.stderr


def test_reads_and_windows_across_part_boundaries_equal_the_one_part_stores(
  tmp_path, documents, monkeypatch
):
  (tmp_path / 'in.jsonl').write_text(_jsonl(documents))
  c = _config(str(tmp_path / 'in.jsonl'), shard_mb=1000.0)
  c.tokenizer.model_type = 'char'
  one = _prepare(c, tmp_path / 'one')
  monkeypatch.setattr(units_lib, 'UNIT_BYTES', 1 << 12)  # Units of 4 KB, a part each.
  c.data.shard_mb, c.tokenizer.path = 0.004, one.tokenizer_path
  many = _prepare(c, tmp_path / 'many')
  a, b = one.split('train'), many.split('train')
  assert len(a.tokens) == 1 and len(b.tokens) >= 10 and a.num_tokens == b.num_tokens
  rng = np.random.default_rng(0)
  edges = [int(s) for s in b.starts[1:-1]]
  spans = [(e + d, n) for e in edges for d in (-1, 0, 1) for n in (1, 2, 17)]  # At each edge,
  spans += [(0, 1), (0, a.num_tokens), (a.num_tokens - 1, 1)]  # the first and the last.
  spans += [
    (int(s), int(n))
    for s, n in zip(
      rng.integers(0, a.num_tokens - 20_000, 200), rng.integers(1, 20_000, 200), strict=True
    )
  ]  # Over several.
  for start, length in spans:
    np.testing.assert_array_equal(
      b.read(start, length), a.read(start, length), err_msg=f'{start}+{length}'
    )
  tok = tokenizer.Tokenizer.load(one.tokenizer_path)
  objectives = _objectives_of(tok)
  batches = [
    pipeline.train_batches(
      [pipeline.Source('data', 1.0, pipeline.Windows(s.split('train'), 64, 48), s.split('eval'))],
      objectives,
      global_batch=8,
      seed=0,
      start_step=0,
      process_index=0,
      process_count=1,
    )
    for s in (one, many)
  ]
  for _ in range(20):
    x, y = next(batches[0]), next(batches[1])
    for field, u, v in zip(x._fields, x, y, strict=True):
      np.testing.assert_array_equal(u, v, err_msg=field)


def _objectives_of(tok):
  from pretrax.data import objectives

  c = config.base_config()
  c.data.seq_len = 64
  return objectives.Objectives.from_config(_resolved(c), tok)
