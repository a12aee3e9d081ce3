"""Attention backends: each against the XLA reference, the fallback rules, and the resolver.

No GPU or TPU here: splash runs in Pallas interpret mode; cuDNN is covered by its fallback rules
(and falls back to xla on this CPU).
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, run_python
from pretrax import config as config_lib
from pretrax import config_check, metrics, run_config, train
from pretrax.model import attention, attention_cudnn, attention_splash, masks

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
    out = attention.attention(
      q, k, v, SEGMENTS, causal=causal, prefix_BT=prefix, backend=backend, **kwargs
    )
    return jnp.sum(out * d_out)

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def _assert_matches_xla(backend: str, mask: str, num_kv_heads: int, **kwargs):
  value, grads = _values_and_grads(backend, mask, num_kv_heads, **kwargs)
  value_ref, grads_ref = _values_and_grads('xla', mask, num_kv_heads)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for name, a, b in zip('qkv', grads, grads_ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('num_kv_heads', [4, 2])  # Multi-head and grouped-query.
@pytest.mark.parametrize('mask', sorted(MASKS))
def test_cpu_backend_matches_xla(mask, num_kv_heads):
  _assert_matches_xla('cpu', mask, num_kv_heads)


@pytest.mark.parametrize(
  'mask, num_kv_heads', [('causal', 4), ('causal', 2), ('bidirectional', 4), ('bidirectional', 1)]
)
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
  out = run_python(
    """
    import jax, jax.numpy as jnp, numpy as np
    from pretrax import sharding
    from pretrax.model import attention, layers
    mesh = jax.make_mesh((2, 1, 1, 2), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
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
  """,
    devices=4,
  )
  assert 'matched' in out


@pytest.mark.parametrize(
  'dtype, q_shape, capability, expected',
  [
    ('bfloat16', (2, 1024, 12, 64), (9, 0), None),
    ('float16', (2, 1024, 16, 256), (9, 0), None),  # Hopper takes head dims up to 256,
    ('bfloat16', (2, 1024, 16, 256), (8, 0), 'multiple of 8 and <= 128, not 256'),  # Ampere 128.
    ('float32', (2, 1024, 12, 64), (9, 0), 'float16/bfloat16, not float32'),
    ('bfloat16', (2, 1024, 12, 60), (9, 0), 'multiple of 8 and <= 256, not 60'),
    ('bfloat16', (2, 1024, 12, 512), (9, 0), 'multiple of 8 and <= 256, not 512'),
    ('bfloat16', (2, 1023, 12, 64), (9, 0), 'even sequence lengths'),
    ('bfloat16', (2, 1024, 12, 64), (7, 5), 'compute capability >= 8.0'),
  ],
)
def test_cudnn_unsupported_reason(dtype, q_shape, capability, expected):
  k_shape = q_shape[:2] + (4, q_shape[3])
  reason = attention_cudnn.cudnn_unsupported_reason(
    jnp.dtype(dtype), q_shape, k_shape, platform='cuda', compute_capability=capability
  )
  assert reason == expected if expected is None else expected in reason
  assert 'NVIDIA' in attention_cudnn.cudnn_unsupported_reason(
    jnp.dtype(dtype), q_shape, k_shape, platform='tpu', compute_capability=None
  )


@pytest.mark.parametrize(
  'kwargs, expected',
  [
    (dict(platform='tpu', prefix=False), None),
    (dict(platform='cpu', prefix=False, interpret=True), None),
    (dict(platform='cpu', prefix=False), 'TPU kernel'),
    (dict(platform='tpu', prefix=True), 'prefix'),
    (dict(platform='tpu', prefix=False, sequence_sharded=True), 'sharded sequence'),
  ],
)
def test_splash_unsupported_reason(kwargs, expected):
  reason = attention_splash.splash_unsupported_reason((2, 1024, 8, 128), **kwargs)
  assert reason == expected if expected is None else expected in reason
  assert 'multiple of 128' in attention_splash.splash_unsupported_reason(
    (2, 1000, 8, 128), platform='tpu', prefix=False
  )


@pytest.mark.parametrize(
  'platform, expected',
  [('cuda', 'cudnn'), ('tpu', 'splash'), ('cpu', 'cpu'), ('gpu', 'xla'), ('rocm', 'xla')],
)
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
  with pytest.raises(
    config_lib.ConfigError,
    match=r"^model.attention_backend='flash' is not one "
    r'of auto, xla, cudnn, splash, cpu.$',
  ):
    config_check.validate(c, check_data=False)
  assert config_lib.ATTENTION_BACKENDS == attention.BACKENDS


def test_the_tiny_model_trains_the_same_with_xla_and_cpu_attention(tiny_config, tmp_path):
  c = tiny_config
  c.steps, c.log_every, c.eval_every = 4, 1, 4
  c.eval_batches = 1
  losses = {}
  for backend in ('xla', 'cpu'):
    c.model.attention_backend = backend
    train.train(run_config.build(c, num_devices=jax.device_count()), str(tmp_path / backend))
    losses[backend] = [
      r['loss'] for r in metrics.read_metrics(str(tmp_path / backend)) if 'loss' in r
    ]
  assert len(losses['cpu']) == 4
  np.testing.assert_allclose(losses['cpu'], losses['xla'], rtol=1e-5)


# ---- cuDNN's variable-length form, proven on CPU: the layout, the routing, every fallback ------


def _random_packed_rows(rng: np.random.Generator, rows: int, length: int, max_docs: int):
  """Rows of contiguous, increasing segment ids of random lengths, some ending in padding and
  some with a gap of padding between documents (a piece the pipeline dropped)."""
  out = np.zeros((rows, length), np.int32)
  for r in range(rows):
    docs = rng.integers(1, max_docs + 1)
    cuts = np.sort(rng.choice(np.arange(1, length), size=docs, replace=False))
    bounds = [0, *cuts.tolist()]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
      out[r, a:b] = i + 1
    if rng.random() < 0.3 and docs > 1:  # Padding in place of one document.
      out[r][out[r] == 1] = 0
  return out


def _layout_by_hand(ids_T: np.ndarray) -> list[tuple[int, int]]:
  """(start, length) of each run of one non-zero id."""
  runs = []
  for t, x in enumerate(ids_T):
    if x and (t == 0 or ids_T[t - 1] != x):
      runs.append([t, 0])
    if x:
      runs[-1][1] += 1
  return [tuple(r) for r in runs]


@pytest.mark.parametrize('max_segments', [1, 3, 8])
def test_segment_layout_matches_the_runs_of_every_row(max_segments):
  rng = np.random.default_rng(max_segments)
  ids = _random_packed_rows(rng, rows=64, length=48, max_docs=6)
  lengths, offsets, fits = jax.jit(attention_cudnn.segment_layout, static_argnums=1)(
    ids, max_segments
  )
  lengths, offsets = np.asarray(lengths), np.asarray(offsets)
  assert lengths.shape == (64, max_segments) and offsets.shape == (64, max_segments + 1)
  every_row_fits = True
  for r in range(64):
    runs = _layout_by_hand(ids[r])
    every_row_fits &= len(runs) <= max_segments
    if max_segments == 1 and runs:
      every_row_fits &= runs[0][0] == 0
    kept = runs[:max_segments]
    pad = max_segments - len(kept)
    np.testing.assert_array_equal(offsets[r], [s for s, _ in kept] + [-1] * (pad + 1))
    np.testing.assert_array_equal(lengths[r], [n for _, n in kept] + [-1] * pad)
  assert bool(fits) == every_row_fits
  assert max_segments < 8 or every_row_fits  # The largest bound holds every row here.


def test_segment_layout_refuses_a_segment_split_in_two():
  # Segment 1 comes back after segment 2: one id, two runs. A dense mask joins them, runs do not.
  ids = jnp.array([[1, 1, 2, 2, 1, 1, 0, 0]], jnp.int32)
  assert not bool(attention_cudnn.segment_layout(ids, 8)[2])
  assert bool(attention_cudnn.segment_layout(jnp.array([[1, 1, 2, 2, 3, 3, 0, 0]]), 8)[2])


def _varlen_mask(lengths_BM, offsets_BM1, T: int, causal: bool) -> jax.Array:
  """What cuDNN's variable-length form means: query t sees key s when both lie in one segment's
  [offset, offset + length) and, if causal, s <= t."""
  t = jnp.arange(T)
  starts, ends = offsets_BM1[:, :-1, None], offsets_BM1[:, :-1, None] + lengths_BM[..., None]
  member_BMT = (lengths_BM[..., None] > 0) & (t >= starts) & (t < ends)
  mask_BTS = (
    jnp.einsum('BMT,BMS->BTS', member_BMT.astype(jnp.int32), member_BMT.astype(jnp.int32)) > 0
  )
  return mask_BTS & (t[:, None] >= t[None, :]) if causal else mask_BTS


@pytest.mark.parametrize('causal', [True, False])
def test_the_variable_length_layout_is_the_segment_mask_on_every_real_token(causal):
  ids = jnp.asarray(_random_packed_rows(np.random.default_rng(1), rows=32, length=40, max_docs=5))
  lengths, offsets, fits = attention_cudnn.segment_layout(ids, 5)
  assert bool(fits)
  real_B1T1 = (ids != 0)[:, :, None]
  ours = masks.attention_mask(ids, causal=causal)
  theirs = _varlen_mask(lengths, offsets, 40, causal)
  np.testing.assert_array_equal(ours & real_B1T1, theirs)  # Padding queries: no meaning there.


def _emulated_cudnn(monkeypatch, ran: list[str]):
  """cuDNN's three entry points replaced by their meaning in plain JAX (the variable-length one
  built from the layout alone), each recording when it runs; the machine claims a Hopper GPU."""

  def dense(q, k, v, segment_ids, *, causal, prefix_BT):
    jax.debug.callback(lambda: ran.append('dense'))
    mask = masks.attention_mask(segment_ids, causal=causal, prefix_BT=prefix_BT)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation='xla')

  def varlen(q, k, v, lengths, offsets, *, causal):
    jax.debug.callback(lambda: ran.append('varlen'))
    if lengths.shape[1] == 1:  # Lengths alone: one segment from position 0.
      offsets = jnp.zeros_like(offsets).at[:, 1].set(-1)
    mask = _varlen_mask(lengths, offsets, q.shape[1], causal)
    mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)  # Padding rows: anything but NaN.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation='xla')

  def plain(q, k, v, *, causal):  # No segments at all: only right for rows of one document.
    jax.debug.callback(lambda: ran.append('plain'))
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation='xla')

  monkeypatch.setattr(attention_cudnn, '_cudnn_dense', dense)
  monkeypatch.setattr(attention_cudnn, '_cudnn_varlen', varlen)
  monkeypatch.setattr(attention_cudnn, '_cudnn_plain', plain)
  monkeypatch.setattr(attention_cudnn, 'current_compute_capability', lambda: (9, 0))
  monkeypatch.setattr(attention_cudnn, '_cudnn_version', lambda: 91000)
  monkeypatch.setattr(jax, '__version__', '0.11.2')  # Past JAX 0.10's grouped-query offsets.


@pytest.mark.parametrize(
  'rows, max_segments, kernel',
  [
    ('packed', 8, 'varlen'),
    ('packed', 2, 'dense'),
    ('packed', 0, 'dense'),
    ('whole', 8, 'plain'),
    ('whole', 0, 'dense'),
  ],
)
@pytest.mark.parametrize('mask', ['causal', 'bidirectional'])
def test_cudnn_routing_matches_xla(monkeypatch, mask, rows, max_segments, kernel):
  """Values and gradients on real tokens as the xla reference, through whichever kernel the
  rows allow: no mask for rows of one whole document each, the variable-length form when every
  row fits, else the dense mask."""
  ran = []
  _emulated_cudnn(monkeypatch, ran)
  if rows == 'packed':
    ids = jnp.asarray(_random_packed_rows(np.random.default_rng(2), rows=4, length=64, max_docs=4))
    assert int(jnp.max(jnp.sum(jnp.diff(ids, axis=1) > 0, axis=1) + 1)) > 2  # A row holds 3+.
  else:
    ids = jnp.ones((4, 64), jnp.int32)
  causal = mask == 'causal'
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (4, 64, 4, 16), jnp.bfloat16)
  k, v = (jax.random.normal(x, (4, 64, 2, 16), jnp.bfloat16) for x in keys[1:3])
  real = (ids != 0)[:, :, None, None]
  d_out = jax.random.normal(keys[3], q.shape) * real  # Only real tokens reach the loss.

  def f(q, k, v, backend):
    out = attention.attention(
      q, k, v, ids, causal=causal, backend=backend, platform='cuda', max_segments=max_segments
    )
    return jnp.sum(out.astype(jnp.float32) * d_out)

  value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), static_argnums=3)(
    q, k, v, 'cudnn'
  )
  jax.effects_barrier()
  value_ref, grads_ref = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), static_argnums=3)(
    q, k, v, 'xla'
  )
  assert set(ran) == {kernel}
  np.testing.assert_allclose(value, value_ref, rtol=2e-2)
  for name, a, b in zip('qkv', grads, grads_ref, strict=True):
    np.testing.assert_allclose(
      a.astype(jnp.float32) * (1 if name != 'q' else real),
      b.astype(jnp.float32) * (1 if name != 'q' else real),
      atol=3e-2,
      err_msg=f'd{name}',
    )


@pytest.mark.parametrize(
  'kwargs, expected',
  [
    (dict(prefix=True), 'prefix'),
    (dict(max_segments=0), 'max_segments=0'),
    (dict(compute_capability=(8, 0)), 'Hopper'),
    (dict(compute_capability=(8, 0), max_segments=1), None),  # Lengths alone: any cuDNN GPU.
    (dict(cudnn_version=90500), '9.6'),
    (dict(cudnn_version=None), '9.6'),
    (dict(num_kv_heads=2, jax_version='0.10.2'), 'grouped-query'),
    (dict(num_kv_heads=2, jax_version='0.10.2', max_segments=1), None),
    (dict(num_kv_heads=2, jax_version='0.11.2'), None),
    (dict(), None),
  ],
)
def test_cudnn_packed_unsupported_reason(kwargs, expected):
  args = dict(
    prefix=False,
    max_segments=16,
    num_heads=4,
    num_kv_heads=4,
    compute_capability=(9, 0),
    cudnn_version=91000,
    jax_version='0.11.2',
  )
  reason = attention_cudnn.cudnn_packed_unsupported_reason(**{**args, **kwargs})
  assert reason is None if expected is None else expected in reason


def test_cudnn_without_the_variable_length_form_takes_the_dense_mask_and_says_why(
  monkeypatch, caplog
):
  ran = []
  _emulated_cudnn(monkeypatch, ran)
  monkeypatch.setattr(attention_cudnn, 'current_compute_capability', lambda: (8, 0))  # An A100.
  monkeypatch.setattr(attention, '_warned', set())
  q = jnp.ones((2, 8, 2, 8), jnp.bfloat16)
  ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]] * 2, jnp.int32)
  with caplog.at_level(logging.WARNING):
    attention.attention(q, q, q, ids, causal=True, backend='cudnn', platform='cuda')
    jax.effects_barrier()
    attention.attention(
      q, q, q, jnp.ones((2, 8), jnp.int32), causal=True, backend='cudnn', platform='cuda'
    )
    jax.effects_barrier()
  assert ran == ['dense', 'plain']  # Rows of one whole document each still need no mask.
  assert 'Hopper' in caplog.text and 'using cudnn with a dense mask instead' in caplog.text


@pytest.mark.parametrize('causal, max_segments', [(True, 4), (False, 4), (True, 1)])
def test_cudnn_variable_length_call_passes_the_layout_and_mask_type(
  monkeypatch, causal, max_segments
):
  """What reaches JAX's cuDNN wrapper: the mask type, the scale, and lengths with offsets (or,
  for one segment per row, lengths alone)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=C0415

  calls = []

  class Recorder:
    MaskType = cudnn.MaskType

    @staticmethod
    def dot_product_attention(q, k, v, **kwargs):
      calls.append(kwargs)
      return q

  monkeypatch.setattr(attention_cudnn, '_cudnn_module', lambda: Recorder)
  ids = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
  lengths, offsets, _ = attention_cudnn.segment_layout(ids, max_segments)
  q = jnp.ones((2, 6, 2, 16), jnp.bfloat16)
  attention_cudnn._cudnn_varlen(q, q, q, lengths, offsets, causal=causal)
  ((kwargs,),) = [calls]
  expected = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  assert kwargs['mask_type'] == expected and kwargs['scale'] == pytest.approx(0.25)
  if max_segments == 1:
    np.testing.assert_array_equal(kwargs['q_seqlen'], [3, 6])
    assert 'q_offsets' not in kwargs
  else:
    np.testing.assert_array_equal(kwargs['q_seqlen'], [[3, 2, -1, -1], [6, -1, -1, -1]])
    np.testing.assert_array_equal(kwargs['kv_offsets'], [[0, 3, -1, -1, -1], [0, -1, -1, -1, -1]])


def test_the_dense_branch_keeps_no_t_by_t_residual_beside_the_variable_length_one(
  monkeypatch, capsys
):
  """lax.switch returns every branch's residuals; the dense one is checkpointed, so what the
  backward keeps is O(T), whatever the dense kernel would save (here a T x T mask and scores)."""
  ran = []
  _emulated_cudnn(monkeypatch, ran)

  @jax.custom_vjp
  def flash_like(q, k, v):  # Keeps what a flash kernel keeps: inputs, output, log-sum-exp.
    return q * 2

  flash_like.defvjp(
    lambda q, k, v: (q * 2, (q, k, v, q * 2, jnp.sum(q, -1))),
    lambda res, d: (d * res[3] + res[4][..., None], res[1], res[2]),
  )
  monkeypatch.setattr(
    attention_cudnn,
    '_cudnn_varlen',
    lambda q, k, v, lengths, offsets, *, causal: flash_like(q, k, v),
  )
  monkeypatch.setattr(
    attention_cudnn, '_cudnn_plain', lambda q, k, v, *, causal: flash_like(q, k, v)
  )
  T = 48
  ids = jnp.array([[1] * 20 + [2] * 28, [1] * 40 + [0] * 8], jnp.int32)
  q = jax.random.normal(jax.random.key(0), (2, T, 2, 16), jnp.bfloat16)

  def f(q):
    out = attention.attention(q, q, q, ids, causal=True, backend='cudnn', platform='cuda')
    return jnp.sum(out.astype(jnp.float32))

  jax.ad_checkpoint.print_saved_residuals(f, q)
  saved = capsys.readouterr().out
  assert f'{T},{T}]' not in saved, saved  # No (..., T, T) array.
  assert f'[2,{T},2,16]' in saved  # The flash-like kernel's output is kept.


def test_cudnn_kernels_that_refuse_the_inputs_leave_the_dense_mask_and_say_why(monkeypatch, caplog):
  """A check in JAX's wrapper newer than ours (raised while tracing) costs the mask-free kernels,
  not cuDNN: the dense mask still runs."""
  ran = []
  _emulated_cudnn(monkeypatch, ran)
  monkeypatch.setattr(attention, '_warned', set())

  def refuses(*args, **kwargs):
    raise NotImplementedError('Unsupported sequence length')

  monkeypatch.setattr(attention_cudnn, '_cudnn_varlen', refuses)
  q = jnp.ones((2, 8, 2, 8), jnp.bfloat16)
  ids = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]] * 2, jnp.int32)
  with caplog.at_level(logging.WARNING):
    attention.attention(q, q, q, ids, causal=True, backend='cudnn', platform='cuda')
    jax.effects_barrier()
  assert ran == ['dense']
  assert 'Unsupported sequence length' in caplog.text
  assert 'using cudnn with a dense mask' in caplog.text


# ---- The real cuDNN path, lowered for CUDA on this CPU ------------------------------------------


@pytest.fixture
def pretend_hopper(monkeypatch):
  """JAX's cuDNN wrapper asks the hardware for cuDNN's version and the compute capability: say
  cuDNN 9.10 on a Hopper GPU, so the real path traces and lowers for CUDA here (nothing runs)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=C0415

  monkeypatch.setattr(cudnn, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(cudnn, 'check_compute_capability', lambda capability: True)
  monkeypatch.setattr(cudnn, 'is_cuda_compute_capability_equal', lambda capability: False)
  monkeypatch.setattr(attention_cudnn, 'current_compute_capability', lambda: (9, 0))
  monkeypatch.setattr(attention_cudnn, '_cudnn_version', lambda: 91000)


def _cudnn_loss(ids, causal: bool, num_kv_heads: int = 4):
  q = jnp.ones((2, 64, 4, 16), jnp.bfloat16)
  k = jnp.ones((2, 64, num_kv_heads, 16), jnp.bfloat16)

  def f(q, k, v):
    out = attention.attention(q, k, v, ids, causal=causal, backend='cudnn', platform='cuda')
    return jnp.sum(out.astype(jnp.float32))

  return f, (q, k, k)


@pytest.mark.parametrize(
  'causal, mask_types', [(True, {'CAUSAL', 'PADDING_CAUSAL'}), (False, {'NO_MASK', 'PADDING'})]
)
def test_cudnn_kernels_lower_for_cuda_with_their_mask_types(pretend_hopper, causal, mask_types):
  """JAX's wrapper accepts our lengths and offsets: the gradient lowers to cuDNN's fused
  attention, forward and backward, for each kernel: mask-free (CAUSAL or NO_MASK), variable
  length (PADDING_CAUSAL or PADDING) and the dense mask (a bias: ScaleBias)."""
  del pretend_hopper
  ids = jnp.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64], jnp.int32)
  f, args = _cudnn_loss(ids, causal)
  text = (
    jax.jit(jax.grad(f, argnums=(0, 1, 2)))
    .trace(*args)
    .lower(lowering_platforms=('cuda',))
    .as_text()
  )
  calls = re.findall(r'__cudnn\$fmha\w*', text)
  assert sorted(set(calls)) == [
    '__cudnn$fmhaScaleBiasSoftmax',
    '__cudnn$fmhaScaleBiasSoftmaxBackward',
    '__cudnn$fmhaSoftmax',
    '__cudnn$fmhaSoftmaxBackward',
  ]
  assert len(calls) == 6  # Three kernels, each forward and backward.
  assert set(re.findall(r'mask_type\\22: \\22(\w+)\\22', text)) >= mask_types


@pytest.mark.parametrize('policy, kept', [('dots', 0), ('dots_attention', 3)])
def test_dots_attention_keeps_cudnns_forward_outputs(pretend_hopper, capsys, policy, kept):
  """With the real cuDNN path: its forward outputs (the attention output and each kernel's
  softmax statistics, out of lax.switch) are kept, so the backward never reruns a forward."""
  del pretend_hopper
  from pretrax.model import transformer  # pylint: disable=C0415

  ids = jnp.array([[1] * 20 + [2] * 30 + [0] * 14, [1] * 64], jnp.int32)
  f, args = _cudnn_loss(ids, True)
  jax.ad_checkpoint.print_saved_residuals(
    jax.checkpoint(f, policy=transformer._REMAT_POLICIES[policy]()), *args
  )
  saved = capsys.readouterr().out.splitlines()
  # The output (bf16[2,64,4,16]), the plain kernel's statistics (f32[2,4,64]) and the
  # variable-length one's, per segment slot (f32[2*16,4,64]).
  assert sum('output of cond' in line for line in saved) == kept, saved


@pytest.mark.parametrize('scan', [False, True])
@pytest.mark.parametrize('remat', ['dots_attention', 'full'])
def test_the_train_step_lowers_for_cuda_and_dots_attention_runs_each_forward_once(
  pretend_hopper, monkeypatch, remat, scan
):
  """The whole bfloat16 train step (chunked loss too) lowered for CUDA: every block calls cuDNN's
  three kernels forward and backward; with 'dots_attention' no forward runs again in the backward
  pass, with 'full' each does. Scanned (model.scan_layers), the program holds one block's body
  (forward and backward) whatever the depth: the counts are one block's."""
  del pretend_hopper
  from pretrax import plan as plan_lib  # pylint: disable=C0415
  from pretrax import state as state_lib  # pylint: disable=C0415
  from pretrax import step as step_lib  # pylint: disable=C0415

  monkeypatch.setattr(attention, 'current_platform', lambda: 'cuda')
  c = load_config('tiny')
  c.model.dtype, c.model.attention_backend = 'bfloat16', 'cudnn'
  c.model.remat, c.model.loss_chunk = remat, 8
  c.model.scan_layers, c.model.num_layers = scan, 3
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, 64)
  train_step = step_lib.jit_train_step(
    run.model_def, run.optimizer, run.schedule, step_lib.step_config(c)
  )
  text = (
    train_step.trace(run.abstract, plan_lib._abstract_batch(c, run))
    .lower(lowering_platforms=('cuda',))
    .as_text()
  )
  calls = re.findall(r'__cudnn\$fmha\w*', text)
  forward = [x for x in calls if not x.endswith('Backward')]
  layers = 1 if scan else c.model.num_layers
  assert len(calls) - len(forward) == 3 * layers  # Each kernel's backward, in every block.
  if remat == 'dots_attention':
    assert len(forward) == 3 * layers
  else:  # Recomputed: again for each kernel, and once more inside the checkpointed dense branch.
    assert len(forward) == 3 * layers + 4 * layers
