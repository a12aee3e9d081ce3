"""One attention function for every mask, with a backend per platform.

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, G query
heads per key/value head (N // K), H head dim.
Masks: `segment_ids` (1-based, 0 = padding) keep packed documents apart; `causal` hides the future
except, with `prefix` (1 on the tokens of a bidirectional prefix), the prefix: every token of a
document sees its prefix whole. Causal alone is a decoder, causal with a prefix a prefix LM, and
neither an encoder.

Backends (`backend=`, from `model.attention_backend`; 'auto' picks by platform):
- 'cudnn' (auto on NVIDIA GPUs): cuDNN's fused flash kernel, without a mask tensor wherever the
  rows allow (`cudnn_kernel`, decided on device per batch; every kernel is compiled): rows that
  are each one whole document need only `is_causal`; packed rows go in cuDNN's variable-length
  form, each row's segment lengths and start offsets (`segment_layout`, built in O(B*T) from
  the segment ids, never from a T x T mask) with a padding(-causal) mask type. A batch with a
  row of more than `max_segments` segments, or segments out of order, takes the dense-mask
  kernel (an additive bias inside cuDNN, its bias-softmax kernels), as do prefix LMs,
  `max_segments=0`, and setups without the variable-length form
  (`cudnn_packed_unsupported_reason`). Unsupported dtypes and shapes fall back to 'xla'
  (`cudnn_unsupported_reason`).
- 'splash' (auto on TPUs): the Pallas splash-attention kernel, with segment ids and a static causal
  or full mask; a per-example prefix is not static, so prefix LMs fall back to 'xla'
  (`splash_unsupported_reason`). `interpret=True` runs the kernel on CPU for tests.
- 'cpu' (auto on CPUs): the same maths heads-major with an explicit softmax backward
  (`_attention_core`), which XLA:CPU compiles into fewer, cheaper loops than the generic autodiff.
- 'xla' (auto elsewhere, and the reference): `jax.nn.dot_product_attention(implementation='xla')`.
A fallback is logged once per reason. Tests hold every backend to the 'xla' values and gradients.
"""

from collections.abc import Callable
import functools
import logging
import re

import jax
import jax.numpy as jnp

from pretrax.model import layers

BACKENDS = ('auto', 'xla', 'cudnn', 'splash', 'cpu')
# Finite, so that masked scores never produce inf - inf = NaN; exp() of it is exactly 0.
_MASKED = -1e30
# Splash tiles the sequence in blocks of at least one TPU lane row (128); bigger ones are faster.
_SPLASH_BLOCKS = (512, 256, 128)
_warned: set[str] = set()


def current_platform() -> str:
  """'cuda' on NVIDIA GPUs (where cuDNN exists), else JAX's platform name ('tpu', 'cpu', 'gpu')."""
  device = jax.devices()[0]
  if device.platform == 'gpu' and hasattr(device, 'compute_capability'):
    from jax.extend import backend as jax_backend  # pylint: disable=import-outside-toplevel

    if 'cuda' in jax_backend.get_backend().platform_version.lower():  # Not ROCm.
      return 'cuda'
  return device.platform


def resolve_backend(backend: str, platform: str) -> str:
  """The backend 'auto' means on `platform`; any other name is returned as it is."""
  if backend not in BACKENDS:
    raise ValueError(f'attention backend {backend!r} is not one of {", ".join(BACKENDS)}.')
  if backend != 'auto':
    return backend
  return {'cuda': 'cudnn', 'tpu': 'splash', 'cpu': 'cpu'}.get(platform, 'xla')


def _compute_capability() -> tuple[int, int] | None:
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


def splash_unsupported_reason(
  q_shape: tuple[int, ...],
  *,
  platform: str,
  prefix: bool,
  interpret: bool = False,
  sequence_sharded: bool = False,
) -> str | None:
  """Why the splash kernel cannot take these inputs (None: it can)."""
  T = q_shape[1]
  if platform != 'tpu' and not interpret:
    return f'splash attention is a TPU kernel, not for {platform} (interpret=True runs it anywhere)'
  if prefix:
    return "splash takes a static mask, and a prefix LM's prefix differs per example"
  if sequence_sharded:
    return 'splash runs per batch and head shard; a sharded sequence needs ring attention'
  if T % _SPLASH_BLOCKS[-1]:
    return f'splash needs a sequence length that is a multiple of {_SPLASH_BLOCKS[-1]}, not {T}'
  return None


def _warn_once(backend: str, reason: str, instead: str = 'xla') -> None:
  if reason not in _warned:
    _warned.add(reason)
    logging.getLogger(__name__).warning(
      'attention: %s, using %s instead of %s.', reason, instead, backend
    )


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


def attention(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array,
  *,
  causal: bool,
  prefix_BT: jax.Array | None = None,
  backend: str = 'auto',
  platform: str | None = None,
  interpret: bool = False,
  max_segments: int = 16,
) -> jax.Array:
  """Scaled dot-product attention with segment, causal and prefix masks; returns (B, T, N, H).

  `platform` (default: this process's) decides what 'auto' means and what is supported;
  `interpret` runs the splash kernel in Pallas interpret mode (tests on CPU); `max_segments`
  bounds the segments per row of cuDNN's variable-length path (0: the dense mask).
  """
  platform = platform or current_platform()
  name = resolve_backend(backend, platform)
  if name == 'cudnn':
    reason = cudnn_unsupported_reason(
      q_BTNH.dtype,
      q_BTNH.shape,
      k_BSKH.shape,
      platform=platform,
      compute_capability=_compute_capability(),
    )
  elif name == 'splash':
    reason = splash_unsupported_reason(
      q_BTNH.shape,
      platform=platform,
      prefix=causal and prefix_BT is not None,
      interpret=interpret,
      sequence_sharded=_sequence_sharded(),
    )
    if not reason and _import_splash() is None:
      reason = 'this JAX has no Pallas splash kernel'
  else:
    reason = None
  if reason:
    _warn_once(name, reason)
    name = 'xla'
  if name == 'splash':
    return _splash_sharded(
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, interpret=interpret
    )
  if name == 'cudnn':
    try:
      return _cudnn(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        segment_ids_BT,
        causal=causal,
        prefix_BT=prefix_BT,
        max_segments=max_segments,
      )
    except (ValueError, NotImplementedError, RuntimeError) as e:  # Checks newer than ours.
      _warn_once('cudnn', f'cuDNN refused these inputs ({type(e).__name__}: {e})')
  mask_BTS = attention_mask(segment_ids_BT, causal=causal, prefix_BT=prefix_BT)
  if name == 'cpu':
    return _cpu_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  return jax.nn.dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation='xla'
  )


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


def _cudnn(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array,
  *,
  causal: bool,
  prefix_BT: jax.Array | None,
  max_segments: int,
) -> jax.Array:
  """cuDNN without a mask where the rows allow (`cudnn_kernel`), else with a dense one."""
  dense: Callable[[], jax.Array] = functools.partial(
    _cudnn_dense, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, prefix_BT=prefix_BT
  )
  reason = cudnn_packed_unsupported_reason(
    prefix=causal and prefix_BT is not None,
    max_segments=max_segments,
    num_heads=q_BTNH.shape[2],
    num_kv_heads=k_BSKH.shape[2],
    compute_capability=_compute_capability(),
    cudnn_version=_cudnn_version(),
  )
  if reason and max_segments:  # max_segments=0 chose the dense mask: nothing to report.
    _warn_once('cudnn variable-length', reason, instead='cudnn with a dense mask')
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
    _warn_once(
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
  mask_BTS = attention_mask(segment_ids_BT, causal=causal, prefix_BT=prefix_BT)
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


def _sequence_sharded() -> bool:
  to_sharding = layers.current_activation_sharding()
  return to_sharding is not None and to_sharding(('batch', 'length')).spec[1:2] not in ((), (None,))


def _splash_sharded(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array,
  *,
  causal: bool,
  interpret: bool,
) -> jax.Array:
  """`_splash` per shard: a Pallas kernel is opaque to the partitioner, which would otherwise
  gather it whole onto every device. Examples and heads are independent, so each device runs the
  kernel on its own batch and head shards (the sequence is never sharded here)."""
  kernel = functools.partial(_splash, causal=causal, interpret=interpret)
  to_sharding = layers.current_activation_sharding()
  if to_sharding is None:
    return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  q_sharding = to_sharding(('batch', 'length', 'heads', 'head_dim'))
  kv_spec = to_sharding(('batch', 'length', 'kv_heads', 'head_dim')).spec
  ids_spec = to_sharding(('batch', 'length')).spec
  per_shard = jax.shard_map(
    kernel,
    mesh=q_sharding.mesh,
    in_specs=(q_sharding.spec, kv_spec, kv_spec, ids_spec),
    out_specs=q_sharding.spec,
    check_vma=False,
  )
  return per_shard(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def _import_splash():
  """The splash kernel's module, or None where this JAX does not ship it. Imported on first use:
  it pulls in Pallas's Mosaic lowering, which nothing else needs."""
  try:
    # pylint: disable-next=import-outside-toplevel
    from jax.experimental.pallas.ops.tpu import splash_attention
  except ImportError:
    return None
  return splash_attention


def _splash(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  segment_ids_BT: jax.Array,
  *,
  causal: bool,
  interpret: bool,
) -> jax.Array:
  """The splash kernel: MQA per key/value head (so GQA and MHA are one path), vmapped over K, B."""
  splash = _import_splash()
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  block = next(b for b in _SPLASH_BLOCKS if T % b == 0)
  sizes = splash.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  head_mask = splash.CausalMask((T, T)) if causal else splash.FullMask((T, T))
  kernel = splash.make_splash_mqa_single_device(
    splash.MultiHeadMask([head_mask] * G), block_sizes=sizes, interpret=interpret
  )
  # Splash does not scale the scores: scale q as jax.nn.dot_product_attention does.
  q_BKGTH = (q_BTNH * jnp.asarray(H**-0.5, q_BTNH.dtype)).reshape(B, T, K, G, H)
  q_BKGTH = q_BKGTH.transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

  def one_example(q_KGTH, k_KSH, v_KSH, ids_T):
    ids = splash.SegmentIds(q=ids_T, kv=ids_T)
    return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGTH, k_KSH, v_KSH)

  out_BKGTH = jax.vmap(one_example)(q_BKGTH, k_BKSH, v_BKSH, segment_ids_BT)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def _cpu_attention(
  q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array
) -> jax.Array:
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
