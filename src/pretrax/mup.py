"""Width transfer (model.mup_base_width): the maximal-update parametrisation's (muP's) role of each
parameter, read from its logical axis names, and that role's init and learning-rate multipliers.

With m = embed_dim / mup_base_width, muP for Adam (Yang et al., Tensor Programs V, Table 3, taken
relative to the base width so that m = 1 is the standard parametrisation) treats a parameter by
which of its dimensions grow with the width:

  role    axes (examples)                               init std   Adam lr
  hidden  a residual and a block's own width: attention   1/sqrt(m)  1/m
          q k v o, MLP wi wo, experts, the MLM dense and
          pooler layers
  output  a width in, a fixed size out: the untied head    1/m        1/m
          (embed, vocab), the classifier, the MoE router
  input   a fixed size in, a width out: token and          1          1
          position embeddings
  vector  one width only: norms' scales, biases            1          1

A tied embedding is both input and output; as muP does for it (the mup package's shared readout),
it keeps the input role's init and lr and the model multiplies its logits by 1/m instead
(Transformer.output_projection). Attention scales its logits by sqrt(base head_dim) / head_dim
(muP's 1/d, equal to 1/sqrt(head_dim) at the base). Muon's hidden matrices take 1/sqrt(m)
(muon_lr_multiplier). The lr multipliers scale each step's Adam or Muon direction, not its weight
decay (optim.py).

m is one number for every hidden matrix: muP's multipliers follow each one's fan-in, which grows
with embed_dim when the block's widths (heads x head_dim, mlp_dim, expert_dim) grow with it, as
their defaults do. Imports only JAX's tree functions: the model imports it (init multipliers), and
so does optim.py (learning rates).
"""

import math
from typing import Any

import jax

# Logical axis -> what its size is as the model widens: 'residual' (the residual stream's width)
# and 'inner' (a block's own width) grow; 'batch' counts independent matrices (experts, stacked
# layers); 'fixed' stays (vocabulary, positions, classes, a router's experts, a norm's scale, a
# bias's last axis).
# An axis missing here is an error: a new one must say whether it grows.
AXES = {
  'embed': 'residual',
  'expert_embed': 'residual',
  'heads': 'inner',
  'kv_heads': 'inner',
  'head_dim': 'inner',
  'mlp': 'inner',
  'expert_mlp': 'inner',
  'experts': 'batch',
  'layers': 'batch',  # model.scan_layers' stack: one independent matrix per layer.
  'vocab': 'fixed',
  'position': 'fixed',
  'classes': 'fixed',
  'router': 'fixed',
  'norm': 'fixed',
}


def role(names: tuple[str | None, ...]) -> str:
  """muP's role of a parameter with these logical axes: hidden, output, input or vector."""
  for n in names:
    if n not in AXES:
      raise ValueError(
        f'muP: logical axis {n!r} (of {names}) is not in pretrax.mup.AXES: add it, saying '
        'whether it grows with the model width.'
      )
  kinds = [AXES[n] for n in names if n is not None and AXES[n] != 'batch']
  widths = {k for k in kinds if k in ('residual', 'inner')}
  if len(widths) == 2:
    return 'hidden'
  if len(widths) == 1 and 'fixed' in kinds and len(kinds) >= 2:
    # A matrix with one width. Its leading axes are its fan-in (layers.dense contracts them; an
    # embedding table is indexed by them): a width there is a readout, a fixed size an embedding.
    return 'input' if kinds[0] == 'fixed' else 'output'
  return 'vector'


def init_multiplier(names: tuple[str | None, ...], width_mult: float) -> float:
  """What the init std of a parameter with these axes is multiplied by at width multiple m."""
  return {'hidden': 1 / math.sqrt(width_mult), 'output': 1 / width_mult}.get(role(names), 1.0)


def adam_lr_multiplier(names: tuple[str | None, ...], width_mult: float) -> float:
  """What AdamW's learning rate for a parameter with these axes is multiplied by."""
  return 1 / width_mult if role(names) in ('hidden', 'output') else 1.0


def muon_lr_multiplier(width_mult: float) -> float:
  """What Muon's learning rate for its hidden matrices is multiplied by.

  Muon's orthogonalised r x c update is scaled by 0.2 sqrt(max(r, c)) (optim_muon.MATCHED_RMS):
  its spectral norm grows as sqrt(width). The spectral condition for feature learning (Yang,
  Simon and Bernstein, arXiv 2310.17813) wants it to stay put when both sides grow by the same
  factor, as Keller Jordan's sqrt(max(1, fan_out / fan_in)) scale does: 1/sqrt(m) makes the
  scale 0.2 sqrt(max(r, c) / m), the base model's, at every width.
  """
  return 1 / math.sqrt(width_mult)


def adam_lr_multipliers(logical_axes: Any, width_mult: float) -> Any:
  """A params-shaped tree of adam_lr_multiplier (`logical_axes`: a tree of name tuples)."""
  return jax.tree.map(
    lambda names: adam_lr_multiplier(names, width_mult),
    logical_axes,
    is_leaf=lambda x: isinstance(x, tuple),
  )
