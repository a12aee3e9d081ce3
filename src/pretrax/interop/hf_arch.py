"""Which transformers architecture a pretrax model is, and the config.json that export writes.

Each flavour maps to the transformers architecture whose layout is ours, tensor for tensor:

  gpt2 decoder  -> GPT2LMHeadModel          (learned positions, LayerNorm, tanh GELU, fused qkv)
  llama decoder -> LlamaForCausalLM         (RoPE on two halves, RMSNorm, SwiGLU, grouped kv heads)
  gpt2 encoder  -> XLMRobertaXLForMaskedLM  (masked LM: pre-norm BERT with a final norm and BERT's
                                             head; BertForMaskedLM normalises after each residual)
  llama decoder with experts, softmax router -> MixtralForCausalLM
  llama decoder with experts, sigmoid router -> Glm4MoeForCausalLM (DeepSeek-V3's router, its
                                                 shared experts and dense first layers, with
                                                 Llama's attention)

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
MIXTRAL, GLM4_MOE = 'MixtralForCausalLM', 'Glm4MoeForCausalLM'
MOE = (MIXTRAL, GLM4_MOE)


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
  else:
    arch = GPT2 if m.flavour == 'gpt2' else LLAMA
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


def _moe_architecture(m: ModelConfig) -> str:
  """Mixtral for a softmax router, GLM-4.5's MoE for a sigmoid one; ConversionError naming what
  the target has no place for."""
  moe = m.moe
  arch = GLM4_MOE if moe.score == 'sigmoid' else MIXTRAL
  sigmoid = f'or train with model.moe.score=sigmoid, exported as {GLM4_MOE}'
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
      moe.every != 1,
      f'model.moe.every={moe.every}: {arch} has experts in every layer'
      + (' after the first first_k_dense_replace' if arch == GLM4_MOE else ''),
      'train with model.moe.every=1.',
    ),
  ]
  if arch == MIXTRAL:
    problems += [
      (
        moe.first_dense != 0,
        f'model.moe.first_dense={moe.first_dense}: {MIXTRAL} has experts in every layer',
        f'train with model.moe.first_dense=0, {sigmoid}.',
      ),
      (
        moe.shared_experts != 0,
        f'model.moe.shared_experts={moe.shared_experts}: {MIXTRAL} has no shared expert '
        "(Qwen2MoeForCausalLM's is scaled by a sigmoid gate that pretrax's lack)",
        f'train with model.moe.shared_experts=0, {sigmoid}.',
      ),
      (
        not moe.renormalise,
        f"model.moe.renormalise=False: {MIXTRAL} renormalises the chosen experts' weights "
        '(Qwen3-MoE and OLMoE need not, but normalise queries and keys, which pretrax does not)',
        f'train with model.moe.renormalise=true, {sigmoid}.',
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
  """config.json for Mixtral or GLM-4.5's MoE: Llama's keys and the router's."""
  moe = m.moe
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
    use_qk_norm=False,
    attention_bias=False,
    num_nextn_predict_layers=0,
  )
