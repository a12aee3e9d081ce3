"""Tensor maps: one entry per transformers tensor, made from our parameters and split back.

Our RoPE already rotates the two halves of each head, as transformers' Llama does, so q and k need
no permutation (the permutation in Meta-to-HF converters undoes Meta's interleaved pairs). Weights
are stored (in, out) by us and by GPT-2's Conv1D, (out, in) by torch Linear layers.

Biases our model lacks map to no source: export writes them as zeros, which computes the same
function; import requires them to be zero.

Experts: transformers holds them fused in memory (gate_up_proj (E, 2F, D), down_proj (E, D, F))
but saves one tensor per expert per weight, the layout every version and other loaders read;
export writes that layout and import reads either.

Shape letters: V vocab, D embed, N query heads, K kv heads, H head dim, F mlp hidden, P positions,
E experts.
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
  expert: int | None = None  # One expert's slice (axis 0) of its source: import stacks them.


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


def tensor_map(m: ModelConfig, arch: str, fused: bool = False) -> list[Tensor]:
  """Every tensor of the transformers model (tied ones once), in the order they are written;
  `fused`: its experts as transformers holds them in memory (see the module docstring)."""
  if arch in hf_arch.MOE:
    return _moe_tensors(m, arch, fused)
  if arch in (hf_arch.LLAMA, hf_arch.QWEN3):
    return _llama_tensors(m)
  return {hf_arch.GPT2: _gpt2_tensors}.get(arch, _roberta_tensors)(m)


def zero_params(m: ModelConfig, arch: str) -> dict[str, tuple[int, ...]]:
  """Our parameters (path: shape) that `arch` has no tensor for, so are zero in a model it holds:
  only GLM's routers have a bias. Import sets them to zero; export refuses them unless zero."""
  if arch not in hf_arch.NO_ROUTER_BIAS:
    return {}
  layers = [i for i in range(m.num_layers) if m.moe.is_moe(i)]
  return {f'blocks/{i}/mlp/router_bias': (m.moe.num_experts,) for i in layers}


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
    out += _llama_attention(m, b, h) + _swiglu(f'{h}.mlp', f'{b}/mlp', D, F)
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
  return out + _llama_output(m)


def _llama_attention(m: ModelConfig, b: str, h: str) -> list[Tensor]:
  """Block `b`'s norms and attention weights as Llama's layer `h` names them (no biases), and
  Qwen3's or OLMoE's q_norm and k_norm (one scale per head's dims, or over all heads)."""
  D, N, K, H = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
  out = [
    _same(f'{h}.input_layernorm.weight', (D,), f'{b}/attn_norm/scale'),
    _matrix(f'{h}.self_attn.q_proj.weight', (N * H, D), f'{b}/attn/q', (D, N, H), True),
    _matrix(f'{h}.self_attn.k_proj.weight', (K * H, D), f'{b}/attn/k', (D, K, H), True),
    _matrix(f'{h}.self_attn.v_proj.weight', (K * H, D), f'{b}/attn/v', (D, K, H), True),
    _matrix(f'{h}.self_attn.o_proj.weight', (D, N * H), f'{b}/attn/o', (N, H, D), True),
    _same(f'{h}.post_attention_layernorm.weight', (D,), f'{b}/mlp_norm/scale'),
  ]
  if m.qk_norm in ('head', 'full'):
    q, k = (N * H, K * H) if m.qk_norm == 'full' else (H, H)
    out += [
      _same(f'{h}.self_attn.q_norm.weight', (q,), f'{b}/attn/q_norm/scale'),
      _same(f'{h}.self_attn.k_norm.weight', (k,), f'{b}/attn/k_norm/scale'),
    ]
  return out


def _swiglu(hf: str, ours: str | None, D: int, F: int) -> list[Tensor]:
  """A SwiGLU MLP's weights (`ours` None: one the model does not have, written as zeros)."""

  def at(name: str) -> str | None:
    return None if ours is None else f'{ours}/{name}'

  return [
    _matrix(f'{hf}.gate_proj.weight', (F, D), at('wi_gate'), (D, F), True),
    _matrix(f'{hf}.up_proj.weight', (F, D), at('wi'), (D, F), True),
    _matrix(f'{hf}.down_proj.weight', (D, F), at('wo'), (F, D), True),
  ]


def _llama_output(m: ModelConfig) -> list[Tensor]:
  V, D = m.vocab_size, m.embed_dim
  out = [_same('model.norm.weight', (D,), 'final_norm/scale')]
  if not m.tie_embeddings:
    out.append(_matrix('lm_head.weight', (V, D), 'head', (D, V), True))
  return out


# Each MoE architecture's names for an expert's gate, up and down projections, on disk.
_EXPERT_NAMES = {
  hf_arch.MIXTRAL: ('w1', 'w3', 'w2'),
  hf_arch.GLM4_MOE: ('gate_proj', 'up_proj', 'down_proj'),
  hf_arch.QWEN3_MOE: ('gate_proj', 'up_proj', 'down_proj'),
  hf_arch.OLMOE: ('gate_proj', 'up_proj', 'down_proj'),
}


def _moe_tensors(m: ModelConfig, arch: str, fused: bool) -> list[Tensor]:
  """Mixtral, GLM-4.5's MoE, Qwen3-MoE, OLMoE: Llama's attention (with a qk-norm); a router (E, D)
  and experts in each MoE layer, a dense MLP in the others; GLM's router bias and shared experts."""
  V, D, E = m.vocab_size, m.embed_dim, m.moe.num_experts
  F, shared = m.moe.expert_dim, m.moe.shared_experts
  glm = arch == hf_arch.GLM4_MOE
  out = [_same('model.embed_tokens.weight', (V, D), 'embed/embedding')]
  for i in range(m.num_layers):
    b, h = f'blocks/{i}', f'model.layers.{i}'
    out += _llama_attention(m, b, h)
    if not m.moe.is_moe(i):
      out += _swiglu(f'{h}.mlp', f'{b}/mlp', D, m.mlp_dim)
      continue
    # Mixtral's checkpoints keep its first name for the layer; transformers renames it on load.
    moe = f'{h}.block_sparse_moe' if arch == hf_arch.MIXTRAL and not fused else f'{h}.mlp'
    out.append(_matrix(f'{moe}.gate.weight', (E, D), f'{b}/mlp/router', (D, E), True))
    if glm:  # DeepSeek-V3's bias: it chooses experts, never weighs them, as ours.
      out.append(_same(f'{moe}.gate.e_score_correction_bias', (E,), f'{b}/mlp/router_bias'))
    out += _fused_experts(moe, f'{b}/mlp', E, D, F) if fused else _experts(arch, moe, b, E, D, F)
    if glm:  # Always there: zero-width when the model has no shared experts.
      out += _swiglu(f'{moe}.shared_experts', f'{b}/mlp/shared' if shared else None, D, F * shared)
  return out + _llama_output(m)


def _experts(arch: str, moe: str, b: str, E: int, D: int, F: int) -> list[Tensor]:
  """One (out, in) tensor per expert per weight; weight by weight, so that export reads each of
  our (E, ...) parameters once for all its experts."""

  def expert(name: str, shape: tuple[int, ...], source: str, j: int) -> Tensor:
    return Tensor(name, shape, (source,), lambda x: x[j].T, lambda y: (y.T,), expert=j)

  gate, up, down = _EXPERT_NAMES[arch]
  out = []
  for hf_name, ours, shape in ((gate, 'wi_gate', (F, D)), (up, 'wi', (F, D)), (down, 'wo', (D, F))):
    out += [
      expert(f'{moe}.experts.{j}.{hf_name}.weight', shape, f'{b}/mlp/{ours}', j) for j in range(E)
    ]
  return out


def _fused_experts(moe: str, mlp: str, E: int, D: int, F: int) -> list[Tensor]:
  """transformers' in-memory layout (`save_pretrained(save_original_format=False)` writes it):
  gate and up concatenated in that order, (out, in) per expert."""
  return [
    Tensor(
      f'{moe}.experts.gate_up_proj',
      (E, 2 * F, D),
      (f'{mlp}/wi_gate', f'{mlp}/wi'),
      lambda gate, up: np.concatenate([gate, up], axis=2).transpose(0, 2, 1),
      lambda y: tuple(np.split(y.transpose(0, 2, 1), 2, axis=2)),
    ),
    Tensor(
      f'{moe}.experts.down_proj',
      (E, D, F),
      (f'{mlp}/wo',),
      lambda wo: wo.transpose(0, 2, 1),
      lambda y: (y.transpose(0, 2, 1),),
    ),
  ]


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
