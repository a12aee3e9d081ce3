"""The 'splash' attention backend (auto on TPUs): the Pallas splash-attention kernel, with
segment ids and a static causal or full mask, run per batch and head shard.

A per-example prefix is not static, so prefix LMs fall back to 'xla' (`splash_unsupported_reason`,
which model/attention.py asks first). `interpret=True` runs the kernel on CPU for tests.
Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, G query
heads per key/value head (N // K), H head dim.
"""

import functools

import jax
import jax.numpy as jnp

from pretrax.model import layers

# Splash tiles the sequence in blocks of at least one TPU lane row (128); bigger ones are faster.
_SPLASH_BLOCKS = (512, 256, 128)


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


def sequence_sharded() -> bool:
  """Whether the activation sharding being traced under splits the sequence axis."""
  to_sharding = layers.current_activation_sharding()
  return to_sharding is not None and to_sharding(('batch', 'length')).spec[1:2] not in ((), (None,))


def splash_sharded(
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


def import_splash():
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
  splash = import_splash()
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
