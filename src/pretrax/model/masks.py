"""The mask every attention backend means, as one boolean (B, T, S) array.

Shape suffixes: B batch, T query length, S key length.
`segment_ids` (1-based, 0 = padding) keep packed documents apart; `causal` hides the future
except, with `prefix` (1 on the tokens of a bidirectional prefix), the prefix: every token of a
document sees its prefix whole. Causal alone is a decoder, causal with a prefix a prefix LM, and
neither an encoder. The 'xla' and 'cpu' backends and cuDNN's dense-mask kernel apply it as it is;
the others describe the same mask without the array (model/attention_cudnn.py, attention_splash.py).
"""

import jax
import jax.numpy as jnp


def attention_mask(
  segment_ids_BT: jax.Array, *, causal: bool, prefix_BT: jax.Array | None = None
) -> jax.Array:
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
