"""A config.json read back: the fields of our model config it implies, the settings of it that our
model cannot hold (refused with the reason), and every field that differs from a run's config,
named on both sides.
"""

from typing import Any

import numpy as np

from pretrax.config_types import ModelConfig
from pretrax.interop import hf_arch

# Mixture-of-Experts decoders whose layers ours cannot hold, and why: refused on import.
_CANNOT_IMPORT = {
  'Qwen3MoeForCausalLM': "it normalises each head's queries and keys (q_norm, k_norm) and "
  "pretrax's llama flavour has no qk-norm",
  'OlmoeForCausalLM': "it normalises queries and keys (q_norm, k_norm) and pretrax's llama "
  'flavour has no qk-norm',
  'Qwen2MoeForCausalLM': 'it scales its shared expert by a learned sigmoid gate '
  "(shared_expert_gate) that pretrax's shared experts lack",
  'DeepseekV3ForCausalLM': 'its attention is multi-head latent attention (kv_lora_rank), not '
  "pretrax's; Glm4MoeForCausalLM has the same router with Llama's attention",
}


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Our model config's fields (by `ModelConfig` name, 'moe.x' for model.moe's) implied by a
  config.json; ConversionError for an architecture, or a setting of one, that ours cannot hold."""
  arch = (hf.get('architectures') or [None])[0]
  if arch in _CANNOT_IMPORT:
    raise hf_arch.ConversionError(f'cannot import {arch}: {_CANNOT_IMPORT[arch]}.')
  if arch in hf_arch.MOE:
    return _moe_fields(hf, arch)
  if arch not in (hf_arch.GPT2, hf_arch.LLAMA, hf_arch.XLMR):
    raise hf_arch.ConversionError(
      f'config.json names architecture {arch!r}; pretrax converts '
      f'{", ".join((hf_arch.GPT2, hf_arch.LLAMA, hf_arch.XLMR) + hf_arch.MOE)}.'
    )
  # A dense checkpoint has no experts to fill.
  return dict(_dense_fields(hf, arch), **{'moe.num_experts': 0})


def _dense_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  def get(key: str, default: Any = None) -> Any:
    return hf.get(key, default)

  if arch == hf_arch.GPT2:
    D = get('n_embd')
    return dict(
      flavour='gpt2',
      attention='causal',
      vocab_size=get('vocab_size'),
      num_layers=get('n_layer'),
      num_heads=get('n_head'),
      num_kv_heads=get('n_head'),
      embed_dim=D,
      head_dim=D // get('n_head'),
      mlp_dim=get('n_inner') or 4 * D,
      max_len=get('n_positions'),
      norm_eps=get('layer_norm_epsilon', 1e-5),
      tie_embeddings=get('tie_word_embeddings', True),
    )
  if arch == hf_arch.LLAMA:
    return dict(_llama_fields(hf, rope_theta=10000.0), mlp_dim=get('intermediate_size'))
  D, N = get('hidden_size'), get('num_attention_heads')
  return dict(
    flavour='gpt2',
    attention='bidirectional',
    mlm_head=True,
    vocab_size=get('vocab_size'),
    num_layers=get('num_hidden_layers'),
    num_heads=N,
    num_kv_heads=N,
    embed_dim=D,
    head_dim=D // N,
    mlp_dim=get('intermediate_size'),
    max_len=get('max_position_embeddings') - get('pad_token_id', 1) - 1,
    norm_eps=get('layer_norm_eps', 1e-5),
    tie_embeddings=get('tie_word_embeddings', True),
  )


def _llama_fields(hf: dict[str, Any], rope_theta: float) -> dict[str, Any]:
  """The fields of Llama's attention, norms and positions; `rope_theta` when config.json has none
  (each architecture has its own default)."""

  def get(key: str, default: Any = None) -> Any:
    return hf.get(key, default)

  rope = get('rope_parameters') or {}
  heads = get('num_attention_heads')
  return dict(
    flavour='llama',
    attention='causal',
    vocab_size=get('vocab_size'),
    num_layers=get('num_hidden_layers'),
    num_heads=heads,
    num_kv_heads=get('num_key_value_heads') or heads,
    embed_dim=get('hidden_size'),
    head_dim=get('head_dim') or get('hidden_size') // heads,
    max_len=get('max_position_embeddings'),
    norm_eps=get('rms_norm_eps', 1e-6),
    rope_theta=rope.get('rope_theta', get('rope_theta', rope_theta)),
    tie_embeddings=get('tie_word_embeddings', False),
  )


def _moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """Mixtral's or GLM-4.5's config.json as our fields (their defaults where a key is missing)."""
  _refuse_import(hf, arch)
  if arch == hf_arch.MIXTRAL:
    return dict(
      _llama_fields(hf, rope_theta=1e6),
      use_bias=False,
      **{
        'moe.num_experts': hf.get('num_local_experts', 8),
        'moe.top_k': hf.get('num_experts_per_tok', 2),
        'moe.expert_dim': hf.get('intermediate_size'),
        'moe.score': 'softmax',
        'moe.renormalise': True,
        'moe.shared_experts': 0,
        'moe.first_dense': 0,
        'moe.every': 1,
      },
    )
  first_dense = hf.get('first_k_dense_replace', 1)
  fields = dict(
    _llama_fields(hf, rope_theta=10000.0),
    use_bias=False,
    **{
      'moe.num_experts': hf.get('n_routed_experts'),
      'moe.top_k': hf.get('num_experts_per_tok'),
      'moe.expert_dim': hf.get('moe_intermediate_size'),
      'moe.score': 'sigmoid',
      'moe.renormalise': hf.get('norm_topk_prob', True),
      'moe.shared_experts': hf.get('n_shared_experts', 1),
      'moe.first_dense': first_dense,
      'moe.every': 1,
    },
  )
  if first_dense:  # The dense layers' width: nothing has it when every layer has experts.
    fields['mlp_dim'] = hf.get('intermediate_size')
  return fields


def _refuse_import(hf: dict[str, Any], arch: str) -> None:
  """ConversionError naming the first setting of an MoE config.json that our model cannot hold."""
  rope = hf.get('rope_parameters') or {}
  # (config.json key, its value, the value ours must have, why)
  checks: list[tuple[str, Any, Any, str]] = [
    ('hidden_act', hf.get('hidden_act', 'silu'), 'silu', 'our experts are SwiGLU'),
    (
      'rope_parameters.rope_type',
      rope.get('rope_type', 'default'),
      'default',
      'our RoPE is unscaled',
    ),
  ]
  if arch == hf_arch.MIXTRAL:
    window = hf.get('sliding_window')
    if window is not None and window < hf.get('max_position_embeddings', 0):
      checks.append(('sliding_window', window, None, 'our attention sees the whole context'))
  else:
    checks += [
      ('use_qk_norm', hf.get('use_qk_norm', False), False, 'the llama flavour has no qk-norm'),
      ('attention_bias', hf.get('attention_bias', False), False, 'our MoE models have no biases'),
      (
        'rope_parameters.partial_rotary_factor',
        rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 0.5)),
        1.0,
        'our RoPE rotates the whole of each head',
      ),
      (
        'routed_scaling_factor',
        hf.get('routed_scaling_factor', 1.0),
        1.0,
        "our router does not scale the experts' weights",
      ),
      (
        'topk_group',
        hf.get('topk_group', 1),
        hf.get('n_group', 1),
        'our router chooses among all experts, not within the best groups (n_group)',
      ),
    ]
  for key, theirs, ours, why in checks:
    if theirs != ours:
      raise hf_arch.ConversionError(f'cannot import {arch} with {key}={theirs!r}: {why}.')


# The config.json key that sets each of our fields, to name it in a mismatch.
_LLAMA_KEYS = dict(
  num_layers='num_hidden_layers',
  num_heads='num_attention_heads',
  num_kv_heads='num_key_value_heads',
  embed_dim='hidden_size',
  max_len='max_position_embeddings',
  norm_eps='rms_norm_eps',
  rope_theta='rope_parameters.rope_theta',
)
_HF_KEY = {
  hf_arch.GPT2: dict(
    num_layers='n_layer',
    num_heads='n_head',
    embed_dim='n_embd',
    mlp_dim='n_inner',
    max_len='n_positions',
    norm_eps='layer_norm_epsilon',
  ),
  hf_arch.LLAMA: dict(_LLAMA_KEYS, mlp_dim='intermediate_size'),
  hf_arch.XLMR: dict(
    num_layers='num_hidden_layers',
    num_heads='num_attention_heads',
    embed_dim='hidden_size',
    mlp_dim='intermediate_size',
    max_len='max_position_embeddings',
    norm_eps='layer_norm_eps',
  ),
  hf_arch.MIXTRAL: dict(
    _LLAMA_KEYS,
    **{
      'moe.num_experts': 'num_local_experts',
      'moe.top_k': 'num_experts_per_tok',
      'moe.expert_dim': 'intermediate_size',
    },
  ),
  hf_arch.GLM4_MOE: dict(
    _LLAMA_KEYS,
    mlp_dim='intermediate_size',
    **{
      'moe.num_experts': 'n_routed_experts',
      'moe.top_k': 'num_experts_per_tok',
      'moe.expert_dim': 'moe_intermediate_size',
      'moe.renormalise': 'norm_topk_prob',
      'moe.shared_experts': 'n_shared_experts',
      'moe.first_dense': 'first_k_dense_replace',
    },
  ),
}
_OUR_KEY = dict(
  flavour='model.flavour',
  attention='objective',
  mlm_head='objective',
  tie_embeddings='model.tie_embeddings',
  num_kv_heads='model.num_kv_heads',
  head_dim='model.head_dim',
  vocab_size='model.vocab_size (or the tokenizer)',
)


def mismatches(m: ModelConfig, hf: dict[str, Any]) -> list[str]:
  """What differs between our model config and a config.json, each named on both sides."""
  arch = hf['architectures'][0]
  fields = model_fields(hf)
  both_moe = bool(m.moe.num_experts and fields['moe.num_experts'])
  out = []
  for field, theirs in fields.items():
    if field.startswith('moe.') and field != 'moe.num_experts' and not both_moe:
      continue  # Routing settings mean nothing where one side has no experts.
    ours = getattr(m.moe, field[4:]) if field.startswith('moe.') else getattr(m, field)
    if ours != theirs and not (isinstance(ours, float) and np.isclose(ours, theirs)):
      ours_named = f'{_OUR_KEY.get(field, "model." + field)}={ours!r}'
      hf_key = {
        'vocab_size': 'vocab_size',
        'tie_embeddings': 'tie_word_embeddings',
        **_HF_KEY[arch],
      }.get(field)
      if hf_key:
        out.append(f'{ours_named} but config.json has {hf_key}={theirs!r}')
      else:  # Implied by the architecture (flavour, attention) or derived (head_dim).
        out.append(f"{ours_named} but config.json's {arch} means {field}={theirs!r}")
  return out
