"""`pretrax prepare`: packing whole windows into rows, reading them back, and global batches that
depend only on (seed, step), whatever the number of processes."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, load_config, run_cli
from pretrax import tokenizer
from pretrax.data import objectives as objectives_lib
from pretrax.data import pipeline, prepare


def _windows(lengths: list[int], seq_len: int) -> pipeline.TokenWindows:
  """Documents of these token counts (ids 10, 11, ...), cut into windows as training cuts them."""
  rng = np.random.default_rng(0)
  encoded = [list(rng.integers(10, 60, n)) for n in lengths]
  return pipeline.windows_of(encoded, seq_len)


def test_rows_hold_every_window_once_and_give_them_back():
  seq_len = 16
  windows = _windows([3, 40, 7, 1, 16, 15, 9, 2, 30, 5], seq_len)
  rows = prepare.pack_rows(windows, seq_len)
  assert sorted(i for row in rows for i in row) == list(range(len(windows)))
  got = []
  for row in rows:
    array = prepare.row_array(windows, row, seq_len)
    assert array.shape == (4, seq_len) and array.dtype == np.int32
    # Causal targets are the next tokens within each segment.
    back = prepare.row_windows(array)
    assert [len(w) for _, w in back] == [len(windows[i]) for i in row]
    got += [tuple(w) for _, w in back]
  assert sorted(got) == sorted(tuple(windows[i]) for i in range(len(windows)))
  # Best fit: short windows share rows, so there are fewer rows than windows.
  assert len(rows) < len(windows)


def test_masked_examples_fit_where_their_windows_were():
  seq_len = 16
  windows = _windows([3, 40, 7, 16, 15, 9, 2, 30, 5], seq_len)
  rows = prepare.pack_rows(windows, seq_len)
  c = load_config('tiny')
  c.objective = 'masked_lm'
  c.data.seq_len = seq_len
  tok = tokenizer.Tokenizer(tokenizer.train(['abcdefghij klmnop ' * 50], model_type='char',
                                            vocab_size=512))
  objectives = objectives_lib.Objectives.from_config(c, tok)
  for row_id, row in enumerate(rows):
    array = prepare.row_array(windows, row, seq_len)
    example = prepare.row_example(array, objectives, seed=0, stream=0, epoch=0, row_id=row_id)
    segments = [s for s in np.unique(example['segment_ids']) if s]
    assert len(segments) == len(row)
    # Masked LM keeps every token of a window: the targets are the windows themselves.
    for (offset, window), s in zip(prepare.row_windows(array), segments):
      where = example['segment_ids'] == s
      np.testing.assert_array_equal(example['targets'][where], window[:seq_len])
      assert np.flatnonzero(where)[0] == offset


def test_global_batches_depend_on_seed_and_step_only(tmp_path, corpus_path):
  out = tmp_path / 'prepared'
  result = run_cli('prepare', f'--config={os.path.join(REPO, "configs", "tiny.py")}',
                   f'--config.data.path={corpus_path}', '--config.data.fallback=',
                   f'--output={out}', '--workers=2')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'tokenized' in result.stdout and 'M chars/s' in result.stdout  # Progress lines.
  meta = json.loads((out / 'meta.json').read_text())
  data = prepare.PreparedData(str(out))
  rows = data.rows('train')
  assert len(rows) == meta['splits']['train']['rows'] > 0
  c = load_config('tiny')
  c.objective = 'causal_lm:1,prefix_lm:1'
  objectives = objectives_lib.Objectives.from_config(c, tokenizer.Tokenizer.load(data.tokenizer_path))

  def batches(start: int, process_index: int, process_count: int, count: int = 3):
    it = iter(prepare.prepared_train_dataset(rows, objectives, global_batch=8, seed=3,
                                              start_step=start, process_index=process_index,
                                              process_count=process_count))
    return [next(it) for _ in range(count)]

  whole = batches(0, 0, 1)
  halves = zip(batches(0, 0, 2), batches(0, 1, 2))
  for one, (a, b) in zip(whole, halves):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(one[k], np.concatenate([a[k], b[k]]))
  later = batches(1, 0, 4, count=2)  # Starting at step 1 on a quarter of the processes.
  for k in pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(later[0][k], whole[1][k][:2])
    np.testing.assert_array_equal(later[1][k], whole[2][k][:2])
  assert not np.array_equal(whole[0]['inputs'], whole[1]['inputs'])


def test_training_on_a_missing_prepared_directory_names_the_command(tmp_path):
  result = run_cli('train', f'--config={os.path.join(REPO, "configs", "tiny.py")}',
                   f'--workdir={tmp_path / "run"}', f'--config.data.prepared={tmp_path / "nope"}')
  assert result.returncode == 2
  assert 'pretrax prepare' in result.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('n', [1, 2])
def test_short_windows_pack_into_few_rows(n):
  seq_len = 8
  windows = _windows([3] * 12 * n, seq_len)  # Windows of 4 tokens (3 + EOS): two per row.
  assert len(prepare.pack_rows(windows, seq_len)) == 6 * n
