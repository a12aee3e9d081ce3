"""Tensor maps: one entry per transformers tensor, made from our parameters and split back.

Our RoPE already rotates the two halves of each head, as transformers' Llama does, so q and k need
no permutation (the permutation in Meta-to-HF converters undoes Meta's interleaved pairs). Weights
are stored (in, out) by us and by GPT-2's Conv1D, (out, in) by torch Linear layers.

Biases our model lacks map to no source: export writes them as zeros, which computes the same
function; import requires them to be zero.

Shape letters: V vocab, D embed, N query heads, K kv heads, H head dim, F mlp hidden, P positions.
"""

from collections.abc import Callable
import dataclasses

import numpy as np

from pretrax.config_types import ModelConfig
from pretrax.interop import hf_arch


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One transformers tensor, made from our parameters at `sources` (None: a zero tensor we do not
  have, such as a bias) by `to_hf`, and split back by `from_hf`."""

  name: str
  shape: tuple[int, ...]
  sources: tuple[str | None, ...]
  to_hf: Callable[..., np.ndarray]
  from_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _same(name, shape, source):
  return Tensor(name, shape, (source,), lambda x: x, lambda y: (y,))


def _matrix(name, shape, source, ours_shape, transpose):
  """Ours reshaped to 2-D (and transposed for torch's (out, in) Linear layout)."""

  def to_hf(x):
    y = x.reshape(shape[::-1] if transpose else shape)
    return y.T if transpose else y

  return Tensor(
    name, shape, (source,), to_hf, lambda y: ((y.T if transpose else y).reshape(ours_shape),)
  )


def _bias(name, size, source, ours_shape):
  return Tensor(
    name, (size,), (source,), lambda x: x.reshape(size), lambda y: (y.reshape(ours_shape),)
  )


def tensor_map(m: ModelConfig, arch: str) -> list[Tensor]:
  """Every tensor of the transformers model (tied ones once), in the order they are written."""
  return {hf_arch.GPT2: _gpt2_tensors, hf_arch.LLAMA: _llama_tensors}.get(arch, _roberta_tensors)(m)


def _gpt2_tensors(m: ModelConfig) -> list[Tensor]:
  """GPT2LMHeadModel: fused q/k/v, Conv1D (in, out) weights."""
  V, D, N, H, F, P = m.vocab_size, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim, m.max_len

  def bias(path: str) -> str | None:
    return path if m.use_bias else None

  norm_bias = (lambda path: path) if m.flavour == 'gpt2' and m.use_bias else (lambda path: None)
  out = []
  out += [
    _same('transformer.wte.weight', (V, D), 'embed/embedding'),
    _same('transformer.wpe.weight', (P, D), 'pos_embed'),
  ]
  for i in range(m.num_layers):
    b, h = f'blocks/{i}', f'transformer.h.{i}'
    qkv = (f'{b}/attn/q', f'{b}/attn/k', f'{b}/attn/v')
    qkv_bias = tuple(bias(f'{b}/attn/{x}_bias') for x in 'qkv')
    out += [
      _same(f'{h}.ln_1.weight', (D,), f'{b}/attn_norm/scale'),
      _same(f'{h}.ln_1.bias', (D,), norm_bias(f'{b}/attn_norm/bias')),
      Tensor(
        f'{h}.attn.c_attn.weight',
        (D, 3 * D),
        qkv,
        lambda q, k, v: np.concatenate([x.reshape(D, N * H) for x in (q, k, v)], 1),
        lambda y: tuple(x.reshape(D, N, H) for x in np.split(y, 3, 1)),
      ),
      Tensor(
        f'{h}.attn.c_attn.bias',
        (3 * D,),
        qkv_bias,
        lambda q, k, v: np.concatenate([x.reshape(N * H) for x in (q, k, v)]),
        lambda y: tuple(x.reshape(N, H) for x in np.split(y, 3)),
      ),
      _matrix(f'{h}.attn.c_proj.weight', (N * H, D), f'{b}/attn/o', (N, H, D), False),
      _same(f'{h}.attn.c_proj.bias', (D,), bias(f'{b}/attn/o_bias')),
      _same(f'{h}.ln_2.weight', (D,), f'{b}/mlp_norm/scale'),
      _same(f'{h}.ln_2.bias', (D,), norm_bias(f'{b}/mlp_norm/bias')),
      _same(f'{h}.mlp.c_fc.weight', (D, F), f'{b}/mlp/wi'),
      _same(f'{h}.mlp.c_fc.bias', (F,), bias(f'{b}/mlp/bi')),
      _same(f'{h}.mlp.c_proj.weight', (F, D), f'{b}/mlp/wo'),
      _same(f'{h}.mlp.c_proj.bias', (D,), bias(f'{b}/mlp/bo')),
    ]
  out += [
    _same('transformer.ln_f.weight', (D,), 'final_norm/scale'),
    _same('transformer.ln_f.bias', (D,), norm_bias('final_norm/bias')),
  ]
  if not m.tie_embeddings:
    out.append(_matrix('lm_head.weight', (V, D), 'head', (D, V), True))
  return out


def _llama_tensors(m: ModelConfig) -> list[Tensor]:
  """LlamaForCausalLM: (out, in) weights, separate q/k/v, a gated MLP."""
  V, D, N, K, H, F = (m.vocab_size, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim)
  out = []
  out.append(_same('model.embed_tokens.weight', (V, D), 'embed/embedding'))
  for i in range(m.num_layers):
    b, h = f'blocks/{i}', f'model.layers.{i}'
    out += [
      _same(f'{h}.input_layernorm.weight', (D,), f'{b}/attn_norm/scale'),
      _matrix(f'{h}.self_attn.q_proj.weight', (N * H, D), f'{b}/attn/q', (D, N, H), True),
      _matrix(f'{h}.self_attn.k_proj.weight', (K * H, D), f'{b}/attn/k', (D, K, H), True),
      _matrix(f'{h}.self_attn.v_proj.weight', (K * H, D), f'{b}/attn/v', (D, K, H), True),
      _matrix(f'{h}.self_attn.o_proj.weight', (D, N * H), f'{b}/attn/o', (N, H, D), True),
      _same(f'{h}.post_attention_layernorm.weight', (D,), f'{b}/mlp_norm/scale'),
      _matrix(f'{h}.mlp.gate_proj.weight', (F, D), f'{b}/mlp/wi_gate', (D, F), True),
      _matrix(f'{h}.mlp.up_proj.weight', (F, D), f'{b}/mlp/wi', (D, F), True),
      _matrix(f'{h}.mlp.down_proj.weight', (D, F), f'{b}/mlp/wo', (F, D), True),
    ]
    if m.use_bias:
      out += [
        _bias(f'{h}.self_attn.q_proj.bias', N * H, f'{b}/attn/q_bias', (N, H)),
        _bias(f'{h}.self_attn.k_proj.bias', K * H, f'{b}/attn/k_bias', (K, H)),
        _bias(f'{h}.self_attn.v_proj.bias', K * H, f'{b}/attn/v_bias', (K, H)),
        _same(f'{h}.self_attn.o_proj.bias', (D,), f'{b}/attn/o_bias'),
        _same(f'{h}.mlp.gate_proj.bias', (F,), f'{b}/mlp/bi_gate'),
        _same(f'{h}.mlp.up_proj.bias', (F,), f'{b}/mlp/bi'),
        _same(f'{h}.mlp.down_proj.bias', (D,), f'{b}/mlp/bo'),
      ]
  out.append(_same('model.norm.weight', (D,), 'final_norm/scale'))
  if not m.tie_embeddings:
    out.append(_matrix('lm_head.weight', (V, D), 'head', (D, V), True))
  return out


def _roberta_tensors(m: ModelConfig) -> list[Tensor]:
  """RobertaForMaskedLM: the encoder and its masked-LM head."""
  V, D, N, H, F, P = m.vocab_size, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim, m.max_len

  def bias(path: str) -> str | None:
    return path if m.use_bias else None

  norm_bias = (lambda path: path) if m.flavour == 'gpt2' and m.use_bias else (lambda path: None)
  out = []
  r = 'roberta.embeddings'
  out += [
    _same(f'{r}.word_embeddings.weight', (V, D), 'embed/embedding'),
    Tensor(
      f'{r}.position_embeddings.weight',
      (P + 1, D),
      ('pos_embed',),
      lambda x: np.concatenate([np.zeros_like(x[:1]), x]),
      lambda y: (y[1:],),
    ),
    # Added to every token alike: import folds it into the position table.
    _same(f'{r}.token_type_embeddings.weight', (1, D), None),
  ]
  for i in range(m.num_layers):
    b, h = f'blocks/{i}', f'roberta.encoder.layer.{i}'
    a = f'{h}.attention'
    out += [
      _same(f'{a}.self_attn_layer_norm.weight', (D,), f'{b}/attn_norm/scale'),
      _same(f'{a}.self_attn_layer_norm.bias', (D,), norm_bias(f'{b}/attn_norm/bias')),
      _matrix(f'{a}.self.query.weight', (D, D), f'{b}/attn/q', (D, N, H), True),
      _bias(f'{a}.self.query.bias', D, bias(f'{b}/attn/q_bias'), (N, H)),
      _matrix(f'{a}.self.key.weight', (D, D), f'{b}/attn/k', (D, N, H), True),
      _bias(f'{a}.self.key.bias', D, bias(f'{b}/attn/k_bias'), (N, H)),
      _matrix(f'{a}.self.value.weight', (D, D), f'{b}/attn/v', (D, N, H), True),
      _bias(f'{a}.self.value.bias', D, bias(f'{b}/attn/v_bias'), (N, H)),
      _matrix(f'{a}.output.dense.weight', (D, D), f'{b}/attn/o', (N, H, D), True),
      _same(f'{a}.output.dense.bias', (D,), bias(f'{b}/attn/o_bias')),
      _same(f'{h}.LayerNorm.weight', (D,), f'{b}/mlp_norm/scale'),
      _same(f'{h}.LayerNorm.bias', (D,), norm_bias(f'{b}/mlp_norm/bias')),
      _matrix(f'{h}.intermediate.dense.weight', (F, D), f'{b}/mlp/wi', (D, F), True),
      _same(f'{h}.intermediate.dense.bias', (F,), bias(f'{b}/mlp/bi')),
      _matrix(f'{h}.output.dense.weight', (D, F), f'{b}/mlp/wo', (F, D), True),
      _same(f'{h}.output.dense.bias', (D,), bias(f'{b}/mlp/bo')),
    ]
  out += [
    _same('roberta.encoder.LayerNorm.weight', (D,), 'final_norm/scale'),
    _same('roberta.encoder.LayerNorm.bias', (D,), norm_bias('final_norm/bias')),
    _matrix('lm_head.dense.weight', (D, D), 'mlm_dense', (D, D), True),
    _same('lm_head.dense.bias', (D,), 'mlm_dense_bias'),
    _same('lm_head.layer_norm.weight', (D,), 'mlm_norm/scale'),
    _same('lm_head.layer_norm.bias', (D,), norm_bias('mlm_norm/bias')),
    _same('lm_head.bias', (V,), 'mlm_bias'),
  ]
  if not m.tie_embeddings:
    out += [
      _matrix('lm_head.decoder.weight', (V, D), 'head', (D, V), True),
      _same('lm_head.decoder.bias', (V,), 'mlm_bias'),
    ]
  return out
