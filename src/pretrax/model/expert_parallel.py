"""Dropless experts split over devices (expert parallelism), for `moe.dropless`.

The fixed-capacity computation needs nothing here: its (groups, experts, capacity, embed) buffers
have static shapes, so two sharding constraints make the partitioner move them with an all-to-all
(`moe.with_capacity`). The dropless one sends each expert a number of rows known only at run time,
which the partitioner cannot split; this module splits it by hand, in `shard_map`:

1. every device of the expert axis gathers the tokens (and their routing) of the others on that
   axis (an all-gather; they hold different sequences of the same batch);
2. it runs its own experts on the copies routed to them: copies sorted by local expert, one grouped
   matmul (`ragged_dot`) per weight, the other devices' copies left out of the groups;
3. the partial outputs (each device has its experts' share) are summed and scattered back to the
   devices that own the tokens (a reduce-scatter).

This is Megatron's all-gather token dispatcher. It moves every token to every device of the axis,
which is simple and works on every backend, XLA:CPU included (`ragged_all_to_all` does not run
there); a ragged all-to-all would move only the routed copies.

Inside an expert the weights may also be split like a dense MLP: over their embed dim (gathered
here, as FSDP gathers) and their hidden dim (tensor parallelism: the partial outputs are summed).
"""

import functools

import jax

from pretrax import errors
from pretrax.model import layers


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axes."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def on_mesh() -> bool:
  """Whether the model is traced for a mesh of more than one device."""
  to_sharding = layers.current_activation_sharding()
  return to_sharding is not None and to_sharding(('experts',)).mesh.size > 1


def expert_axes() -> tuple[str, ...]:
  """The mesh axes (of size > 1) that split the experts under the current activation sharding;
  () when there is no mesh or every device holds every expert."""
  to_sharding = layers.current_activation_sharding()
  if to_sharding is None:
    return ()
  sharding = to_sharding(('experts',))
  return tuple(a for a in _axes(sharding.spec[0]) if sharding.mesh.shape[a] > 1)


def dropless_sharded(expert_fn, x_TD, routing, wi_EDF, gate_EDF, wo_EFD) -> jax.Array:
  """`expert_fn(x_TD, expert_TK, weight_TK, wi, gate, wo, first_expert)` (moe's local dropless
  computation) per device, its tokens gathered over the expert axes and its outputs summed back.
  Without expert parallelism, too: each device then sorts only its own tokens' copies, where the
  partitioner would gather the whole batch's onto every device to sort them."""
  to_sharding = layers.current_activation_sharding()
  assert to_sharding is not None  # Only called when expert_axes() found a mesh.
  mesh = to_sharding(('experts',)).mesh
  tokens = to_sharding(('batch', 'activation_embed')).spec
  wi_spec = to_sharding(('experts', 'expert_embed', 'expert_mlp')).spec
  wo_spec = to_sharding(('experts', 'expert_mlp', 'expert_embed')).spec
  ep_axes, batch_axes = expert_axes(), _axes(tokens[0])
  # The expert axes must be the batch's innermost (a device's tokens are then one contiguous
  # block of its group's gathered rows) or not split the batch at all (every device has them).
  gathered = bool(set(ep_axes) & set(batch_axes))
  if gathered and batch_axes[-len(ep_axes) :] != ep_axes:  # (gathered: ep_axes is not empty)
    raise errors.PretraxError(
      f"mesh.rules: the experts' mesh axes {ep_axes} must be the last of the batch's "
      f'{batch_axes} (or not split the batch) for dropless expert parallelism: change mesh.rules.'
    )
  body = functools.partial(
    _per_device,
    expert_fn=expert_fn,
    ep_axes=ep_axes,
    gathered=gathered,
    embed_axes=_axes(wi_spec[1]),
    mlp_axes=_axes(wi_spec[2]),
  )
  per_device = jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(tokens, tokens, tokens, wi_spec, wi_spec if gate_EDF is not None else None, wo_spec),
    out_specs=tokens,
  )
  return per_device(x_TD, routing.expert_TK, routing.weight_TK, wi_EDF, gate_EDF, wo_EFD)


def _per_device(
  x_TD,
  expert_TK,
  weight_TK,
  wi_EDF,
  gate_EDF,
  wo_EFD,
  *,
  expert_fn,
  ep_axes,
  gathered,
  embed_axes,
  mlp_axes,
):
  if embed_axes:  # Each expert whole along embed, as FSDP gathers a dense layer's weights.
    gather = functools.partial(jax.lax.all_gather, axis_name=embed_axes, tiled=True)
    wi_EDF = gather(wi_EDF, axis=1)
    gate_EDF = None if gate_EDF is None else gather(gate_EDF, axis=1)
    wo_EFD = gather(wo_EFD, axis=2)
  if gathered:  # Every token of the expert group, in the order of the devices that own them.
    x_TD, expert_TK, weight_TK = (
      jax.lax.all_gather(a, ep_axes, axis=0, tiled=True) for a in (x_TD, expert_TK, weight_TK)
    )
  first_expert = jax.lax.axis_index(ep_axes) * wi_EDF.shape[0] if ep_axes else 0
  y_TD = expert_fn(x_TD, expert_TK, weight_TK, wi_EDF, gate_EDF, wo_EFD, first_expert)
  if gathered:  # Sum the experts' shares; each device keeps the rows of its own tokens.
    y_TD = jax.lax.psum_scatter(y_TD, ep_axes, scatter_dimension=0, tiled=True)
  elif ep_axes:
    y_TD = jax.lax.psum(y_TD, ep_axes)
  if mlp_axes:  # Each device summed over its slice of the experts' hidden dim.
    y_TD = jax.lax.psum(y_TD, mlp_axes)
  return y_TD
