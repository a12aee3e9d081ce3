"""Hugging Face export and import, checked against transformers itself (torch on CPU).

Without torch and transformers (`pip install -e '.[dev]'`) the comparisons fail rather than skip.

Every model here has random weights, norms and biases (not the initial ones and zeros), so a
tensor mapped to the wrong place, transposed or split the wrong way shows in the logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm

from conftest import load_config, require
from pretrax import checkpoint, run_config
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.interop import hf_arch, hf_export, hf_import, hf_tokenizer

# Text that trips tokenizers up: runs of spaces, tabs, newlines, bytes never seen in training,
# a literal '▁', emoji, CJK, control characters, a byte-order mark.
AWKWARD = [
  'Hello  world\n\n\ttab',
  ' leading space',
  'trailing  ',
  'émoji 🤖 日本語 ∑ x²',
  'a\u2581b \u2581',
  '\x00\x01\x7f ctrl',
  '\ufeffBOM',
  '',
  '   ',
  '\r\n\r\n',
  'KING RICHARD III:\nWhat? ha! -- 1,234.5',
]

MODELS = {  # name: (config arg, overrides)
  'gpt2': (None, {}),
  'gpt2_bias_untied': (None, {'model.use_bias': True, 'model.tie_embeddings': False}),
  'llama_gqa': ('llama', {}),
  'llama_bias_untied': (
    'llama',
    {'model.use_bias': True, 'model.tie_embeddings': False, 'model.rope_theta': 500.0},
  ),
  'encoder': (None, {'objective': 'masked_lm', 'model.use_bias': True}),
}


def _override(c, overrides: dict) -> None:
  for key, value in overrides.items():
    section, _, leaf = key.rpartition('.')
    (c[section] if section else c)[leaf] = value


def _config(name: str, corpus_path: str, arg: str | None = None, overrides: dict | None = None):
  arg, overrides = MODELS[name] if name else (arg, overrides)
  c = load_config('tiny', arg)
  c.data.path, c.data.fallback = corpus_path, ''
  c.data.seq_len, c.model.mlp_dim = 24, 96  # Not 4 * embed_dim: a wrong default shows.
  _override(c, overrides)
  return c


@pytest.fixture(scope='module')
def char_tokenizer(corpus_path) -> tokenizer_lib.Tokenizer:
  with open(corpus_path, encoding='utf-8') as f:
    return tokenizer_lib.Tokenizer(
      tokenizer_lib.train([f.read()], model_type='char', vocab_size=400)
    )


def _random_run(c, tok: tokenizer_lib.Tokenizer, workdir: str, seed: int = 0):
  """A step-7 checkpoint of `c`'s model with every parameter random; returns the params."""
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, tok.vocab_size)
  state = run.init(seed)
  leaves, treedef = jax.tree.flatten(state['params'])
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  state['params'] = jax.tree.unflatten(
    treedef,
    [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)],
  )
  state['step'] = jnp.asarray(7, state['step'].dtype)
  mngr = checkpoint.manager(workdir, async_save=False)
  checkpoint.save(mngr, 7, state, run_config.to_dict(c))
  checkpoint.wait(mngr)
  mngr.close()
  tok.save(os.path.join(workdir, hf_tokenizer.SENTENCEPIECE_FILE))
  return run, state['params']


def _pretrax_logits(run, params, ids: list[int]) -> np.ndarray:
  from flax import nnx

  model = nnx.merge(run.model_def, params)
  L = len(ids)
  return np.asarray(
    model(jnp.asarray([ids]), jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None])
  )[0]


def _hf_logits(model, ids: list[int]) -> np.ndarray:
  torch = require('torch')
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].float().numpy()


def _hf_class(name: str):
  """transformers.NAME, imported when a test needs it: the tests that do not still run without."""
  return getattr(require('transformers'), name)


@pytest.mark.parametrize('name', list(MODELS))
def test_export_matches_transformers_and_imports_back(tmp_path, corpus_path, char_tokenizer, name):
  c = _config(name, corpus_path)
  run, params = _random_run(c, char_tokenizer, str(tmp_path / 'run'))
  out = str(tmp_path / 'hf')
  arch = hf_export.export(str(tmp_path / 'run'), out, log=lambda _: None)
  assert arch == {
    'encoder': hf_arch.XLMR,
    'llama_gqa': hf_arch.LLAMA,
    'llama_bias_untied': hf_arch.LLAMA,
  }.get(name, hf_arch.GPT2)

  model = _hf_class(arch).from_pretrained(out).eval()
  tok = _hf_class('AutoTokenizer').from_pretrained(out)
  ids = char_tokenizer.encode('ROMEO:\nWhat light')
  assert tok.encode('ROMEO:\nWhat light', add_special_tokens=False) == ids
  if name == 'encoder':
    ids[3] = tokenizer_lib.MASK_ID
  ours, theirs = _pretrax_logits(run, params, ids), _hf_logits(model, ids)
  assert ours.shape == theirs.shape
  assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()

  # Export -> import gives back the same parameters, bit for bit.
  imported = hf_import.import_model(
    out, run_config.build(c, check_data=False), str(tmp_path / 'imported'), log=lambda _: None
  )
  flat = {
    state_lib.param_path(k): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  assert set(imported) == set(flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(imported[path], value, err_msg=path)


def test_bfloat16_and_sharded_export(tmp_path, corpus_path, char_tokenizer):
  c = _config('llama_gqa', corpus_path)
  run, params = _random_run(c, char_tokenizer, str(tmp_path / 'run'))
  out = str(tmp_path / 'hf')
  hf_export.export(
    str(tmp_path / 'run'), out, dtype='bfloat16', max_shard_bytes=20_000, log=lambda _: None
  )
  with open(os.path.join(out, 'model.safetensors.index.json')) as f:
    assert len(set(json.load(f)['weight_map'].values())) > 3
  model = _hf_class('LlamaForCausalLM').from_pretrained(out)
  assert model.dtype == require('torch').bfloat16
  ids = char_tokenizer.encode('To be, or not to be')
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  ours = _pretrax_logits(run, bf16, ids)  # The same rounded weights, computed in float32.
  theirs = _hf_logits(model.float(), ids)
  assert np.abs(ours - theirs).max() < 1e-4


# Each transformers architecture with random weights, and the pretrax config that matches it.
HF_MODELS = {
  'gpt2': (
    None,
    {'model.use_bias': True},
    lambda V: _hf_class('GPT2Config')(
      vocab_size=V,
      n_positions=24,
      n_embd=64,
      n_layer=2,
      n_head=2,
      n_inner=96,
      activation_function='gelu_new',
      architectures=[hf_arch.GPT2],
    ),
  ),
  'llama': (
    'llama',
    {'model.use_bias': True, 'model.tie_embeddings': False},
    lambda V: _hf_class('LlamaConfig')(
      vocab_size=V,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=24,
      rms_norm_eps=1e-5,
      attention_bias=True,
      mlp_bias=True,
      tie_word_embeddings=False,
      architectures=[hf_arch.LLAMA],
    ),
  ),
  'xlmr': (
    None,
    {'objective': 'masked_lm', 'model.use_bias': True},
    lambda V: _hf_class('XLMRobertaXLConfig')(
      vocab_size=V,
      hidden_size=64,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=96,
      hidden_act='gelu_new',
      max_position_embeddings=25,
      pad_token_id=0,
      architectures=[hf_arch.XLMR],
    ),
  ),
}


def _transformers_model(name: str, vocab_size: int, out: str):
  torch = require('torch')
  torch.manual_seed(0)
  hf_config = HF_MODELS[name][2](vocab_size)
  model = _hf_class(hf_config.architectures[0])(hf_config).eval()
  with torch.no_grad():
    for p in model.parameters():  # Not the init's ones and zeros: every tensor matters.
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  return model


@pytest.mark.parametrize('name', list(HF_MODELS))
def test_import_matches_a_transformers_model(tmp_path, corpus_path, name):
  arg, overrides, _ = HF_MODELS[name]
  c = _config(None, corpus_path, arg, dict(overrides, **{'model.vocab_size': 72}))
  c = run_config.build(c, check_data=False)
  model = _transformers_model(name, 72, str(tmp_path / 'hf'))
  params = hf_import.import_model(
    str(tmp_path / 'hf'), c, str(tmp_path / 'run'), log=lambda _: None
  )
  run = state_lib.build(c, 72)
  mngr = checkpoint.manager(str(tmp_path / 'run'), read_only=True)
  assert mngr.latest_step() == 0
  state, _ = checkpoint.restore(mngr, 0, run.abstract)
  mngr.close()
  assert set(params) == {
    state_lib.param_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(state['params'])[0]
  }
  ids = list(np.random.default_rng(0).integers(5, 72, size=20))
  ours, theirs = _pretrax_logits(run, state['params'], ids), _hf_logits(model, ids)
  assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


def test_import_names_every_mismatch(tmp_path, corpus_path):
  _transformers_model('gpt2', 72, str(tmp_path / 'hf'))
  c = load_config('tiny', 'llama')
  c.model.vocab_size, c.model.num_layers = 72, 3
  with pytest.raises(hf_arch.ConversionError) as e:
    hf_import.import_model(
      str(tmp_path / 'hf'), run_config.build(c, check_data=False), str(tmp_path / 'run')
    )
  message = str(e.value)
  for fragment in (
    "model.flavour='llama' but config.json's GPT2LMHeadModel means flavour='gpt2'",
    'model.num_layers=3 but config.json has n_layer=2',
    'model.max_len=32 but config.json has n_positions=24',
  ):
    assert fragment in message, message
  # Matching shapes, but biases the configured model lacks: refused, not dropped.
  c = run_config.build(_config(None, corpus_path, None, {'model.vocab_size': 72}), check_data=False)
  with pytest.raises(
    hf_arch.ConversionError, match=r'transformer\.h\.0\..*bias is not zero.*use_bias'
  ):
    hf_import.import_model(str(tmp_path / 'hf'), c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


@pytest.mark.parametrize(
  'overrides, reason',
  [
    ({'objective': 'prefix_lm'}, 'prefix-LM'),
    ({'objective': 'masked_lm', 'model.flavour': 'llama'}, 'Llama-flavour encoder'),
    ({'model.num_kv_heads': 1}, 'grouped key/value heads'),
  ],
)
def test_export_refuses_what_the_target_cannot_express(
  tmp_path, corpus_path, char_tokenizer, overrides, reason
):
  c = _config('gpt2', corpus_path)
  _override(c, overrides)
  _random_run(c, char_tokenizer, str(tmp_path / 'run'))
  with pytest.raises(hf_arch.ConversionError, match=reason):
    hf_export.export(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  assert not os.path.exists(tmp_path / 'hf')


def test_a_damaged_checkpoint_is_not_exported(tmp_path, corpus_path, char_tokenizer):
  c = _config('gpt2', corpus_path)
  _random_run(c, char_tokenizer, str(tmp_path / 'run'))
  # Flip bits in the middle of the largest array file: the fingerprint must catch it.
  files = [
    os.path.join(d, f)
    for d, _, fs in os.walk(tmp_path / 'run' / 'checkpoints')
    for f in fs
    if '/d/' in os.path.join(d, f)
  ]
  for path in files:
    data = bytearray(open(path, 'rb').read())
    for i in range(len(data) // 16, len(data), len(data) // 8 or 1):
      data[i] ^= 0xFF
    open(path, 'wb').write(bytes(data))
  with pytest.raises((checkpoint.CheckpointError, hf_arch.ConversionError)):
    hf_export.export(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  assert not os.path.exists(tmp_path / 'hf')


@pytest.mark.parametrize('model_type, vocab_size', [('char', 400), ('bpe', 600), ('unigram', 600)])
def test_tokenizer_encodes_and_decodes_as_pretrax(tmp_path, corpus_path, model_type, vocab_size):
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read()
  tok = tokenizer_lib.Tokenizer(
    tokenizer_lib.train([text], model_type=model_type, vocab_size=vocab_size, num_sentinels=3)
  )
  processor = spm.SentencePieceProcessor(model_proto=tok.model_proto)
  hf_tokenizer.save(tok.model_proto, str(tmp_path), model_max_length=64)
  theirs = _hf_class('AutoTokenizer').from_pretrained(str(tmp_path))
  assert theirs.mask_token_id == tokenizer_lib.MASK_ID and theirs.eos_token_id == 3
  for t in AWKWARD + [text[:5000], text[-5000:]]:
    ours_ids, their_ids = tok.encode(t), theirs.encode(t, add_special_tokens=False)
    assert theirs.decode(their_ids) == tok.decode(ours_ids), repr(t[:50])
    assert theirs.decode(ours_ids) == tok.decode(ours_ids), repr(t[:50])
    if model_type != 'unigram':
      assert their_ids == ours_ids, repr(t[:50])
    else:  # Unigram may break an exact tie between two segmentations the other way.

      def score(ids):
        return sum(processor.get_score(i) for i in ids)

      assert their_ids == ours_ids or np.isclose(score(their_ids), score(ours_ids), atol=1e-4)
