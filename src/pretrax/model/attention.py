"""One attention function for every mask, with a backend per platform.

Shape suffixes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
Masks (model/masks.py): `segment_ids` (1-based, 0 = padding) keep packed documents apart; `causal`
hides the future except, with `prefix` (1 on the tokens of a bidirectional prefix), the prefix:
every token of a document sees its prefix whole. Causal alone is a decoder, causal with a prefix a
prefix LM, and neither an encoder.

Backends (`backend=`, from `model.attention_backend`; 'auto' picks by platform):
- 'cudnn' (auto on NVIDIA GPUs; model/attention_cudnn.py): cuDNN's fused flash kernel, without a
  mask tensor wherever the rows allow (plain, variable-length or dense-mask kernel, decided on
  device per batch). Unsupported dtypes and shapes fall back to 'xla' (`cudnn_unsupported_reason`).
- 'splash' (auto on TPUs; model/attention_splash.py): the Pallas splash-attention kernel, with
  segment ids and a static causal or full mask; prefix LMs fall back to 'xla'
  (`splash_unsupported_reason`). `interpret=True` runs the kernel on CPU for tests.
- 'cpu' (auto on CPUs; model/attention_cpu.py): the same maths heads-major with an explicit softmax
  backward, which XLA:CPU compiles into fewer, cheaper loops than the generic autodiff.
- 'xla' (auto elsewhere, and the reference): `jax.nn.dot_product_attention(implementation='xla')`.
A fallback is logged once per reason, here (logger pretrax.model.attention). Tests hold every
backend to the 'xla' values and gradients.
"""

import logging

import jax

from pretrax.model import attention_cpu, attention_cudnn, attention_splash, masks

BACKENDS = ('auto', 'xla', 'cudnn', 'splash', 'cpu')
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


def _warn_once(backend: str, reason: str, instead: str = 'xla') -> None:
  """Logs a fallback from `backend` to `instead`, once per reason per process (`_warned`)."""
  if reason not in _warned:
    _warned.add(reason)
    logging.getLogger(__name__).warning(
      'attention: %s, using %s instead of %s.', reason, instead, backend
    )


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
    reason = attention_cudnn.cudnn_unsupported_reason(
      q_BTNH.dtype,
      q_BTNH.shape,
      k_BSKH.shape,
      platform=platform,
      compute_capability=attention_cudnn.current_compute_capability(),
    )
  elif name == 'splash':
    reason = attention_splash.splash_unsupported_reason(
      q_BTNH.shape,
      platform=platform,
      prefix=causal and prefix_BT is not None,
      interpret=interpret,
      sequence_sharded=attention_splash.sequence_sharded(),
    )
    if not reason and attention_splash.import_splash() is None:
      reason = 'this JAX has no Pallas splash kernel'
  else:
    reason = None
  if reason:
    _warn_once(name, reason)
    name = 'xla'
  if name == 'splash':
    return attention_splash.splash_sharded(
      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, causal=causal, interpret=interpret
    )
  if name == 'cudnn':
    try:
      return attention_cudnn.cudnn_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        segment_ids_BT,
        causal=causal,
        prefix_BT=prefix_BT,
        max_segments=max_segments,
        warn=_warn_once,
      )
    except (ValueError, NotImplementedError, RuntimeError) as e:  # Checks newer than ours.
      _warn_once('cudnn', f'cuDNN refused these inputs ({type(e).__name__}: {e})')
  mask_BTS = masks.attention_mask(segment_ids_BT, causal=causal, prefix_BT=prefix_BT)
  if name == 'cpu':
    return attention_cpu.cpu_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
  return jax.nn.dot_product_attention(
    q_BTNH, k_BSKH, v_BSKH, mask=mask_BTS[:, None], implementation='xla'
  )
