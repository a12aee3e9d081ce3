"""The frozen dataclasses handed to the model and optimizer, and the defaults a config implies.

ConfigDicts stop here: the model, the optimizer and the step take the frozen dataclasses built
below, so a typo can only happen in one place and is caught by the locked ConfigDict. `implied`
spells out every "0 means another field's value" default, so two configs can be compared.

Imports only config_specs.py (the string languages), and through it config.py.
"""

import dataclasses
import os
from typing import Any

import ml_collections

from pretrax.config_specs import init_source, mixture, objective_mixture


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  flavour: str
  vocab_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  mlp_dim: int
  max_len: int
  use_bias: bool
  tie_embeddings: bool
  dropout: float
  norm_eps: float
  rope_theta: float
  init_std: float
  param_dtype: str
  dtype: str
  remat: str  # none | dots | dots_attention | full | offload
  attention: str = 'causal'  # causal | prefix (bidirectional over batch['prefix']) | bidirectional
  mlm_head: bool = False  # BERT's head: dense, GELU, norm, then the (tied) projection with a bias.
  num_classes: int = 0  # > 0: a pooled classification head (classify()) over this many labels.
  attention_backend: str = 'auto'  # auto | xla | cudnn | splash | cpu (see model/attention.py)
  loss_chunk: int = 0  # Positions per chunk of the output projection and loss; 0: all at once.
  max_segments: int = 16  # Documents per row for cuDNN's variable-length attention; 0: dense mask.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  min_lr: float
  schedule: str
  warmup_steps: int
  decay_fraction: float
  total_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_embeddings: bool
  decay_norms_and_biases: bool
  clip_norm: float


def model_config(
  c: ml_collections.ConfigDict, vocab_size: int, num_classes: int = 0
) -> ModelConfig:
  """The model's frozen config; `vocab_size` is the tokenizer's when the config leaves it 0;
  `num_classes`, the classification objective's label count (from its data)."""
  m = c.model
  if m.vocab_size:
    vocab_size = m.vocab_size
  vocab_size = -(-vocab_size // m.vocab_multiple) * m.vocab_multiple
  return ModelConfig(
    flavour=m.flavour,
    vocab_size=vocab_size,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads or m.num_heads,
    embed_dim=m.embed_dim,
    head_dim=m.head_dim or m.embed_dim // m.num_heads,
    mlp_dim=m.mlp_dim or 4 * m.embed_dim,
    max_len=m.max_len or c.data.seq_len,
    use_bias=m.use_bias,
    tie_embeddings=m.tie_embeddings,
    dropout=m.dropout,
    norm_eps=m.norm_eps,
    rope_theta=m.rope_theta,
    init_std=m.init_std,
    param_dtype=m.param_dtype,
    dtype=m.dtype,
    remat=remat_policy(m.remat),
    attention=attention_kind(c.objective),
    mlm_head=c.objective == 'masked_lm',
    num_classes=num_classes if c.objective == 'classification' else 0,
    attention_backend=m.attention_backend,
    loss_chunk=m.get('loss_chunk', 0),  # .get: configs saved by older versions lack both.
    max_segments=m.get('max_segments', 16),
  )


def on_local_devices(
  c: ml_collections.ConfigDict, mesh: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """A copy of `c` on this machine's devices: its mesh `mesh` (another run's), or every local
  device on `data`. Reading a checkpoint back does not depend on the mesh that wrote it."""
  local = ml_collections.ConfigDict(c.to_dict())
  if mesh is None:
    local.mesh.data, local.mesh.fsdp, local.mesh.tensor = -1, 1, 1
    local.mesh.dcn_data, local.mesh.dcn_fsdp = 1, 1
  else:
    local.mesh = ml_collections.ConfigDict(mesh.to_dict())
  local.mesh.rules = local.mesh.get('rules', '')  # Absent from checkpoints of older versions.
  return local


REMAT_POLICIES = ('none', 'dots', 'dots_attention', 'full', 'offload')


def remat_policy(value) -> str:
  """model.remat as a policy name; checkpoints of older versions saved a bool (True: full)."""
  if isinstance(value, bool):
    return 'full' if value else 'none'
  return value


def attention_kind(objective: str) -> str:
  """The attention the objective needs: masked_lm an encoder's, prefix objectives a prefix."""
  names = [n for n, _ in objective_mixture(objective)]
  if names in (['masked_lm'], ['classification']):
    return 'bidirectional'
  return 'prefix' if set(names) & {'span_corruption', 'prefix_lm'} else 'causal'


def implied(flat: dict) -> dict:
  """A flattened config with every 'this value means another field's' default spelt out (0 steps
  of schedule = steps, ...): two configs mean the same run when these agree."""
  out = dict(flat)

  def get(key: str, default: Any = 0) -> Any:
    return flat.get(key, default)

  fills = {
    'optim.schedule_steps': get('steps'),
    'model.max_len': get('data.seq_len'),
    'model.mlp_dim': 4 * get('model.embed_dim'),
    'model.head_dim': get('model.embed_dim') // max(get('model.num_heads', 1), 1),
    'model.num_kv_heads': get('model.num_heads'),
    'data.window_stride': get('data.seq_len'),
  }
  for key, value in fills.items():
    if key in out and not out[key]:
      out[key] = value
  if out.get('tokenizer.sentinels', 0) < 0:
    uses_spans = 'span_corruption' in dict(objective_mixture(str(get('objective', 'causal_lm'))))
    out['tokenizer.sentinels'] = 100 if uses_spans else 0
  # Paths mean the files they name: 'a/../x.txt' and 'x.txt' are one corpus.
  for key in ('data.path', 'data.prepared', 'finetune.eval_path', 'tokenizer.path'):
    if out.get(key):
      out[key] = ','.join(canonical_path(p) for p in str(out[key]).split(',') if p.strip())
  if out.get('data.mixture'):
    out['data.mixture'] = ','.join(
      f'{name}={canonical_path(path)}:{weight!r}'
      for name, path, weight in mixture(str(out['data.mixture']))
    )
  if out.get('init_from'):
    path, step = init_source(str(out['init_from']))
    out['init_from'] = canonical_path(path) + ('' if step is None else f':{step}')
  return out


def canonical_path(path: str) -> str:
  """A local path resolved to the file it names (home, '..', symlinks, relative to this directory);
  a bucket path (gs://...) as written, since buckets have no such aliases."""
  path = path.strip()
  if not path or '://' in path:
    return path
  return os.path.realpath(os.path.expanduser(path))


def num_sentinels(c: ml_collections.ConfigDict) -> int:
  if c.tokenizer.sentinels >= 0:
    return c.tokenizer.sentinels
  uses_spans = 'span_corruption' in dict(objective_mixture(c.objective))
  return 100 if uses_spans else 0


def optim_config(c: ml_collections.ConfigDict) -> OptimConfig:
  o = c.optim
  return OptimConfig(
    lr=o.lr,
    min_lr=o.min_lr,
    schedule=o.schedule,
    warmup_steps=o.warmup_steps,
    decay_fraction=o.decay_fraction,
    total_steps=o.schedule_steps or c.steps,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    decay_embeddings=o.decay_embeddings,
    decay_norms_and_biases=o.decay_norms_and_biases,
    clip_norm=o.clip_norm,
  )
