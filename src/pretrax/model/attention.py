"""One attention function for every mask and backend.

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
Masks: `segment_ids` (1-based, 0 = padding) keep packed documents apart; `causal` hides the future
except, with `prefix` (1 on the tokens of a bidirectional prefix), the prefix: every token of a
document sees its prefix whole. Causal alone is a decoder, causal with a prefix a prefix LM, and
neither an encoder.

Backends: accelerators use `jax.nn.dot_product_attention` (cuDNN's fused kernel on GPUs). On CPU
the same maths runs heads-major with an explicit softmax backward (`_attention_core`), which XLA:CPU
compiles into fewer, cheaper loops than the autodiff of the generic path; a test holds the two
paths to the same values and gradients.
"""

import functools

import jax
import jax.numpy as jnp

# Finite, so that masked scores never produce inf - inf = NaN; exp() of it is exactly 0.
_MASKED = -1e30


def attention_mask(segment_ids_BT: jax.Array, *, causal: bool,
                   prefix_BT: jax.Array | None = None) -> jax.Array:
  """Boolean (B, T, T): True where query t may attend to key s.

  Padding (segment 0) attends to padding only, so no row is empty and no NaN appears.
  """
  mask_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  if causal:
    T = segment_ids_BT.shape[1]
    visible_BTS = jnp.tril(jnp.ones((T, T), jnp.bool_))[None]
    if prefix_BT is not None:  # Keys in the prefix are visible from anywhere in their document.
      visible_BTS = visible_BTS | (prefix_BT[:, None, :] > 0)
    mask_BTS = mask_BTS & visible_BTS
  return mask_BTS


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array,
              *, causal: bool, prefix_BT: jax.Array | None = None,
              backend: str | None = None) -> jax.Array:
  """Scaled dot-product attention with segment, causal and prefix masks; returns (B, T, N, H)."""
  mask_BTS = attention_mask(segment_ids_BT, causal=causal, prefix_BT=prefix_BT)
  if (backend or jax.default_backend()) != 'cpu':
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None])
  N, K, H = q_BTNH.shape[2], k_BSKH.shape[2], q_BTNH.shape[3]
  if K != N:  # Grouped-query: each key/value head serves N // K query heads.
    k_BSKH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSKH = jnp.repeat(v_BSKH, N // K, axis=2)
  bias_B1TS = jnp.where(mask_BTS, 0.0, _MASKED).astype(jnp.float32)[:, None]
  heads_major = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
  q_BNTH = heads_major(q_BTNH * jnp.asarray(H ** -0.5, q_BTNH.dtype))
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
