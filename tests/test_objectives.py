"""The objectives' example builders: masking rates, special tokens, spans, prefixes, mixtures."""

import numpy as np
import pytest

from conftest import make_store
from pretrax import config, config_specs, run_config, tokenizer
from pretrax.data import objectives, pipeline
from pretrax.data.batch import Batch

L = 64


@pytest.fixture(scope='module')
def tok(corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    return tokenizer.Tokenizer(
      tokenizer.train([f.read(50_000)], model_type='char', num_sentinels=20)
    )


@pytest.fixture(scope='module')
def windows(tok, corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read(150_000)
  documents = [text[i : i + 3000] for i in range(0, len(text), 3000)]
  out = []  # Each document then EOS, in windows of L + 1 tokens every L.
  for d in documents:
    ids = np.array(tok.encode(d) + [tokenizer.EOS_ID], np.int32)
    out += [ids[s : s + L + 1] for s in range(0, len(ids) - 1, L)]
  return out


def make(tok, objective: str, **settings) -> objectives.Objectives:
  c = config.base_config()
  c.objective = objective
  c.data.seq_len = L
  for key, value in settings.items():
    group, name = key.split('__')
    c[group][name] = value
  return objectives.Objectives.from_config(run_config.build(c, check_data=False), tok)


def build_all(o, windows, count=None, seed=0):
  count = count or len(windows)
  return [o.build(windows[i], seed=seed, stream=0, epoch=0, index=i) for i in range(count)]


def test_masking_rates_match_the_config(tok, windows):
  o = make(tok, 'masked_lm')
  examples = build_all(o, windows)
  special = tok.special_ids()
  candidates = chosen = masked = replaced = kept = 0
  for e in examples:
    sel = e.weights > 0
    candidates += int((~special[e.targets]).sum())
    chosen += int(sel.sum())
    masked += int((e.inputs[sel] == tokenizer.MASK_ID).sum())
    replaced += int(
      ((e.inputs[sel] != tokenizer.MASK_ID) & (e.inputs[sel] != e.targets[sel])).sum()
    )
    kept += int((e.inputs[sel] == e.targets[sel]).sum())
    # Nothing outside the chosen positions changes; the encoder sees everything.
    np.testing.assert_array_equal(e.inputs[~sel], e.targets[~sel])
    assert np.all(e.prefix == 1)
  assert chosen > 10_000
  assert abs(chosen / candidates - 0.15) < 0.005, chosen / candidates
  assert abs(masked / chosen - 0.8) < 0.015, masked / chosen
  # A random replacement equal to the original token counts as kept: ~1/vocab of them.
  assert abs(replaced / chosen - 0.1) < 0.015, replaced / chosen
  assert abs(kept / chosen - 0.1) < 0.015, kept / chosen


def test_other_rates_are_honoured(tok, windows):
  o = make(
    tok,
    'masked_lm',
    masked_lm__rate=0.4,
    masked_lm__mask_token_fraction=1.0,
    masked_lm__random_token_fraction=0.0,
  )
  examples = build_all(o, windows, 300)
  chosen = np.concatenate([e.weights > 0 for e in examples])
  assert abs(chosen.mean() - 0.4) < 0.01
  inputs = np.concatenate([e.inputs for e in examples])
  assert np.all(inputs[chosen] == tokenizer.MASK_ID)


def test_special_tokens_and_padding_are_never_chosen(tok):
  o = make(tok, 'masked_lm', masked_lm__rate=0.9)
  special = np.flatnonzero(tok.special_ids())
  rng = np.random.default_rng(0)
  regular = np.flatnonzero(~tok.special_ids())
  for i in range(200):
    window = rng.choice(regular, L + 1).astype(np.int32)
    window[rng.choice(L, 20, replace=False)] = rng.choice(special, 20)
    e = o.build(window, seed=0, stream=0, epoch=0, index=i)
    is_special = tok.special_ids()[e.targets]
    assert not np.any(e.weights[is_special]), 'a special token was chosen'
    np.testing.assert_array_equal(e.inputs[is_special], e.targets[is_special])
    # Random replacements are never special either.
    changed = (e.inputs != e.targets) & (e.inputs != tokenizer.MASK_ID)
    assert not np.any(tok.special_ids()[e.inputs[changed]])


def test_whole_word_masking_takes_whole_words(tok, windows):
  o = make(tok, 'masked_lm', masked_lm__whole_word=True)
  starts_table = tok.word_starts()
  total = chosen_total = 0
  for e in build_all(o, windows, 400):
    targets, chosen = e.targets, e.weights > 0
    starts = starts_table[targets].copy()
    starts[0] = True
    word_of = np.cumsum(starts)
    for word in np.unique(word_of[chosen]):
      in_word = (word_of == word) & ~tok.special_ids()[targets]
      assert np.all(chosen[in_word]), 'part of a word was left unmasked'
    total += int((~tok.special_ids()[targets]).sum())
    chosen_total += int(chosen.sum())
  assert 0.12 < chosen_total / total <= 0.15  # Whole words fill the budget from below.


def test_masks_depend_only_on_seed_and_example(tok, windows):
  o = make(tok, 'masked_lm')
  a = o.build(windows[5], seed=0, stream=0, epoch=0, index=5)
  b = o.build(windows[5], seed=0, stream=0, epoch=0, index=5)
  c = o.build(windows[5], seed=0, stream=0, epoch=1, index=5)
  for field, x, y in zip(objectives.Example._fields, a, b, strict=True):
    np.testing.assert_array_equal(x, y, err_msg=field)
  assert not np.array_equal(a.weights, c.weights), 'a new epoch should draw new masks'


def test_masks_are_identical_after_a_resume(tmp_path, corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read(60_000)
  s = make_store(tmp_path, [text[i : i + 700] for i in range(0, len(text), 700)])
  o = make(tokenizer.Tokenizer.load(s.tokenizer_path), 'masked_lm')
  source = pipeline.Source('data', 1.0, pipeline.Windows(s.split('train'), L, L), s.split('eval'))

  def make_iter(start):
    return pipeline.train_batches([source], o, global_batch=4, seed=3, start_step=start)

  it = make_iter(0)
  for _ in range(3):
    next(it)
  expected = [next(it) for _ in range(4)]
  resumed = make_iter(3)  # A resumed run starts reading at its step.
  for want in expected:
    got = next(resumed)
    for field, x, y in zip(Batch._fields, got, want, strict=True):
      np.testing.assert_array_equal(x, y, err_msg=field)
    assert not np.any(got.weights[got.segment_ids == 0]), 'padding was chosen'


def test_span_corruption_reassembles_into_the_original(tok, windows):
  o = make(tok, 'span_corruption')
  sentinels = tok.sentinel_ids
  noise = kept = spans = 0
  for i, e in enumerate(build_all(o, windows, 500)):
    window = windows[i]
    assert len(e.inputs) <= L
    sequence = np.concatenate([e.inputs, e.targets[-1:]])
    prefix_length = int(e.prefix.sum())
    restored = objectives.uncorrupt(sequence, prefix_length, sentinels)
    np.testing.assert_array_equal(restored, window[: len(restored)])
    # The loss is on the targets part only, from the last prefix position on.
    np.testing.assert_array_equal(e.weights, np.arange(len(e.inputs)) >= prefix_length - 1)
    n_spans = int(np.isin(sequence[:prefix_length], sentinels).sum())
    assert list(sequence[prefix_length:][np.isin(sequence[prefix_length:], sentinels)]) == list(
      sentinels[:n_spans]
    )
    spans += n_spans
    noise += len(sequence) - prefix_length - n_spans
    kept += prefix_length - n_spans
  assert abs(noise / (noise + kept) - 0.15) < 0.01
  assert abs(noise / spans - 3.0) < 0.3


def test_span_corruption_settings(tok, windows):
  o = make(
    tok,
    'span_corruption',
    span_corruption__noise_density=0.5,
    span_corruption__mean_span_length=8.0,
  )
  noise = total = spans = 0
  for e in build_all(o, windows, 300):
    sequence = np.concatenate([e.inputs, e.targets[-1:]])
    p = int(e.prefix.sum())
    n_spans = int(np.isin(sequence[:p], tok.sentinel_ids).sum())
    noise += len(sequence) - p - n_spans
    total += len(sequence) - 2 * n_spans
    spans += n_spans
  assert abs(noise / total - 0.5) < 0.02 and abs(noise / spans - 8.0) < 1.0


def test_span_corruption_needs_sentinels(corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    plain = tokenizer.Tokenizer(tokenizer.train([f.read(20_000)], model_type='char'))
  with pytest.raises(config.ConfigError, match='sentinel'):
    make(plain, 'span_corruption')


def test_prefix_lm_splits_and_weights(tok, windows):
  o = make(tok, 'prefix_lm')
  lengths = []
  for i, e in enumerate(build_all(o, windows, 300)):
    np.testing.assert_array_equal(e.inputs, windows[i][:-1])
    np.testing.assert_array_equal(e.targets, windows[i][1:])
    p = int(e.prefix.sum())
    assert 1 <= p <= len(e.inputs) and np.all(e.prefix[:p] == 1)
    # Predictions that could read their target inside the prefix do not count.
    np.testing.assert_array_equal(e.weights, np.arange(len(e.inputs)) >= p - 1)
    lengths.append(p / len(e.inputs))
  assert 0.4 < np.mean(lengths) < 0.6  # Uniform split points.


def test_mixture_chooses_objectives_by_weight(tok, windows):
  o = make(tok, 'causal_lm:2,span_corruption:1,prefix_lm:1')
  chosen = [int(e.objective[0]) for e in build_all(o, windows)]
  counts = np.bincount(chosen, minlength=len(config.OBJECTIVES)) / len(chosen)
  index = config.OBJECTIVES.index
  assert len(chosen) > 2000
  assert abs(counts[index('causal_lm')] - 0.5) < 0.04
  assert abs(counts[index('span_corruption')] - 0.25) < 0.04
  assert abs(counts[index('prefix_lm')] - 0.25) < 0.04
  assert counts[index('masked_lm')] == 0


@pytest.mark.parametrize(
  'spec, fragment',
  [
    ('causal', 'not one of'),
    ('masked_lm:1,causal_lm:1', 'cannot be mixed'),
    ('causal_lm:0', 'positive'),
    ('causal_lm:x', 'positive'),
    ('prefix_lm,prefix_lm', 'twice'),
  ],
)
def test_bad_objectives_are_named(spec, fragment):
  with pytest.raises(config.ConfigError, match=fragment):
    config_specs.objective_mixture(spec)


def test_mixture_weights_are_normalised():
  assert config_specs.objective_mixture('causal_lm:3,prefix_lm:1') == (
    ('causal_lm', 0.75),
    ('prefix_lm', 0.25),
  )
  assert config_specs.objective_mixture('prefix_lm') == (('prefix_lm', 1.0),)
