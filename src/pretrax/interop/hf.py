"""Hugging Face export and import: pretrax checkpoints <-> transformers model directories.

Each flavour maps to the transformers architecture whose layout is ours, tensor for tensor:

  gpt2 decoder  -> GPT2LMHeadModel          (learned positions, LayerNorm, tanh GELU, fused qkv)
  llama decoder -> LlamaForCausalLM         (RoPE on two halves, RMSNorm, SwiGLU, grouped kv heads)
  gpt2 encoder  -> XLMRobertaXLForMaskedLM  (masked LM: pre-norm BERT with a final norm and BERT's
                                             head; BertForMaskedLM normalises after each residual)

Our RoPE already rotates the two halves of each head, as transformers' Llama does, so q and k need
no permutation (the permutation in Meta-to-HF converters undoes Meta's interleaved pairs). Weights
are stored (in, out) by us and by GPT-2's Conv1D, (out, in) by torch Linear layers.

A feature the target cannot express (a prefix-LM mask, grouped kv heads in GPT-2, a Llama-flavour
encoder's head) is refused with its reason before anything is written. Biases our model lacks are
written as zeros, which computes the same function; on import such a tensor must be zero.

Shape letters: V vocab, D embed, N query heads, K kv heads, H head dim, F mlp hidden, P positions.
"""

from collections.abc import Callable
import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np

from pretrax import checkpoint, paths
from pretrax import config as config_lib
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.interop import hf_tokenizer, safetensors

GPT2, LLAMA, XLMR = 'GPT2LMHeadModel', 'LlamaForCausalLM', 'XLMRobertaXLForMaskedLM'
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}


class ConversionError(config_lib.ConfigError):
  """A model, config or directory that cannot be converted; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Which architecture, and its config.json.


def architecture(m: config_lib.ModelConfig) -> str:
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


def hf_config(m: config_lib.ModelConfig, arch: str, dtype: str) -> dict[str, Any]:
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
  """Our model config's fields (by `pretrax.config.ModelConfig` name) implied by a config.json."""
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


def mismatches(m: config_lib.ModelConfig, hf: dict[str, Any]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Tensor maps: one entry per transformers tensor, from and to our parameters.


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


def tensor_map(m: config_lib.ModelConfig, arch: str) -> list[Tensor]:
  """Every tensor of the transformers model (tied ones once), in the order they are written."""
  return {GPT2: _gpt2_tensors, LLAMA: _llama_tensors}.get(arch, _roberta_tensors)(m)


def _gpt2_tensors(m: config_lib.ModelConfig) -> list[Tensor]:
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


def _llama_tensors(m: config_lib.ModelConfig) -> list[Tensor]:
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


def _roberta_tensors(m: config_lib.ModelConfig) -> list[Tensor]:
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


# ---------------------------------------------------------------------------------------------
# Export: a checkpoint's parameters, read one at a time.


def _bit_sum(x: np.ndarray) -> int:
  """checkpoint.fingerprint's sum for one array, on the host."""
  width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  return int(np.sum(np.ascontiguousarray(x).view(width), dtype=np.uint64) % 2**32)


class CheckpointParams:
  """The parameters of one saved train state, each restored on its own (as a host array) and
  checked against the fingerprint taken when it was saved; nothing else is loaded."""

  def __init__(self, state_dir: str, bit_sums: list[int]):
    self._dir = state_dir
    self._checkpointer = checkpoint.ocp.PyTreeCheckpointer()
    try:
      tree = self._checkpointer.metadata(state_dir).item_metadata.tree
    except Exception as e:  # Missing or garbled metadata: Orbax raises many kinds.
      raise checkpoint.CheckpointError(
        f'{state_dir} is damaged: its metadata is unreadable ({type(e).__name__}).'
      ) from None
    # The fingerprint lists every array of the state in jax.tree order: params come after the
    # keys that sort before 'params'.
    offset = sum(len(jax.tree.leaves(tree[k])) for k in sorted(tree) if k < 'params')
    if len(jax.tree.leaves(tree)) != len(bit_sums):
      raise checkpoint.CheckpointError(
        f'{state_dir} does not match its fingerprint: the checkpoint is damaged.'
      )
    self._leaves = {}
    for i, (keypath, meta) in enumerate(jax.tree_util.tree_flatten_with_path(tree['params'])[0]):
      keys = tuple(getattr(k, 'key', k) for k in keypath)
      self._leaves[state_lib.param_path(keypath)] = (keys, meta, bit_sums[offset + i])

  def shape(self, path: str) -> tuple[int, ...]:
    return tuple(self._leaves[path][1].shape)

  def paths(self) -> list[str]:
    return list(self._leaves)

  def read(self, path: str) -> np.ndarray:
    keys, _, expected = self._leaves[path]
    # The same nesting as the saved tree, down to this one leaf.
    item: dict[str, Any] | None = None
    restore_args: dict[str, Any] | None = None
    for key in reversed(keys):
      item = {key: 0 if item is None else item}
      restore_args = {
        key: checkpoint.ocp.RestoreArgs(restore_type=np.ndarray)
        if restore_args is None
        else restore_args
      }
    try:
      restored = self._checkpointer.restore(
        self._dir,
        args=checkpoint.ocp.args.PyTreeRestore(
          item={'params': item}, restore_args={'params': restore_args}, partial_restore=True
        ),
      )
    except Exception as e:  # TensorStore raises many kinds; all mean "unreadable".
      raise checkpoint.CheckpointError(
        f'{self._dir}: parameter {path} is unreadable '
        f'({type(e).__name__}); the checkpoint is damaged.'
      ) from None
    array = restored['params']
    for key in keys:
      array = array[key]
    if _bit_sum(array) != expected:
      raise checkpoint.CheckpointError(
        f'{self._dir}: parameter {path} differs from what was saved; the checkpoint is damaged.'
      )
    return array


def _tokenizer_path(c: ml_collections.ConfigDict, workdir: str) -> str:
  candidates = [paths.join(workdir, hf_tokenizer.SENTENCEPIECE_FILE)]
  if c.data.get('prepared'):  # A store keeps its tokenizer (a mixture's, in one of its sources).
    candidates += [os.path.join(c.data.prepared, hf_tokenizer.SENTENCEPIECE_FILE)]
  candidates.append(c.tokenizer.path)
  for path in candidates:
    if path and paths.path(path).exists():
      return path
  raise FileNotFoundError(
    f'no tokenizer for the run in {workdir} (looked for {", ".join(p for p in candidates if p)}).'
  )


def export(
  workdir: str,
  out_dir: str,
  *,
  step: int | None = None,
  dtype: str = 'float32',
  max_shard_bytes: int = 5 << 30,
  log: Callable[[str], None] = print,
) -> str:
  """Writes the run's checkpoint (the latest, or `step`) as a transformers model directory with
  its tokenizer. The directory appears whole or not at all. Returns the architecture."""
  if dtype not in DTYPES:
    raise ConversionError(f'--dtype={dtype} is not one of {", ".join(DTYPES)}.')
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise ConversionError(f'{out_dir} is not empty: export into a new --out directory.')
  if not paths.path(checkpoint.directory(workdir)).exists():
    raise FileNotFoundError(
      f'no checkpoints in {workdir}: train there first with `pretrax train --workdir=...`.'
    )
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(
        f'no checkpoint at step {step} in {checkpoint.directory(workdir)}; '
        f'it has steps {sorted(mngr.all_steps())}.'
      )
    saved = mngr.restore(
      step,
      args=checkpoint.ocp.args.Composite(
        config=checkpoint.ocp.args.JsonRestore(), fingerprint=checkpoint.ocp.args.JsonRestore()
      ),
    )
  finally:
    mngr.close()
  c = ml_collections.ConfigDict(saved['config'])
  if c.objective == 'classification':
    raise ConversionError(
      f'{workdir} is a classifier: no transformers model has its head (the '
      'mean of the states, then a pooler): export the run it started from.'
    )
  params = CheckpointParams(
    paths.join(checkpoint.directory(workdir), str(step), 'state'), saved['fingerprint']['bit_sums']
  )
  m = config_lib.model_config(c, params.shape('embed/embedding')[0])
  arch = architecture(m)
  tokenizer_path = _tokenizer_path(c, workdir)
  target = np.dtype(DTYPES[dtype])

  def compute(t: Tensor) -> np.ndarray:
    # A tensor's sources are all ours or all None (a bias the model does not have): no mix.
    sources = [s for s in t.sources if s is not None]
    if not sources:
      return np.zeros(t.shape, target)
    return t.to_hf(*(params.read(s).astype(np.float32) for s in sources)).astype(target)

  specs = [
    safetensors.TensorSpec(t.name, t.shape, target, functools.partial(compute, t))
    for t in tensor_map(m, arch)
  ]
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(parent, f'.{os.path.basename(os.path.abspath(out_dir))}.partial')
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    files = safetensors.write(partial, specs, max_shard_bytes=max_shard_bytes)
    with open(os.path.join(partial, 'config.json'), 'w') as f:
      json.dump(hf_config(m, arch, dtype), f, indent=2)
    files += hf_tokenizer.save(
      paths.path(tokenizer_path).read_bytes(), partial, model_max_length=m.max_len
    )
    with open(os.path.join(partial, 'pretrax.json'), 'w') as f:
      json.dump(
        {'workdir': str(paths.path(workdir)), 'step': step, 'config': saved['config']}, f, indent=2
      )
    if os.path.exists(out_dir):
      os.rmdir(out_dir)  # Empty, checked above.
    os.rename(partial, out_dir)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  size = sum(s.nbytes for s in specs)
  log(
    f'exported step {step} of {workdir} as {arch} ({size / 2**20:.1f} MiB of {dtype} weights, '
    f'{len(specs)} tensors) to {out_dir}: ' + ', '.join(['config.json'] + files)
  )
  return arch


# ---------------------------------------------------------------------------------------------
# Import: a transformers directory as a step-0 checkpoint that `pretrax train` continues.


def _zero_or_refuse(name: str, y: np.ndarray, hf_dir: str) -> None:
  if np.any(y != 0):
    raise ConversionError(
      f'{hf_dir}: tensor {name} is not zero, and the configured model has no '
      'such parameter: set --config.model.use_bias=true.'
    )


def import_model(
  hf_dir: str, c: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
  """Writes a step-0 checkpoint of `c`'s model with the weights of the transformers model in
  `hf_dir` (a local directory). Returns the params as host arrays."""
  existing = paths.path(checkpoint.directory(workdir))
  if existing.exists() and any(existing.iterdir()):
    raise ConversionError(f'{workdir} already has checkpoints: import into a new --workdir.')
  arch, m, tok, sp_path = _matching_model(hf_dir, c)
  reader = safetensors.Reader(hf_dir)
  values = _read_values(reader, m, arch, hf_dir)
  flat = _write_step_zero(c, workdir, values, m.vocab_size, hf_dir)
  if tok is not None and not c.tokenizer.path:
    paths.path(workdir).joinpath(hf_tokenizer.SENTENCEPIECE_FILE).write_bytes(
      paths.path(sp_path).read_bytes()
    )
  unused = sorted(set(reader.names()) - {t.name for t in tensor_map(m, arch)})
  log(
    f'imported {arch} from {hf_dir} ({sum(v.size for v in values.values()):,} parameters) as '
    f'step 0 in {workdir}'
    + (f'; ignored {len(unused)} tensors: {", ".join(unused[:4])}' if unused else '')
    + (
      ''
      if tok
      else '; no tokenizer.model there: train with --config.tokenizer.path='
      f'a SentencePiece model of {m.vocab_size} pieces'
    )
  )
  return {state_lib.param_path(k): values[state_lib.param_path(k)] for k, _ in flat}


def read_params(hf_dir: str, c: ml_collections.ConfigDict) -> tuple[dict[str, np.ndarray], str]:
  """The transformers model in `hf_dir` as our parameters (by path, float32 on the host) for
  `c`'s model, and the path of its SentencePiece tokenizer ('' if it has none): what
  `init_from` starts a run from."""
  arch, m, tok, sp_path = _matching_model(hf_dir, c)
  values = _read_values(safetensors.Reader(hf_dir), m, arch, hf_dir)
  return values, sp_path if tok is not None and not c.tokenizer.path else ''


def _matching_model(hf_dir: str, c: ml_collections.ConfigDict):
  """(architecture, our model config, tokenizer or None, its path in hf_dir) for a config.json
  that `c` matches; ConversionError naming every field that does not."""
  config_path = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(
      f'no config.json in {hf_dir}: --hf must be a local directory written '
      'by save_pretrained() or `pretrax export`.'
    )
  with open(config_path) as f:
    hf = json.load(f)
  model_fields(hf)  # Refuses an architecture we do not convert.
  arch = hf['architectures'][0]
  sp_path = os.path.join(hf_dir, hf_tokenizer.SENTENCEPIECE_FILE)
  tok = None
  if c.tokenizer.path:
    tok = tokenizer_lib.Tokenizer.load(c.tokenizer.path)
  elif os.path.exists(sp_path):
    tok = tokenizer_lib.Tokenizer.load(sp_path)
  m = config_lib.model_config(c, tok.vocab_size if tok else hf['vocab_size'])
  problems = mismatches(m, hf)
  if arch == LLAMA and bool(hf.get('attention_bias')) != bool(hf.get('mlp_bias')):
    problems.append('config.json has attention_bias != mlp_bias; pretrax has one model.use_bias')
  elif arch == LLAMA and m.use_bias != bool(hf.get('attention_bias')):
    problems.append(
      f'model.use_bias={m.use_bias} but config.json has attention_bias={hf.get("attention_bias")}'
    )
  if problems:
    raise ConversionError(
      f'{config_path} does not match the config: '
      + '; '.join(problems)
      + '. Set the --config.* values to match.'
    )
  return arch, m, tok, sp_path


def _read_values(
  reader: 'safetensors.Reader', m: config_lib.ModelConfig, arch: str, hf_dir: str
) -> dict[str, np.ndarray]:
  """Our parameters (by path) from the transformers tensors, float32 on the host."""
  values: dict[str, np.ndarray] = {}
  token_type = None
  for t in tensor_map(m, arch):
    if t.name not in reader:
      raise ConversionError(
        f'{hf_dir} has no tensor {t.name}, which {arch} with this config.json must have.'
      )
    if reader.shape(t.name) != t.shape:
      raise ConversionError(
        f'{hf_dir}: tensor {t.name} has shape {reader.shape(t.name)}, '
        f'config.json implies {t.shape}.'
      )
    y = reader.read(t.name).astype(np.float32)
    if t.name.endswith('token_type_embeddings.weight'):
      token_type = y[0]
      continue
    if all(s is None for s in t.sources):
      _zero_or_refuse(t.name, y, hf_dir)
      continue
    for source, part in zip(t.sources, t.from_hf(y), strict=True):
      if source is None:
        _zero_or_refuse(t.name, part, hf_dir)
      else:
        values[source] = part
  if arch == XLMR:
    values['pos_embed'] = values['pos_embed'] + token_type
  return values


def _write_step_zero(
  c: ml_collections.ConfigDict,
  workdir: str,
  values: dict[str, np.ndarray],
  vocab_size: int,
  hf_dir: str,
) -> list:
  """Step 0 of a run: `values` as the parameters, a fresh optimizer state; returns the params'
  flattened (path, abstract array) pairs."""
  # Whatever mesh the config trains on, importing uses this machine's devices (`train` restores
  # onto its own mesh); the checkpoint keeps the config as given.
  run = state_lib.build(config_lib.on_local_devices(c), vocab_size)
  flat, treedef = jax.tree_util.tree_flatten_with_path(run.abstract['params'])
  names = [state_lib.param_path(k) for k, _ in flat]
  missing = [name for name in names if name not in values]
  if missing:
    raise ConversionError(
      f'the configured model has parameters no tensor of {hf_dir} fills: {", ".join(missing[:5])}.'
    )
  leaves = [
    jax.device_put(values[name].astype(a.dtype), a.sharding)
    for name, (_, a) in zip(names, flat, strict=True)
  ]
  state = run.state_from(jax.tree_util.tree_unflatten(treedef, leaves))
  if not paths.is_remote(workdir):
    os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint.manager(workdir, async_save=False)
  try:
    checkpoint.save(mngr, 0, state, json.loads(c.to_json()))
    checkpoint.wait(mngr)
  finally:
    mngr.close()
  return flat
