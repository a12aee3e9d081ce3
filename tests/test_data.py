"""Batches from a token store: documents kept apart, every target once, determinism by (seed, step),
the same global batch on any number of processes, windows at every offset."""

import jax
import numpy as np
import pytest

from conftest import make_store
from pretrax import config, run_config, tokenizer
from pretrax.data import objectives, pipeline, store
from pretrax.data import units as units_lib
from pretrax.data.batch import Batch

L = 16


@pytest.fixture(scope='module')
def documents(corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read(60_000)
  # Documents of very different lengths, shorter and longer than a row. strict=False: the 100
  # lengths are more than enough for the 61 offsets, which decide how many documents there are.
  return [
    text[i : i + n] for i, n in zip(range(0, 60_000, 997), [3, 40, 997, 7, 2000] * 20, strict=False)
  ]


@pytest.fixture(scope='module')
def data(tmp_path_factory, documents):
  s = make_store(tmp_path_factory.mktemp('data'), documents)
  return s, tokenizer.Tokenizer.load(s.tokenizer_path)


def _objectives(tok, objective='causal_lm'):
  c = config.base_config()
  c.data.seq_len, c.objective = L, objective
  return objectives.Objectives.from_config(run_config.build(c, check_data=False), tok)


def _source(s: store.Store, stride: int = L) -> pipeline.Source:
  return pipeline.Source(
    'data', 1.0, pipeline.Windows(s.split('train'), L, stride), s.split('eval')
  )


def _take(
  s,
  tok,
  *,
  start=0,
  count=3,
  process_index=0,
  process_count=1,
  seed=0,
  stride=L,
  objective='causal_lm',
):
  it = pipeline.train_batches(
    [_source(s, stride)],
    _objectives(tok, objective),
    global_batch=8,
    seed=seed,
    start_step=start,
    process_index=process_index,
    process_count=process_count,
  )
  return [next(it) for _ in range(count)]


def _assert_same(got: Batch, want: Batch) -> None:
  for field, x, y in zip(Batch._fields, got, want, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=field)


def test_the_store_holds_every_document_then_eos_in_its_split(data, documents):
  s, tok = data
  expected = {'train': [], 'eval': []}
  for d in documents:
    split = 'eval' if units_lib.held_out(d.encode(), 0.1) else 'train'
    expected[split] += tok.encode(d) + [tokenizer.EOS_ID]
  assert expected['train'] and expected['eval']
  for split in ('train', 'eval'):
    got = s.split(split).read(0, s.split(split).num_tokens)
    np.testing.assert_array_equal(got, expected[split])


@pytest.mark.parametrize('objective', ['causal_lm', 'causal_lm:1,prefix_lm:1', 'masked_lm'])
def test_batches_keep_documents_apart(data, objective):
  s, tok = data
  for b in _take(s, tok, count=10, objective=objective):
    fields = {k: v for k, v in b._asdict().items() if v is not None}
    assert set(fields) == set(Batch._fields) - {'labels', 'label_weights'}  # A language model's.
    assert all(v.shape == (8, L) for v in fields.values())
    assert np.all(b.weights[b.segment_ids == 0] == 0)
    for row in range(8):
      seg, pos = b.segment_ids[row], b.positions[row]
      for sid in set(seg.tolist()) - {0}:
        # Each document is contiguous and its positions count from 0.
        idx = np.flatnonzero(seg == sid)
        assert np.all(np.diff(idx) == 1)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      for t in range(L - 1):
        if objective == 'causal_lm' and seg[t] and seg[t] == seg[t + 1]:
          assert b.targets[row, t] == b.inputs[row, t + 1]
        # Nothing is learnt across a document boundary.
        if b.inputs[row, t] == tokenizer.EOS_ID and objective == 'causal_lm':
          assert b.weights[row, t] == 0 and seg[t + 1] == seg[t] + 1


def test_a_causal_window_across_documents_gets_segments_positions_and_weights():
  window = np.array([[7, 8, tokenizer.EOS_ID, 9, 10, tokenizer.EOS_ID, 11, 12, 13]], np.int32)
  rows = pipeline.causal_rows(window, np.array([9]))
  np.testing.assert_array_equal(rows.segment_ids[0], [1, 1, 1, 2, 2, 2, 3, 3])
  np.testing.assert_array_equal(rows.positions[0], [0, 1, 2, 0, 1, 2, 0, 1])
  np.testing.assert_array_equal(rows.weights[0], [1, 1, 0, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(rows.targets[0], window[0, 1:])
  short = pipeline.causal_rows(window, np.array([4]))  # Three targets, the rest padding.
  np.testing.assert_array_equal(short.segment_ids[0], [1, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(short.weights[0], [1, 1, 0, 0, 0, 0, 0, 0])


def test_batches_are_a_function_of_seed_and_step_on_any_number_of_processes(data):
  s, tok = data
  for objective in ('causal_lm', 'causal_lm:2,prefix_lm:1', 'masked_lm'):
    whole = _take(s, tok, objective=objective)
    halves = zip(
      _take(s, tok, process_index=0, process_count=2, objective=objective),
      _take(s, tok, process_index=1, process_count=2, objective=objective),
      strict=True,
    )
    for one, (a, b) in zip(whole, halves, strict=True):
      _assert_same(one, jax.tree.map(lambda x, y: np.concatenate([x, y]), a, b))
    # Starting at step 1 on a quarter of the processes: what the whole batch held there.
    later = _take(s, tok, start=1, count=2, process_index=1, process_count=4, objective=objective)
    _assert_same(later[0], jax.tree.map(lambda x: x[2:4], whole[1]))
    _assert_same(later[1], jax.tree.map(lambda x: x[2:4], whole[2]))
  assert not np.array_equal(whole[0].inputs, whole[1].inputs)
  other_seed = _take(s, tok, seed=1)
  assert any((x.inputs != y.inputs).any() for x, y in zip(whole, other_seed, strict=True))


def test_an_epoch_sees_every_window_once_then_reshuffles(data):
  s, tok = data
  source = _source(s)
  order = pipeline.window_order([source], seed=0)
  n = len(source.train)
  first, second = [order[j][1] for j in range(n)], [order[j][1] for j in range(n, 2 * n)]
  assert sorted(first) == sorted(second) == list(range(n))
  assert first != second
  assert {order[j][2] for j in range(n)} == {0} and order[n][2] == 1


def test_processes_evaluate_disjoint_windows_that_cover_every_target_once(data):
  s, tok = data
  split, causal = s.split('eval'), _objectives(tok)
  ids = split.read(0, split.num_tokens)
  targets = int(np.sum(ids[:-1] != tokenizer.EOS_ID))  # Every pair but the cross-document ones.

  def read(p, n):
    return list(
      pipeline.eval_batches(
        split, causal, seq_len=L, global_batch=8, seed=0, process_index=p, process_count=n
      )
    )

  whole, halves = read(0, 1), zip(read(0, 2), read(1, 2), strict=True)
  for one, (a, b) in zip(whole, halves, strict=True):
    assert a.inputs.shape == (4, L)
    # Each process holds its own rows of the one global batch.
    _assert_same(one, jax.tree.map(lambda x, y: np.concatenate([x, y]), a, b))
  assert sum(int(b.weights.sum()) for b in whole) == targets


def test_a_smaller_stride_gives_windows_at_every_offset(data):
  s, _ = data
  full, every = _source(s).train, _source(s, stride=1).train
  n = s.split('train').num_tokens
  assert len(full) == (n - L - 1) // L + 1
  assert len(every) == n - L
  np.testing.assert_array_equal(every.read(3), s.split('train').read(3, L + 1))
  np.testing.assert_array_equal(full.read(3), every.read(3 * L))
