"""Which transformers architecture a pretrax model is, and the config.json that export writes.

Each flavour maps to the transformers architecture whose layout is ours, tensor for tensor:

  gpt2 decoder  -> GPT2LMHeadModel          (learned positions, LayerNorm, tanh GELU, fused qkv)
  llama decoder -> LlamaForCausalLM         (RoPE on two halves, RMSNorm, SwiGLU, grouped kv heads)
  llama decoder, qk_norm=head -> Qwen3ForCausalLM (Llama's blocks with a q_norm and k_norm per head)
  gpt2 encoder  -> XLMRobertaXLForMaskedLM  (masked LM: pre-norm BERT with a final norm and BERT's
                                             head; BertForMaskedLM normalises after each residual)
  llama decoder with experts, softmax router -> MixtralForCausalLM
                              and qk_norm=head -> Qwen3MoeForCausalLM (dense layers anywhere)
                              and qk_norm=full -> OlmoeForCausalLM
  llama decoder with experts, sigmoid router -> Glm4MoeForCausalLM (DeepSeek-V3's router, its
                                                 shared experts and dense first layers, with
                                                 Llama's attention; qk_norm=head or none)

A feature the target cannot express (a prefix-LM mask, grouped kv heads in GPT-2, a Llama-flavour
encoder's head, a router the target lacks) is refused with its reason before anything is written.
`hf_fields` reads a config.json back. The lowest of the Hugging Face modules: `hf_fields`,
`hf_tensors`, `hf_export` and `hf_import` build on it.
"""

from typing import Any

from pretrax import config as config_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import ModelConfig

GPT2, LLAMA, XLMR = 'GPT2LMHeadModel', 'LlamaForCausalLM', 'XLMRobertaXLForMaskedLM'
QWEN3 = 'Qwen3ForCausalLM'
MIXTRAL, GLM4_MOE = 'MixtralForCausalLM', 'Glm4MoeForCausalLM'
QWEN3_MOE, OLMOE = 'Qwen3MoeForCausalLM', 'OlmoeForCausalLM'
MOE = (MIXTRAL, GLM4_MOE, QWEN3_MOE, OLMOE)
# The MoE architectures whose router has no bias: ours must be zero to export to them.
NO_ROUTER_BIAS = (MIXTRAL, QWEN3_MOE, OLMOE)


class ConversionError(config_lib.ConfigError):
  """A model, config or directory that cannot be converted; the message says why and what to do."""


def refuse(feature: str, fix: str) -> ConversionError:
  """The error for a model export cannot write: what the target lacks, then what to do."""
  return ConversionError(f'cannot export: {feature}; {fix}')


def architecture(m: ModelConfig) -> str:
  """The transformers architecture with our layout, or ConversionError naming what has none."""
  if m.attention == 'prefix':
    raise refuse(
      'a prefix-LM model attends bidirectionally over its prefix, which no '
      'transformers causal LM can express',
      'export a causal_lm or masked_lm run.',
    )
  if m.mup_base_width:
    raise refuse(
      f'a muP model (model.mup_base_width={m.mup_base_width}) multiplies its attention and tied '
      'output logits by width multipliers that no transformers config holds',
      'export a run trained with model.mup_base_width=0.',
    )
  if m.moe.num_experts:
    return _moe_architecture(m)
  if m.attention == 'bidirectional':
    if m.flavour == 'llama':
      raise refuse(
        'a Llama-flavour encoder has no transformers architecture with its masked-LM '
        'head (EuroBertForMaskedLM has the same blocks but a plain linear head)',
        f'train the encoder with --config.model.flavour=gpt2 to export it as {XLMR}.',
      )
    if not m.mlm_head:
      raise refuse('an encoder without the masked-LM head', 'export a masked_lm run.')
    arch = XLMR
  elif m.flavour == 'gpt2':
    arch = GPT2
  else:
    arch = _llama_architecture(m)
  if arch in (GPT2, XLMR):
    if m.num_kv_heads != m.num_heads:
      raise refuse(
        f'{arch} has no grouped key/value heads (model.num_kv_heads='
        f'{m.num_kv_heads}, num_heads={m.num_heads})',
        'use the llama flavour for grouped-query attention.',
      )
    if m.head_dim * m.num_heads != m.embed_dim:
      raise refuse(
        f'{arch} needs head_dim * num_heads == embed_dim (model.head_dim={m.head_dim})',
        'leave model.head_dim at 0.',
      )
  return arch


def _llama_architecture(m: ModelConfig) -> str:
  """Llama, or Qwen3 for per-head qk-norm; ConversionError for what neither holds."""
  if m.qk_norm == 'full':
    raise refuse(
      'model.qk_norm=full in a dense model: Olmo2ForCausalLM normalises the whole projection '
      'but after each attention and MLP (post-norm), where pretrax normalises before',
      f'train with model.qk_norm=head (exported as Qwen3ForCausalLM), or with experts ({OLMOE}).',
    )
  if m.qk_norm == 'head' and m.use_bias:
    raise refuse(
      f'model.use_bias=True with model.qk_norm=head: {QWEN3} has no MLP biases',
      'train with model.use_bias=false.',
    )
  return QWEN3 if m.qk_norm == 'head' else LLAMA


def _moe_target(m: ModelConfig) -> str:
  """The MoE architecture with our router and our qk-norm."""
  if m.moe.score == 'sigmoid':
    return GLM4_MOE
  return {'head': QWEN3_MOE, 'full': OLMOE}.get(m.qk_norm, MIXTRAL)


def _moe_architecture(m: ModelConfig) -> str:
  """`_moe_target`'s architecture; ConversionError naming what it has no place for."""
  moe, arch = m.moe, _moe_target(m)
  problems = [
    (
      m.attention == 'bidirectional',
      'a Mixture-of-Experts encoder: no transformers masked LM has experts',
      'export a causal_lm run.',
    ),
    (
      m.flavour != 'llama',
      "GELU experts (the gpt2 flavour): transformers' MoE decoders have SwiGLU experts",
      'train with --config.model.flavour=llama.',
    ),
    (m.use_bias, f'model.use_bias=True: {arch} has no biases', 'train with model.use_bias=false.'),
    (
      moe.every != 1 and arch != QWEN3_MOE,
      f'model.moe.every={moe.every}: {arch} has experts in every layer'
      + (' after the first first_k_dense_replace' if arch == GLM4_MOE else ''),
      f'train with model.moe.every=1, or a softmax router with model.qk_norm=head ({QWEN3_MOE}).',
    ),
    (
      moe.first_dense != 0 and arch in (MIXTRAL, OLMOE),
      f'model.moe.first_dense={moe.first_dense}: {arch} has experts in every layer',
      f'train with model.moe.first_dense=0, model.qk_norm=head ({QWEN3_MOE}) or '
      f'model.moe.score=sigmoid ({GLM4_MOE}).',
    ),
    (
      moe.shared_experts != 0 and arch != GLM4_MOE,
      f'model.moe.shared_experts={moe.shared_experts}: {arch} has no shared expert '
      "(Qwen2MoeForCausalLM's is scaled by a sigmoid gate that pretrax's lack)",
      f'train with model.moe.shared_experts=0, or with model.moe.score=sigmoid ({GLM4_MOE}).',
    ),
    (
      not moe.renormalise and arch == MIXTRAL,
      f"model.moe.renormalise=False: {MIXTRAL} renormalises the chosen experts' weights",
      f'train with model.moe.renormalise=true, with model.qk_norm=head ({QWEN3_MOE}) or full '
      f'({OLMOE}), or with model.moe.score=sigmoid ({GLM4_MOE}).',
    ),
    (
      m.qk_norm == 'full' and arch == GLM4_MOE,
      f"model.qk_norm=full with a sigmoid router: {GLM4_MOE}'s qk-norm is per head",
      'train with model.qk_norm=head or none.',
    ),
    (
      arch == OLMOE and m.head_dim * m.num_heads != m.embed_dim,
      f'model.head_dim={m.head_dim}: {OLMOE} needs head_dim * num_heads == embed_dim',
      'leave model.head_dim at 0.',
    ),
  ]
  for bad, feature, fix in problems:
    if bad:
      raise refuse(feature, fix)
  return arch


def _llama_config(m: ModelConfig) -> dict[str, Any]:
  """The config.json keys of Llama's attention, norms and positions, which every llama-flavour
  target shares."""
  return dict(
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    num_key_value_heads=m.num_kv_heads,
    hidden_size=m.embed_dim,
    head_dim=m.head_dim,
    max_position_embeddings=m.max_len,
    rms_norm_eps=m.norm_eps,
    hidden_act='silu',
    rope_parameters={'rope_type': 'default', 'rope_theta': m.rope_theta},
    attention_dropout=0.0,
  )


def hf_config(m: ModelConfig, arch: str, dtype: str) -> dict[str, Any]:
  """config.json for `arch`, from our frozen model config."""
  common = dict(
    architectures=[arch],
    vocab_size=m.vocab_size,
    tie_word_embeddings=m.tie_embeddings,
    pad_token_id=tokenizer_lib.PAD_ID,
    bos_token_id=tokenizer_lib.BOS_ID,
    eos_token_id=tokenizer_lib.EOS_ID,
    dtype=dtype,
  )
  if arch == GPT2:
    return dict(
      common,
      model_type='gpt2',
      n_layer=m.num_layers,
      n_head=m.num_heads,
      n_embd=m.embed_dim,
      n_inner=m.mlp_dim,
      n_positions=m.max_len,
      activation_function='gelu_new',
      layer_norm_epsilon=m.norm_eps,
      resid_pdrop=m.dropout,
      embd_pdrop=m.dropout,
      attn_pdrop=0.0,
      scale_attn_weights=True,
    )
  if arch == LLAMA:
    return dict(
      common,
      model_type='llama',
      **_llama_config(m),
      intermediate_size=m.mlp_dim,
      attention_bias=m.use_bias,
      mlp_bias=m.use_bias,
    )
  if arch == QWEN3:
    return dict(
      common,
      model_type='qwen3',
      **_llama_config(m),
      intermediate_size=m.mlp_dim,
      attention_bias=False,
      use_sliding_window=False,
      sliding_window=None,
    )
  if arch in MOE:
    return _moe_config(m, arch, common)
  return dict(
    common,
    model_type='xlm-roberta-xl',
    num_hidden_layers=m.num_layers,
    num_attention_heads=m.num_heads,
    hidden_size=m.embed_dim,
    intermediate_size=m.mlp_dim,
    hidden_act='gelu_new',
    layer_norm_eps=m.norm_eps,
    # RoBERTa numbers positions from pad_token_id + 1: our position p is its row p + 1.
    max_position_embeddings=m.max_len + 1,
    type_vocab_size=1,
    position_embedding_type='absolute',
    hidden_dropout_prob=m.dropout,
    attention_probs_dropout_prob=0.0,
    is_decoder=False,
  )


def _moe_config(m: ModelConfig, arch: str, common: dict[str, Any]) -> dict[str, Any]:
  """config.json for an MoE architecture: Llama's keys and the router's."""
  moe = m.moe
  if arch in (QWEN3_MOE, OLMOE):
    return _qk_norm_moe_config(m, arch, common)
  if arch == MIXTRAL:
    return dict(
      common,
      model_type='mixtral',
      **_llama_config(m),
      intermediate_size=moe.expert_dim,
      num_local_experts=moe.num_experts,
      num_experts_per_tok=moe.top_k,
      sliding_window=None,
      router_aux_loss_coef=moe.balance_loss,
      router_jitter_noise=0.0,
    )
  llama = _llama_config(m)
  # GLM's default rotates half of each head; ours rotates all of it.
  llama['rope_parameters']['partial_rotary_factor'] = 1.0
  return dict(
    common,
    model_type='glm4_moe',
    **llama,
    intermediate_size=m.mlp_dim,
    moe_intermediate_size=moe.expert_dim,
    n_routed_experts=moe.num_experts,
    num_experts_per_tok=moe.top_k,
    n_shared_experts=moe.shared_experts,
    first_k_dense_replace=moe.first_dense,
    norm_topk_prob=moe.renormalise,
    # One group of experts and no scaling: DeepSeek-V3's router as ours.
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    use_qk_norm=m.qk_norm == 'head',
    attention_bias=False,
    num_nextn_predict_layers=0,
  )


def _qk_norm_moe_config(m: ModelConfig, arch: str, common: dict[str, Any]) -> dict[str, Any]:
  """config.json for Qwen3-MoE or OLMoE: softmax routers, qk-norm per head or over all heads."""
  moe = m.moe
  router = dict(
    num_experts=moe.num_experts,
    num_experts_per_tok=moe.top_k,
    norm_topk_prob=moe.renormalise,
    router_aux_loss_coef=moe.balance_loss,
    attention_bias=False,
  )
  llama = _llama_config(m)
  if arch == OLMOE:
    del llama['head_dim']  # OLMoE derives it (hidden_size // num_attention_heads).
    return dict(
      common, model_type='olmoe', **llama, **router, intermediate_size=moe.expert_dim, clip_qkv=None
    )
  return dict(
    common,
    model_type='qwen3_moe',
    **llama,
    **router,
    intermediate_size=m.mlp_dim,
    moe_intermediate_size=moe.expert_dim,
    # Every layer may have experts; those that do not are listed: any first_dense and every.
    decoder_sparse_step=1,
    mlp_only_layers=[i for i in range(m.num_layers) if not moe.is_moe(i)],
    use_sliding_window=False,
    sliding_window=None,
  )
