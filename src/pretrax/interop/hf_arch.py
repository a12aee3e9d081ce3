"""Which transformers architecture a pretrax model is, and its config.json both ways.

Each flavour maps to the transformers architecture whose layout is ours, tensor for tensor:

  gpt2 decoder  -> GPT2LMHeadModel          (learned positions, LayerNorm, tanh GELU, fused qkv)
  llama decoder -> LlamaForCausalLM         (RoPE on two halves, RMSNorm, SwiGLU, grouped kv heads)
  gpt2 encoder  -> XLMRobertaXLForMaskedLM  (masked LM: pre-norm BERT with a final norm and BERT's
                                             head; BertForMaskedLM normalises after each residual)

A feature the target cannot express (a prefix-LM mask, grouped kv heads in GPT-2, a Llama-flavour
encoder's head) is refused with its reason before anything is written. On import, a config.json is
read back into our model config's fields and every field that differs from the run's is named on
both sides. The lowest of the Hugging Face modules: `hf_tensors`, `hf_export` and `hf_import`
build on it.
"""

from typing import Any

import numpy as np

from pretrax import config as config_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import ModelConfig

GPT2, LLAMA, XLMR = 'GPT2LMHeadModel', 'LlamaForCausalLM', 'XLMRobertaXLForMaskedLM'


class ConversionError(config_lib.ConfigError):
  """A model, config or directory that cannot be converted; the message says why and what to do."""


def architecture(m: ModelConfig) -> str:
  """The transformers architecture with our layout, or ConversionError naming what has none."""

  def refuse(feature: str, fix: str) -> ConversionError:
    return ConversionError(f'cannot export: {feature}; {fix}')

  if m.attention == 'prefix':
    raise refuse(
      'a prefix-LM model attends bidirectionally over its prefix, which no '
      'transformers causal LM can express',
      'export a causal_lm or masked_lm run.',
    )
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
      num_hidden_layers=m.num_layers,
      num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads,
      hidden_size=m.embed_dim,
      head_dim=m.head_dim,
      intermediate_size=m.mlp_dim,
      max_position_embeddings=m.max_len,
      rms_norm_eps=m.norm_eps,
      hidden_act='silu',
      rope_parameters={'rope_type': 'default', 'rope_theta': m.rope_theta},
      attention_bias=m.use_bias,
      mlp_bias=m.use_bias,
      attention_dropout=0.0,
    )
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


def model_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """Our model config's fields (by `ModelConfig` name) implied by a config.json."""
  arch = (hf.get('architectures') or [None])[0]

  def get(key: str, default: Any = None) -> Any:
    return hf.get(key, default)

  if arch == GPT2:
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
  if arch == LLAMA:
    rope = get('rope_parameters') or {}
    return dict(
      flavour='llama',
      attention='causal',
      vocab_size=get('vocab_size'),
      num_layers=get('num_hidden_layers'),
      num_heads=get('num_attention_heads'),
      num_kv_heads=get('num_key_value_heads') or get('num_attention_heads'),
      embed_dim=get('hidden_size'),
      head_dim=get('head_dim') or get('hidden_size') // get('num_attention_heads'),
      mlp_dim=get('intermediate_size'),
      max_len=get('max_position_embeddings'),
      norm_eps=get('rms_norm_eps', 1e-6),
      rope_theta=rope.get('rope_theta', get('rope_theta', 10000.0)),
      tie_embeddings=get('tie_word_embeddings', False),
    )
  if arch == XLMR:
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
  raise ConversionError(
    f'config.json names architecture {arch!r}; pretrax converts {GPT2}, {LLAMA} and {XLMR}.'
  )


# The config.json key that sets each of our fields, to name it in a mismatch.
_HF_KEY = {
  GPT2: dict(
    num_layers='n_layer',
    num_heads='n_head',
    embed_dim='n_embd',
    mlp_dim='n_inner',
    max_len='n_positions',
    norm_eps='layer_norm_epsilon',
  ),
  LLAMA: dict(
    num_layers='num_hidden_layers',
    num_heads='num_attention_heads',
    num_kv_heads='num_key_value_heads',
    embed_dim='hidden_size',
    mlp_dim='intermediate_size',
    max_len='max_position_embeddings',
    norm_eps='rms_norm_eps',
    rope_theta='rope_parameters.rope_theta',
  ),
  XLMR: dict(
    num_layers='num_hidden_layers',
    num_heads='num_attention_heads',
    embed_dim='hidden_size',
    mlp_dim='intermediate_size',
    max_len='max_position_embeddings',
    norm_eps='layer_norm_eps',
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
  out = []
  for field, theirs in model_fields(hf).items():
    ours = getattr(m, field)
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
