"""A config.json read back: the fields of our model config it implies, the settings of it that our
model cannot hold (refused with the reason), and every field that differs from a run's config,
named on both sides.
"""

from typing import Any

import numpy as np

from pretrax.config_types import ModelConfig
from pretrax.interop import hf_arch

_DENSE = (hf_arch.GPT2, hf_arch.LLAMA, hf_arch.QWEN3, hf_arch.XLMR)
# Decoders whose layers ours cannot hold, and why: refused on import.
_CANNOT_IMPORT = {
  'Olmo2ForCausalLM': 'it normalises the output of each attention and MLP (post-norm), where '
  "pretrax's blocks normalise their input",
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
  if arch not in _DENSE:
    raise hf_arch.ConversionError(
      f'config.json names architecture {arch!r}; pretrax converts '
      f'{", ".join(_DENSE + hf_arch.MOE)}.'
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
      qk_norm='none',
    )
  if arch == hf_arch.LLAMA:
    return dict(_llama_fields(hf, rope_theta=10000.0), mlp_dim=get('intermediate_size'))
  if arch == hf_arch.QWEN3:
    _refuse_import(hf, arch)
    return dict(
      _llama_fields(hf, rope_theta=10000.0, qk_norm='head'),
      mlp_dim=get('intermediate_size'),
      use_bias=False,
    )
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
    qk_norm='none',
  )


def _llama_fields(hf: dict[str, Any], rope_theta: float, qk_norm: str = 'none') -> dict[str, Any]:
  """The fields of Llama's attention, norms and positions; `rope_theta` when config.json has none
  (each architecture has its own default); `qk_norm`, the architecture's."""

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
    qk_norm=qk_norm,
  )


def _moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """An MoE config.json as our fields (the architecture's defaults where a key is missing)."""
  _refuse_import(hf, arch)
  if arch in (hf_arch.QWEN3_MOE, hf_arch.OLMOE):
    return _qk_norm_moe_fields(hf, arch)
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
    _llama_fields(hf, rope_theta=10000.0, qk_norm='head' if hf.get('use_qk_norm') else 'none'),
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


def _qk_norm_moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """Qwen3-MoE's (q_norm per head) or OLMoE's (over all heads) config.json as our fields: a
  softmax router over all experts, then the top k, renormalised if norm_topk_prob, as ours."""
  router = {
    'moe.top_k': hf.get('num_experts_per_tok', 8),
    'moe.score': 'softmax',
    'moe.renormalise': hf.get('norm_topk_prob', False),
    'moe.shared_experts': 0,
  }
  if arch == hf_arch.OLMOE:
    llama = _llama_fields(hf, rope_theta=10000.0, qk_norm='full')
    return dict(
      llama,
      use_bias=False,
      head_dim=llama['embed_dim'] // llama['num_heads'],  # OLMoE's q_norm spans hidden_size.
      norm_eps=hf.get('rms_norm_eps', 1e-5),
      **router,
      **{
        'moe.num_experts': hf.get('num_experts', 64),
        'moe.expert_dim': hf.get('intermediate_size'),
        'moe.first_dense': 0,
        'moe.every': 1,
      },
    )
  first_dense, every = _qwen3_moe_layers(hf)
  fields = dict(
    _llama_fields(hf, rope_theta=10000.0, qk_norm='head'),
    use_bias=False,
    **router,
    **{
      # transformers writes num_local_experts (an alias); Qwen's checkpoints num_experts.
      'moe.num_experts': hf.get('num_experts', hf.get('num_local_experts', 128)),
      'moe.expert_dim': hf.get('moe_intermediate_size'),
      'moe.first_dense': first_dense,
      'moe.every': every,
    },
  )
  if first_dense or every > 1:  # The dense layers' width, as for GLM.
    fields['mlp_dim'] = hf.get('intermediate_size')
  return fields


def _qwen3_moe_layers(hf: dict[str, Any]) -> tuple[int, int]:
  """(moe.first_dense, moe.every) for Qwen3-MoE's MoE layers (every decoder_sparse_step-th,
  less mlp_only_layers); ConversionError when they are not every `every`-th layer from
  first_dense to the end, as ours."""
  n, step = int(hf.get('num_hidden_layers', 24)), hf.get('decoder_sparse_step', 1)
  dense = sorted(hf.get('mlp_only_layers') or [])
  num_experts = hf.get('num_experts', hf.get('num_local_experts', 128))
  moe = [i for i in range(n) if num_experts and i not in dense and (i + 1) % step == 0]
  if moe:
    first, every = moe[0], (moe[1] - moe[0] if len(moe) > 1 else n - moe[0])
    if moe == list(range(first, n, every)):
      return first, every
  raise hf_arch.ConversionError(
    f'cannot import {hf_arch.QWEN3_MOE} with decoder_sparse_step={step} and mlp_only_layers='
    f'{dense}: its experts are in layers {moe}, and pretrax puts them in every model.moe.every-th '
    'layer from model.moe.first_dense to the last.'
  )


def _refuse_import(hf: dict[str, Any], arch: str) -> None:
  """ConversionError naming the first setting of a config.json (qk-norm or MoE architectures)
  that our model cannot hold."""
  rope = hf.get('rope_parameters') or {}
  window = hf.get('sliding_window') if hf.get('use_sliding_window', True) else None
  # (config.json key, its value, the value ours must have, why)
  checks: list[tuple[str, Any, Any, str]] = [
    ('hidden_act', hf.get('hidden_act', 'silu'), 'silu', 'our MLPs are SwiGLU'),
    (
      'rope_parameters.rope_type',
      rope.get('rope_type', 'default'),
      'default',
      'our RoPE is unscaled',
    ),
    (
      'sliding_window',
      window if window is not None and window < hf.get('max_position_embeddings', 0) else None,
      None,
      'our attention sees the whole context',
    ),
  ]
  if arch != hf_arch.MIXTRAL:
    why = 'model.use_bias would add MLP biases, which it lacks'
    checks.append(('attention_bias', hf.get('attention_bias', False), False, why))
  if arch == hf_arch.OLMOE:
    checks.append(('clip_qkv', hf.get('clip_qkv'), None, 'our queries, keys and values are whole'))
  if arch == hf_arch.GLM4_MOE:
    checks += [
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
  hf_arch.QWEN3: dict(_LLAMA_KEYS, mlp_dim='intermediate_size', head_dim='head_dim'),
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
  hf_arch.QWEN3_MOE: dict(
    _LLAMA_KEYS,
    mlp_dim='intermediate_size',
    head_dim='head_dim',
    **{
      'moe.num_experts': 'num_experts',
      'moe.top_k': 'num_experts_per_tok',
      'moe.expert_dim': 'moe_intermediate_size',
      'moe.renormalise': 'norm_topk_prob',
    },
  ),
  hf_arch.OLMOE: dict(
    _LLAMA_KEYS,
    **{
      'moe.num_experts': 'num_experts',
      'moe.top_k': 'num_experts_per_tok',
      'moe.expert_dim': 'intermediate_size',
      'moe.renormalise': 'norm_topk_prob',
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
  if m.mup_base_width:  # Its multipliers would change what the imported weights compute.
    out.append(
      f'model.mup_base_width={m.mup_base_width} but transformers models have no muP '
      'multipliers (model.mup_base_width=0)'
    )
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
