"""The classification head: how an example is laid out (one text, pairs, templates), which states
the head reads (mean, first, mask), and its pooler (the masked LM's transform or BERT's tanh)."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from pretrax import config as config_lib
from pretrax import run_config
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.data import examples
from pretrax.data import records as records_lib
from pretrax.model import layers, transformer

MASK, EOS = tokenizer_lib.MASK_ID, tokenizer_lib.EOS_ID


@pytest.fixture(scope='module')
def tok(tmp_path_factory) -> tokenizer_lib.Tokenizer:
  text = 'the cat sat on a mat. is it true? yes no maybe [] 0123456789\n' * 20
  path = tmp_path_factory.mktemp('tok') / 'char.model'
  path.write_bytes(tokenizer_lib.train([text], model_type='char', vocab_size=400))
  return tokenizer_lib.Tokenizer.load(str(path))


def _config(**finetune):
  c = load_config('tiny')
  c.objective = 'classification'
  c.data.fallback = ''
  for k, v in finetune.items():
    c.finetune[k] = v
  return c


# ---- Layout --------------------------------------------------------------------------------------


def test_a_pair_is_both_texts_each_ending_in_eos_and_a_template_places_them_and_the_mask(tok):
  record = {'text': 'the cat sat', 'hyp': 'a cat is on a mat', 'label': 'yes'}
  one = records_lib.Fields('classification')
  assert records_lib.encode_texts(records_lib.texts_of(record, one), one, tok) == (
    tok.encode('the cat sat') + [EOS]
  )
  pair = records_lib.Fields('classification', text_pair='hyp')
  texts = records_lib.texts_of(record, pair)
  assert texts == ['the cat sat', 'a cat is on a mat']
  assert records_lib.encode_texts(texts, pair, tok) == (
    tok.encode('the cat sat') + [EOS] + tok.encode('a cat is on a mat') + [EOS]
  )
  templated = records_lib.Fields(
    'classification', text_pair='hyp', template='{text}? <mask>, {text_pair}.'
  )
  assert records_lib.encode_texts(texts, templated, tok) == (
    tok.encode('the cat sat? ') + [MASK] + tok.encode(', a cat is on a mat.') + [EOS]
  )
  with pytest.raises(records_lib.BadRecord, match="no 'hyp' field .*second text of a pair"):
    records_lib.texts_of({'text': 'the cat', 'label': 'no'}, pair)


def test_the_store_holds_pairs_in_their_layout(tmp_path, tok):
  path = tmp_path / 'pairs.jsonl'
  rows = [
    {'text': 'the cat sat', 'hyp': 'it sat', 'label': 'yes'},
    {'text': 'a mat', 'hyp': 'no cat', 'label': 'no'},
  ] * 10
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  tok.save(str(tmp_path / 'tok.model'))
  c = _config(text_pair_field='hyp', template='{text}. {text_pair}? <mask>')
  c.data.path, c.tokenizer.path = str(path), str(tmp_path / 'tok.model')
  out = str(tmp_path / 'store')
  examples.build(
    run_config.build(c, check_data=False),
    out,
    process_index=0,
    has_checkpoints=False,
    log=lambda _: None,
  )
  with open(os.path.join(out, 'manifest.json')) as f:
    split = examples.ExampleSplit(out, 'train', json.load(f), 'classification')
  laid_out = {tuple(split.ids(i)) for i in range(len(split))}
  assert laid_out <= {
    tuple(tok.encode('the cat sat. it sat? ') + [MASK, EOS]),
    tuple(tok.encode('a mat. no cat? ') + [MASK, EOS]),
  }
  assert len(laid_out) == 2


@pytest.mark.parametrize(
  'finetune, error',
  [
    ({'pooling': 'mask'}, "pooling='mask' reads the example's <mask>: set finetune.template"),
    ({'template': 'about <mask>'}, "has no '{text}'"),
    ({'template': '{text} <mask>', 'text_pair_field': 'hyp'}, 'exactly when the records have'),
    ({'head': 'cls'}, "finetune.head='cls' is not one of mlm, tanh"),
    ({'head_init': 'zeros'}, "finetune.head_init='zeros' is not one of label_words, random"),
  ],
)
def test_head_settings_that_cannot_work_are_refused_with_the_fix(finetune, error):
  with pytest.raises(config_lib.ConfigError, match=error.replace('(', r'\(').replace('?', r'\?')):
    run_config.build(_config(**finetune), check_data=False)


def test_the_classify_variant_is_berts_recipe_and_a_pretraining_rate_gets_a_warning():
  from pretrax import config_check

  c = load_config('shakespeare_mlm', 'classify')
  c.data.path, c.init_from = 'reviews.jsonl', 'runs/mlm'
  run = run_config.build(c, check_data=False)
  assert (run.objective, run.optim.lr, run.optim.schedule) == ('classification', 1e-4, 'linear')
  assert run.optim.warmup_steps == run.steps // 10 and config_check.cautions(run) == []
  c.optim.lr = 1e-3
  (warning,) = config_check.cautions(run_config.build(c, check_data=False))
  assert warning.startswith('optim.lr=0.001 fine-tunes runs/mlm at a pre-training rate')
  assert load_config('bert_base', 'classify').optim.lr == 3e-5


# ---- What the head reads -------------------------------------------------------------------------


def test_readout_weights_average_all_the_first_or_the_masked_state_of_each_segment():
  # Row 0: segment 1 at 0..2 (mask at 1), segment 2 at 3..4 (no mask), padding at 5.
  ids = jnp.asarray([[7, MASK, 8, 9, 10, 0]])
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0]])
  expect = {
    'mean': [[1 / 3, 0], [1 / 3, 0], [1 / 3, 0], [0, 0.5], [0, 0.5], [0, 0]],
    'first': [[1, 0], [0, 0], [0, 0], [0, 1], [0, 0], [0, 0]],
    # Segment 2 has no mask: its first token instead.
    'mask': [[0, 0], [1, 0], [0, 0], [0, 1], [0, 0], [0, 0]],
  }
  for pooling, weights in expect.items():
    got = transformer.readout_weights(pooling, ids, segments, 3, MASK)
    np.testing.assert_allclose(got[0, :, :2], weights, err_msg=pooling)
    np.testing.assert_array_equal(got[0, :, 2], 0.0)  # No third segment in the row.


@pytest.mark.parametrize('pooler', ['mlm', 'tanh'])
def test_classify_is_the_pooler_then_the_classifier_on_the_read_states(pooler):
  c = _config(template='{text} <mask>', pooling='mask', head=pooler)
  c.model.num_layers = 1
  run = state_lib.build(run_config.build(c, check_data=False), 50, num_classes=3)
  model = nnx.merge(run.model_def, run.init_params(0))
  assert (model.pooler is None) == (pooler == 'mlm') and model.classifier is not None
  ids = jnp.asarray([[5, 6, MASK, EOS, 9, MASK, 7, EOS]])
  segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2]])
  positions = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3]])
  states = model.states(ids, segments, positions)
  logits = model.classify(states, ids, segments, 2)
  read = states[0, jnp.asarray([2, 5])]  # The two masks.
  if pooler == 'mlm':
    pooled = model.head_input(read)
  else:
    pooled = jnp.tanh(layers.dense(read, model.pooler[...]) + model.pooler_bias[...])
  want = layers.dense(pooled, model.classifier[...]) + model.classifier_bias[...]
  np.testing.assert_allclose(logits[0], want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits[0, 0], logits[0, 1])  # Two examples, two answers.
  jax.block_until_ready(logits)


# ---- What pre-training buys the head (benchmarks/transfer.py's encoder path, small) --------------


@pytest.mark.slow
def test_a_classifier_from_a_pretrained_masked_lm_knows_what_a_random_init_cannot(tmp_path):
  """60 invented people, each with a city stated in the pre-training biographies; the classifier
  learns 30 people's cities from their bare names and is scored on the other 30, whose cities
  only the pre-training saw. Measured: 0.50 from the masked LM, 0.00 from random init."""
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
  import transfer  # pylint: disable=import-outside-toplevel
  import transfer_data  # pylint: disable=import-outside-toplevel

  data = transfer_data.write(str(tmp_path / 'data'), entities=60, seed=0)
  small = (
    '--config=configs/tiny.py',
    '--config.model.num_layers=2',
    '--config.model.num_heads=4',
    '--config.model.embed_dim=64',
    '--config.data.seq_len=128',
    '--config.peak_flops=1e11',
    '--config.sample.length=0',
  )
  pretrain = [
    arg.replace('vocab_size=1024', 'vocab_size=512')
    for arg in (*transfer.PRETRAIN, *transfer.ENCODER)
    if not arg.startswith(('--config.steps=', '--config.optim.warmup_steps='))
  ]
  pretrain += ['--config.steps=1500', '--config.optim.warmup_steps=50']
  rows = (('defaults', [], ('pretrained', 'random')),)
  result = transfer.encoder(data, str(tmp_path), small, tuple(pretrain), rows)
  ((_, accuracy),) = result['rows']
  chance = data['chance']['cls']
  assert accuracy['pretrained'] >= 3 * chance, accuracy
  assert accuracy['pretrained'] >= accuracy['random'] + 0.25, accuracy
  assert result['fill_in'] > 2 * chance, result['fill_in']  # The facts are in the masked LM.
