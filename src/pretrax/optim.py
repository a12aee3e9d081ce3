"""The Optax chain: global-norm clipping, then AdamW with a decay mask and a schedule; or, with
optim.name=muon, Muon for the transformer blocks' hidden matrices and that AdamW for the rest;
with muP (model.mup_base_width), each parameter's step scaled by its learning-rate multiplier
(pretrax.mup), its weight decay's step left as tuned.

Parameters that the train step sets itself (an MoE router's balancing bias, `FROZEN_NAMES`) are
left out: no update, no weight decay, no optimizer state.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from pretrax import mup, optim_muon
from pretrax.config_types import OptimSection
from pretrax.model import stack

# Parameter names (last path entry) that are embedding tables, not projections.
_EMBEDDING_NAMES = ('embedding', 'pos_embed')
# Parameter names the optimizer never touches (model/moe.py's ROUTER_BIAS).
FROZEN_NAMES = ('router_bias',)


def schedule(cfg: OptimSection) -> optax.Schedule:
  """Linear warmup from 0, then cosine or linear decay to min_lr, warmup-stable-decay, or
  constant."""
  warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
  rest = cfg.schedule_steps - cfg.warmup_steps
  if cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(cfg.lr, max(rest, 1), alpha=cfg.min_lr / cfg.lr)
  elif cfg.schedule == 'linear':  # BERT's.
    after = optax.linear_schedule(cfg.lr, cfg.min_lr, max(rest, 1))
  elif cfg.schedule == 'wsd':
    decay_steps = max(int(round(cfg.schedule_steps * cfg.decay_fraction)), 1)
    after = optax.join_schedules(
      [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, cfg.min_lr, decay_steps)],
      boundaries=[max(rest - decay_steps, 0)],
    )
  else:
    after = optax.constant_schedule(cfg.lr)
  return optax.join_schedules([warmup, after], boundaries=[cfg.warmup_steps])


def decay_mask(params, cfg: OptimSection):
  """True where weight decay applies: projections always; embeddings, norms, biases if asked."""

  def decays(path, leaf) -> bool:
    name = getattr(path[-1], 'key', None)
    if name in _EMBEDDING_NAMES:
      return cfg.decay_embeddings
    # A stacked block's (model.scan_layers) leading axis is its layers: a norm is still a vector.
    layers = int(getattr(path[0], 'key', None) == stack.STACK)
    if leaf.ndim - layers < 2:
      return cfg.decay_norms_and_biases
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(
  cfg: OptimSection,
  logical_axes: Any,
  frozen: bool = False,
  width_mult: float | None = None,
) -> optax.GradientTransformation:
  """The run's optimizer for parameters with these logical axis names (a params-shaped tree of
  name tuples: Muon's matrices and muP's roles are read from them); with `frozen` (a model that
  has FROZEN_NAMES parameters), those are taken out of the tree it sees (zero updates, no state,
  no weight decay). Without it the optimizer state has the structure it always had, so older
  checkpoints restore. `width_mult`: muP's m (ModelConfig.width_mult), None for the standard
  parametrisation."""
  axes = without_frozen(logical_axes) if frozen else logical_axes
  if cfg.name == 'muon':
    trained = _muon(cfg, axes, width_mult)
  else:
    multipliers = None if width_mult is None else mup.adam_lr_multipliers(axes, width_mult)
    trained = _adamw(cfg, multipliers)
  if cfg.clip_norm > 0:
    trained = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), trained)
  return _skipping_frozen(trained) if frozen else trained


def without_frozen(tree):
  """A params-shaped tree of nested dicts without its FROZEN_NAMES entries: the tree the
  optimizer's state follows. Anything else (optax's placeholder for a whole tree) as it is."""
  if not isinstance(tree, dict):
    return tree
  return {
    k: without_frozen(v) if isinstance(v, dict) else v
    for k, v in tree.items()
    if k not in FROZEN_NAMES
  }


def _with_zeros(updates, like):
  """`updates` (without frozen entries) with a zero update for each frozen entry of `like`."""
  return {
    k: jnp.zeros_like(v)
    if k in FROZEN_NAMES
    else (_with_zeros(updates[k], v) if isinstance(v, dict) else updates[k])
    for k, v in like.items()
  }


def _skipping_frozen(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` over the parameters other than FROZEN_NAMES: its state holds nothing of them
  (unlike optax.masked, whose state keeps the tree's shape), and their updates are zero."""

  def init(params):
    return inner.init(without_frozen(params))

  def update(updates, state, params=None):
    kept = None if params is None else without_frozen(params)
    out, state = inner.update(without_frozen(updates), state, kept)
    return _with_zeros(out, updates), state

  return optax.GradientTransformation(init, update)


def _adamw(cfg: OptimSection, multipliers: Any = None) -> optax.GradientTransformation:
  """optax.adamw's chain, with the decay mask; with muP `multipliers` (a params-shaped tree of
  floats), each parameter's Adam direction times its lr multiplier. Before the decay: the decay's
  step, lr x weight_decay, stays as tuned at every width, as the mup package's MuAdamW keeps it
  (it divides a group's lr by m and multiplies its weight decay by m)."""
  return optax.chain(
    optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    *([] if multipliers is None else [_scaled(multipliers)]),
    optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: decay_mask(p, cfg)),
    optax.scale_by_learning_rate(schedule(cfg)),
  )


def _scaled(multipliers: Any) -> optax.GradientTransformation:
  """Each update times its entry of a params-shaped tree of Python floats (no state)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, k: u * k, updates, multipliers), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def _muon(
  cfg: OptimSection, logical_axes: Any, width_mult: float | None = None
) -> optax.GradientTransformation:
  """Muon for the parameters optim_muon.dimension_numbers picks, _adamw for the others.

  Built from optax.contrib's parts rather than its `muon` alias, which ties Adam's Nesterov
  setting to Muon's and applies one weight decay to every Adam parameter (our decay mask spares
  embeddings, norms and biases). The Muon update is scaled to AdamW's RMS (optim_muon), so one
  lr and weight_decay serve both groups, as in Moonshot's 'Muon is scalable'.
  """
  dims = optim_muon.dimension_numbers(logical_axes)
  muon = optax.chain(
    # Heavy-ball momentum: 1 / (1 - b) times the reference's moving average, which the
    # orthogonalisation's normalisation cancels.
    optax.trace(decay=cfg.muon_momentum, nesterov=True),
    optim_muon.orthogonalise(dims, cfg.ns_steps),
    *([] if width_mult is None else [optax.scale(mup.muon_lr_multiplier(width_mult))]),
    optax.add_decayed_weights(cfg.weight_decay),  # Every hidden matrix decays, as in _adamw.
    optax.scale_by_learning_rate(schedule(cfg)),
  )
  labels = jax.tree.map(
    lambda d: 'adamw' if isinstance(d, optax.MaskedNode) else 'muon',
    dims,
    is_leaf=optim_muon.is_dims,
  )
  adam_multipliers = None
  if width_mult is not None:
    # Shaped like the updates the AdamW group sees: MaskedNode in place of Muon's matrices.
    adam_multipliers = jax.tree.map(
      lambda d, k: k if isinstance(d, optax.MaskedNode) else optax.MaskedNode(),
      dims,
      mup.adam_lr_multipliers(logical_axes, width_mult),
      is_leaf=optim_muon.is_dims,
    )
  return optax.partition({'muon': muon, 'adamw': _adamw(cfg, adam_multipliers)}, labels)
