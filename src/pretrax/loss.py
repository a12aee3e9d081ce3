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


def chunked_cross_entropy(x_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                          weights_BL: jax.Array, *, chunk: int, bias_V: jax.Array | None = None,
                          z_loss: float = 0.0, groups_BL: jax.Array | None = None,
                          num_groups: int = 0) -> dict[str, jax.Array]:
  """`cross_entropy` of the logits x_BLD @ head_DV (+ bias_V), without ever holding them whole.

  The output projection runs inside a loop over `chunk` positions at a time (every row at once,
  so a batch sharded over devices stays sharded), and the gradient recomputes each chunk's
  logits from the saved log-sum-exp: at most one (B, chunk, V) float32 block exists at a time,
  instead of (B, L, V) and its gradient. The matmul runs in x's dtype and the loss in float32,
  as the model's own head does. Only loss_sum and z_loss_sum carry gradients (to x, head and
  bias); the other sums are counts, as in `cross_entropy`.
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
                         groups_BL, chunk, z_loss, num_groups)
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


def _forward_chunks(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk: int,
                    z_loss: float, num_groups: int):
  """The sums, and each token's log-sum-exp (B, L) for the backward pass."""
  B, L, _ = x_BLD.shape
  G = max(num_groups, 1)

  def one_chunk(i, carry):
    sums, lse_BL = carry
    t_N, w_N, g_N = (_slice(a, i, chunk) for a in (targets_BL, weights_BL, groups_BL))
    logits_NV = _chunk_logits(_slice(x_BLD, i, chunk), head_DV, bias_V)
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    nll_N = lse_N - jnp.take_along_axis(logits_NV, t_N[:, None], axis=-1)[:, 0]
    in_group_NG = jax.nn.one_hot(g_N, G, dtype=jnp.float32) * w_N[:, None]
    sums = {
        'loss_sum': sums['loss_sum'] + jnp.sum(nll_N * w_N),
        'z_loss_sum': sums['z_loss_sum'] + z_loss * jnp.sum(jnp.square(lse_N) * w_N),
        'weight_sum': sums['weight_sum'] + jnp.sum(w_N),
        'correct_sum': sums['correct_sum'] + jnp.sum(
            (jnp.argmax(logits_NV, axis=-1) == t_N) * w_N),
        'group_loss_sum': sums['group_loss_sum'] + nll_N @ in_group_NG,
        'group_weight_sum': sums['group_weight_sum'] + jnp.sum(in_group_NG, axis=0),
    }
    lse_BL = jax.lax.dynamic_update_slice_in_dim(lse_BL, lse_N.reshape(B, chunk), i * chunk, 1)
    return sums, lse_BL

  scalar = jnp.zeros((), jnp.float32)
  zeros = {'loss_sum': scalar, 'z_loss_sum': scalar, 'weight_sum': scalar, 'correct_sum': scalar,
           'group_loss_sum': jnp.zeros((G,), jnp.float32),
           'group_weight_sum': jnp.zeros((G,), jnp.float32)}
  return jax.lax.fori_loop(0, L // chunk, one_chunk, (zeros, jnp.zeros((B, L), jnp.float32)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _projected_sums(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk, z_loss,
                    num_groups):
  return _forward_chunks(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk,
                         z_loss, num_groups)[0]


def _projected_sums_fwd(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk, z_loss,
                        num_groups):
  sums, lse_BL = _forward_chunks(x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, chunk,
                                 z_loss, num_groups)
  return sums, (x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, lse_BL)


def _projected_sums_bwd(chunk, z_loss, num_groups, residuals, d_sums):
  del num_groups  # The group sums are reports: no gradient flows through them.
  x_BLD, head_DV, bias_V, targets_BL, weights_BL, groups_BL, lse_BL = residuals
  d_loss, d_z = d_sums['loss_sum'], d_sums['z_loss_sum']

  def one_chunk(i, carry):
    d_x_BLD, d_head_DV, d_bias_V = carry
    x_ND = _slice(x_BLD, i, chunk)
    t_N, w_N, lse_N = (_slice(a, i, chunk) for a in (targets_BL, weights_BL, lse_BL))
    # The chunk's logits once more; their softmax comes from the saved log-sum-exp.
    probs_NV = jnp.exp(_chunk_logits(x_ND, head_DV, bias_V) - lse_N[:, None])
    # d nll / d logits = softmax - one_hot(target); d lse^2 / d logits = 2 lse softmax.
    scale_N = w_N * (d_loss + d_z * z_loss * 2.0 * lse_N)
    d_logits_NV = probs_NV * scale_N[:, None]
    d_logits_NV = d_logits_NV.at[jnp.arange(t_N.shape[0]), t_N].add(-w_N * d_loss)
    d_logits_NV = d_logits_NV.astype(x_BLD.dtype)  # As autodiff casts it back through astype.
    d_x_ND = d_logits_NV @ head_DV.T
    d_x_BLD = jax.lax.dynamic_update_slice_in_dim(
        d_x_BLD, d_x_ND.reshape(x_BLD.shape[0], chunk, -1), i * chunk, 1)
    # Accumulated over chunks in float32: one long matmul would accumulate in float32 too.
    d_head_DV = d_head_DV + jnp.matmul(x_ND.T, d_logits_NV, preferred_element_type=jnp.float32)
    if d_bias_V is not None:
      d_bias_V = d_bias_V + jnp.sum(d_logits_NV, axis=0, dtype=jnp.float32)
    return d_x_BLD, d_head_DV, d_bias_V

  zeros = (jnp.zeros_like(x_BLD), jnp.zeros(head_DV.shape, jnp.float32),
           None if bias_V is None else jnp.zeros(bias_V.shape, jnp.float32))
  d_x_BLD, d_head_DV, d_bias_V = jax.lax.fori_loop(0, x_BLD.shape[1] // chunk, one_chunk, zeros)
  d_bias_V = None if bias_V is None else d_bias_V.astype(bias_V.dtype)
  return d_x_BLD, d_head_DV.astype(head_DV.dtype), d_bias_V, None, None, None


_projected_sums.defvjp(_projected_sums_fwd, _projected_sums_bwd)
