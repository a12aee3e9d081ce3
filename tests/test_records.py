"""A record is a record whatever its length: JSON lines, text documents and Parquet cells of many MB
come back whole from the store, and a failed preparation leaves nothing a resume could trust."""

import gzip
import json
import os

import numpy as np
import pytest

from pretrax import config, run_config, tokenizer
from pretrax.data import documents as documents_lib
from pretrax.data import prepare, sources, store
from pretrax.data import units as units_lib

MB = 1 << 20


def _long_text(n: int, seed: int) -> str:
  """`n` characters with what breaks naive cutting: newlines (escaped in JSON), U+2028 (a line
  separator to str.splitlines), multi-byte characters, and no structure to align with 1 MB."""
  alphabet = np.array(list('abcdefgh ij\n\u2028\u00e9\u4e2d.'))
  return ''.join(np.random.default_rng(seed).choice(alphabet, n))


def _config(path: str, **data) -> config.ml_collections.ConfigDict:
  c = config.base_config()
  c.data.path = path
  c.tokenizer.model_type, c.tokenizer.vocab_size, c.tokenizer.sample_mb = 'char', 300, 1
  for k, v in data.items():
    c.data[k] = v
  return c


def _prepare(c, out, workers: int = 0) -> store.Store:
  # Resolved, not validated: the store's own tests, below the command line (eval_fraction=0).
  prepare.prepare(run_config.resolve(c.to_dict()), str(out), workers=workers, log=lambda _: None)
  return store.Store(str(out))


def _documents(s: store.Store) -> dict[str, list[str]]:
  """Each split's documents, decoded from the store's tokens (cut at EOS)."""
  tok = tokenizer.Tokenizer.load(s.tokenizer_path)
  out = {}
  for name in store.SPLITS:
    split = s.split(name)
    ids = split.read(0, split.num_tokens)
    ends = np.flatnonzero(ids == tokenizer.EOS_ID)
    out[name] = [tok.decode(d) for d in np.split(ids, ends + 1)[:-1]]
  return out


def _by_split(documents: list[str], eval_fraction: float = 0.1) -> dict[str, list[str]]:
  out = {'train': [], 'eval': []}
  for d in documents:
    out['eval' if units_lib.held_out(d.encode(), eval_fraction) else 'train'].append(d)
  return out


def test_json_lines_of_8_mb_among_short_ones_come_back_whole_compressed_or_not(tmp_path):
  import zstandard

  def lines(long_mb: int, seed: int) -> tuple[list[str], bytes]:
    documents = [
      f'short {seed} \u2028 with a line separator',
      'short',
      _long_text(long_mb * MB, seed),
      'short too',
    ]
    data = ''.join(json.dumps({'text': d}, ensure_ascii=False) + '\n' for d in documents)
    return documents, data.encode()

  (tmp_path / 'in').mkdir()
  plain, plain_bytes = lines(8, seed=0)  # 8 M characters: ~10 MB of UTF-8 in one line.
  zst, zst_bytes = lines(8, seed=1)
  gz, gz_bytes = lines(2, seed=2)
  assert len(plain_bytes) > 8 * MB and len(zst_bytes) > 8 * MB
  (tmp_path / 'in' / 'a.jsonl').write_bytes(plain_bytes)
  (tmp_path / 'in' / 'b.jsonl.gz').write_bytes(gzip.compress(gz_bytes, mtime=0))
  (tmp_path / 'in' / 'c.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(zst_bytes))
  s = _prepare(_config(str(tmp_path / 'in')), tmp_path / 'store')
  assert s.manifest['bad_records'] == 0
  assert _documents(s) == _by_split(plain + gz + zst)


def test_a_long_record_is_not_lost_when_bad_records_are_skipped(tmp_path):
  long = _long_text(3 * MB, seed=1)
  (tmp_path / 'long.jsonl').write_text(
    json.dumps({'text': 'first'})
    + '\n'
    + json.dumps({'text': long})
    + '\n'
    + json.dumps({'text': 'last'})
    + '\n'
  )
  s = _prepare(_config(str(tmp_path / 'long.jsonl'), skip_bad_records=True), tmp_path / 'store')
  assert s.manifest['bad_records'] == 0
  assert _documents(s) == _by_split(['first', long, 'last'])


def test_a_text_document_without_a_newline_streams_in_pieces_of_one_document(tmp_path):
  text = _long_text(5 * MB, seed=2).replace('\n', ' ')  # No newline to cut at.
  (tmp_path / 'one.txt').write_text(text, encoding='utf-8')
  units = list(units_lib.file_units(str(tmp_path / 'one.txt'), units_lib.Reading()))
  assert len(units) >= 3 and max(u.size for u in units) <= 2 * units_lib.UNIT_BYTES + MB
  s = _prepare(_config(str(tmp_path / 'one.txt'), eval_fraction=0.0), tmp_path / 'store')
  assert _documents(s) == {'train': [text], 'eval': []}


def test_a_separator_that_straddles_a_block_boundary_still_separates(tmp_path):
  # The first document ends 3 bytes before the first MB: the separator's 7 bytes cross it.
  first = 'x' * (MB - 3)
  (tmp_path / 'docs.txt').write_text(first + '<|doc|>second<|doc|>third')
  reading = units_lib.Reading(separator='<|doc|>', eval_fraction=0.0)
  docs = [
    documents_lib.decode_unit(u, reading, skip_bad=False)
    for u in units_lib.file_units(str(tmp_path / 'docs.txt'), reading)
  ]
  texts, ends = sum((d.texts for d in docs), []), sum((d.ends for d in docs), [])
  whole, current = [], ''
  for text, ends_doc in zip(texts, ends, strict=True):
    current += text
    if ends_doc:
      whole, current = whole + [current], ''
  assert whole == [first, 'second', 'third']


def test_a_parquet_cell_of_many_mb_is_one_document_read_a_few_rows_at_a_time(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  long = _long_text(6 * MB, seed=3)
  documents = [f'row {i}' for i in range(3)] + [long] + [f'row {i}' for i in range(3, 40)]
  path = str(tmp_path / 'cells.parquet')
  pq.write_table(pa.table({'text': documents}), path)
  # Read whole, 1024 rows of such cells would be GBs: the batch follows the average row.
  assert units_lib._parquet_batch_rows(pq.ParquetFile(path)) < 1024
  s = _prepare(_config(path), tmp_path / 'store')
  assert _documents(s) == _by_split(documents)


def test_a_preparation_that_fails_mid_group_closes_its_files_and_marks_nothing(tmp_path):
  # One group of several parts; a malformed record in its fourth unit (units are ~1 MB).
  lines = [json.dumps({'text': _long_text(MB // 3, seed=k)}) for k in range(12)]
  lines[10] = '{"text": "cut'
  (tmp_path / 'bad.jsonl').write_text('\n'.join(lines) + '\n')
  c = _config(str(tmp_path / 'bad.jsonl'), shard_mb=1.5)
  out = tmp_path / 'store'
  opened_before = set(os.listdir('/proc/self/fd'))
  with pytest.raises(sources.DataError, match='bad.jsonl:11: malformed JSON'):
    _prepare(c, out)
  leaked = [
    os.readlink(f'/proc/self/fd/{fd}')
    for fd in set(os.listdir('/proc/self/fd')) - opened_before
    if os.path.exists(f'/proc/self/fd/{fd}')
  ]
  assert not [f for f in leaked if str(out) in f], leaked
  names = os.listdir(out)
  assert not [n for n in names if '.tmp' in n], names
  # Parts finished before the bad record stay marked done (a resume keeps them); the one in
  # progress left no file, and the group is not marked done.
  done = sorted(n[: -len('.json')] for n in os.listdir(out / 'parts'))
  assert done and '00000' not in done
  assert sorted(n for n in names if n.endswith(('.tokens', '.docs'))) == sorted(
    f'{split}-{part}.{kind}'
    for part in done
    for split in store.SPLITS
    for kind in ('tokens', 'docs')
  )


def test_a_corpus_of_long_records_makes_the_same_store_with_or_without_workers(tmp_path):
  (tmp_path / 'in').mkdir()
  records = [_long_text(n, seed=n) for n in (100, 3 * MB, 200, 2 * MB, 50)]
  (tmp_path / 'in' / 'a.jsonl').write_text(''.join(json.dumps({'text': r}) + '\n' for r in records))
  (tmp_path / 'in' / 'b.txt').write_text(_long_text(3 * MB, seed=9).replace('\n', ' '))
  c = _config(str(tmp_path / 'in'), shard_mb=1.5)  # Several parts, each a record or more.
  stores = [_prepare(c, tmp_path / f'workers{w}', workers=w) for w in (0, 2)]
  files = [
    {
      n: open(os.path.join(s.path, n), 'rb').read()
      for n in sorted(os.listdir(s.path))
      if n.endswith(('.tokens', '.docs'))
    }
    for s in stores
  ]
  assert len(files[0]) >= 3 * 4 and files[0] == files[1]
