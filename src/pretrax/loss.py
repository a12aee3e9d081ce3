"""Weighted cross-entropy, shared by every objective: the weights say which targets count."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array,
                  z_loss: float = 0.0, groups_BL: jax.Array | None = None,
                  num_groups: int = 0) -> dict[str, jax.Array]:
  """Sums (not means) so that micro-batches and devices can be added before dividing.

  Returns loss_sum (negative log-likelihood), z_loss_sum (z_loss * logsumexp^2, PaLM's
  stabiliser), weight_sum and correct_sum (argmax hits), each weighted by `weights_BL`. With
  `groups_BL` (ints below `num_groups`, e.g. each token's objective) also group_loss_sum and
  group_weight_sum, (num_groups,) each.
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  one_hot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=logits_BLV.dtype)
  target_logit_BL = jnp.einsum('BLV,BLV->BL', logits_BLV, one_hot_BLV)
  nll_BL = lse_BL - target_logit_BL
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  sums = {
      'loss_sum': jnp.sum(nll_BL * weights_BL),
      'z_loss_sum': z_loss * jnp.sum(jnp.square(lse_BL) * weights_BL),
      'weight_sum': jnp.sum(weights_BL),
      'correct_sum': jax.lax.stop_gradient(jnp.sum(correct_BL * weights_BL)),
  }
  if groups_BL is not None:
    in_group_BLG = jax.nn.one_hot(groups_BL, num_groups, dtype=jnp.float32) * weights_BL[..., None]
    sums['group_loss_sum'] = jax.lax.stop_gradient(jnp.einsum('BL,BLG->G', nll_BL, in_group_BLG))
    sums['group_weight_sum'] = jnp.sum(in_group_BLG, axis=(0, 1))
  return sums
