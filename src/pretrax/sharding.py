"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with sharded parameters and
optimizer state), `tensor` (model parallelism inside matmuls). The model names its axes logically
(`pretrax.model.layers`); only this module turns those names into `PartitionSpec`s.
"""

from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import optax

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or axes, or None to replicate). Every logical name must appear here.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    'batch': ('data', 'fsdp'),
    'vocab': 'tensor',
    'embed': 'fsdp',
    'mlp': 'tensor',
    'heads': 'tensor',
    'kv_heads': 'tensor',
    'head_dim': None,
    'position': None,
    'norm': None,
}


class ShardingError(ValueError):
  """A mesh or rule that cannot work; the message names it and the fix."""


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Sizes of (data, fsdp, tensor); one of them may be -1 to take the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ShardingError(f'mesh: only one of {", ".join(MESH_AXES)} may be -1, got {sizes}.')
  fixed = 1
  for s in sizes:
    fixed *= s if s != -1 else 1
  if free:
    if num_devices % fixed:
      raise ShardingError(f'mesh {sizes} cannot use {num_devices} devices: the fixed axes '
                          f'({fixed}) must divide the device count.')
    sizes[free[0]] = num_devices // fixed
  if sizes[0] * sizes[1] * sizes[2] != num_devices:
    raise ShardingError(f'mesh {dict(zip(MESH_AXES, sizes))} needs '
                        f'{sizes[0] * sizes[1] * sizes[2]} devices but there are {num_devices}: '
                        'set one axis to -1.')
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the compiler propagates shardings between our explicit constraints.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, object]) -> P:
  """PartitionSpec for a tuple of logical axis names; an unknown name is an error."""
  axes = []
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in rules:
      raise ShardingError(f'logical axis {name!r} has no rule: add it to the sharding rules '
                          f'(known: {", ".join(sorted(rules))}).')
    axes.append(rules[name])
  return P(*axes)


def param_shardings(abstract_params, mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES):
  """NamedShardings for an nnx.State of parameters (read from their logical names), as a dict."""
  from flax import nnx  # Only here: the rest of this module does not depend on the model library.

  def to_sharding(variable):
    names = getattr(variable, 'out_sharding', None) or (None,) * variable[...].ndim
    return NamedSharding(mesh, logical_to_spec(names, rules))

  shardings = jax.tree.map(to_sharding, abstract_params,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def state_shardings(abstract_state, params_shardings, mesh: Mesh,
                    optimizer: optax.GradientTransformation):
  """Shardings for the whole train state: optimizer moments follow their parameters."""
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state['opt_state'], params_shardings,
      transform_non_params=lambda _: replicated)
  return {'step': replicated, 'params': params_shardings, 'opt_state': opt}


def batch_sharding(mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(('batch', None), rules))
