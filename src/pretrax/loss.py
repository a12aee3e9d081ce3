"""Weighted cross-entropy, shared by every objective: the weights say which targets count."""

import functools

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
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  return _weighted_sums(lse_BL, lse_BL - target_logit_BL, correct_BL, weights_BL, z_loss,
                        groups_BL, num_groups)


def _weighted_sums(lse_BL, nll_BL, correct_BL, weights_BL, z_loss: float,
                   groups_BL: jax.Array | None, num_groups: int) -> dict[str, jax.Array]:
  """The sums of `cross_entropy` from each token's log-sum-exp, loss and argmax hit."""
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


def chunked_cross_entropy(x_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                          weights_BL: jax.Array, *, chunk: int, bias_V: jax.Array | None = None,
                          z_loss: float = 0.0, groups_BL: jax.Array | None = None,
                          num_groups: int = 0, batch_shards: int = 1) -> dict[str, jax.Array]:
  """`cross_entropy` of the logits x_BLD @ head_DV (+ bias_V), without ever holding them whole.

  The output projection runs inside a loop over `chunk` positions at a time (every row at once,
  so a batch sharded over devices stays sharded), and the gradient recomputes each chunk's
  logits from the saved log-sum-exp: at most one (B, chunk, V) float32 block exists at a time,
  instead of (B, L, V) and its gradient. The matmul runs in x's dtype and the loss in float32,
  as the model's own head does. Only loss_sum and z_loss_sum carry gradients (to x, head and
  bias); the other sums are counts, as in `cross_entropy`. `batch_shards`: the devices the batch
  is split over; each keeps its own part of the head's gradient until the loop ends, so the
  gradient is summed across devices once, not once per chunk.
  """
  chunk = min(chunk, x_BLD.shape[1])
  pad = -x_BLD.shape[1] % chunk
  if pad:  # Padded positions weigh nothing, so they change no sum.
    widen = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    x_BLD, targets_BL, weights_BL = widen(x_BLD), widen(targets_BL), widen(weights_BL)
    groups_BL = None if groups_BL is None else widen(groups_BL)
  if groups_BL is None:
    groups_BL = jnp.zeros(targets_BL.shape, jnp.int32)
  sums = _projected_sums(x_BLD, head_DV, bias_V, targets_BL, weights_BL.astype(jnp.float32),
                         groups_BL, chunk, z_loss, num_groups, batch_shards)
  if not num_groups:
    del sums['group_loss_sum'], sums['group_weight_sum']
  return sums


def _chunk_logits(x_ND: jax.Array, head_DV: jax.Array, bias_V: jax.Array | None) -> jax.Array:
  """Float32 logits of N flattened tokens (one 2-D matmul, as layers.dense does)."""
  logits_NV = x_ND @ head_DV
  if bias_V is not None:
    logits_NV = logits_NV + bias_V
  return logits_NV.astype(jnp.float32)


def _slice(a: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
  """Positions [i * chunk, (i + 1) * chunk) of every row, tokens flattened: (B * chunk, ...)."""
  piece = jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk, axis=1)
  return piece.reshape((-1,) + a.shape[2:])


def _per_token(x_BLD, head_DV, bias_V, targets_BL, chunk: int):
  """Each token's log-sum-exp, loss and argmax hit, (B, L) float32 each. The loop keeps values
  per token and sums nothing, so no chunk waits on other devices' tokens."""
  B, L, _ = x_BLD.shape

  def one_chunk(i, per_token):
    t_N = _slice(targets_BL, i, chunk)
    logits_NV = _chunk_logits(_slice(x_BLD, i, chunk), head_DV, bias_V)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    # A comparison with the vocabulary's indices rather than a gather: it stays elementwise
    # (fused, and local to each device when the vocabulary or the tokens are sharded).
    is_target_NV = jnp.arange(logits_NV.shape[-1]) == t_N[:, None]
    nll_N = lse_N - jnp.sum(jnp.where(is_target_NV, logits_NV, 0.0), axis=-1)
    correct_N = (jnp.argmax(logits_NV, axis=-1) == t_N).astype(jnp.float32)
    return tuple(jax.lax.dynamic_update_slice_in_dim(a_BL, a_N.reshape(B, chunk), i * chunk, 1)
                 for a_BL, a_N in zip(per_token, (lse_N, nll_N, correct_N)))

  zeros = tuple(jnp.zeros((B, L), jnp.float32) for _ in range(3))
  return jax.lax.fori_loop(0, L // chunk, one_chunk, zeros)


def _forward_chunks(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk: int,
                    z_loss: float, num_groups: int):
  """The sums, and each token's log-sum-exp (B, L) for the backward pass."""
  lse_BL, nll_BL, correct_BL = _per_token(x_BLD, head_DV, bias_V, targets_BL, chunk)
  sums = _weighted_sums(lse_BL, nll_BL, correct_BL, weights_BL, z_loss, groups_BL,
                        max(num_groups, 1))
  return sums, lse_BL


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _projected_sums(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk, z_loss,
                    num_groups, batch_shards):
  return _forward_chunks(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk,
                         z_loss, num_groups)[0]


def _projected_sums_fwd(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk, z_loss,
                        num_groups, batch_shards):
  del batch_shards  # The backward's.
  sums, lse_BL = _forward_chunks(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk,
                                 z_loss, num_groups)
  return sums, (x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, lse_BL)


def _projected_sums_bwd(chunk, z_loss, num_groups, batch_shards, residuals, d_sums):
  del num_groups  # The group sums are reports: no gradient flows through them.
  x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, lse_BL = residuals
  d_loss, d_z = d_sums['loss_sum'], d_sums['z_loss_sum']
  S = batch_shards
  per_shard = lambda a_N: a_N.reshape((S, -1) + a_N.shape[1:])  # Rows stay with their device.

  def one_chunk(i, carry):
    d_x_BLD, d_head_SDV, d_bias_SV = carry
    x_ND = _slice(x_BLD, i, chunk)
    t_N, w_N, lse_N = (_slice(a, i, chunk) for a in (targets_BL, weights_BL, lse_BL))
    # The chunk's logits once more; their softmax comes from the saved log-sum-exp.
    probs_NV = jnp.exp(_chunk_logits(x_ND, head_DV, bias_V) - lse_N[:, None])
    # d nll / d logits = softmax - one_hot(target); d lse^2 / d logits = 2 lse softmax.
    scale_N = w_N * (d_loss + d_z * z_loss * 2.0 * lse_N)
    is_target_NV = jnp.arange(probs_NV.shape[-1]) == t_N[:, None]  # Not a scatter: see above.
    d_logits_NV = (probs_NV * scale_N[:, None]
                   - jnp.where(is_target_NV, (w_N * d_loss)[:, None], 0.0))
    d_logits_NV = d_logits_NV.astype(x_BLD.dtype)  # As autodiff casts it back through astype.
    d_x_ND = d_logits_NV @ head_DV.T
    d_x_BLD = jax.lax.dynamic_update_slice_in_dim(
        d_x_BLD, d_x_ND.reshape(x_BLD.shape[0], chunk, -1), i * chunk, 1)
    # Per batch shard, in float32 (one long matmul would accumulate in float32 too): summing
    # over all tokens here would add the shards' parts across devices at every chunk.
    d_head_SDV = d_head_SDV + jnp.einsum('SND,SNV->SDV', per_shard(x_ND), per_shard(d_logits_NV),
                                         preferred_element_type=jnp.float32)
    if d_bias_SV is not None:
      d_bias_SV = d_bias_SV + jnp.sum(per_shard(d_logits_NV), axis=1, dtype=jnp.float32)
    return d_x_BLD, d_head_SDV, d_bias_SV

  zeros = (jnp.zeros_like(x_BLD), jnp.zeros((S,) + head_DV.shape, jnp.float32),
           None if bias_V is None else jnp.zeros((S,) + bias_V.shape, jnp.float32))
  d_x_BLD, d_head_SDV, d_bias_SV = jax.lax.fori_loop(0, x_BLD.shape[1] // chunk, one_chunk,
                                                     zeros)
  d_bias_V = None if bias_V is None else jnp.sum(d_bias_SV, axis=0).astype(bias_V.dtype)
  return (d_x_BLD, jnp.sum(d_head_SDV, axis=0).astype(head_DV.dtype), d_bias_V, None, None,
          None)


_projected_sums.defvjp(_projected_sums_fwd, _projected_sums_bwd)
