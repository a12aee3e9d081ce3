"""The 'cpu' attention backend: the 'xla' maths heads-major, with an explicit softmax backward
(`_attention_core`), which XLA:CPU compiles into fewer, cheaper loops than the generic autodiff.

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

import functools

import jax
import jax.numpy as jnp

# Finite, so that masked scores never produce inf - inf = NaN; exp() of it is exactly 0.
_MASKED = -1e30


def cpu_attention(
  q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array
) -> jax.Array:
  """Attention of q to k, v where `mask_BTS` (masks.attention_mask) is True; (B, T, N, H)."""
  N, K, H = q_BTNH.shape[2], k_BSKH.shape[2], q_BTNH.shape[3]
  if K != N:  # Grouped-query: each key/value head serves N // K query heads.
    k_BSKH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSKH = jnp.repeat(v_BSKH, N // K, axis=2)
  bias_B1TS = jnp.where(mask_BTS, 0.0, _MASKED).astype(jnp.float32)[:, None]
  heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
  q_BNTH = heads_major(q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype))
  out_BNTH = _attention_core(q_BNTH, heads_major(k_BSKH), heads_major(v_BSKH), bias_B1TS)
  return heads_major(out_BNTH)


def _core_forward(q_BNTH, k_BNSH, v_BNSH, bias_B1TS):
  scores_BNTS = jnp.einsum('BNTH,BNSH->BNTS', q_BNTH, k_BNSH).astype(jnp.float32) + bias_B1TS
  e_BNTS = jnp.exp(scores_BNTS - jnp.max(scores_BNTS, axis=-1, keepdims=True))
  probs_BNTS = (e_BNTS / jnp.sum(e_BNTS, axis=-1, keepdims=True)).astype(q_BNTH.dtype)
  return jnp.einsum('BNTS,BNSH->BNTH', probs_BNTS, v_BNSH), probs_BNTS


@jax.custom_vjp
def _attention_core(q_BNTH, k_BNSH, v_BNSH, bias_B1TS):
  return _core_forward(q_BNTH, k_BNSH, v_BNSH, bias_B1TS)[0]


def _core_fwd(q_BNTH, k_BNSH, v_BNSH, bias_B1TS):
  out_BNTH, probs_BNTS = _core_forward(q_BNTH, k_BNSH, v_BNSH, bias_B1TS)
  return out_BNTH, (q_BNTH, k_BNSH, v_BNSH, probs_BNTS, out_BNTH)


def _core_bwd(residuals, d_out_BNTH):
  q_BNTH, k_BNSH, v_BNSH, probs_BNTS, out_BNTH = residuals
  d_v_BNSH = jnp.einsum('BNTS,BNTH->BNSH', probs_BNTS, d_out_BNTH)
  d_probs_BNTS = jnp.einsum('BNTH,BNSH->BNTS', d_out_BNTH, v_BNSH)
  # Softmax backward: dS = P * (dP - rowsum(dO * O)), since rowsum(P * dP) = rowsum(dO * O).
  delta_BNT1 = jnp.sum(d_out_BNTH * out_BNTH, axis=-1, keepdims=True)
  d_scores_BNTS = probs_BNTS * (d_probs_BNTS - delta_BNT1)
  d_q_BNTH = jnp.einsum('BNTS,BNSH->BNTH', d_scores_BNTS, k_BNSH)
  d_k_BNSH = jnp.einsum('BNTS,BNTH->BNSH', d_scores_BNTS, q_BNTH)
  return d_q_BNTH, d_k_BNSH, d_v_BNSH, None  # The mask gets no gradient.


_attention_core.defvjp(_core_fwd, _core_bwd)
