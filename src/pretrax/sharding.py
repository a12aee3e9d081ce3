"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with sharded parameters and
optimizer state), `expert` (expert parallelism: each device holds some of a Mixture-of-Experts
layer's experts, and the dense layers treat the axis as more data parallelism), `tensor` (model
parallelism inside matmuls, innermost so that it gets the fastest links). The model names its
axes logically (`pretrax.model.layers`); only this module turns those names into `PartitionSpec`s.
"""

from collections.abc import Callable, Mapping, Sequence
import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from pretrax import errors
from pretrax.config_types import MeshSection

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
# Axes that may also span the data-centre network (between TPU slices or GPU nodes): only data
# parallelism, whose one all-reduce per step tolerates the slower links.
DCN_AXES = ('data', 'fsdp')

# Logical axis -> mesh axis (or axes, or None to replicate). Every logical name must appear here.
# Parameters: vocab, embed, mlp, heads, kv_heads, head_dim, position, norm, layers. Activations:
# batch, length, activation_embed, activation_vocab (the embedding dim of activations is not
# `embed`: the batch already uses fsdp, and one mesh axis cannot shard two dims of an array).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
  'batch': ('data', 'fsdp', 'expert'),
  'length': None,
  'activation_embed': None,
  'activation_vocab': 'tensor',
  'vocab': 'tensor',
  'embed': 'fsdp',
  'mlp': 'tensor',
  'heads': 'tensor',
  'kv_heads': 'tensor',
  'head_dim': None,
  'position': None,
  'norm': None,
  'classes': None,  # A classifier's few labels: not worth splitting.
  # model.scan_layers' stacking axis: every device holds every layer's shard (the scan slices one
  # layer per iteration; splitting layers over devices would be pipelining, not this).
  'layers': None,
  # Mixture-of-Experts (model/moe.py). Whole experts live on the devices of the `expert` axis
  # (expert parallelism; with mesh.expert=1 every device has every expert); inside one expert the
  # weights are sharded like a dense MLP (FSDP over embed, tensor over hidden).
  'experts': 'expert',
  'expert_embed': 'fsdp',
  'expert_mlp': 'tensor',
  'router': None,  # The router's (embed, experts) weight: small, and every token needs all of it.
  'capacity': None,  # A capacity buffer's slots.
  # The token groups of a capacity buffer once dispatched to their experts: `batch` less the axes
  # that now split the experts (the all-to-all trades one for the other). rules() derives it from
  # the two unless mesh.rules sets it.
  'expert_batch': ('data', 'fsdp'),
}


class ShardingError(errors.PretraxError, ValueError):
  """A mesh or rule that cannot work; the message names it and the fix."""


def rules(mesh_cfg: MeshSection) -> dict[str, str | tuple[str, ...] | None]:
  """The rules table with the config's overrides, `mesh.rules='NAME=AXIS[+AXIS],...'` (an empty
  AXIS replicates), e.g. `--config.mesh.rules=embed=,mlp=fsdp+tensor`."""
  table = dict(DEFAULT_RULES)
  overridden = set()
  for entry in filter(None, (e.strip() for e in mesh_cfg.rules.split(','))):
    name, sep, axes = entry.partition('=')
    name = name.strip()
    if not sep or name not in table:
      raise ShardingError(
        f'mesh.rules entry {entry!r}: expected LOGICAL=AXIS[+AXIS] with LOGICAL one of '
        f'{", ".join(table)}.'
      )
    names = tuple(a.strip() for a in axes.split('+') if a.strip())
    unknown = [a for a in names if a not in MESH_AXES]
    if unknown:
      raise ShardingError(
        f'mesh.rules entry {entry!r}: unknown mesh axis {unknown[0]!r} '
        f'(the mesh has {", ".join(MESH_AXES)}).'
      )
    table[name] = names[0] if len(names) == 1 else (names or None)
    overridden.add(name)
  if 'expert_batch' not in overridden:
    table['expert_batch'] = _without(table['batch'], table['experts'])
  return table


def axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
  """A rules-table value as a tuple of mesh axes (none for a replicated dim)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _without(entry, remove) -> str | tuple[str, ...] | None:
  """The dispatched token groups keep the batch's axes except the ones the experts now use."""
  kept = tuple(a for a in axes_of(entry) if a not in axes_of(remove))
  return kept[0] if len(kept) == 1 else (kept or None)


def _resolve(sizes: list[int], num_devices: int, what: str) -> list[int]:
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ShardingError(f'{what}: only one of {", ".join(MESH_AXES)} may be -1, got {sizes}.')
  fixed = 1
  for s in sizes:
    if s == 0 or s < -1:
      raise ShardingError(f'{what}: axis sizes must be positive or -1, got {sizes}.')
    fixed *= s if s != -1 else 1
  if free:
    if num_devices % fixed:
      raise ShardingError(
        f'{what} {sizes} cannot use {num_devices} devices: the fixed axes '
        f'({fixed}) must divide the device count.'
      )
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ShardingError(
      f'{what} {dict(zip(MESH_AXES, sizes, strict=True))} needs '
      f'{math.prod(sizes)} devices but there are {num_devices}: '
      'set one axis to -1.'
    )
  return sizes


def mesh_shapes(mesh_cfg: MeshSection, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(per-granule shape, DCN shape) in MESH_AXES order. A granule is a TPU slice or a GPU
  node (process); `mesh.dcn_data` and `mesh.dcn_fsdp` say how many granules each axis spans, and
  the per-granule sizes (`mesh.data`, ...) cover the devices of one granule."""
  dcn = [int(mesh_cfg.dcn_data), int(mesh_cfg.dcn_fsdp), 1, 1]  # Only data parallelism spans DCN.
  if min(dcn) < 1:
    raise ShardingError(f'mesh.dcn_data={dcn[0]} and mesh.dcn_fsdp={dcn[1]} must be >= 1.')
  granules = dcn[0] * dcn[1]
  if num_devices % granules:
    raise ShardingError(
      f'mesh.dcn_data x mesh.dcn_fsdp = {granules} slices/nodes do not divide '
      f'{num_devices} devices.'
    )
  what = 'mesh per slice/node' if granules > 1 else 'mesh'
  ici = _resolve([int(getattr(mesh_cfg, a)) for a in MESH_AXES], num_devices // granules, what)
  return tuple(ici), tuple(dcn)


def mesh_shape(mesh_cfg: MeshSection, num_devices: int) -> dict[str, int]:
  """Size of each mesh axis over all devices, by name (MESH_AXES order)."""
  ici, dcn = mesh_shapes(mesh_cfg, num_devices)
  return {axis: i * d for axis, i, d in zip(MESH_AXES, ici, dcn, strict=True)}


def make_mesh(mesh_cfg: MeshSection, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  ici, dcn = mesh_shapes(mesh_cfg, len(devices))
  # Auto axes: the compiler propagates shardings between our explicit constraints.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(ici, MESH_AXES, axis_types=auto, devices=devices)
  # Hybrid: the DCN part of each axis is outermost, so it crosses granules and the rest stays on
  # the fast links inside one. TPU devices know their slice; elsewhere a process is a node.
  from jax.experimental import mesh_utils

  by_process = devices[0].platform != 'tpu'
  granules = len({d.process_index if by_process else d.slice_index for d in devices})
  if granules != dcn[0] * dcn[1]:
    raise ShardingError(
      f'mesh.dcn_data x mesh.dcn_fsdp = {dcn[0] * dcn[1]} but the devices are in {granules} '
      f'{"processes" if by_process else "slices"}: make the product {granules}.'
    )
  array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process)
  return Mesh(array, MESH_AXES, axis_types=auto)


def logical_to_spec(names: Sequence[str | None], rules: Mapping[str, object]) -> P:
  """PartitionSpec for a tuple of logical axis names; an unknown name is an error."""
  axes: list[object] = []  # Each a mesh axis, a tuple of them, or None (rules' values).
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in rules:
      raise ShardingError(
        f'logical axis {name!r} has no rule: add it to the sharding rules '
        f'(known: {", ".join(sorted(rules))}).'
      )
    axes.append(rules[name])
  used = [a for entry in axes if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
  for axis in set(used):
    if used.count(axis) > 1:
      raise ShardingError(
        f'logical axes {tuple(names)} map mesh axis {axis!r} to two dimensions of one array '
        f'({", ".join(f"{n}={rules.get(n)}" for n in names if n)}): change mesh.rules so that '
        'each mesh axis shards at most one of them.'
      )
  return P(*axes)


def param_shardings(abstract_params, mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES):
  """NamedShardings for an nnx.State of parameters (read from their logical names), as a dict."""
  from flax import nnx  # Only here: the rest of this module does not depend on the model library.

  def to_sharding(variable):
    names = getattr(variable, 'out_sharding', None) or (None,) * variable[...].ndim
    return NamedSharding(mesh, logical_to_spec(names, rules))

  shardings = jax.tree.map(
    to_sharding, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return nnx.to_pure_dict(shardings)


# The field that sets a logical dim's size, where one does, for check_divisible's message.
_DIVISIBLE_FIX = {
  'vocab': 'set --config.model.vocab_multiple to a multiple of it',
  'experts': 'make --config.model.moe.num_experts a multiple of it, change the mesh',
  'expert_embed': 'make --config.model.embed_dim a multiple of it, change the mesh',
  'expert_mlp': 'make --config.model.moe.expert_dim a multiple of it, change the mesh',
}


def check_divisible(abstract_params, shardings, logical_axes) -> None:
  """Raises ShardingError naming the first parameter whose dims the mesh does not divide evenly
  (JAX needs even shards), with the logical axis at fault and the ways out."""
  paths = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  all_names = jax.tree.leaves(logical_axes, is_leaf=lambda n: isinstance(n, tuple))
  for (path, x), s, names in zip(paths, jax.tree.leaves(shardings), all_names, strict=True):
    # A PartitionSpec may stop before the array's last dims: those are not sharded.
    for dim, (size, axes) in enumerate(zip(x.shape, s.spec, strict=False)):
      if axes is None:
        continue
      parts = 1
      for axis in axes if isinstance(axes, tuple) else (axes,):
        parts *= s.mesh.shape[axis]
      if size % parts:
        name = names[dim]
        fix = _DIVISIBLE_FIX.get(name, 'change the model size or the mesh')
        raise ShardingError(
          f'parameter {jax.tree_util.keystr(path, simple=True, separator=".")} dim {dim} '
          f'({name}, size {size}) cannot be split {parts} ways over mesh axes {axes}: {fix}, '
          f'or replicate it with --config.mesh.rules={name}='
        )


def state_shardings(
  abstract_state,
  params_shardings,
  mesh: Mesh,
  optimizer: optax.GradientTransformation,
  optimized_shardings=None,
):
  """Shardings for the whole train state: optimizer moments follow their parameters.
  `optimized_shardings`: those of the parameters the optimizer keeps state for, when it leaves
  some out (optim.without_frozen); default all of them."""
  replicated = NamedSharding(mesh, P())
  # optax.partition (optim.name=muon) keeps each group's state as a params-shaped tree with a
  # MaskedNode for each parameter of the other group: it stays one, with no sharding.
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  opt = optax.tree_map_params(
    optimizer,
    lambda x, s: x if masked(x) else s,
    abstract_state['opt_state'],
    params_shardings if optimized_shardings is None else optimized_shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=masked,
  )
  # Anything else in the state (the step, loss-spike statistics) is small: every device has it.
  others = {
    k: jax.tree.map(lambda _: replicated, v)
    for k, v in abstract_state.items()
    if k not in ('params', 'opt_state')
  }
  return {**others, 'params': params_shardings, 'opt_state': opt}


def batch_sharding(mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(('batch', 'length'), rules))


def activation_sharding(
  mesh: Mesh, rules: Mapping[str, object] = DEFAULT_RULES
) -> Callable[[Sequence[str | None]], NamedSharding]:
  """Logical activation names -> NamedSharding, for the model's `layers.constrain`."""
  return lambda names: NamedSharding(mesh, logical_to_spec(names, rules))
