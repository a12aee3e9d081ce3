"""Everything a run holds on device, built from a config: model, optimizer, sharded train state.

Nothing here materialises the model on the host: the state is first built abstractly with
`jax.eval_shape`, its shardings come from the logical rules, and the real state is created by a
jitted init straight into those shardings (or restored into them by Orbax).
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from pretrax import optim, run_config, sharding
from pretrax import step as step_lib
from pretrax.config_types import ModelConfig, RunConfig
from pretrax.data import examples
from pretrax.data.batch import Batch
from pretrax.model import transformer


@dataclasses.dataclass(frozen=True)
class RunState:
  """The static pieces of a run and the abstract (shape + sharding) train state."""

  model_cfg: ModelConfig
  model_def: nnx.GraphDef
  optimizer: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  rules: dict[str, Any]  # Logical axis name -> mesh axes (sharding.rules).
  logical_axes: Any  # Each parameter's logical axis names, shaped like the params.
  shardings: Any  # NamedShardings shaped like the train state.
  abstract: Any  # jax.ShapeDtypeStructs with shardings: the restore target.
  spike_window: int = 0  # Losses the state keeps for loss-spike skipping.

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh, self.rules)

  def abstract_batch(self, c: RunConfig) -> Batch[jax.ShapeDtypeStruct]:
    """The shapes of the global batch the run's steps read (data/batch.py), on the mesh: what
    the train step can be compiled for before any data exists."""

    def shaped(dtype, width: int = c.data.seq_len) -> jax.ShapeDtypeStruct:
      return jax.ShapeDtypeStruct((c.data.batch_size, width), dtype, sharding=self.batch_sharding)

    tokens = {'inputs': shaped(jnp.int32), 'segment_ids': shaped(jnp.int32)}
    tokens['positions'] = shaped(jnp.int32)
    if c.objective == 'classification':  # One label slot per packed example (examples.py).
      slots = min(examples.MAX_SEGMENTS, c.data.seq_len)
      return Batch(
        **tokens, labels=shaped(jnp.int32, slots), label_weights=shaped(jnp.float32, slots)
      )
    return Batch(
      **tokens,
      targets=shaped(jnp.int32),
      weights=shaped(jnp.float32),
      prefix=shaped(jnp.int32),
      objective=shaped(jnp.int32),
    )

  def jit_train_step(self, c: RunConfig):
    """The train step jitted as `train` runs it: the run's model, optimizer and schedule, its
    activation shardings, and the state coming out in the state's own shardings."""
    return step_lib.jit_train_step(
      self.model_def,
      self.optimizer,
      self.schedule,
      step_lib.step_config(c),
      activation_sharding=self.activation_sharding,
      out_shardings=(self.shardings, None),
    )

  @property
  def activation_sharding(self):
    return sharding.activation_sharding(self.mesh, self.rules)

  def init(self, seed: int) -> step_lib.TrainState:
    """A freshly initialised train state, created directly in its shardings."""
    return jax.jit(
      lambda: _init(self.model_cfg, self.optimizer, seed, self.spike_window),
      out_shardings=self.shardings,
    )()

  def init_params(self, seed: int) -> Any:
    """Freshly initialised parameters alone, in their shardings."""
    return jax.jit(lambda: _params(self.model_cfg, seed), out_shardings=self.shardings['params'])()

  def state_from(self, params: Any) -> step_lib.TrainState:
    """Step 0 of a run that starts from `params`: a fresh optimizer state around them."""
    return jax.jit(
      lambda p: step_lib.init_state(p, self.optimizer, self.spike_window),
      out_shardings=self.shardings,
    )(params)


def param_path(keypath) -> str:
  """A parameter's name in the params tree, as 'blocks/0/attn/q': how checkpoints and
  conversions address one."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in keypath)


def _params(model_cfg: ModelConfig, seed: int) -> Any:
  return nnx.to_pure_dict(nnx.split(transformer.build(model_cfg, seed))[1])


def _init(
  model_cfg: ModelConfig,
  optimizer: optax.GradientTransformation,
  seed: int,
  spike_window: int,
) -> step_lib.TrainState:
  return step_lib.init_state(_params(model_cfg, seed), optimizer, spike_window)


def build(
  c: RunConfig,
  vocab_size: int,
  devices: list[jax.Device] | None = None,
  num_classes: int = 0,
) -> RunState:
  model_cfg = run_config.model_config(c, vocab_size, num_classes)
  model_def, abstract_params = nnx.split(nnx.eval_shape(lambda: transformer.build(model_cfg, 0)))
  mesh = sharding.make_mesh(c.mesh, devices)
  rules = sharding.rules(c.mesh)
  params_shardings = sharding.param_shardings(abstract_params, mesh, rules)
  logical_axes = nnx.to_pure_dict(
    jax.tree.map(
      lambda v: tuple(getattr(v, 'out_sharding', None) or (None,) * v[...].ndim),
      abstract_params,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
  )
  optimizer = optim.optimizer(
    c.optim,
    logical_axes,
    frozen=model_cfg.moe.num_experts > 0,
    width_mult=model_cfg.width_mult if model_cfg.mup_base_width else None,
  )
  sharding.check_divisible(nnx.to_pure_dict(abstract_params), params_shardings, logical_axes)
  abstract_state = jax.eval_shape(lambda: _init(model_cfg, optimizer, 0, c.optim.spike_window))
  shardings = sharding.state_shardings(
    abstract_state, params_shardings, mesh, optimizer, optim.without_frozen(params_shardings)
  )
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
  )
  return RunState(
    model_cfg=model_cfg,
    model_def=model_def,
    optimizer=optimizer,
    schedule=optim.schedule(c.optim),
    mesh=mesh,
    rules=rules,
    logical_axes=logical_axes,
    shardings=shardings,
    spike_window=c.optim.spike_window,
    abstract=abstract,
  )
