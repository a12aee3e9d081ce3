"""Embeddings, norms, MLPs and RoPE, with logical axis names on every parameter.

Shape suffixes: B batch, L length, D embed, F mlp hidden, V vocab, N query heads, H head dim.
Logical axis names (mapped to mesh axes by one rules table in `pretrax.sharding`): vocab, embed,
position, mlp, heads, kv_heads, head_dim, norm on parameters; batch, length, activation_embed and
activation_vocab on activations. The model never mentions the mesh: `constrain` asks whoever traces
it (the train step, under `activation_sharding`) for the sharding of a logical name tuple.
"""

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp

from pretrax.model import fp8

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

# Logical names -> their sharding on the step's mesh (sharding.activation_sharding).
ToSharding = Callable[[tuple[str | None, ...]], jax.sharding.NamedSharding]

# Set while a sharded step is traced; None: unsharded.
_ACTIVATION_SHARDING: contextvars.ContextVar[ToSharding | None] = contextvars.ContextVar(
  'activation_sharding', default=None
)


@contextlib.contextmanager
def activation_sharding(to_sharding: ToSharding | None) -> Iterator[None]:
  """While a model is traced inside, `constrain` pins activations to `to_sharding(names)`."""
  token = _ACTIVATION_SHARDING.set(to_sharding)
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def current_activation_sharding() -> ToSharding | None:
  """The logical names -> sharding map of the step being traced; None when nothing is sharded."""
  return _ACTIVATION_SHARDING.get()


def shards(name: str) -> int:
  """How many devices split the logical axis `name` in the step being traced (1: none)."""
  to_sharding = _ACTIVATION_SHARDING.get()
  if to_sharding is None:
    return 1
  sharding = to_sharding((name,))
  axes = sharding.spec[0] if len(sharding.spec) else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
  return math.prod(sharding.mesh.shape[a] for a in axes)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """`x` with its sharding fixed to its logical axes, so the compiler does not have to guess where
  the batch and model dimensions live between blocks; unchanged when nothing is sharded."""
  to_sharding = _ACTIVATION_SHARDING.get()
  return x if to_sharding is None else jax.lax.with_sharding_constraint(x, to_sharding(names))


def param(
  rngs: nnx.Rngs,
  init: Initializer,
  shape: tuple[int, ...],
  names: tuple[str, ...],
  dtype: jnp.dtype,
) -> nnx.Param:
  """A parameter with its logical axis names; sharding is decided later, from the rules."""
  assert len(shape) == len(names), (shape, names)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def normal(std: float) -> Initializer:
  return jax.nn.initializers.normal(stddev=std)


zeros: Initializer = jax.nn.initializers.zeros
ones: Initializer = jax.nn.initializers.ones


def dense(
  x: jax.Array, w: jax.Array, contract: int = 1, *, fp8_min_dim: int | None = None
) -> jax.Array:
  """Contracts the last `contract` dims of x with the first of w, as one 2-D matmul.

  Tokens (every leading dim of x) are flattened first. With a 3-D (B, L, D) operand the weight
  gradient contracts over both B and L, and XLA:CPU then materialises transposed copies that
  recompute their elementwise producers (the GELU and LayerNorm backward): ~30% of a small model's
  step. One flat token dim makes every gradient a plain 2-D dot. Free on accelerators.
  `fp8_min_dim` (model.fp8_min_dim when model.fp8 is on, else None): the matmul runs in FP8
  (fp8.matmul) when the flattened weight's dims are both at least this.
  """
  tokens, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
  outer = w.shape[contract:]
  assert w.shape[:contract] == inner, (x.shape, w.shape)
  x_TI = x.reshape(math.prod(tokens), math.prod(inner))
  w_IO = w.reshape(math.prod(inner), math.prod(outer))
  if fp8.converts(w_IO.shape[0], w_IO.shape[1], fp8_min_dim):
    y_TO = fp8.matmul(x_TI, w_IO)
  else:
    y_TO = x_TI @ w_IO.astype(x.dtype)
  return y_TO.reshape(tokens + outer)


class Embed(nnx.Module):
  """Token embedding; with tied embeddings also the output projection (output_projection)."""

  def __init__(
    self,
    vocab_size: int,
    embed_dim: int,
    *,
    std: float,
    param_dtype: jnp.dtype,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    self.embedding = param(
      rngs, normal(std), (vocab_size, embed_dim), ('vocab', 'embed'), param_dtype
    )
    self.dtype = dtype

  def __call__(self, ids_BL: jax.Array) -> jax.Array:
    # Gather the table's embed dim first (as FSDP does for every weight): a lookup from a table
    # sharded on both dims has no efficient partitioning and XLA would replicate the whole table.
    table = constrain(self.embedding[...], ('vocab', 'activation_embed'))
    return jnp.take(table, ids_BL, axis=0).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32, with an optional bias."""

  def __init__(
    self, dim: int, *, eps: float, use_bias: bool, param_dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    self.scale = param(rngs, ones, (dim,), ('norm',), param_dtype)
    self.bias = param(rngs, zeros, (dim,), ('norm',), param_dtype) if use_bias else None
    self.eps = eps

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    y = layer_norm(x_BLD.astype(jnp.float32), self.scale[...].astype(jnp.float32), self.eps)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(x_BLD.dtype)


def _normalise(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)
  return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def layer_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """(x - mean) / std * scale over the last axis, with the textbook backward written out.

  Autodiff of the composite formula gives XLA:CPU several small reductions per norm; the closed
  form below needs two, from the normalised input saved by the forward pass.
  """
  return _normalise(x, eps)[0] * scale


def _layer_norm_fwd(x, scale, eps):
  normed, inv_std = _normalise(x, eps)
  return normed * scale, (normed, inv_std, scale)


def _layer_norm_bwd(eps, residuals, d_y):
  del eps
  normed, inv_std, scale = residuals
  d_normed = d_y * scale
  d_scale = jnp.sum((d_y * normed).reshape(-1, normed.shape[-1]), axis=0)
  d_x = inv_std * (
    d_normed
    - jnp.mean(d_normed, axis=-1, keepdims=True)
    - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True)
  )
  return d_x, d_scale


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32."""

  def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.scale = param(rngs, ones, (dim,), ('norm',), param_dtype)
    self.eps = eps

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x = x_BLD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_BLD.dtype)


class QKNorm(RMSNorm):
  """RMSNorm of queries or keys (B, L, heads, H), before RoPE: over each head, with one scale of
  head_dim that the heads share (Qwen3's q_norm), or `full`: over all heads at once, with a scale
  of heads * head_dim (OLMoE's and OLMo-2's)."""

  def __init__(
    self,
    heads: int,
    head_dim: int,
    *,
    full: bool,
    eps: float,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    dim = heads * head_dim if full else head_dim
    super().__init__(dim, eps=eps, param_dtype=param_dtype, rngs=rngs)
    self.full = full

  def __call__(self, x_BLNH: jax.Array) -> jax.Array:
    if not self.full:
      return super().__call__(x_BLNH)
    B, L, N, H = x_BLNH.shape
    return super().__call__(x_BLNH.reshape(B, L, N * H)).reshape(B, L, N, H)


class Mlp(nnx.Module):
  """GELU (tanh) MLP for the gpt2 flavour, SwiGLU for llama."""

  def __init__(
    self,
    embed_dim: int,
    mlp_dim: int,
    *,
    gated: bool,
    use_bias: bool,
    std: float,
    out_std: float,
    param_dtype: jnp.dtype,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
    fp8_min_dim: int | None = None,
  ):
    D, F = embed_dim, mlp_dim
    self.gated = gated
    self.dtype = dtype
    self.fp8_min_dim = fp8_min_dim  # None: no FP8 matmul (see dense).
    self.wi = param(rngs, normal(std), (D, F), ('embed', 'mlp'), param_dtype)
    self.wi_gate = (
      param(rngs, normal(std), (D, F), ('embed', 'mlp'), param_dtype) if gated else None
    )
    self.wo = param(rngs, normal(out_std), (F, D), ('mlp', 'embed'), param_dtype)
    self.bi = param(rngs, zeros, (F,), ('mlp',), param_dtype) if use_bias else None
    self.bi_gate = param(rngs, zeros, (F,), ('mlp',), param_dtype) if use_bias and gated else None
    self.bo = param(rngs, zeros, (D,), ('embed',), param_dtype) if use_bias else None

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    def cast(p: nnx.Param) -> jax.Array:
      return p[...].astype(self.dtype)

    h_BLF = dense(x_BLD, cast(self.wi), fp8_min_dim=self.fp8_min_dim)
    if self.bi is not None:
      h_BLF = h_BLF + cast(self.bi)
    if self.wi_gate is not None:  # Built when gated (SwiGLU).
      gate_BLF = dense(x_BLD, cast(self.wi_gate), fp8_min_dim=self.fp8_min_dim)
      if self.bi_gate is not None:
        gate_BLF = gate_BLF + cast(self.bi_gate)
      h_BLF = jax.nn.silu(gate_BLF) * h_BLF
    else:
      h_BLF = gelu_tanh(h_BLF)
    y_BLD = dense(h_BLF, cast(self.wo), fp8_min_dim=self.fp8_min_dim)
    if self.bo is not None:
      y_BLD = y_BLD + cast(self.bo)
    return y_BLD


_SQRT_2_OVER_PI = 0.7978845608028654


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (GPT-2's), with a hand-written derivative.

  XLA:CPU differentiates the composite formula into a long chain of elementwise ops that costs
  more than the matmuls around it; the derivative below reuses tanh from the forward pass.
  """
  return _gelu_tanh_fwd(x)[0]


def _gelu_tanh_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
  t = jnp.tanh(inner)
  return 0.5 * x * (1.0 + t), (x, t)


def _gelu_tanh_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array]:
  x, t = res
  d_inner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
  grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
  return (g * grad,)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def rope(x_BLNH: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding, rotating the two halves of each head (Llama's layout)."""
  H = x_BLNH.shape[-1]
  inv_freq_K = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq_K
  sin_BL1K = jnp.sin(angles_BLK)[:, :, None, :]
  cos_BL1K = jnp.cos(angles_BLK)[:, :, None, :]
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BL1K - x2 * sin_BL1K, x2 * cos_BL1K + x1 * sin_BL1K], -1)
  return rotated.astype(x_BLNH.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `rng` is None (evaluation) or the rate is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
