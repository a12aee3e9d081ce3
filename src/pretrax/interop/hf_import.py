"""Import: a transformers model directory as a step-0 checkpoint that `pretrax train` continues,
or as the parameters `init_from` starts a run from.

The directory's config.json must match the run's config (every difference is named); a tensor our
model has no parameter for must be zero.
"""

from collections.abc import Callable
import json
import os
from typing import Any

import jax
import numpy as np

from pretrax import checkpoint, paths, run_config
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax import workdir as workdir_lib
from pretrax.config_types import ModelConfig, RunConfig
from pretrax.interop import hf_arch, hf_fields, hf_tensors, hf_tokenizer, safetensors
from pretrax.model import stack, transformer


def _zero_or_refuse(name: str, y: np.ndarray, hf_dir: str) -> None:
  if np.any(y != 0):
    raise hf_arch.ConversionError(
      f'{hf_dir}: tensor {name} is not zero, and the configured model has no '
      'such parameter: set --config.model.use_bias=true.'
    )


def import_model(
  hf_dir: str, c: RunConfig, workdir: str, log: Callable[[str], None] = print
) -> dict[str, Any]:
  """Writes a step-0 checkpoint of `c`'s model with the weights of the transformers model in
  `hf_dir` (a local directory). Returns the params as host arrays."""
  existing = paths.path(checkpoint.directory(workdir))
  if existing.exists() and any(existing.iterdir()):
    raise hf_arch.ConversionError(
      f'{workdir} already has checkpoints: import into a new --workdir.'
    )
  arch, m, tok, sp_path = _matching_model(hf_dir, c)
  reader = safetensors.Reader(hf_dir)
  # transformers' layers, one by one: stacked when the run scans them (model.scan_layers).
  values = stack.to_layout(
    _read_values(reader, m, arch, hf_dir), transformer.first_scanned(m), m.num_layers
  )
  flat = _write_step_zero(c, workdir, values, m.vocab_size, hf_dir)
  if tok is not None and not c.tokenizer.path:
    paths.path(workdir_lib.tokenizer_file(workdir)).write_bytes(paths.path(sp_path).read_bytes())
  unused = sorted(set(reader.names()) - {t.name for t in _tensor_map(reader, m, arch)})
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


def read_params(hf_dir: str, c: RunConfig) -> tuple[dict[str, np.ndarray], str]:
  """The transformers model in `hf_dir` as our parameters (by path, float32 on the host) for
  `c`'s model, and the path of its SentencePiece tokenizer ('' if it has none): what
  `init_from` starts a run from."""
  arch, m, tok, sp_path = _matching_model(hf_dir, c)
  values = _read_values(safetensors.Reader(hf_dir), m, arch, hf_dir)
  return values, sp_path if tok is not None and not c.tokenizer.path else ''


def _matching_model(hf_dir: str, c: RunConfig):
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
  hf_fields.model_fields(hf)  # Refuses an architecture we do not convert.
  arch = hf['architectures'][0]
  sp_path = os.path.join(hf_dir, hf_tokenizer.SENTENCEPIECE_FILE)
  tok = None
  if c.tokenizer.path:
    tok = tokenizer_lib.Tokenizer.load(c.tokenizer.path)
  elif os.path.exists(sp_path):
    tok = tokenizer_lib.Tokenizer.load(sp_path)
  m = run_config.model_config(c, tok.vocab_size if tok else hf['vocab_size'])
  problems = hf_fields.mismatches(m, hf)
  if arch == hf_arch.LLAMA and bool(hf.get('attention_bias')) != bool(hf.get('mlp_bias')):
    problems.append('config.json has attention_bias != mlp_bias; pretrax has one model.use_bias')
  elif arch == hf_arch.LLAMA and m.use_bias != bool(hf.get('attention_bias')):
    problems.append(
      f'model.use_bias={m.use_bias} but config.json has attention_bias={hf.get("attention_bias")}'
    )
  if problems:
    raise hf_arch.ConversionError(
      f'{config_path} does not match the config: '
      + '; '.join(problems)
      + '. Set the --config.* values to match.'
    )
  return arch, m, tok, sp_path


def _tensor_map(reader: 'safetensors.Reader', m: ModelConfig, arch: str) -> list[hf_tensors.Tensor]:
  """The tensor map of the layout the directory has: experts one tensor each, or fused."""
  fused = any(name.endswith('.experts.gate_up_proj') for name in reader.names())
  return hf_tensors.tensor_map(m, arch, fused)


def _read_values(
  reader: 'safetensors.Reader', m: ModelConfig, arch: str, hf_dir: str
) -> dict[str, np.ndarray]:
  """Our parameters (by path) from the transformers tensors, float32 on the host."""
  values: dict[str, np.ndarray] = {}
  experts: dict[str, dict[int, np.ndarray]] = {}  # Our (E, ...) parameters, expert by expert.
  token_type = None
  for t in _tensor_map(reader, m, arch):
    if t.name not in reader:
      raise hf_arch.ConversionError(
        f'{hf_dir} has no tensor {t.name}, which {arch} with this config.json must have.'
      )
    if reader.shape(t.name) != t.shape:
      raise hf_arch.ConversionError(
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
      elif t.expert is not None:
        experts.setdefault(source, {})[t.expert] = part
      else:
        values[source] = part
  for source, parts in experts.items():
    values[source] = np.stack([parts[j] for j in range(len(parts))])
  for path, shape in hf_tensors.zero_params(m, arch).items():
    values[path] = np.zeros(shape, np.float32)
  if arch == hf_arch.XLMR:
    values['pos_embed'] = values['pos_embed'] + token_type
  return values


def _write_step_zero(
  c: RunConfig,
  workdir: str,
  values: dict[str, np.ndarray],
  vocab_size: int,
  hf_dir: str,
) -> list:
  """Step 0 of a run: `values` as the parameters, a fresh optimizer state; returns the params'
  flattened (path, abstract array) pairs."""
  # Whatever mesh the config trains on, importing uses this machine's devices (`train` restores
  # onto its own mesh); the checkpoint keeps the config as given.
  run = state_lib.build(run_config.on_local_devices(c), vocab_size)
  flat, treedef = jax.tree_util.tree_flatten_with_path(run.abstract['params'])
  names = [state_lib.param_path(k) for k, _ in flat]
  missing = [name for name in names if name not in values]
  if missing:
    raise hf_arch.ConversionError(
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
    checkpoint.save(mngr, 0, state, run_config.to_dict(c))
    checkpoint.wait(mngr)
  finally:
    mngr.close()
  return flat
