"""Hugging Face export and import of Mixture-of-Experts and qk-norm models, checked against
transformers.

Mixtral (softmax router, the chosen experts renormalised), GLM-4.5's MoE (DeepSeek-V3's sigmoid
router and bias, shared experts, dense first layers, with Llama's attention and optionally a
per-head qk-norm), Qwen3-MoE (softmax router, q_norm and k_norm per head, dense layers anywhere),
OLMoE (softmax router, q_norm and k_norm over all heads) and dense Qwen3, both ways: the same
logits within 1e-4 and the same greedy text as `pretrax.sample`. The decoders whose layers ours
cannot hold are refused on import, and models no target holds on export, each with one line.

Every model has random weights, norms and router biases, so a gate swapped with an up projection,
a transposed expert, a missing renormalisation or a qk-norm scale on the wrong axis shows in the
logits.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, require
from pretrax import checkpoint, run_config, sample
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import MoeConfig
from pretrax.interop import hf_arch, hf_export, hf_fields, hf_import, hf_tensors, hf_tokenizer

MOE = {'model.moe.num_experts': 4, 'model.moe.top_k': 2, 'model.moe.expert_dim': 40}
MODELS = {  # name: (the pretrax overrides, the transformers architecture)
  'mixtral': (MOE, hf_arch.MIXTRAL),
  'glm4_moe': (
    dict(
      MOE,
      **{
        'model.num_layers': 3,
        'model.tie_embeddings': False,
        'model.moe.score': 'sigmoid',
        'model.moe.shared_experts': 1,
        'model.moe.first_dense': 1,
      },
    ),
    hf_arch.GLM4_MOE,
  ),
  # No shared experts (GLM writes zero-width ones), the chosen weights not renormalised, and
  # GLM's per-head qk-norm (use_qk_norm).
  'glm4_moe_plain': (
    dict(
      MOE,
      **{'model.moe.score': 'sigmoid', 'model.moe.renormalise': False, 'model.qk_norm': 'head'},
    ),
    hf_arch.GLM4_MOE,
  ),
  # Experts in layers 1 and 3 (mlp_only_layers 0 and 2), a head_dim of its own, not renormalised.
  'qwen3_moe': (
    dict(
      MOE,
      **{
        'model.num_layers': 4,
        'model.head_dim': 24,
        'model.qk_norm': 'head',
        'model.moe.first_dense': 1,
        'model.moe.every': 2,
        'model.moe.renormalise': False,
      },
    ),
    hf_arch.QWEN3_MOE,
  ),
  'olmoe': (
    dict(
      MOE,
      **{'model.tie_embeddings': False, 'model.qk_norm': 'full'},
    ),
    hf_arch.OLMOE,
  ),
  'qwen3': ({'model.qk_norm': 'head', 'model.head_dim': 24}, hf_arch.QWEN3),
}
PROMPT = 'ROMEO:\nWhat light'


def _config(corpus_path: str, overrides: dict):
  c = load_config('tiny', 'llama')
  c.data.path, c.data.fallback = corpus_path, ''
  c.data.seq_len, c.model.mlp_dim = 24, 96  # Neither expert_dim nor 4 * embed_dim.
  for key, value in overrides.items():
    section, _, leaf = key.rpartition('.')
    (c[section] if section else c)[leaf] = value
  return run_config.build(c, check_data=False)


@pytest.fixture(scope='module')
def char_tokenizer(corpus_path) -> tokenizer_lib.Tokenizer:
  with open(corpus_path, encoding='utf-8') as f:
    return tokenizer_lib.Tokenizer(
      tokenizer_lib.train([f.read()], model_type='char', vocab_size=400)
    )


def _random_run(c, tok: tokenizer_lib.Tokenizer, workdir: str, zero_router_bias: bool):
  """A step-7 checkpoint of `c`'s model with every parameter random (the router biases too,
  unless `zero_router_bias`); returns the run and the params."""
  run = state_lib.build(c, tok.vocab_size)
  state = run.init(0)
  flat, treedef = jax.tree_util.tree_flatten_with_path(state['params'])
  keys = jax.random.split(jax.random.key(1), len(flat))
  leaves = []
  for (path, x), key in zip(flat, keys, strict=True):
    bias = state_lib.param_path(path).endswith('router_bias')
    leaves.append(x * 0 if bias and zero_router_bias else x + 0.1 * jax.random.normal(key, x.shape))
  state['params'] = jax.tree_util.tree_unflatten(treedef, leaves)
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
  positions = jnp.arange(L, dtype=jnp.int32)[None]
  return np.asarray(model(jnp.asarray([ids]), jnp.ones((1, L), jnp.int32), positions))[0]


def _hf_logits(model, ids: list[int]) -> np.ndarray:
  torch = require('torch')
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].float().numpy()


def _same_function(run, params, model, tok: tokenizer_lib.Tokenizer) -> float:
  """Asserts that our model and transformers' give the same logits and greedy text; returns the
  largest logit difference."""
  torch = require('torch')
  ids = tok.encode(PROMPT)
  ours, theirs = _pretrax_logits(run, params, ids), _hf_logits(model, ids)
  assert ours.shape == theirs.shape
  diff = float(np.abs(ours - theirs).max())
  assert diff < 1e-4, diff
  length = 6
  text = sample.generate(
    run.model_def, params, tok, PROMPT, length=length, seq_len=24, temperature=0.0
  )
  with torch.no_grad():
    generated = model.generate(
      torch.tensor([ids]), max_new_tokens=length, do_sample=False, eos_token_id=None, pad_token_id=0
    )
  assert PROMPT + tok.decode(generated[0, len(ids) :].tolist()) == text
  return diff


def _flat(params) -> dict[str, np.ndarray]:
  return {
    state_lib.param_path(k): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


# transformers builds GLM's shared experts even when there are none: zero-width, and warns.
@pytest.mark.filterwarnings('ignore:Initializing zero-element tensors')
@pytest.mark.parametrize('name', list(MODELS))
def test_export_matches_transformers_and_imports_back(tmp_path, corpus_path, char_tokenizer, name):
  overrides, arch = MODELS[name]
  c = _config(corpus_path, overrides)
  run, params = _random_run(
    c, char_tokenizer, str(tmp_path / 'run'), zero_router_bias=arch in hf_arch.NO_ROUTER_BIAS
  )
  out = str(tmp_path / 'hf')
  assert hf_export.export(str(tmp_path / 'run'), out, log=lambda _: None) == arch
  model = require('transformers').AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(model).__name__ == arch
  print(f'{name}: exported logits within {_same_function(run, params, model, char_tokenizer):.1e}')

  # Export -> import gives back the same parameters, bit for bit.
  imported = hf_import.import_model(out, c, str(tmp_path / 'imported'), log=lambda _: None)
  flat = _flat(params)
  assert set(imported) == set(flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(imported[path], value, err_msg=path)


def _hf_config(name: str, vocab_size: int, **kwargs):
  """A tiny transformers config of the MoE architecture in MODELS[name] (or any, by `kwargs`)."""
  transformers = require('transformers')
  common = dict(
    vocab_size=vocab_size,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=24,
    rms_norm_eps=1e-5,
    rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0},
    num_experts_per_tok=2,
  )
  if name == 'mixtral':
    made = dict(intermediate_size=40, num_local_experts=4, tie_word_embeddings=True)
    return transformers.MixtralConfig(**dict(common, **made, **kwargs))
  if name in ('qwen3_moe', 'qwen3'):
    made = dict(intermediate_size=96, head_dim=24, tie_word_embeddings=True)
    if name == 'qwen3':
      del common['num_experts_per_tok']
      return transformers.Qwen3Config(**dict(common, **made, **kwargs))
    made.update(
      moe_intermediate_size=40, num_experts=4, num_hidden_layers=4, mlp_only_layers=[0, 2]
    )
    return transformers.Qwen3MoeConfig(**dict(common, **dict(made, **kwargs)))
  if name == 'olmoe':
    made = dict(
      intermediate_size=40, num_experts=4, norm_topk_prob=True, pad_token_id=0, eos_token_id=2
    )
    return transformers.OlmoeConfig(**dict(common, **dict(made, **kwargs)))
  made = dict(
    intermediate_size=96,
    moe_intermediate_size=40,
    n_routed_experts=4,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_shared_experts=1,
    head_dim=16,
    partial_rotary_factor=1.0,
  )
  return transformers.Glm4MoeConfig(**dict(common, **dict(made, **kwargs)))


# The tied embeddings of the transformers models _hf_config makes.
_HF_TIED = {'mixtral': True, 'glm4_moe': False, 'qwen3_moe': True, 'olmoe': False, 'qwen3': True}


@pytest.mark.parametrize(
  'name, fused',
  [(n, f) for n in ('mixtral', 'glm4_moe') for f in (False, True)]
  + [('qwen3_moe', False), ('qwen3_moe', True), ('olmoe', False), ('qwen3', False)],
)
def test_import_matches_a_transformers_model(tmp_path, corpus_path, char_tokenizer, name, fused):
  torch = require('torch')
  torch.manual_seed(0)
  model = require('transformers').AutoModelForCausalLM.from_config(
    _hf_config(name, char_tokenizer.vocab_size)
  )
  # Not the init's ones and zeros: every tensor matters, GLM's router bias (a buffer) too.
  biases = [b for name, b in model.named_buffers() if name.endswith('e_score_correction_bias')]
  with torch.no_grad():
    for tensor in list(model.parameters()) + biases:
      tensor.add_(0.1 * torch.randn_like(tensor))
  model.eval()
  # transformers writes one tensor per expert; its in-memory, fused layout on request.
  model.save_pretrained(str(tmp_path / 'hf'), save_original_format=not fused)
  char_tokenizer.save(str(tmp_path / 'hf' / hf_tokenizer.SENTENCEPIECE_FILE))
  c = _config(corpus_path, dict(MODELS[name][0], **{'model.tie_embeddings': _HF_TIED[name]}))
  params = hf_import.import_model(str(tmp_path / 'hf'), c, str(tmp_path / 'run'), log=print)
  run = state_lib.build(c, char_tokenizer.vocab_size)
  mngr = checkpoint.manager(str(tmp_path / 'run'), read_only=True)
  state, _ = checkpoint.restore(mngr, 0, run.abstract)
  mngr.close()
  assert set(params) == set(_flat(state['params']))
  diff = _same_function(run, state['params'], model, char_tokenizer)
  print(f'{name} (fused={fused}): imported logits within {diff:.1e}')


@pytest.mark.parametrize('name', list(MODELS))
def test_every_tensor_splits_back_into_what_made_it(corpus_path, name):
  # Export writes experts one by one, so the fused layout's to_hf runs only here.
  overrides, arch = MODELS[name]
  m = run_config.model_config(_config(corpus_path, overrides), 72)
  rng = np.random.default_rng(0)
  for fused in (False, True):
    for t in hf_tensors.tensor_map(m, arch, fused):
      y = rng.normal(size=t.shape)
      parts = t.from_hf(y)
      if t.expert is None:
        np.testing.assert_array_equal(t.to_hf(*parts), y, err_msg=t.name)
      else:  # The expert's slice of a parameter: put it in its place among others.
        whole = np.stack([np.zeros_like(parts[0])] * m.moe.num_experts)
        whole[t.expert] = parts[0]
        np.testing.assert_array_equal(t.to_hf(whole), y, err_msg=t.name)


@pytest.mark.parametrize(
  'config, reason',
  [
    (('Olmo2Config', {}), r'Olmo2ForCausalLM: .*output of each attention and MLP \(post-norm\)'),
    (('Qwen2MoeConfig', {}), r'Qwen2MoeForCausalLM: .*sigmoid gate \(shared_expert_gate\)'),
    (('mixtral', {'sliding_window': 8}), r'Mixtral.* sliding_window=8: .*whole context'),
    (('glm4_moe', {'routed_scaling_factor': 2.5}), r'routed_scaling_factor=2.5: .*scale'),
    (('glm4_moe', {'partial_rotary_factor': 0.5}), r'partial_rotary_factor=0.5: .*whole'),
    (('glm4_moe', {'n_group': 2, 'topk_group': 1}), r'topk_group=1: .*groups \(n_group\)'),
    (
      ('qwen3_moe', {'mlp_only_layers': [1]}),
      r'decoder_sparse_step=1 and mlp_only_layers=\[1\]: its experts are in layers \[0, 2, 3\]',
    ),
    (
      ('qwen3_moe', {'mlp_only_layers': [3]}),
      r'experts are in layers \[0, 1, 2\], and pretrax puts them in every model.moe.every-th',
    ),
    (('qwen3_moe', {'use_sliding_window': True, 'sliding_window': 8}), r'sliding_window=8'),
    (('qwen3', {'attention_bias': True}), r'Qwen3ForCausalLM with attention_bias=True: .*MLP'),
    (('olmoe', {'clip_qkv': 8.0}), r'OlmoeForCausalLM with clip_qkv=8.0: '),
  ],
)
def test_import_refuses_what_our_layers_cannot_hold(tmp_path, corpus_path, config, reason):
  name, kwargs = config
  if name.endswith('Config'):  # Another architecture, as transformers makes it.
    hf_config = getattr(require('transformers'), name)(**kwargs)
    hf_config.architectures = [name.replace('Config', 'ForCausalLM')]
  else:
    hf_config = _hf_config(name, 72, **kwargs)
    hf_config.architectures = [MODELS[name][1]]
  hf_config.save_pretrained(str(tmp_path / 'hf'))  # Refused on config.json alone.
  c = _config(corpus_path, dict(MOE, **{'model.vocab_size': 72}))
  with pytest.raises(hf_arch.ConversionError, match=reason) as e:
    hf_import.import_model(str(tmp_path / 'hf'), c, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


@pytest.mark.parametrize(
  'layers, step, dense, expected',
  [
    (4, 1, [], (0, 1)),
    (4, 2, [], (1, 2)),  # Layers 1 and 3: every second layer, from the second.
    (6, 3, [], (2, 3)),
    (4, 1, [0, 2], (1, 2)),
    (5, 1, [0, 1], (2, 1)),  # Dense first layers, as DeepSeek-V3's.
    (4, 1, [0, 1, 2], (3, 1)),  # One MoE layer, the last.
  ],
)
def test_qwen3_moe_layers_become_first_dense_and_every(layers, step, dense, expected):
  hf = dict(
    architectures=[hf_arch.QWEN3_MOE],
    num_hidden_layers=layers,
    decoder_sparse_step=step,
    mlp_only_layers=dense,
    num_attention_heads=4,
    hidden_size=64,
    num_experts=4,
  )
  fields = hf_fields.model_fields(hf)
  assert (fields['moe.first_dense'], fields['moe.every']) == expected
  # And back: the layers export writes as mlp_only_layers are the ones that were dense.
  moe = MoeConfig(num_experts=4, first_dense=expected[0], every=expected[1])
  hf_moe = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
  assert [i for i in range(layers) if moe.is_moe(i)] == hf_moe


def test_import_names_every_moe_mismatch(tmp_path, corpus_path):
  hf_config = _hf_config('mixtral', 72)
  hf_config.architectures = [hf_arch.MIXTRAL]
  hf_config.save_pretrained(str(tmp_path / 'mixtral'))
  expected = {  # Our overrides: what the error must say.
    'model.moe.num_experts': (8, 'model.moe.num_experts=8 but config.json has num_local_experts=4'),
    'model.moe.expert_dim': (
      48,
      'model.moe.expert_dim=48 but config.json has intermediate_size=40',
    ),
    'model.moe.score': (
      'sigmoid',
      "model.moe.score='sigmoid' but config.json's MixtralForCausalLM means moe.score='softmax'",
    ),
  }
  c = _config(
    corpus_path, {'model.vocab_size': 72, **MOE, **{k: v for k, (v, _) in expected.items()}}
  )
  with pytest.raises(hf_arch.ConversionError) as e:
    hf_import.import_model(str(tmp_path / 'mixtral'), c, str(tmp_path / 'run'))
  for _, fragment in expected.values():
    assert fragment in str(e.value), str(e.value)
  # A dense config and an MoE checkpoint: only the experts are named, not their routing.
  c = _config(corpus_path, {'model.vocab_size': 72, 'model.mlp_dim': 40})
  with pytest.raises(hf_arch.ConversionError) as e:
    hf_import.import_model(str(tmp_path / 'mixtral'), c, str(tmp_path / 'run'))
  assert 'model.moe.num_experts=0 but config.json has num_local_experts=4.' in str(e.value)
  assert str(e.value).count(' but config.json') == 1, str(e.value)
  # An MoE config and a dense checkpoint.
  llama = require('transformers').LlamaConfig(
    vocab_size=72,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=24,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    architectures=[hf_arch.LLAMA],
  )
  llama.save_pretrained(str(tmp_path / 'llama'))
  c = _config(corpus_path, {'model.vocab_size': 72, **MOE})
  with pytest.raises(hf_arch.ConversionError) as e:
    hf_import.import_model(str(tmp_path / 'llama'), c, str(tmp_path / 'run'))
  assert (
    "model.moe.num_experts=4 but config.json's LlamaForCausalLM means moe.num_experts=0."
    in str(e.value)
  )


@pytest.mark.parametrize(
  'overrides, reason',
  [
    ({'model.flavour': 'gpt2'}, 'GELU experts'),
    ({'model.use_bias': True}, 'use_bias=True: MixtralForCausalLM has no biases'),
    ({'model.moe.shared_experts': 1}, 'shared_experts=1: MixtralForCausalLM has no shared'),
    ({'model.moe.first_dense': 1}, 'first_dense=1: MixtralForCausalLM has experts in every'),
    ({'model.moe.renormalise': False}, 'renormalise=False: MixtralForCausalLM renormalises'),
    ({'model.moe.score': 'sigmoid', 'model.moe.every': 2}, 'every=2: Glm4MoeForCausalLM'),
    ({'objective': 'masked_lm'}, 'Mixture-of-Experts encoder'),
    (
      {'model.qk_norm': 'full', 'model.moe.score': 'sigmoid'},
      "qk_norm=full with a sigmoid router: Glm4MoeForCausalLM's qk-norm is per head",
    ),
    ({'model.qk_norm': 'full', 'model.moe.first_dense': 1}, 'first_dense=1: OlmoeForCausalLM'),
    ({'model.qk_norm': 'full', 'model.moe.every': 2}, 'every=2: OlmoeForCausalLM'),
    ({'model.qk_norm': 'full', 'model.head_dim': 24}, 'head_dim=24: OlmoeForCausalLM needs'),
    ({'model.qk_norm': 'head', 'model.moe.shared_experts': 1}, 'Qwen3MoeForCausalLM has no shared'),
    ({'model.moe.num_experts': 0, 'model.qk_norm': 'full'}, r'Olmo2ForCausalLM .*\(post-norm\)'),
    (
      {'model.moe.num_experts': 0, 'model.qk_norm': 'head', 'model.use_bias': True},
      'Qwen3ForCausalLM has no MLP biases',
    ),
  ],
)
def test_export_refuses_what_no_target_holds(corpus_path, overrides, reason):
  c = _config(corpus_path, dict(MOE, **overrides))
  with pytest.raises(hf_arch.ConversionError, match=reason) as e:
    hf_arch.architecture(run_config.model_config(c, 72))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('qk_norm', ['none', 'head', 'full'])  # Mixtral, Qwen3-MoE, OLMoE.
def test_export_refuses_a_router_bias_the_target_lacks(
  tmp_path, corpus_path, char_tokenizer, qk_norm
):
  c = _config(corpus_path, dict(MOE, **{'model.moe.bias_rate': 0.001, 'model.qk_norm': qk_norm}))
  _random_run(c, char_tokenizer, str(tmp_path / 'run'), zero_router_bias=False)
  with pytest.raises(
    hf_arch.ConversionError, match=r'blocks/0/mlp/router_bias is not zero .* no router bias'
  ):
    hf_export.export(str(tmp_path / 'run'), str(tmp_path / 'hf'))
  assert not os.path.exists(tmp_path / 'hf')
