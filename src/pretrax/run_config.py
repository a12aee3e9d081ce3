"""The one way a ConfigDict becomes the run's typed config, and a saved config comes back as one.

`build` validates a ConfigDict (config_check.py) and resolves it; `from_saved` upgrades a config
that a checkpoint of any version saved and resolves it the same way. `resolve` is the one place
where "0 means another field's value" defaults are spelt out (0 schedule steps = steps, ...), so
two resolved configs mean the same run exactly when their fields agree, and resume compares them
field by field (`differences`). ConfigDicts stop here: everything below takes config_types.py's
frozen records.

The top config module: imports config.py, config_specs.py, config_types.py and config_check.py.
"""

import dataclasses
import os
import typing
from typing import Any

import ml_collections

from pretrax import config as config_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_check import validate
from pretrax.config_specs import (
  attention_kind,
  init_source,
  mixture,
  objective_mixture,
  remat_policy,
)
from pretrax.config_types import MeshSection, ModelConfig, RunConfig

# Fields that name files: resume compares the files they name, not their spelling.
PATH_FIELDS = ('data.path', 'data.prepared', 'finetune.eval_path', 'tokenizer.path')


def build(
  c: ml_collections.ConfigDict, *, num_devices: int = 1, check_data: bool = True
) -> RunConfig:
  """The run's config from a loaded, overridden ConfigDict: validated (ConfigError naming the
  fields and the fix), then resolved."""
  validate(c, num_devices=num_devices, check_data=check_data)
  return resolve(c.to_dict())


def from_saved(saved: dict[str, Any]) -> RunConfig:
  """A config as a checkpoint of this or an older version saved it, resolved."""
  return resolve(upgrade(saved))


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config in this version's fields, the one place old configs are brought forward:
  a field an older version lacked takes its default (which keeps that version's behaviour),
  a field this version dropped is left out, and `model.remat`'s old bool becomes a policy."""
  out = _merged(config_lib.base_config().to_dict(), saved)
  out['model']['remat'] = remat_policy(out['model']['remat'])
  return out


def _merged(defaults: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
  """`defaults` with the values `saved` has for its fields, section by section."""
  out = dict(defaults)
  for key, value in saved.items():
    if key in out:
      out[key] = _merged(out[key], value) if isinstance(out[key], dict) else value
  return out


def resolve(fields: dict[str, Any]) -> RunConfig:
  """The frozen run config of a config's fields (as ConfigDict.to_dict gives them), every derived
  default resolved. Resolving a resolved config changes nothing."""
  f = {k: dict(v) if isinstance(v, dict) else v for k, v in fields.items()}
  model, data, optim, tok = f['model'], f['data'], f['optim'], f['tokenizer']
  model['num_kv_heads'] = model['num_kv_heads'] or model['num_heads']
  if model['mup_base_width'] and not model['mup_base_head_dim']:
    # The base model's head_dim: the heads widen with the model unless head_dim is written out.
    base = model['mup_base_width'] // model['num_heads']
    model['mup_base_head_dim'] = model['head_dim'] or base
  model['head_dim'] = model['head_dim'] or model['embed_dim'] // model['num_heads']
  model['mlp_dim'] = model['mlp_dim'] or 4 * model['embed_dim']
  model['max_len'] = model['max_len'] or data['seq_len']
  model['qk_norm'] = model['qk_norm'] or 'none'
  moe = model['moe'] = dict(model['moe'])
  if moe['num_experts']:  # A dense model's expert settings mean nothing: left as written.
    moe['expert_dim'] = moe['expert_dim'] or model['mlp_dim']
  data['window_stride'] = data['window_stride'] or data['seq_len']
  optim['schedule_steps'] = optim['schedule_steps'] or f['steps']
  f['eval'] = dict(f['eval'], tasks_every=f['eval']['tasks_every'] or f['eval_every'])
  if tok['sentinels'] < 0:
    uses_spans = 'span_corruption' in dict(objective_mixture(str(f['objective'])))
    tok['sentinels'] = 100 if uses_spans else 0
  return _record(RunConfig, f)


def _record(cls: type, fields: dict[str, Any]) -> Any:
  """`cls` (a config_types dataclass) from a dict, its sections built recursively."""
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    value, kind = fields[field.name], hints[field.name]
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
      value = _record(kind, value)
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)  # An override of 1 for a float field reads back as an int.
    values[field.name] = value
  return cls(**values)


def to_dict(run: RunConfig) -> dict[str, Any]:
  """The config as nested dicts of plain values: what a checkpoint saves."""
  return dataclasses.asdict(run)


def flat(run: RunConfig) -> dict[str, Any]:
  """Every field by its `--config.` name ('optim.lr') with its value."""
  return _flat(to_dict(run), '')


def _flat(fields: dict[str, Any], prefix: str) -> dict[str, Any]:
  out = {}
  for key, value in fields.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def differences(now: RunConfig, before: RunConfig, ignore: tuple[str, ...] = ()) -> list[str]:
  """'field: before -> now' for each field that differs, paths compared as the files they name;
  fields in `ignore` (or in a section named there) are left out."""
  a, b = _comparable(flat(before)), _comparable(flat(now))
  if 'steps' in ignore and all(x['optim.schedule_steps'] == x['steps'] for x in (a, b)):
    # A schedule as long as the run (schedule_steps 0) follows `steps` when that may change.
    ignore += ('optim.schedule_steps',)
  return [
    f'{k}: {a[k]!r} -> {b[k]!r}'
    for k in sorted(a)
    if a[k] != b[k] and not any(k == f or k.startswith(f + '.') for f in ignore)
  ]


def _comparable(fields: dict[str, Any]) -> dict[str, Any]:
  """`fields` with every path as the file it names: 'a/../x.txt' and 'x.txt' are one corpus."""
  out = dict(fields)
  for key in PATH_FIELDS:
    if out[key]:
      out[key] = ','.join(canonical_path(p) for p in str(out[key]).split(',') if p.strip())
  if out['data.mixture']:
    out['data.mixture'] = ','.join(
      f'{name}={canonical_path(path)}:{weight!r}'
      for name, path, weight in mixture(out['data.mixture'])
    )
  if out['init_from']:
    path, step = init_source(out['init_from'])
    out['init_from'] = canonical_path(path) + ('' if step is None else f':{step}')
  return out


def canonical_path(path: str) -> str:
  """A local path resolved to the file it names (home, '..', symlinks, relative to this directory);
  a bucket path (gs://...) as written, since buckets have no such aliases."""
  path = path.strip()
  if not path or '://' in path:
    return path
  return os.path.realpath(os.path.expanduser(path))


def on_local_devices(run: RunConfig, mesh: MeshSection | None = None) -> RunConfig:
  """`run` on this machine's devices: the mesh `mesh` (another run's), or every local device on
  `data`. Reading a checkpoint back does not depend on the mesh that wrote it."""
  if mesh is None:
    mesh = MeshSection(
      data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, rules=run.mesh.rules
    )
  return dataclasses.replace(run, mesh=mesh)


def _heads(run: RunConfig, num_classes: int) -> dict[str, Any]:
  """The ModelConfig fields of the output heads: a masked LM's, or a classifier's (which keeps
  the masked LM's transform as its pooler when finetune.head is 'mlm')."""
  if run.objective != 'classification':
    return {'mlm_head': run.objective == 'masked_lm'}
  f = run.finetune
  return {
    'mlm_head': f.head == 'mlm',
    'num_classes': num_classes,
    'pooling': f.pooling,
    'pooler': f.head,
    'mask_id': tokenizer_lib.MASK_ID if f.pooling == 'mask' else -1,
  }


def model_config(run: RunConfig, vocab_size: int, num_classes: int = 0) -> ModelConfig:
  """The model's frozen config: the model section's fields, the vocabulary (`vocab_size` is the
  tokenizer's when the config leaves it 0, rounded up to vocab_multiple), and what the objective
  asks of the architecture; `num_classes`, the classification objective's label count."""
  m = run.model
  vocab_size = m.vocab_size or vocab_size
  shared = {
    f.name: getattr(m, f.name) for f in dataclasses.fields(ModelConfig) if hasattr(m, f.name)
  }
  return ModelConfig(
    **{
      **shared,
      'vocab_size': -(-vocab_size // m.vocab_multiple) * m.vocab_multiple,
      'attention': attention_kind(run.objective),
      **_heads(run, num_classes),
    }
  )
