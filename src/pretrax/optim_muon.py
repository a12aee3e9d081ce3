"""Which parameters Muon trains and how each is a matrix, read from their logical axis names; and
Muon's orthogonalised update.

A transformer block's weights map between two widths: the residual stream's (`embed`) and the
block's own (attention heads, MLP hidden). AXIS_ROLES puts each logical axis on one side, or
makes it a batch of independent matrices (an MoE layer's experts). A weight's input side is the
side of its leading axes, since the model contracts a weight's leading axes (layers.dense): q
(embed, heads, head_dim) is one embed x (heads * head_dim) matrix, o (heads, head_dim, embed) the
reverse, an MoE wi (experts, expert_embed, expert_mlp) one matrix per expert.

Muon takes the weights inside the transformer blocks whose every axis is a width or a batch, with
both sides. Everything else goes to AdamW: embeddings and the output head (vocab, position),
norms and biases (one side or 'norm'), the MoE router ('router': it scores a handful of experts
for a softmax or top-k, where an orthogonalised update would move every expert's score by the
same amount whatever its gradient; it is small and kept in float32), and the layers above the
blocks (the masked LM's dense layer, the classifier and its pooler: task heads, as the output
head is, though their axes are the blocks' own).

Imports JAX, optax, mup (its axis table) and model/stack.py (the blocks' names) only: optim.py uses
it; the model never imports it.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

# Its Newton-Schulz and shape scaling, which optax.contrib does not export (pinned optax 0.2.8).
from optax.contrib import _muon as optax_muon

from pretrax import mup
from pretrax.model import stack

# Logical axis -> the side of a hidden matrix it is on ('residual' or 'inner'), 'batch'
# (independent matrices), or 'fixed' (a size that is no hidden width): muP's table, one for both.
AXIS_ROLES = mup.AXES

# Moonshot's 'Muon is scalable' (arXiv 2502.16982): an orthogonalised m x n update has RMS
# 1/sqrt(max(m, n)); times 0.2 sqrt(max(m, n)) it has AdamW's typical update RMS of ~0.2, so
# AdamW's learning rate and weight decay carry over.
MATCHED_RMS = 0.2
# The reference implementation's quintic Newton-Schulz coefficients (Keller Jordan's Muon).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def matrix_dims(names: tuple[str | None, ...]) -> MuonDimensionNumbers | None:
  """How a weight with these logical axes is a matrix (or a batch of them): its input (reduction)
  and output axes; None if it is not one of the hidden matrices."""
  roles = [AXIS_ROLES.get(n) if n else None for n in names]
  if None in roles or 'fixed' in roles or 'residual' not in roles or 'inner' not in roles:
    return None
  sides = [(i, r) for i, r in enumerate(roles) if r != 'batch']
  first = sides[0][1]
  reduction = tuple(i for i, r in sides if r == first)
  output = tuple(i for i, r in sides if r != first)
  if max(reduction) > min(output):  # The sides interleave: not a matrix the model multiplies by.
    return None
  return MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)


def dimension_numbers(logical_axes: Any) -> Any:
  """A params-shaped tree: the MuonDimensionNumbers of each hidden matrix of the transformer
  blocks, optax.MaskedNode() for each parameter AdamW trains (the shape optax's masked transforms
  give the Muon group's updates). `logical_axes`: a params-shaped tree of name tuples."""

  def dims(path, names: tuple[str | None, ...]) -> Any:
    # Unrolled or stacked (model.scan_layers: 'layers' is a batch axis, one matrix per layer).
    in_blocks = getattr(path[0], 'key', None) in (stack.BLOCKS, stack.STACK)
    found = matrix_dims(names) if in_blocks else None
    return optax.MaskedNode() if found is None else found

  return jax.tree_util.tree_map_with_path(
    dims, logical_axes, is_leaf=lambda x: isinstance(x, tuple)
  )


def is_dims(x: Any) -> bool:
  """A leaf of dimension_numbers' tree (both are tuples, which JAX would otherwise descend)."""
  return isinstance(x, (MuonDimensionNumbers, optax.MaskedNode))


def orthogonalise(dims: Any, ns_steps: int) -> optax.GradientTransformation:
  """Each update (a matrix or a batch of them, as `dims` says) replaced by its orthogonalisation:
  the same singular vectors, singular values all near 1 (quintic Newton-Schulz, which trades
  exactness for speed: they land in about [0.7, 1.2]), then scaled to AdamW's RMS (MATCHED_RMS).

  Newton-Schulz runs in bfloat16, as the reference implementation's does (optax's runs in the
  update's dtype): it is the optimizer's one large cost (ns_steps x 3 matmuls per matrix).
  """
  coeffs = jnp.asarray(NS_COEFFS, jnp.float32)

  def one(u: jax.Array, d: MuonDimensionNumbers) -> jax.Array:
    o = optax_muon.orthogonalize_via_newton_schulz(
      u.astype(jnp.bfloat16), coeffs, ns_steps, dimension_numbers=d
    )
    return o.astype(u.dtype)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(one, updates, dims), state

  return optax.chain(
    optax.GradientTransformation(optax.init_empty_state, update),
    optax_muon.scale_by_shape(dims, consistent_rms=MATCHED_RMS),
  )


def newton_schulz_flops(params: Any, logical_axes: Any, ns_steps: int) -> float:
  """Matmul FLOPs of Muon's Newton-Schulz in one update, for parameters of these shapes (arrays
  or ShapeDtypeStructs) and logical axes. Each matrix is m x n with m <= n (optax transposes the
  taller ones); each step computes A = X X^T (2 m^2 n), A A (2 m^3) and (b A + c A A) X (2 m^2 n).
  Once per optimizer step, however many micro-batches the step accumulates."""
  total = 0.0
  dims = jax.tree.leaves(dimension_numbers(logical_axes), is_leaf=is_dims)
  for x, d in zip(jax.tree.leaves(params), dims, strict=True):
    if isinstance(d, optax.MaskedNode):
      continue
    m = math.prod(x.shape[a] for a in d.reduction_axis)
    n = math.prod(x.shape[a] for a in d.output_axis)
    small, big = sorted((m, n))
    matrices = math.prod(x.shape) // (m * n)
    total += matrices * ns_steps * (4 * small**2 * big + 2 * small**3)
  return total
