"""The data pipeline: splits, windows, packing, determinism, exact resume, sharding by process."""

import numpy as np
import pytest

from pretrax import config, tokenizer
from pretrax.data import objectives, pipeline, sources

L = 16


@pytest.fixture(scope='module')
def tok(corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    return tokenizer.Tokenizer(tokenizer.train([f.read(50_000)], model_type='char'))


@pytest.fixture(scope='module')
def causal(tok):
  c = config.base_config()
  c.data.seq_len = L
  return objectives.Objectives.from_config(c, tok)


@pytest.fixture(scope='module')
def documents(corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read(60_000)
  # Documents of very different lengths, shorter and longer than a row.
  return [text[i:i + n] for i, n in zip(range(0, 60_000, 997), [3, 40, 997, 7, 2000] * 20)]


def test_split_by_position_holds_out_the_end():
  train, held_out = sources.split_by_position(['aaaa', 'bbbbbb'], 0.3)
  assert ''.join(train) == 'aaaabbb' and ''.join(held_out) == 'bbb'
  train, held_out = sources.split_by_position(['x' * 90 + 'y' * 10], 0.1)
  assert train == ['x' * 90] and held_out == ['y' * 10]


def test_windows_cover_every_next_token_pair_once(tok, documents):
  windows = pipeline.tokenize_windows(documents, tok, L)
  assert len(windows) and max(windows.ends - windows.starts) <= L + 1
  pairs = []
  for i in range(len(windows)):
    w = windows[i]
    assert 2 <= len(w) <= L + 1
    pairs.extend(zip(w[:-1].tolist(), w[1:].tolist()))
  expected = []
  for doc in documents:
    ids = tok.encode(doc) + [tokenizer.EOS_ID]
    expected.extend(zip(ids[:-1], ids[1:]))
  assert pairs == expected
  assert windows.num_targets == len(expected)


def test_packed_batches_keep_documents_apart(tok, documents, causal):
  windows = pipeline.tokenize_windows(documents, tok, L)
  it = iter(pipeline.train_dataset(windows, causal, seq_len=L, batch_size=4, seed=0))
  for _ in range(20):
    b = next(it)
    assert set(b) == set(pipeline.BATCH_KEYS)
    assert all(v.shape == (4, L) for v in b.values())
    np.testing.assert_array_equal(b['weights'], b['segment_ids'] > 0)
    for row in range(4):
      seg, pos = b['segment_ids'][row], b['positions'][row]
      for s in set(seg.tolist()) - {0}:
        # Each document is contiguous and its positions count from 0.
        idx = np.flatnonzero(seg == s)
        assert np.all(np.diff(idx) == 1)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      # Targets are the inputs shifted by one inside each document.
      for t in range(L - 1):
        if seg[t] and seg[t] == seg[t + 1]:
          assert b['targets'][row, t] == b['inputs'][row, t + 1]


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_same_seed_same_batches_and_resume_is_exact(tok, documents, causal):
  windows = pipeline.tokenize_windows(documents, tok, L)
  make = lambda seed: iter(pipeline.train_dataset(windows, causal, seq_len=L, batch_size=4, seed=seed))
  a, b, c = make(0), make(0), make(1)
  first_a, first_b, first_c = _take(a, 5), _take(b, 5), _take(c, 5)
  for x, y in zip(first_a, first_b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  assert any((x['inputs'] != z['inputs']).any() for x, z in zip(first_a, first_c))
  # Save the position, read on, restore into a fresh iterator: the same batches follow.
  state = a.get_state()
  ahead = _take(a, 30)  # Crosses epochs: the windows are re-shuffled each epoch.
  fresh = make(0)
  fresh.set_state(state)
  for x, y in zip(ahead, _take(fresh, 30)):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_processes_read_disjoint_windows(tok, documents, causal):
  windows = pipeline.tokenize_windows(documents, tok, L)
  seen = []
  for p in range(2):
    ds = pipeline.eval_dataset(windows, causal, seq_len=L, batch_size=4, seed=0,
                              process_index=p, process_count=2)
    seen.append(sum(int(b['weights'].sum()) for b in ds))
  assert seen[0] > 0 and seen[1] > 0
  assert seen[0] + seen[1] == windows.num_targets


def test_eval_pass_covers_every_target_once(tok, documents, causal):
  windows = pipeline.tokenize_windows(documents, tok, L)
  batches = list(pipeline.eval_dataset(windows, causal, seq_len=L, batch_size=4, seed=0))
  assert sum(int(b['weights'].sum()) for b in batches) == windows.num_targets
  assert all(b['inputs'].shape == (4, L) for b in batches)


def test_paths_globs_and_bad_files(tmp_path):
  (tmp_path / 'a.txt').write_text('alpha')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'b.txt').write_text('beta||gamma')
  (tmp_path / 'bin.dat').write_bytes(b'\xff\xfe\x00\x81')
  assert sources.expand_paths(str(tmp_path / '*.txt')) == [str(tmp_path / 'a.txt')]
  both = sources.expand_paths(f'{tmp_path}/a.txt, {tmp_path}/sub')
  assert sources.read_documents(both, separator='||') == ['alpha', 'beta', 'gamma']
  with pytest.raises(sources.DataError, match='bin.dat is not UTF-8'):
    sources.read_documents([str(tmp_path / 'bin.dat')])


def test_a_smaller_stride_gives_windows_at_every_offset(tok, documents):
  full = pipeline.tokenize_windows(documents[:3], tok, L)
  every = pipeline.tokenize_windows(documents[:3], tok, L, stride=1)
  assert len(every) == full.num_targets  # One window per target position.
  starts = set(every.starts.tolist())
  assert set(full.starts.tolist()) <= starts
  assert max(every.ends - every.starts) == L + 1
