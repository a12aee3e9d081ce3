"""One transformer for every objective, in a GPT-2 flavour and a Llama flavour.

gpt2: learned positions, LayerNorm, GELU MLP. llama: RoPE, RMSNorm, SwiGLU, grouped-query attention.
`cfg.attention` makes it a decoder ('causal'), a prefix LM ('prefix': bidirectional over the tokens
that batch.prefix marks) or an encoder ('bidirectional'); `cfg.mlm_head` adds BERT's prediction
head (dense, exact GELU, norm, then the output projection with a bias) for masked LM.
Shape suffixes: B batch, L length, D embed, N query heads, K key/value heads, H head dim, V vocab.
"""

from collections.abc import Callable
import math

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from pretrax import mup
from pretrax.config_types import ModelConfig
from pretrax.model import attention as attention_lib
from pretrax.model import layers
from pretrax.model import moe as moe_lib
from pretrax.model import stack as stack_lib


def _dtype(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.flavour == 'llama':
    return layers.RMSNorm(
      cfg.embed_dim, eps=cfg.norm_eps, param_dtype=_dtype(cfg.param_dtype), rngs=rngs
    )
  return layers.LayerNorm(
    cfg.embed_dim,
    eps=cfg.norm_eps,
    use_bias=cfg.use_bias,
    param_dtype=_dtype(cfg.param_dtype),
    rngs=rngs,
  )


class Attention(nnx.Module):
  """Multi-head (or grouped-query) self-attention with masks for packing and causality."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, N, K, H = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pdt = _dtype(cfg.param_dtype)
    std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.num_layers)
    self.cfg = cfg
    self.q = layers.param(rngs, layers.normal(std), (D, N, H), ('embed', 'heads', 'head_dim'), pdt)
    self.k = layers.param(
      rngs, layers.normal(std), (D, K, H), ('embed', 'kv_heads', 'head_dim'), pdt
    )
    self.v = layers.param(
      rngs, layers.normal(std), (D, K, H), ('embed', 'kv_heads', 'head_dim'), pdt
    )
    self.o = layers.param(
      rngs, layers.normal(out_std), (N, H, D), ('heads', 'head_dim', 'embed'), pdt
    )
    if cfg.use_bias:
      self.q_bias: nnx.Param | None = layers.param(
        rngs, layers.zeros, (N, H), ('heads', 'head_dim'), pdt
      )
      self.k_bias: nnx.Param | None = layers.param(
        rngs, layers.zeros, (K, H), ('kv_heads', 'head_dim'), pdt
      )
      self.v_bias: nnx.Param | None = layers.param(
        rngs, layers.zeros, (K, H), ('kv_heads', 'head_dim'), pdt
      )
      self.o_bias: nnx.Param | None = layers.param(rngs, layers.zeros, (D,), ('embed',), pdt)
    else:
      self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
    if cfg.qk_norm in ('head', 'full'):
      full, eps = cfg.qk_norm == 'full', cfg.norm_eps

      def qk_norm(heads: int) -> layers.QKNorm:
        return layers.QKNorm(heads, H, full=full, eps=eps, param_dtype=pdt, rngs=rngs)

      self.q_norm: layers.QKNorm | None = qk_norm(N)
      self.k_norm: layers.QKNorm | None = qk_norm(K)
    else:
      self.q_norm = self.k_norm = None

  def __call__(
    self,
    x_BLD: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None,
  ) -> jax.Array:
    cfg = self.cfg

    def cast(p: nnx.Param) -> jax.Array:
      return p[...].astype(cfg.dtype)

    q_BLNH = self._project(x_BLD, cast(self.q), 'BLD,DNH->BLNH', 1)
    k_BLKH = self._project(x_BLD, cast(self.k), 'BLD,DKH->BLKH', 1)
    v_BLKH = self._project(x_BLD, cast(self.v), 'BLD,DKH->BLKH', 1)
    if self.q_bias is not None:
      q_BLNH = q_BLNH + cast(self.q_bias)
    if self.k_bias is not None:
      k_BLKH = k_BLKH + cast(self.k_bias)
    if self.v_bias is not None:
      v_BLKH = v_BLKH + cast(self.v_bias)
    if self.q_norm is not None and self.k_norm is not None:  # Before RoPE, as Qwen3 and OLMoE.
      q_BLNH, k_BLKH = self.q_norm(q_BLNH), self.k_norm(k_BLKH)
    if cfg.flavour == 'llama':
      q_BLNH = layers.rope(q_BLNH, positions_BL, cfg.rope_theta)
      k_BLKH = layers.rope(k_BLKH, positions_BL, cfg.rope_theta)
    if cfg.mup_base_width:  # muP's 1/head_dim logits; every kernel applies its 1/sqrt(head_dim).
      q_BLNH = q_BLNH * cfg.attention_mult
    out_BLNH = attention_lib.attention(
      q_BLNH,
      k_BLKH,
      v_BLKH,
      segment_ids_BL,
      causal=cfg.attention != 'bidirectional',
      prefix_BT=prefix_BL if cfg.attention == 'prefix' else None,
      backend=cfg.attention_backend,
      max_segments=cfg.max_segments,
    )
    # Named, so that remat='dots_attention' keeps it: the kernel is a custom call, not a dot.
    out_BLNH = checkpoint_name(out_BLNH, 'attention')
    y_BLD = self._project(out_BLNH, cast(self.o), 'BLNH,NHD->BLD', 2)
    if self.o_bias is not None:
      y_BLD = y_BLD + cast(self.o_bias)
    return y_BLD

  def _project(self, x: jax.Array, w: jax.Array, spec: str, contract: int) -> jax.Array:
    """The einsum `spec` of activations and a weight, which contracts the weight's first
    `contract` dims. With cfg.fp8: as layers.dense's 2-D matmul, in FP8 where the threshold lets
    it. Without: the einsum itself, since on a CPU the flattened matmul rounds grouped-query
    heads' products differently, and runs without FP8 keep their losses bit for bit."""
    if not self.cfg.fp8:
      return jnp.einsum(spec, x, w)
    return layers.dense(x, w, contract, fp8_min_dim=self.cfg.block_fp8_min_dim)


def _mlp(cfg: ModelConfig, layer: int, rngs: nnx.Rngs) -> nnx.Module:
  """Block `layer`'s MLP: dense, or experts where cfg.moe puts them."""
  gated, std = cfg.flavour == 'llama', cfg.init_std
  out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
  pdt, dt = _dtype(cfg.param_dtype), _dtype(cfg.dtype)
  if cfg.moe.is_moe(layer):
    return moe_lib.MoeMlp(
      cfg.embed_dim,
      cfg.moe,
      gated=gated,
      std=std,
      out_std=out_std,
      param_dtype=pdt,
      dtype=dt,
      rngs=rngs,
    )
  return layers.Mlp(
    cfg.embed_dim,
    cfg.mlp_dim,
    gated=gated,
    use_bias=cfg.use_bias,
    std=std,
    out_std=out_std,
    param_dtype=pdt,
    dtype=dt,
    rngs=rngs,
    fp8_min_dim=cfg.block_fp8_min_dim,
  )


class Block(nnx.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is a
  Mixture-of-Experts in the layers cfg.moe names."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = _norm(cfg, rngs)
    self.mlp = _mlp(cfg, layer, rngs)

  def __call__(
    self,
    x_BLD: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None,
    dropout_rng: jax.Array | None,
  ) -> tuple[jax.Array, moe_lib.MoeStats | None]:
    """The block's output, and an MoE layer's routing statistics (None for a dense MLP)."""
    rate = self.cfg.dropout
    attn_rng, mlp_rng = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    h = self.attn(self.attn_norm(x_BLD), segment_ids_BL, positions_BL, prefix_BL)
    x_BLD = x_BLD + layers.dropout(h, rate, attn_rng)
    stats = None
    if isinstance(self.mlp, moe_lib.MoeMlp):
      # Padding (segment 0) goes to no expert: it takes no capacity and counts in no load.
      h, stats = self.mlp(self.mlp_norm(x_BLD), segment_ids_BL > 0)
    else:
      h = self.mlp(self.mlp_norm(x_BLD))
    return x_BLD + layers.dropout(h, rate, mlp_rng), stats


class Transformer(nnx.Module):
  """Token ids in, float32 logits out."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    pdt, dt = _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    self.cfg = cfg
    self.embed = layers.Embed(
      cfg.vocab_size, cfg.embed_dim, std=cfg.init_std, param_dtype=pdt, dtype=dt, rngs=rngs
    )
    if cfg.flavour == 'gpt2':
      self.pos_embed: nnx.Param | None = layers.param(
        rngs, layers.normal(cfg.init_std), (cfg.max_len, cfg.embed_dim), ('position', 'embed'), pdt
      )
    else:
      self.pos_embed = None
    # Each layer draws what an unrolled build would, whatever the layout, in one compiled
    # initialiser per run of alike layers (stack.alike): start-up does not grow with depth.
    values = _block_values(cfg, rngs)
    first = first_scanned(cfg)
    unrolled = [stack_lib.blocks_from(_make_block(cfg, i), [values[i]])[0] for i in range(first)]
    self.blocks: nnx.List | None = nnx.List(unrolled) if unrolled else None
    scanned = first < cfg.num_layers
    self.stack = stack_lib.stacked(_make_block(cfg, first), values[first:]) if scanned else None
    self.final_norm = _norm(cfg, rngs)
    if cfg.tie_embeddings:
      self.head = None
    else:
      self.head = layers.param(
        rngs, layers.normal(cfg.init_std), (cfg.embed_dim, cfg.vocab_size), ('embed', 'vocab'), pdt
      )
    if cfg.mlm_head:
      D = cfg.embed_dim
      self.mlm_dense: nnx.Param | None = layers.param(
        rngs, layers.normal(cfg.init_std), (D, D), ('embed', 'mlp'), pdt
      )
      self.mlm_dense_bias: nnx.Param | None = layers.param(rngs, layers.zeros, (D,), ('mlp',), pdt)
      self.mlm_norm: nnx.Module | None = _norm(cfg, rngs)
      self.mlm_bias: nnx.Param | None = layers.param(
        rngs, layers.zeros, (cfg.vocab_size,), ('vocab',), pdt
      )
    else:
      self.mlm_dense = self.mlm_dense_bias = self.mlm_norm = self.mlm_bias = None
    if cfg.num_classes and cfg.pooler == 'tanh':  # BERT's pooler (dense + tanh); else the MLM's.
      D = cfg.embed_dim
      self.pooler: nnx.Param | None = layers.param(
        rngs, layers.normal(cfg.init_std), (D, D), ('embed', 'mlp'), pdt
      )
      self.pooler_bias: nnx.Param | None = layers.param(rngs, layers.zeros, (D,), ('mlp',), pdt)
    else:
      self.pooler = self.pooler_bias = None
    if cfg.num_classes:  # A linear classifier over the pooled states.
      D, C = cfg.embed_dim, cfg.num_classes
      self.classifier: nnx.Param | None = layers.param(
        rngs, layers.normal(cfg.init_std), (D, C), ('mlp', 'classes'), pdt
      )
      self.classifier_bias: nnx.Param | None = layers.param(
        rngs, layers.zeros, (C,), ('classes',), pdt
      )
    else:
      self.classifier = self.classifier_bias = None
    if cfg.mup_base_width:
      _scale_init_for_mup(self, cfg.width_mult)

  def __call__(
    self,
    ids_BL: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """Logits (B, L, V). `prefix_BL` marks bidirectional tokens when cfg.attention is 'prefix'."""
    return self.lm_head(
      self.states(ids_BL, segment_ids_BL, positions_BL, prefix_BL, dropout_rng=dropout_rng)
    )

  def states(
    self,
    ids_BL: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """The final states (B, L, D) of token ids: embeddings (with dropout) through the stack."""
    return self.states_and_stats(
      ids_BL, segment_ids_BL, positions_BL, prefix_BL, dropout_rng=dropout_rng
    )[0]

  def states_and_stats(
    self,
    ids_BL: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[moe_lib.MoeStats, ...]]:
    """`states`, and each MoE layer's routing statistics (see hidden_and_stats)."""
    x_BLD = layers.dropout(self.embed_tokens(ids_BL, positions_BL), self.cfg.dropout, dropout_rng)
    return self.hidden_and_stats(
      x_BLD, segment_ids_BL, positions_BL, prefix_BL, dropout_rng=dropout_rng
    )

  def embed_tokens(self, ids_BL: jax.Array, positions_BL: jax.Array) -> jax.Array:
    x_BLD = self.embed(ids_BL)
    if self.pos_embed is not None:
      table = layers.constrain(self.pos_embed[...], ('position', 'activation_embed'))  # See Embed.
      x_BLD = x_BLD + jnp.take(table, positions_BL, axis=0).astype(self.cfg.dtype)
    return x_BLD

  def decode(
    self,
    x_BLD: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """The transformer stack and output head, from input embeddings to float32 logits."""
    x_BLD, _ = self.hidden_and_stats(
      x_BLD, segment_ids_BL, positions_BL, prefix_BL, dropout_rng=dropout_rng
    )
    return self.lm_head(x_BLD)

  def hidden_and_stats(
    self,
    x_BLD: jax.Array,
    segment_ids_BL: jax.Array,
    positions_BL: jax.Array,
    prefix_BL: jax.Array | None = None,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[moe_lib.MoeStats, ...]]:
    """The transformer stack, from input embeddings to the final norm's output; and the routing
    statistics of each MoE layer in order (() for a dense model), returned rather than stored so
    that they pass through remat like any output."""
    cfg = self.cfg
    activation = ('batch', 'length', 'activation_embed')
    x_BLD = layers.constrain(x_BLD, activation)

    def run(block: Block, x_BLD: jax.Array, rng: jax.Array | None):
      if cfg.remat != 'none':
        remat_call = nnx.remat(type(block).__call__, policy=_REMAT_POLICIES[cfg.remat]())
        x_BLD, stats = remat_call(block, x_BLD, segment_ids_BL, positions_BL, prefix_BL, rng)
      else:
        x_BLD, stats = block(x_BLD, segment_ids_BL, positions_BL, prefix_BL, rng)
      return layers.constrain(x_BLD, activation), stats

    def layer_rng(i):  # Layer i's dropout key, the same unrolled or scanned.
      return None if dropout_rng is None else jax.random.fold_in(dropout_rng, i + 1)

    all_stats = []
    for i, block in enumerate(self.blocks or ()):
      x_BLD, stats = run(block, x_BLD, layer_rng(i))
      if stats is not None:
        all_stats.append(stats)
    if self.stack is not None:
      first, n = first_scanned(cfg), stack_lib.depth(self.stack)
      rngs = None if dropout_rng is None else jax.vmap(layer_rng)(jnp.arange(first, first + n))
      x_BLD, stats_n = stack_lib.scan(self.stack, run, x_BLD, rngs)
      all_stats.extend(stack_lib.unstacked(stats_n, n))  # Per layer, as unrolled.
    return self.final_norm(x_BLD), tuple(all_stats)

  def lm_head(self, x_BLD: jax.Array) -> jax.Array:
    """Final states to float32 logits over the vocabulary (through BERT's head for masked LM)."""
    x_BLD = self.head_input(x_BLD)
    head_DV, bias_V = self.output_projection()
    logits_BLV = layers.dense(x_BLD, head_DV)
    if bias_V is not None:
      logits_BLV = logits_BLV + bias_V
    return layers.constrain(logits_BLV.astype(jnp.float32), ('batch', 'length', 'activation_vocab'))

  def head_input(self, x_BLD: jax.Array) -> jax.Array:
    """What the output projection reads: the final states, or BERT's transform of them."""
    cfg = self.cfg
    if self.mlm_dense is None or self.mlm_dense_bias is None or self.mlm_norm is None:
      return x_BLD  # No masked-LM head (cfg.mlm_head builds all three of its parts).
    h_BLD = layers.dense(x_BLD, self.mlm_dense[...].astype(cfg.dtype))
    # Exact (erf) GELU, as BERT's and RoBERTa's heads, so that the head exports exactly.
    h_BLD = jax.nn.gelu(h_BLD + self.mlm_dense_bias[...].astype(cfg.dtype), approximate=False)
    return self.mlm_norm(h_BLD)

  def output_projection(self) -> tuple[jax.Array, jax.Array | None]:
    """(head (D, V), bias (V,) or None) in the compute dtype: the (tied) vocabulary projection."""
    dt = self.cfg.dtype
    if self.head is None:
      head_DV = self.embed.embedding[...].T
      if self.cfg.mup_base_width:
        # muP's output multiplier: the tied table keeps its init and lr as an embedding, so its
        # logits are scaled here instead (an untied head's init and lr are, see pretrax.mup).
        head_DV = head_DV * (1 / self.cfg.width_mult)
    else:
      head_DV = self.head[...]
    # Gathered over FSDP here, once: inside a chunked loss's loop it would be gathered per chunk.
    head_DV = layers.constrain(head_DV.astype(dt), ('activation_embed', 'vocab'))
    bias_V = None if self.mlm_bias is None else self.mlm_bias[...].astype(dt)
    return head_DV, bias_V

  def classify(
    self,
    x_BLD: jax.Array,
    ids_BL: jax.Array,
    segment_ids_BL: jax.Array,
    num_segments: int,
    *,
    dropout_rng: jax.Array | None = None,
  ) -> jax.Array:
    """Float32 class logits (B, S, C) of segments 1..S of each row (packed examples), from the
    final states (B, L, D): each segment's states read as cfg.pooling says, through the pooler
    (the masked LM's transform, or BERT's dense + tanh), then the classifier. A segment absent
    from a row gets the bias's logits."""
    cfg = self.cfg
    classifier, classifier_bias = self.classifier, self.classifier_bias
    if classifier is None or classifier_bias is None:
      raise ValueError('classify needs a classifier head: build the model with num_classes > 0.')
    read_BLS = readout_weights(cfg.pooling, ids_BL, segment_ids_BL, num_segments, cfg.mask_id)
    read_BSD = jnp.einsum('BLS,BLD->BSD', read_BLS.astype(cfg.dtype), x_BLD)
    if self.pooler is not None and self.pooler_bias is not None:
      dense_BSD = layers.dense(read_BSD, self.pooler[...].astype(cfg.dtype))
      pooled_BSD = jnp.tanh(dense_BSD + self.pooler_bias[...].astype(cfg.dtype))
    else:
      pooled_BSD = self.head_input(read_BSD)  # What the masked LM's projection reads.
    pooled_BSD = layers.dropout(
      pooled_BSD, cfg.dropout, None if dropout_rng is None else jax.random.fold_in(dropout_rng, 0)
    )
    logits_BSC = layers.dense(pooled_BSD, classifier[...].astype(cfg.dtype))
    return (logits_BSC + classifier_bias[...].astype(cfg.dtype)).astype(jnp.float32)


def readout_weights(
  pooling: str, ids_BL: jax.Array, segment_ids_BL: jax.Array, num_segments: int, mask_id: int
) -> jax.Array:
  """(B, L, S) float32 weights, each segment's summing to 1 (or 0 where a row lacks it): how
  segment s + 1's states are averaged. mean: all its tokens; first: its first; mask: its first
  `mask_id` token (its first token if it has none)."""
  # member_BLS[b, l, s]: token l of row b belongs to segment s + 1 (0 is padding).
  member_BLS = segment_ids_BL[..., None] == jnp.arange(1, num_segments + 1)
  if pooling == 'mask':
    marked_BLS = member_BLS & (ids_BL == mask_id)[..., None]
    has_mark_BS = jnp.any(marked_BLS, axis=1)
    member_BLS = jnp.where(has_mark_BS[:, None], marked_BLS, member_BLS)
  if pooling in ('first', 'mask'):
    # Rows are packed in order, so a segment's first member has no member before it.
    member_BLS = member_BLS & (jnp.cumsum(member_BLS, axis=1) == 1)
  weights_BLS = member_BLS.astype(jnp.float32)
  return weights_BLS / jnp.maximum(jnp.sum(weights_BLS, axis=1, keepdims=True), 1.0)


def _scale_init_for_mup(model: Transformer, width_mult: float) -> None:
  """Each parameter times its muP role's init multiplier (mup.init_multiplier, read from its
  logical axes): the layers draw every weight at the std tuned at the base width (init_std)."""
  for _, p in nnx.iter_graph(model):
    if isinstance(p, nnx.Param):
      scale = mup.init_multiplier(p.out_sharding, width_mult)
      if scale != 1.0:
        p[...] = p[...] * scale


# What each block keeps for the backward pass; the rest is recomputed. Matmuls over flattened
# tokens (layers.dense) have no batch dims, so 'dots' keeps every projection's output and
# recomputes norms, activations and attention (the attention kernel is a custom call, not a dot);
# 'dots_attention' also keeps attention's output and its kernel's statistics (cuDNN, splash), so
# only norms and activations are recomputed; 'offload' keeps the dots in host memory instead.
def _dots_and_attention():
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  named = jax.checkpoint_policies.save_only_these_names('attention')

  def policy(prim, *args, **params) -> bool:
    # The attention kernels' forward outputs: with them the backward never reruns the forward.
    # cuDNN's are its output and softmax statistics; splash's (a Pallas call, the model's only
    # one) its output and log-sum-exp, which splash lays out 128 lanes wide: (heads, T, 128)
    # float32, more bytes than the output itself.
    if prim.name.startswith('dot_product_attention_fwd') or prim.name == 'pallas_call':
      return True
    return dots(prim, *args, **params) or named(prim, *args, **params)

  return policy


_REMAT_POLICIES = {
  'dots': lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  'dots_attention': _dots_and_attention,
  'full': lambda: jax.checkpoint_policies.nothing_saveable,
  'offload': lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims(
    offload_src='device', offload_dst='pinned_host'
  ),
}


def _make_block(cfg: ModelConfig, layer: int) -> Callable[[nnx.Rngs], Block]:
  return lambda rngs: Block(cfg, layer, rngs)


def _block_values(cfg: ModelConfig, rngs: nnx.Rngs) -> list:
  """Every block's parameter values in order, as Block(cfg, i, rngs) for i in turn would draw
  them; each run of consecutive alike layers (dense, or Mixture-of-Experts) built at once."""
  values: list = []
  while len(values) < cfg.num_layers:
    start = len(values)
    end = start + 1
    while end < cfg.num_layers and cfg.moe.is_moe(end) == cfg.moe.is_moe(start):
      end += 1
    values += stack_lib.alike(_make_block(cfg, start), end - start, rngs)
  return values


def first_scanned(cfg: ModelConfig) -> int:
  """The first layer of the scanned stack (num_layers: none; see model/stack.py)."""
  return stack_lib.first_scanned(
    cfg.num_layers, cfg.scan_layers, cfg.moe.num_experts, cfg.moe.first_dense
  )


def build(cfg: ModelConfig, seed: int) -> Transformer:
  return Transformer(cfg, nnx.Rngs(params=seed))


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
