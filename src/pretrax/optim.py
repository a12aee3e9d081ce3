"""The Optax chain: global-norm clipping, then AdamW with a decay mask and a schedule."""

import jax
import optax

from pretrax.config_types import OptimSection

# Parameter names (last path entry) that are embedding tables, not projections.
_EMBEDDING_NAMES = ('embedding', 'pos_embed')


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
    if leaf.ndim < 2:
      return cfg.decay_norms_and_biases
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg: OptimSection) -> optax.GradientTransformation:
  adamw = optax.adamw(
    schedule(cfg),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=lambda p: decay_mask(p, cfg),
  )
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw
