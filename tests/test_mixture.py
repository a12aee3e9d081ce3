"""`data.mixture`: training batches draw each source in proportion to its weight, and the spec
parses paths with colons and names what is wrong with a bad item."""

import json

import numpy as np
import pytest

from conftest import load_config
from pretrax import config, config_specs, run_config
from pretrax.data import dataset

# Disjoint alphabets under a char tokenizer: every token of a row says which source it came from.
# The largest corpus has the smallest weight, so shares that follow sizes, or equal shares, fail.
SOURCES = {
  'web': ('abcdefghij', 6.0, 40),
  'code': ('ABCDEFGHIJ', 3.0, 80),
  'books': ('0123456789', 1.0, 160),
}
BATCHES = 2000


def _write_corpus(path, alphabet: str, documents: int, rng: np.random.Generator) -> None:
  letters = np.array(list(alphabet))
  lines = (json.dumps({'text': ''.join(rng.choice(letters, 120))}) for _ in range(documents))
  path.write_text('\n'.join(lines) + '\n')


def test_training_batches_draw_each_source_by_its_weight(tmp_path):
  rng = np.random.default_rng(0)
  items = []
  for name, (alphabet, weight, documents) in SOURCES.items():
    _write_corpus(tmp_path / f'{name}.jsonl', alphabet, documents, rng)
    items.append(f'{name}={tmp_path / name}.jsonl:{weight:g}')
  c = load_config('tiny')
  c.data.path, c.data.fallback = '', ''
  c.data.mixture = ','.join(items)
  c.data.seq_len, c.data.batch_size = 16, 8
  c.tokenizer.sample_mb = 1.0
  run = run_config.build(c)
  # What train.load_data does, without a device: the stores, the tokenizer, the batches.
  data = dataset.load(
    run,
    str(tmp_path / 'run'),
    process_index=0,
    process_count=1,
    has_checkpoints=False,
    log=lambda _: None,
  )

  owner = np.full(data.tok.vocab_size, -1)  # Token id -> source index; -1: '▁' and specials.
  for i in range(data.tok.vocab_size):
    piece = data.tok.piece(i).lstrip('▁')
    for k, (alphabet, _, _) in enumerate(SOURCES.values()):
      if piece and set(piece) <= set(alphabet):
        owner[i] = k
  counts = np.zeros(len(SOURCES), int)
  batches = data.train_batches(0)
  for _ in range(BATCHES):
    owner_BxL = owner[next(batches).inputs]
    in_row_BxS = (owner_BxL[:, :, None] == np.arange(len(SOURCES))).any(axis=1)
    assert (in_row_BxS.sum(axis=1) == 1).all()  # A row is a window of one source.
    counts += in_row_BxS.sum(axis=0)

  weights = np.array([w for _, w, _ in SOURCES.values()])
  shares = counts / counts.sum()
  assert np.abs(shares - weights / weights.sum()).max() < 0.02, dict(
    zip(SOURCES, shares, strict=True)
  )


def test_a_path_may_hold_colons_the_weight_follows_the_last():
  assert config_specs.mixture('web=gs://bucket/dir/*.parquet:0.7, code=/data/code:0.3') == [
    ('web', 'gs://bucket/dir/*.parquet', 0.7),
    ('code', '/data/code', 0.3),
  ]
  assert config_specs.mixture('') == []  # No mixture: data.path is the one source.


@pytest.mark.parametrize(
  'item',
  [
    'web=/data/web:heavy',  # Not a number.
    'web=/data/web:0',
    'web=/data/web:-0.5',
    'web=/data/web:nan',
    'web=/data/web:inf',  # Would normalise every other weight to 0.
    'web=/data/web',  # No weight: '/data/web' is not one.
    'web=gs://bucket/web',  # Nor is '//bucket/web', after the last colon.
    '/data/web:0.7',  # No NAME=.
    'my-web=/data/web:0.7',  # The name keys eval_loss_NAME and the store's directory.
    'web=:0.7',  # No path.
  ],
)
def test_a_bad_item_is_named_with_the_form_it_should_take(item):
  with pytest.raises(config.ConfigError) as error:
    config_specs.mixture(f'code=/data/code:0.3,{item}')
  message = str(error.value)
  assert repr(item) in message and 'NAME=PATH:WEIGHT' in message, message
  assert 'positive' in message and 'finite' in message


def test_a_source_named_twice_is_an_error():
  with pytest.raises(config.ConfigError, match=r"names a source twice: \['web', 'code', 'web'\]"):
    config_specs.mixture('web=/a:0.5,code=/b:0.2,web=/c:0.3')


@pytest.mark.parametrize('spec', [',', ' ', 'web=/a:0.5,,code=/b:0.5', 'web=/a:1,'])
def test_an_empty_item_is_an_error(spec):
  # Not skipped: ',' alone gave a mixture of no sources, which crashed the run with IndexError.
  with pytest.raises(config.ConfigError, match='empty item'):
    config_specs.mixture(spec)
