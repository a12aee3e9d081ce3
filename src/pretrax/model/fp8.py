"""FP8 matmuls with current (just-in-time, per-tensor) scaling, for the transformer blocks'
projections (model.fp8).

Each operand is scaled so that its largest magnitude lands on its format's largest value, then
cast: e4m3 (float8_e4m3fn: 3 mantissa bits, max 448) for the forward operands, activations and
weights; e5m2 (float8_e5m2: 2 mantissa bits, max 57344, more range) for the gradient arriving in
the backward pass. Every product is a dot_general of two FP8 operands that accumulates in the
compute dtype and is rescaled by the product of the two scales. The scales come from this step's
tensors (no amax history), so a run keeps no extra state: checkpoints and bit-exact resume are
those of a bfloat16 run. Hopper-class GPUs (compute capability 8.9 and up: Ada, Hopper, Blackwell)
run such dots on FP8 tensor cores; elsewhere (CPU, TPU, older GPUs) XLA upcasts the operands, which
costs time and gains nothing.

Shape suffixes: T tokens (flattened), I the contracted dim, O the output dim.
"""

import jax
import jax.numpy as jnp

FORWARD = jnp.float8_e4m3fn  # Activations and weights: precision matters more than range.
BACKWARD = jnp.float8_e5m2  # Gradients: their spread across a tensor is wider.

# The compute capability from which NVIDIA GPUs have FP8 tensor cores (Ada 8.9, Hopper 9.0).
FP8_CAPABILITY = (8, 9)


def gains_on(device: jax.Device) -> bool:
  """Whether FP8 matmuls can run faster than bfloat16 on `device`: an NVIDIA GPU with FP8 tensor
  cores (its compute_capability reads 'major.minor'; other devices have none, or another form)."""
  capability = str(getattr(device, 'compute_capability', '') or '')
  major, _, minor = capability.partition('.')
  if device.platform != 'gpu' or not (major.isdigit() and minor.isdigit()):
    return False
  return (int(major), int(minor)) >= FP8_CAPABILITY


def converts(inner: int, outer: int, min_dim: int | None) -> bool:
  """Whether a (inner, outer) weight's matmul runs in FP8: FP8 on (`min_dim` not None) and both
  dims at least `min_dim`. Below it the matmul is too small for FP8's faster tensor cores to pay
  for the three quantising passes (amax, scale, cast) that each operand costs."""
  return min_dim is not None and min(inner, outer) >= min_dim


def quantise(x: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """(x_q, scale): x / scale in FP8 `dtype`, with x ~= x_q * scale; the scale is float32.

  An all-zero x gets scale 1 (not 0, which would divide 0 by 0); a tiny one a scale no smaller
  than float32's smallest normal number; the clip is a guard at the format's maximum, which a
  float8_e4m3fn cast would otherwise turn into NaN (it has no inf).
  """
  fmax = float(jnp.finfo(dtype).max)
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  # The smallest power of two at or above amax / fmax: dividing by it and multiplying by it are
  # exact, so the FP8 cast is the only rounding, and a product rescaled after rounding to bfloat16
  # (remat keeps it so) equals one rescaled before (without remat XLA may keep it in float32).
  # Floored at float32's smallest normal number: a subnormal ratio may be flushed to zero.
  ratio = jnp.maximum(amax / fmax, jnp.finfo(jnp.float32).smallest_normal)
  mantissa, exponent = jnp.frexp(jnp.where(amax > 0, ratio, 1.0))  # ratio = mantissa 2**exponent
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)  # mantissa in [0.5, 1).
  scale = jnp.ldexp(jnp.float32(1.0), exponent)
  # An inf or NaN in x makes every element NaN, as a bfloat16 matmul's output would be (partly):
  # clipped to the format's maximum, an overflow would pass the step's non-finite check unseen.
  scale = jnp.where(jnp.isfinite(amax), scale, jnp.nan)
  x_q = jnp.clip(x.astype(jnp.float32) / scale, -fmax, fmax).astype(dtype)
  return x_q, scale


def _scaled_dot(
  a: jax.Array,
  b: jax.Array,
  contract: tuple[int, int],
  scale: jax.Array,
  out_dtype: jnp.dtype,
) -> jax.Array:
  """a . b over dims `contract` (one of each), two FP8 operands accumulated in `out_dtype`, times
  `scale` (float32)."""
  ab = jax.lax.dot_general(
    a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=out_dtype
  )
  # Rescaled in float32: the product of two scales may be far from 1 (huge or tiny tensors).
  return (ab.astype(jnp.float32) * scale).astype(out_dtype)


def matmul(x_TI: jax.Array, w_IO: jax.Array) -> jax.Array:
  """x_TI @ w_IO in x's dtype, both operands in e4m3; its gradients quantise the incoming
  gradient to e5m2 and multiply it by the saved FP8 operands."""
  return _matmul(x_TI, w_IO.astype(x_TI.dtype))


@jax.custom_vjp
def _matmul(x_TI: jax.Array, w_IO: jax.Array) -> jax.Array:
  return _matmul_fwd(x_TI, w_IO)[0]


_Residuals = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _matmul_fwd(x_TI: jax.Array, w_IO: jax.Array) -> tuple[jax.Array, _Residuals]:
  xq_TI, x_scale = quantise(x_TI, FORWARD)
  wq_IO, w_scale = quantise(w_IO, FORWARD)
  y_TO = _scaled_dot(xq_TI, wq_IO, (1, 0), x_scale * w_scale, x_TI.dtype)
  # The backward reads the FP8 copies, not the originals: a quarter of float32's bytes, half of
  # bfloat16's, and the operands the gradients' dots want anyway.
  return y_TO, (xq_TI, x_scale, wq_IO, w_scale)


def _matmul_bwd(residuals: _Residuals, g_TO: jax.Array) -> tuple[jax.Array, jax.Array]:
  xq_TI, x_scale, wq_IO, w_scale = residuals
  gq_TO, g_scale = quantise(g_TO, BACKWARD)
  # x, w and y share one dtype (matmul casts w), so both gradients take g's.
  dx_TI = _scaled_dot(gq_TO, wq_IO, (1, 1), g_scale * w_scale, g_TO.dtype)
  dw_IO = _scaled_dot(xq_TI, gq_TO, (0, 0), x_scale * g_scale, g_TO.dtype)
  return dx_TI, dw_IO


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
