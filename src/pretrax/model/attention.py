"""One attention function for every mask and backend.

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
Masks: `segment_ids` (1-based, 0 = padding) keep packed documents apart; `causal` hides the future.
"""

import jax
import jax.numpy as jnp


def attention_mask(segment_ids_BT: jax.Array, *, causal: bool) -> jax.Array:
  """Boolean (B, T, T): True where query t may attend to key s.

  Padding (segment 0) attends to padding only, so no row is empty and no NaN appears.
  """
  mask_BTS = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  if causal:
    T = segment_ids_BT.shape[1]
    mask_BTS = mask_BTS & jnp.tril(jnp.ones((T, T), jnp.bool_))[None]
  return mask_BTS


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array,
              *, causal: bool) -> jax.Array:
  """Scaled dot-product attention with segment and causal masks; returns (B, T, N, H)."""
  mask_BTS = attention_mask(segment_ids_BT, causal=causal)
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None])
