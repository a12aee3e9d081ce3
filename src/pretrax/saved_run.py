"""A trained model read back from a workdir: its config, tokenizer and parameters, on this machine.

`sample`, `eval` and fine-tuning (`init_from`) all start here. Whatever mesh the run trained on,
the parameters are restored onto the devices at hand: all on `data` (replicated) by default, or
onto the mesh of the run that will use them.
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from pretrax import checkpoint, config_specs, paths, run_config
from pretrax import config as config_lib
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax import workdir as workdir_lib
from pretrax.config_types import MeshSection, RunConfig
from pretrax.model import stack, transformer

# Parameters a fine-tune may add to what it starts from: the classification head, and the masked
# LM's head (the classifier's pooler) when it starts from a model without one.
NEW_HEAD = ('pooler', 'pooler_bias', 'classifier', 'classifier_bias')
MLM_HEAD = ('mlm_dense', 'mlm_dense_bias', 'mlm_norm/scale', 'mlm_norm/bias', 'mlm_bias')


@dataclasses.dataclass(frozen=True)
class Trained:
  config: RunConfig  # The run's config, as its checkpoint saved it (run_config.from_saved).
  step: int
  tok: tokenizer_lib.Tokenizer
  tokenizer_path: str
  run: state_lib.RunState  # Built for this machine's devices (see `load`).
  params: Any


def checkpoint_steps(workdir: str) -> list[int]:
  """The finished checkpoints of a workdir; FileNotFoundError saying what to do if none."""
  if not paths.path(checkpoint.directory(workdir)).exists():
    raise FileNotFoundError(
      f'no checkpoints in {workdir}: train there first with `pretrax train --workdir=...`.'
    )
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    steps = sorted(mngr.all_steps())
  finally:
    mngr.close()
  if not steps:
    raise FileNotFoundError(f'no finished checkpoint in {checkpoint.directory(workdir)} yet.')
  return steps


def tokenizer_path(workdir: str, c: RunConfig) -> str:
  """The tokenizer a run kept in its workdir, else its prepared store's, else its config's."""
  return workdir_lib.find_tokenizer(workdir, c.data.prepared, c.tokenizer.path)


def load(workdir: str, step: int | None = None, mesh: MeshSection | None = None) -> Trained:
  """The checkpoint at `step` (default: the latest) of the run in `workdir`.

  `mesh`: a config's mesh section to restore onto (fine-tuning restores straight into its own
  shardings); None puts every local device on `data`.
  """
  steps = checkpoint_steps(workdir)
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(
      f'no checkpoint at step {step} in {checkpoint.directory(workdir)}; it has steps {steps}.'
    )
  mngr = checkpoint.manager(workdir, read_only=True)
  try:
    c = run_config.from_saved(checkpoint.restore_config(mngr, step))
    path = tokenizer_path(workdir, c)
    tok = tokenizer_lib.Tokenizer.load(path)
    run = state_lib.build(
      run_config.on_local_devices(c, mesh), tok.vocab_size, num_classes=len(labels(workdir, c))
    )
    state, _ = checkpoint.restore(mngr, step, run.abstract)
  finally:
    mngr.close()
  return Trained(config=c, step=step, tok=tok, tokenizer_path=path, run=run, params=state['params'])


def labels(workdir: str, c: RunConfig) -> list[str]:
  """A classification run's labels (saved by `train`); [] for other objectives."""
  if c.objective != 'classification':
    return []
  path = paths.path(workdir_lib.labels_file(workdir))
  if not path.exists():
    raise FileNotFoundError(f'{path} is missing: it names the classes of the run in {workdir}.')
  return json.loads(path.read_text())


# ---- init_from: a run that starts from another's parameters -------------------------------------


def _is_hf_dir(path: str) -> bool:
  """A transformers model directory (config.json, no checkpoints) rather than a pretrax workdir."""
  return (
    not paths.is_remote(path)
    and os.path.isfile(os.path.join(path, 'config.json'))
    and not os.path.exists(checkpoint.directory(path))
  )


def source_tokenizer(spec: str) -> str:
  """The tokenizer of the run (or Hugging Face directory) that `init_from` names."""
  path, _ = config_specs.init_source(spec)
  if not paths.path(path).exists():
    raise FileNotFoundError(
      f'init_from={spec!r}: {path} does not exist: name the workdir of a '
      'pretrax run or a Hugging Face model directory.'
    )
  candidate = workdir_lib.tokenizer_file(path)
  if not paths.path(candidate).exists():
    raise config_lib.ConfigError(
      f'init_from={spec!r}: {candidate} does not exist, so the tokenizer the parameters were '
      'trained with is unknown: set --config.tokenizer.path to it.'
    )
  return candidate


def _source_values(c: RunConfig) -> tuple[dict[str, Any], str]:
  """The parameters `init_from` names, by path, and a description of where they come from."""
  path, step = config_specs.init_source(c.init_from)
  if _is_hf_dir(path):
    from pretrax.interop import hf_import  # Local: only a Hugging Face start needs the converter.

    values, _ = hf_import.read_params(path, c)
    return values, f'{path} (Hugging Face)'
  if not paths.path(checkpoint.directory(path)).exists():
    raise FileNotFoundError(
      f'init_from={c.init_from!r}: {path} is neither a pretrax workdir (no '
      'checkpoints/) nor a Hugging Face model directory (no config.json).'
    )
  # Restored straight onto this run's mesh: no full copy on one device.
  source = load(path, step, mesh=c.mesh)
  flat = jax.tree_util.tree_flatten_with_path(source.params)[0]
  return {state_lib.param_path(k): v for k, v in flat}, f'{path} at step {source.step}'


def label_pieces(tok: tokenizer_lib.Tokenizer, labels: Sequence[str]) -> list[int]:
  """Each label's word as a masked LM would predict it: the first piece of ' LABEL' that is
  more than the space."""
  pieces = []
  for label in labels:
    ids = tok.encode(' ' + label)
    pieces.append(next((i for i in ids if tok.decode([i]).strip()), ids[0]))
  return pieces


def _label_word_head(values: dict[str, Any], pieces: list[int]) -> dict[str, Any]:
  """The classifier (D, C) and its bias (C,) as the masked LM's output projection for the label
  pieces: at the start, the head scores the labels as the masked LM would fill them in."""
  # jnp, not numpy: on several hosts the values are global arrays no process holds whole.
  at = jnp.asarray(pieces)
  if 'head' in values:  # Untied: the output projection (D, V).
    rows_DC = jnp.asarray(values['head'])[:, at]
  else:
    rows_DC = jnp.asarray(values['embed/embedding'])[at].T
  bias_C = jnp.asarray(values['mlm_bias'])[at] if 'mlm_bias' in values else jnp.zeros(len(at))
  return {'classifier': rows_DC, 'classifier_bias': bias_C}


def initial_params(
  c: RunConfig,
  run: state_lib.RunState,
  log: Callable[[str], None],
  pieces: list[int] | None = None,
) -> Any:
  """This run's parameters taken from the run `init_from` names, in this run's shardings. Shapes
  must match; a new classification head starts fresh (or from `pieces`, the labels' pieces, when
  finetune.head_init is label_words), and a head this run lacks (a masked LM's) is left out.
  Raises ConfigError naming the parameters that differ."""
  values, where = _source_values(c)
  # Stacked or unrolled there (model.scan_layers, or a Hugging Face model), as this run lays out.
  m = run.model_cfg
  values = stack.to_layout(values, transformer.first_scanned(m), m.num_layers)
  flat, treedef = jax.tree_util.tree_flatten_with_path(run.abstract['params'])
  names = [state_lib.param_path(k) for k, _ in flat]
  may_add = NEW_HEAD + (MLM_HEAD if c.objective == 'classification' else ())
  problems = [
    f'{name} is missing there' for name in names if name not in values and name not in may_add
  ]
  problems += [
    f'{name} is {a.shape} here and {tuple(values[name].shape)} there'
    for name, (_, a) in zip(names, flat, strict=True)
    if name in values and tuple(values[name].shape) != a.shape
  ]
  if problems:
    # Experts on one side only: name the field rather than leave it to the shapes.
    experts = any('/mlp/' in n for n in names + list(values)) and (
      any(n.endswith('/mlp/router') for n in names)
      != any(n.endswith('/mlp/router') for n in values)
    )
    hint = 'model.moe.num_experts differs (one is a Mixture-of-Experts model); ' if experts else ''
    raise config_lib.ConfigError(
      f'init_from={c.init_from!r}: this model does not match {where} ({hint}{len(problems)} '
      f'parameters differ: {"; ".join(problems[:4])}): give the run the same --config.model.* '
      'values (and tokenizer) as the one it starts from.'
    )
  # Host arrays (a Hugging Face start) or arrays already on this mesh (a workdir's).
  start = {name: values[name] for name in names if name in values}
  new = [name for name in names if name not in values]
  if new:  # A random initialisation (a whole model's, briefly) only when a new head needs it.
    fresh = dict(zip(names, jax.tree.leaves(run.init_params(c.seed)), strict=True))
    start.update({name: fresh[name] for name in new})
  if pieces is not None and c.finetune.head_init == 'label_words' and 'classifier' in new:
    if c.finetune.head == 'mlm' and 'mlm_dense' in values:
      start.update(_label_word_head(values, pieces))
      new = [name for name in new if not name.startswith('classifier')]
      log("the classifier starts as the masked LM's output rows (and bias) of the label words")
    else:
      log(
        'finetune.head_init=label_words needs finetune.head=mlm and a masked LM (with its head) '
        f'to start from; {where} has none: the classifier starts random'
      )
  leaves = [
    jax.device_put(start[name].astype(a.dtype), a.sharding)
    for name, (_, a) in zip(names, flat, strict=True)
  ]
  unused = sorted(set(values) - set(names))
  log(
    f'initialised from {where} with a fresh optimizer'
    + (f'; new (random) parameters: {", ".join(new)}' if new else '')
    + (f'; left out: {", ".join(unused)}' if unused else '')
  )
  return jax.tree_util.tree_unflatten(treedef, leaves)
