"""Attention backends: each against the XLA reference, the fallback rules, and the resolver.

No GPU or TPU here: splash runs in Pallas interpret mode; cuDNN is covered by its fallback rules
(and falls back to xla on this CPU).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, run_python
from pretrax import config as config_lib
from pretrax import metrics
from pretrax import train
from pretrax.model import attention

B, L, N, H = 2, 128, 4, 16  # One splash block (128) per sequence keeps interpret mode quick.
# Two packed documents and padding (segment 0) in one row, a single document in the other.
SEGMENTS = jnp.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * L], jnp.int32)
PREFIX = jnp.array([[1] * 10 + [0] * 40 + [1] * 5 + [0] * 73, [1] * 64 + [0] * 64], jnp.int32)
MASKS = {'causal': (True, None), 'bidirectional': (False, None), 'prefix': (True, PREFIX)}


def _values_and_grads(backend: str, mask: str, num_kv_heads: int, **kwargs):
  causal, prefix = MASKS[mask]
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, L, N, H))
  k = jax.random.normal(keys[1], (B, L, num_kv_heads, H))
  v = jax.random.normal(keys[2], (B, L, num_kv_heads, H))
  d_out = jax.random.normal(keys[3], (B, L, N, H))

  def f(q, k, v):
    out = attention.attention(q, k, v, SEGMENTS, causal=causal, prefix_BT=prefix, backend=backend,
                              **kwargs)
    return jnp.sum(out * d_out)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def _assert_matches_xla(backend: str, mask: str, num_kv_heads: int, **kwargs):
  value, grads = _values_and_grads(backend, mask, num_kv_heads, **kwargs)
  value_ref, grads_ref = _values_and_grads('xla', mask, num_kv_heads)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for name, a, b in zip('qkv', grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('num_kv_heads', [4, 2])  # Multi-head and grouped-query.
@pytest.mark.parametrize('mask', sorted(MASKS))
def test_cpu_backend_matches_xla(mask, num_kv_heads):
  _assert_matches_xla('cpu', mask, num_kv_heads)


@pytest.mark.parametrize('mask, num_kv_heads', [
    ('causal', 4), ('causal', 2), ('bidirectional', 4), ('bidirectional', 1)])
def test_splash_kernel_matches_xla_in_interpret_mode(mask, num_kv_heads):
  _assert_matches_xla('splash', mask, num_kv_heads, platform='tpu', interpret=True)


def test_splash_falls_back_to_xla_for_a_prefix_lm_and_says_why(caplog):
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    _assert_matches_xla('splash', 'prefix', 2, platform='tpu', interpret=True)
  assert 'prefix' in caplog.text and 'using xla instead of splash' in caplog.text


@pytest.mark.skipif(attention.current_platform() == 'cuda', reason='cuDNN runs on this machine')
def test_cudnn_falls_back_to_xla_off_nvidia_once(caplog):
  attention._warned.clear()
  with caplog.at_level(logging.WARNING, logger=attention.__name__):
    _assert_matches_xla('cudnn', 'causal', 2)
    _assert_matches_xla('cudnn', 'bidirectional', 2)
  platform = attention.current_platform()
  assert caplog.text.count(f'cuDNN needs an NVIDIA GPU, not {platform}') == 1, caplog.text


def test_splash_under_a_data_and_tensor_mesh_runs_per_shard():
  """Under the step's activation sharding, splash runs in shard_map over batch and heads (GQA
  groups stay whole on a device) and still matches xla; 4 fake CPU devices."""
  out = run_python("""
    import jax, jax.numpy as jnp, numpy as np
    from pretrax import sharding
    from pretrax.model import attention, layers
    mesh = jax.make_mesh((2, 1, 2), ('data', 'fsdp', 'tensor'),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    to_sharding = sharding.activation_sharding(mesh)
    B, L, N, K, H = 4, 128, 4, 2, 16
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, L, N, H))
    k, v = (jax.random.normal(key, (B, L, K, H)) for key in keys[1:3])
    d_out = jax.random.normal(keys[3], (B, L, N, H))
    seg = jnp.array([[1] * 50 + [2] * 60 + [0] * 18] * 2 + [[1] * L] * 2, jnp.int32)

    def loss_and_grads(backend, q, k, v):
      f = lambda q, k, v: jnp.sum(d_out * attention.attention(
          q, k, v, seg, causal=True, backend=backend, platform='tpu', interpret=True))
      with layers.activation_sharding(to_sharding):
        return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh):
      q = jax.device_put(q, to_sharding(('batch', 'length', 'heads', 'head_dim')))
      splash = lambda *a: loss_and_grads('splash', *a)
      assert 'shard_map' in str(jax.make_jaxpr(splash)(q, k, v))
      (a, grads_a), (b, grads_b) = jax.jit(splash)(q, k, v), jax.jit(
          lambda *a: loss_and_grads('xla', *a))(q, k, v)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(grads_a, grads_b):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-5)
    print('matched')
  """, devices=4)
  assert 'matched' in out


@pytest.mark.parametrize('dtype, q_shape, capability, expected', [
    ('bfloat16', (2, 1024, 12, 64), (9, 0), None),
    ('float16', (2, 1024, 16, 256), (9, 0), None),  # Hopper takes head dims up to 256,
    ('bfloat16', (2, 1024, 16, 256), (8, 0), 'multiple of 8 and <= 128, not 256'),  # Ampere 128.
    ('float32', (2, 1024, 12, 64), (9, 0), 'float16/bfloat16, not float32'),
    ('bfloat16', (2, 1024, 12, 60), (9, 0), 'multiple of 8 and <= 256, not 60'),
    ('bfloat16', (2, 1024, 12, 512), (9, 0), 'multiple of 8 and <= 256, not 512'),
    ('bfloat16', (2, 1023, 12, 64), (9, 0), 'even sequence lengths'),
    ('bfloat16', (2, 1024, 12, 64), (7, 5), 'compute capability >= 8.0'),
])
def test_cudnn_unsupported_reason(dtype, q_shape, capability, expected):
  k_shape = q_shape[:2] + (4, q_shape[3])
  reason = attention.cudnn_unsupported_reason(jnp.dtype(dtype), q_shape, k_shape, platform='cuda',
                                              compute_capability=capability)
  assert reason == expected if expected is None else expected in reason
  assert 'NVIDIA' in attention.cudnn_unsupported_reason(
      jnp.dtype(dtype), q_shape, k_shape, platform='tpu', compute_capability=None)


@pytest.mark.parametrize('kwargs, expected', [
    (dict(platform='tpu', prefix=False), None),
    (dict(platform='cpu', prefix=False, interpret=True), None),
    (dict(platform='cpu', prefix=False), 'TPU kernel'),
    (dict(platform='tpu', prefix=True), 'prefix'),
    (dict(platform='tpu', prefix=False, sequence_sharded=True), 'sharded sequence'),
])
def test_splash_unsupported_reason(kwargs, expected):
  reason = attention.splash_unsupported_reason((2, 1024, 8, 128), **kwargs)
  assert reason == expected if expected is None else expected in reason
  assert 'multiple of 128' in attention.splash_unsupported_reason((2, 1000, 8, 128),
                                                                  platform='tpu', prefix=False)


@pytest.mark.parametrize('platform, expected', [
    ('cuda', 'cudnn'), ('tpu', 'splash'), ('cpu', 'cpu'), ('gpu', 'xla'), ('rocm', 'xla')])
def test_auto_resolves_per_platform(platform, expected):
  assert attention.resolve_backend('auto', platform) == expected
  assert attention.resolve_backend('xla', platform) == 'xla'  # An explicit choice stays.


def test_auto_on_this_machine_is_its_platforms_backend():
  platform = attention.current_platform()
  expected = {'cpu': 'cpu', 'cuda': 'cudnn', 'tpu': 'splash'}.get(platform, 'xla')
  assert attention.resolve_backend('auto', platform) == expected


def test_an_unknown_backend_fails_in_validation_in_one_line():
  c = load_config('tiny')
  c.model.attention_backend = 'flash'
  with pytest.raises(config_lib.ConfigError, match=r"^model.attention_backend='flash' is not one "
                     r'of auto, xla, cudnn, splash, cpu.$'):
    config_lib.validate(c, check_data=False)
  assert config_lib.ATTENTION_BACKENDS == attention.BACKENDS


def test_the_tiny_model_trains_the_same_with_xla_and_cpu_attention(tiny_config, tmp_path):
  c = tiny_config
  c.steps, c.log_every, c.eval_every = 4, 1, 4
  c.eval_batches = 1
  losses = {}
  for backend in ('xla', 'cpu'):
    c.model.attention_backend = backend
    train.train(c, str(tmp_path / backend))
    losses[backend] = [r['loss'] for r in metrics.read_metrics(str(tmp_path / backend))
                       if 'loss' in r]
  assert len(losses['cpu']) == 4
  np.testing.assert_allclose(losses['cpu'], losses['xla'], rtol=1e-5)
