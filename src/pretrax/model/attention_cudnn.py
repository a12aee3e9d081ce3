"""The 'cudnn' attention backend (auto on NVIDIA GPUs): cuDNN's fused flash kernel, without a
mask tensor wherever the rows allow, and the checks that decide what it can take.

The kernel is decided on device per batch (`cudnn_kernel`; every kernel is compiled): rows that
are each one whole document need only `is_causal`; packed rows go in cuDNN's variable-length form,
each row's segment lengths and start offsets (`segment_layout`, built in O(B*T) from the segment
ids, never from a T x T mask) with a padding(-causal) mask type. A batch with a row of more than
`max_segments` segments, or segments out of order, takes the dense-mask kernel (an additive bias
inside cuDNN, its bias-softmax kernels), as do prefix LMs, `max_segments=0`, and setups without the
variable-length form (`cudnn_packed_unsupported_reason`). Unsupported dtypes and shapes fall back
to 'xla' (`cudnn_unsupported_reason`, which model/attention.py asks first).
Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, H head
dim, M segment slots per row.
"""

from collections.abc import Callable
import functools
import re

import jax
import jax.numpy as jnp

from pretrax.model import masks


def current_compute_capability() -> tuple[int, int] | None:
  """This process's first device's (major, minor) compute capability; None where it has none."""
  capability = getattr(jax.devices()[0], 'compute_capability', None)
  if not capability:
    return None
  major, minor = capability.split('.')[:2]  # e.g. '9.0'
  return int(major), int(minor)


def cudnn_unsupported_reason(
  dtype: jnp.dtype,
  q_shape: tuple[int, ...],
  k_shape: tuple[int, ...],
  *,
  platform: str,
  compute_capability: tuple[int, int] | None,
) -> str | None:
  """Why cuDNN's fused attention cannot take these inputs (None: it can).

  Mirrors the checks in JAX's cuDNN wrapper, so that we fall back before it raises. Every mask
  kind is supported: all reach cuDNN as a bias, which is why sequence lengths must be even.
  """
  _, T, N, H = q_shape
  S = k_shape[1]
  if platform != 'cuda':
    return f'cuDNN needs an NVIDIA GPU, not {platform}'
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    return f'cuDNN attention takes float16/bfloat16, not {jnp.dtype(dtype).name}'
  if compute_capability is None or compute_capability < (8, 0):
    return f'cuDNN flash attention needs compute capability >= 8.0, not {compute_capability}'
  max_head_dim = 256 if compute_capability >= (9, 0) else 128
  if H % 8 or H > max_head_dim:
    return f'cuDNN needs a head dim that is a multiple of 8 and <= {max_head_dim}, not {H}'
  if T % 2 or S % 2:
    return f'cuDNN with a mask (bias) needs even sequence lengths, not {T} and {S}'
  return None


def cudnn_packed_unsupported_reason(
  *,
  prefix: bool,
  max_segments: int,
  num_heads: int,
  num_kv_heads: int,
  compute_capability: tuple[int, int] | None,
  cudnn_version: int | None,
  jax_version: str | None = None,
) -> str | None:
  """Why cuDNN cannot take these rows in its variable-length form (None: it can); they then go
  to cuDNN as a dense mask. `cudnn_version` as cuDNN reports it (9.6.0 is 90600)."""
  if prefix:
    return "a prefix LM's prefix is not a segment length, so cuDNN takes it as a dense mask"
  if max_segments == 0:
    return 'model.max_segments=0 asks for the dense mask'
  if max_segments > 1 and (compute_capability is None or compute_capability < (9, 0)):
    return (
      f'cuDNN takes several segments per row on Hopper or later (compute capability 9.0), '
      f'not {compute_capability}; model.max_segments=1 uses lengths alone'
    )
  if max_segments > 1 and (cudnn_version is None or cudnn_version < 90600):
    return f'cuDNN takes several segments per row from version 9.6 (90600), not {cudnn_version}'
  jax_version = jax_version or jax.__version__
  if max_segments > 1 and num_kv_heads != num_heads and _version(jax_version) < (0, 11):
    # JAX 0.10 strides the key/value offsets by the query head count: wrong for grouped queries.
    return (
      f'JAX {jax_version} computes packed key offsets for as many key/value heads as query '
      'heads (fixed in JAX 0.11), which grouped-query attention is not'
    )
  if _cudnn_module() is None:
    return 'this JAX has no cuDNN variable-length attention (jax._src.cudnn)'
  return None


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r'\d+', text)[:2])


def _cudnn_version() -> int | None:
  module = _cudnn_module()
  try:
    return module.check_cudnn_version() if module else None
  except RuntimeError:  # No cuDNN library.
    return None


def _cudnn_module():
  """JAX's cuDNN attention module, whose dot_product_attention takes segment lengths and
  offsets (jax.nn.dot_product_attention does not yet); None where this JAX lacks it."""
  try:
    # pylint: disable-next=import-outside-toplevel
    from jax._src.cudnn import fused_attention_stablehlo
  except ImportError:
    return None
  if not hasattr(fused_attention_stablehlo, 'MaskType'):
    return None
  return fused_attention_stablehlo


def segment_layout(
  segment_ids_BT: jax.Array, max_segments: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """cuDNN's variable-length description of packed rows, in O(B*T): (lengths_BM, offsets_BM1,
  fits).

  Segment m of a row is its m-th run of one non-zero id: lengths_BM[b, m] tokens from
  offsets_BM1[b, m]; both are -1 past a row's last segment, and the offsets' extra column is
  always -1 (the layout JAX's cuDNN wrapper takes). `fits` is False when some row has more than
  `max_segments` runs, or an id that does not exceed every id before it (a segment split in
  two, which the runs would separate but the ids join): then the layout does not describe the
  mask and the caller must use another. With max_segments=1 the first run must also start at 0.
  """
  B, T = segment_ids_BT.shape
  M = max_segments
  earlier_BT = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)))
  starts_BT = (segment_ids_BT != earlier_BT) & (segment_ids_BT != 0)
  run_BT = jnp.cumsum(starts_BT, axis=1) - 1  # Which run of its row each token is in.
  count_B = run_BT[:, -1] + 1
  highest_before_BT = jax.lax.cummax(earlier_BT, axis=1)
  in_order = jnp.all(~starts_BT | (segment_ids_BT > highest_before_BT))
  # Padding and runs past the M-th land in an extra bin M, dropped after the scatters.
  bin_BT = jnp.where((segment_ids_BT != 0) & (run_BT < M), run_BT, M)
  rows_B1 = jnp.arange(B)[:, None]
  lengths_BM = jnp.zeros((B, M + 1), jnp.int32).at[rows_B1, bin_BT].add(1)[:, :M]
  starts_BM = (
    jnp.full((B, M + 1), T, jnp.int32)
    .at[rows_B1, bin_BT]
    .min(jnp.arange(T, dtype=jnp.int32))[:, :M]
  )
  present_BM = jnp.arange(M) < count_B[:, None]
  lengths_BM = jnp.where(present_BM, lengths_BM, -1)
  offsets_BM1 = jnp.pad(jnp.where(present_BM, starts_BM, -1), ((0, 0), (0, 1)), constant_values=-1)
  fits = in_order & jnp.all(count_B <= M)
  if M == 1:
    fits &= jnp.all((starts_BM[:, 0] == 0) | (count_B == 0))
  return lengths_BM, offsets_BM1, fits


# cuDNN's kernels, in the order `cudnn_kernel` numbers them.
CUDNN_KERNELS = ('plain', 'variable-length', 'dense mask')


def cudnn_kernel(segment_ids_BT: jax.Array, fits: jax.Array | None) -> jax.Array:
  """Which of CUDNN_KERNELS takes this batch (an index, decided on device from the data):
  'plain' (is_causal or nothing: no mask, no lengths) when every row is one document over all
  its positions; else 'variable-length' when `fits` (segment_layout's; None: that form is not
  available); else 'dense mask'."""
  whole_rows = jnp.all((segment_ids_BT == segment_ids_BT[:, :1]) & (segment_ids_BT[:, :1] != 0))
  packed = 2 if fits is None else jnp.where(fits, 1, 2)
  return jnp.where(whole_rows, 0, packed)


def cudnn_attention(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array,
  *,
  causal: bool,
  prefix_BT: jax.Array | None,
  max_segments: int,
  warn: Callable[..., None],
) -> jax.Array:
  """cuDNN without a mask where the rows allow (`cudnn_kernel`), else with a dense one.

  `warn(backend, reason, instead=...)` reports a fallback (model/attention.py's, once per reason).
  """
  dense: Callable[[], jax.Array] = functools.partial(
    _cudnn_dense, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, prefix_BT=prefix_BT
  )
  reason = cudnn_packed_unsupported_reason(
    prefix=causal and prefix_BT is not None,
    max_segments=max_segments,
    num_heads=q_BTNH.shape[2],
    num_kv_heads=k_BSKH.shape[2],
    compute_capability=current_compute_capability(),
    cudnn_version=_cudnn_version(),
  )
  if reason and max_segments:  # max_segments=0 chose the dense mask: nothing to report.
    warn('cudnn variable-length', reason, instead='cudnn with a dense mask')
  if not max_segments or (causal and prefix_BT is not None):
    return dense()
  plain = functools.partial(_cudnn_plain, q_BTNH, k_BSKH, v_BSKH, causal=causal)
  # Under autodiff lax.switch keeps the residuals of every branch (zeros for those not taken):
  # checkpointed, the dense branch keeps only its inputs, not the (B, 1, T, T) bias cuDNN's
  # backward reads. A batch that takes it reruns its forward kernel in the backward pass.
  dense = jax.checkpoint(dense)
  try:
    # Data decides, so every branch is compiled and each batch runs one.
    if reason:  # No variable-length form: cudnn_kernel gives 0 or 2.
      return jax.lax.switch(cudnn_kernel(segment_ids_BT, None) // 2, [plain, dense])
    lengths_BM, offsets_BM1, fits = segment_layout(segment_ids_BT, max_segments)
    varlen = functools.partial(
      _cudnn_varlen, q_BTNH, k_BSKH, v_BSKH, lengths_BM, offsets_BM1, causal=causal
    )
    return jax.lax.switch(cudnn_kernel(segment_ids_BT, fits), [plain, varlen, dense])
  except (ValueError, NotImplementedError, RuntimeError, TypeError) as e:  # Checks newer than ours.
    warn(
      'cudnn without a mask',
      f'cuDNN refused these inputs ({type(e).__name__}: {e})',
      instead='cudnn with a dense mask',
    )
    return dense()


def _cudnn_plain(q_BTNH, k_BSKH, v_BSKH, *, causal: bool) -> jax.Array:
  """cuDNN on rows that are each one whole document: causal or not, and nothing else."""
  return jax.nn.dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, is_causal=causal, implementation='cudnn'
  )


def _cudnn_dense(
  q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, causal: bool, prefix_BT: jax.Array | None
) -> jax.Array:
  """cuDNN with a (B, 1, T, T) boolean mask, which it reads as an additive bias."""
  mask_BTS = masks.attention_mask(segment_ids_BT, causal=causal, prefix_BT=prefix_BT)
  # The mask already holds causality; is_causal lets cuDNN skip whole blocks above the diagonal.
  # A prefix makes some keys above the diagonal visible, so it cannot be set then.
  return jax.nn.dot_product_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    mask=mask_BTS[:, None],
    implementation='cudnn',
    is_causal=causal and prefix_BT is None,
  )


def _cudnn_varlen(q_BTNH, k_BSKH, v_BSKH, lengths_BM, offsets_BM1, *, causal: bool) -> jax.Array:
  """cuDNN's flash kernel over each row's segments (segment_layout): no mask tensor at all.
  Tokens outside every segment (padding) get an output of no meaning; nothing reads it."""
  cudnn = _cudnn_module()
  mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  if lengths_BM.shape[1] == 1:  # One segment from position 0: lengths alone (any cuDNN GPU).
    lengths_B = jnp.maximum(lengths_BM[:, 0], 0)
    layout = dict(q_seqlen=lengths_B, kv_seqlen=lengths_B)
  else:
    layout = dict(
      q_seqlen=lengths_BM, kv_seqlen=lengths_BM, q_offsets=offsets_BM1, kv_offsets=offsets_BM1
    )
  return cudnn.dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, **layout, scale=q_BTNH.shape[-1] ** -0.5, mask_type=mask_type
  )
