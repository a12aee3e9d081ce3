"""The workdir layout in one place, and the one tokenizer search that export and sample share."""

import pytest

from pretrax import workdir as workdir_lib


def test_a_runs_tokenizer_is_its_workdirs_then_its_stores_then_its_configs(tmp_path):
  run, store, configured = tmp_path / 'run', tmp_path / 'store', tmp_path / 'given.model'
  for d in (run, store):
    d.mkdir()
  with pytest.raises(FileNotFoundError) as error:
    workdir_lib.find_tokenizer(str(run), str(store), str(configured))
  for place in (run / 'tokenizer.model', store / 'tokenizer.model', configured):
    assert str(place) in str(error.value)  # Every place looked at is named.
  configured.write_bytes(b'c')
  assert workdir_lib.find_tokenizer(str(run), str(store), str(configured)) == str(configured)
  (store / 'tokenizer.model').write_bytes(b's')
  assert workdir_lib.find_tokenizer(str(run), str(store), str(configured)) == str(
    store / 'tokenizer.model'
  )
  (run / 'tokenizer.model').write_bytes(b'r')
  assert workdir_lib.find_tokenizer(str(run), str(store), str(configured)) == str(
    run / 'tokenizer.model'
  )


def test_the_layout_names_each_place_under_the_workdir(tmp_path):
  w = str(tmp_path)
  assert workdir_lib.checkpoints(w) == f'{w}/checkpoints'
  assert workdir_lib.damaged_checkpoint(w, 7) == f'{w}/damaged_checkpoints/7'
  assert workdir_lib.metrics_file(w) == f'{w}/metrics.jsonl'
  assert workdir_lib.eval_dir(w, 500) == f'{w}/eval/step_500'
  assert workdir_lib.tokenizer_file(w) == f'{w}/tokenizer.model'
