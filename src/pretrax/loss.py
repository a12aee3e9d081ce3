"""Weighted cross-entropy, shared by every objective: the weights say which targets count."""

import functools

import jax
import jax.numpy as jnp


def cross_entropy(
  logits_BLV: jax.Array,
  targets_BL: jax.Array,
  weights_BL: jax.Array,
  z_loss: float = 0.0,
  groups_BL: jax.Array | None = None,
  num_groups: int = 0,
) -> dict[str, jax.Array]:
  """Sums (not means) so that micro-batches and devices can be added before dividing.

  Returns loss_sum (negative log-likelihood), z_loss_sum (z_loss * logsumexp^2, PaLM's
  stabiliser), their sum objective_sum (what training differentiates), weight_sum and
  correct_sum (argmax hits), each weighted by `weights_BL`. With
  `groups_BL` (ints below `num_groups`, e.g. each token's objective) also group_loss_sum and
  group_weight_sum, (num_groups,) each.
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  one_hot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=logits_BLV.dtype)
  target_logit_BL = jnp.einsum('BLV,BLV->BL', logits_BLV, one_hot_BLV)
  correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL).astype(jnp.float32)
  return _weighted_sums(
    lse_BL, lse_BL - target_logit_BL, correct_BL, weights_BL, z_loss, groups_BL, num_groups
  )


def _weighted_sums(
  lse_BL,
  nll_BL,
  correct_BL,
  weights_BL,
  z_loss: float,
  groups_BL: jax.Array | None,
  num_groups: int,
) -> dict[str, jax.Array]:
  """The sums of `cross_entropy` from each token's log-sum-exp, loss and argmax hit."""
  sums = {
    'loss_sum': jnp.sum(nll_BL * weights_BL),
    'z_loss_sum': z_loss * jnp.sum(jnp.square(lse_BL) * weights_BL),
    'weight_sum': jnp.sum(weights_BL),
    'correct_sum': jax.lax.stop_gradient(jnp.sum(correct_BL * weights_BL)),
  }
  sums['objective_sum'] = sums['loss_sum'] + sums['z_loss_sum']  # What training minimises.
  if groups_BL is not None:
    in_group_BLG = jax.nn.one_hot(groups_BL, num_groups, dtype=jnp.float32) * weights_BL[..., None]
    sums['group_loss_sum'] = jax.lax.stop_gradient(jnp.einsum('BL,BLG->G', nll_BL, in_group_BLG))
    sums['group_weight_sum'] = jnp.sum(in_group_BLG, axis=(0, 1))
  return sums


def chunked_cross_entropy(
  x_BLD: jax.Array,
  head_DV: jax.Array,
  targets_BL: jax.Array,
  weights_BL: jax.Array,
  *,
  chunk: int,
  bias_V: jax.Array | None = None,
  z_loss: float = 0.0,
  groups_BL: jax.Array | None = None,
  num_groups: int = 0,
  batch_shards: int = 1,
) -> dict[str, jax.Array]:
  """`cross_entropy` of the logits x_BLD @ head_DV (+ bias_V), without ever holding them whole.

  The output projection runs inside a loop over `chunk` positions at a time (every row at once,
  so a batch sharded over devices stays sharded): at most one (B, chunk, V) float32 block of
  logits exists at a time, instead of (B, L, V) and its gradient. The matmul runs in x's dtype
  and the loss in float32, as the model's own head does. Under differentiation the gradient is
  taken in the same loop, chunk by chunk, as each chunk's logits are made (as fused linear
  cross-entropy kernels do), so no chunk is computed twice; the backward pass only scales it.
  That gradient is objective_sum's: differentiate objective_sum (loss_sum + z_loss_sum). The
  other sums, loss_sum and z_loss_sum included, are reports and carry none. `batch_shards`:
  the devices the batch is split over; each keeps its own part of the head's gradient until
  the loop ends, so it is summed across devices once, not once per chunk.
  """
  chunk = min(chunk, x_BLD.shape[1])
  pad = -x_BLD.shape[1] % chunk

  def widen(a):
    return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

  if pad:  # Padded positions weigh nothing, so they change no sum.
    x_BLD, targets_BL, weights_BL = widen(x_BLD), widen(targets_BL), widen(weights_BL)
    groups_BL = None if groups_BL is None else widen(groups_BL)
  return _projected_sums(
    x_BLD,
    head_DV,
    bias_V,
    targets_BL,
    weights_BL.astype(jnp.float32),
    groups_BL,
    chunk,
    z_loss,
    num_groups,
    batch_shards,
  )


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


def _chunk_values(x_ND, head_DV, bias_V, t_N):
  """One chunk's logits (float32), then each token's log-sum-exp, loss and argmax hit, and
  where its target is (N, V)."""
  logits_NV = _chunk_logits(x_ND, head_DV, bias_V)
  lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
  # A comparison with the vocabulary's indices rather than a gather: it stays elementwise
  # (fused, and local to each device when the vocabulary or the tokens are sharded).
  is_target_NV = jnp.arange(logits_NV.shape[-1]) == t_N[:, None]
  nll_N = lse_N - jnp.sum(jnp.where(is_target_NV, logits_NV, 0.0), axis=-1)
  correct_N = (jnp.argmax(logits_NV, axis=-1) == t_N).astype(jnp.float32)
  return logits_NV, lse_N, nll_N, correct_N, is_target_NV


def _place(a_BL: jax.Array, a_N: jax.Array, i: jax.Array, chunk: int) -> jax.Array:
  """`a_BL` with chunk i's positions set from a_N (flattened tokens, as `_slice` gives them)."""
  piece = a_N.reshape((a_BL.shape[0], chunk) + a_N.shape[1:])
  return jax.lax.dynamic_update_slice_in_dim(a_BL, piece, i * chunk, 1)


def _per_token(x_BLD, head_DV, bias_V, targets_BL, chunk: int):
  """Each token's log-sum-exp, loss and argmax hit, (B, L) float32 each. The loop keeps values
  per token and sums nothing, so no chunk waits on other devices' tokens."""
  B, L, _ = x_BLD.shape

  def one_chunk(i, per_token):
    values = _chunk_values(_slice(x_BLD, i, chunk), head_DV, bias_V, _slice(targets_BL, i, chunk))
    return tuple(
      _place(a_BL, a_N, i, chunk) for a_BL, a_N in zip(per_token, values[1:4], strict=True)
    )

  zeros = tuple(jnp.zeros((B, L), jnp.float32) for _ in range(3))
  return jax.lax.fori_loop(0, L // chunk, one_chunk, zeros)


def _per_token_and_gradient(
  x_BLD, head_DV, bias_V, targets_BL, weights_BL, chunk: int, z_loss: float, batch_shards: int
):
  """`_per_token`'s values, and the gradient of objective_sum w.r.t. x, head and bias, taken
  chunk by chunk as each chunk's logits are made."""
  B, L, _ = x_BLD.shape
  S = batch_shards

  def per_shard(a_N):
    return a_N.reshape((S, -1) + a_N.shape[1:])  # Rows stay with their device.

  def one_chunk(i, carry):
    lse_BL, nll_BL, correct_BL, d_x_BLD, d_head_SDV, d_bias_SV = carry
    x_ND, w_N = _slice(x_BLD, i, chunk), _slice(weights_BL, i, chunk)
    logits_NV, lse_N, nll_N, correct_N, is_target_NV = _chunk_values(
      x_ND, head_DV, bias_V, _slice(targets_BL, i, chunk)
    )
    # d nll / d logits = softmax - one_hot(target); d (z lse^2) / d logits = 2 z lse softmax.
    probs_NV = jnp.exp(logits_NV - lse_N[:, None])
    d_logits_NV = probs_NV * (w_N * (1.0 + 2.0 * z_loss * lse_N))[:, None] - jnp.where(
      is_target_NV, w_N[:, None], 0.0
    )
    d_logits_NV = d_logits_NV.astype(x_BLD.dtype)  # As autodiff casts it back through astype.
    # Per batch shard, in float32 (one long matmul would accumulate in float32 too): summing
    # over all tokens here would add the shards' parts across devices at every chunk.
    d_head_SDV = d_head_SDV + jnp.einsum(
      'SND,SNV->SDV', per_shard(x_ND), per_shard(d_logits_NV), preferred_element_type=jnp.float32
    )
    if d_bias_SV is not None:
      d_bias_SV = d_bias_SV + jnp.sum(per_shard(d_logits_NV), axis=1, dtype=jnp.float32)
    per_token = (lse_BL, nll_BL, correct_BL, d_x_BLD)
    values = (lse_N, nll_N, correct_N, d_logits_NV @ head_DV.T)
    return (
      *(_place(a_BL, a_N, i, chunk) for a_BL, a_N in zip(per_token, values, strict=True)),
      d_head_SDV,
      d_bias_SV,
    )

  zeros = (
    *(jnp.zeros((B, L), jnp.float32) for _ in range(3)),
    jnp.zeros_like(x_BLD),
    jnp.zeros((S,) + head_DV.shape, jnp.float32),
    None if bias_V is None else jnp.zeros((S,) + bias_V.shape, jnp.float32),
  )
  lse_BL, nll_BL, correct_BL, d_x_BLD, d_head_SDV, d_bias_SV = jax.lax.fori_loop(
    0, L // chunk, one_chunk, zeros
  )
  d_bias_V = None if d_bias_SV is None else jnp.sum(d_bias_SV, axis=0)
  return (lse_BL, nll_BL, correct_BL), (d_x_BLD, jnp.sum(d_head_SDV, axis=0), d_bias_V)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _projected_sums(
  x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk, z_loss, num_groups, batch_shards
):
  del batch_shards  # The gradient's.
  per_token = _per_token(x_BLD, head_DV, bias_V, targets_BL, chunk)
  return _weighted_sums(*per_token, weights_BL, z_loss, groups_BL, num_groups)


def _projected_sums_fwd(
  x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk, z_loss, num_groups, batch_shards
):
  per_token, grads = _per_token_and_gradient(
    x_BLD, head_DV, bias_V, targets_BL, weights_BL, chunk, z_loss, batch_shards
  )
  sums = _weighted_sums(*per_token, weights_BL, z_loss, groups_BL, num_groups)
  # Empty arrays of the inputs' dtypes: a residual must be arrays, and the gradients are cast to
  # them only after scaling (the head's and the bias's are float32 until then).
  dtypes = tuple(None if a is None else jnp.zeros((0,), a.dtype) for a in (x_BLD, head_DV, bias_V))
  return sums, (grads, dtypes)


def _projected_sums_bwd(chunk, z_loss, num_groups, batch_shards, residuals, d_sums):
  del chunk, z_loss, num_groups, batch_shards
  grads, dtypes = residuals
  # Only objective_sum passes a gradient on; the other sums are reports (see the docstring).
  scale = d_sums['objective_sum']
  d_x_BLD, d_head_DV, d_bias_V = (
    None if g is None else (g.astype(jnp.float32) * scale).astype(like.dtype)
    for g, like in zip(grads, dtypes, strict=True)
  )
  return d_x_BLD, d_head_DV, d_bias_V, None, None, None


_projected_sums.defvjp(_projected_sums_fwd, _projected_sums_bwd)
