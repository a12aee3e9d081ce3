"""Mixture-of-Experts MLP: a float32 router sends each token to its top-k experts, whose outputs are
summed with the router's weights.

Two computations of the same layer (`MoeConfig.capacity_factor`):
- dropless (0): the token copies are sorted by expert and each expert's rows go through a grouped
  matmul (`jax.lax.ragged_dot`); no token is dropped whatever the load.
- fixed capacity (> 0): each expert takes at most C = ceil(tokens * k / experts * factor) copies
  into an (experts, C, embed) buffer and the experts run as one batched matmul. Copies past C are
  dropped (counted in `dropped`), first choices before second ones. Static shapes, so a sharded
  step moves the buffer between devices with an all-to-all (expert parallelism on any backend).

Balancing: the load-balancing loss of Switch/GShard, E * sum_e f_e * P_e (f_e the share of token
copies sent to expert e, P_e its mean router probability; 1 when balanced), over the whole batch
and per sequence (DeepSeek-V3's complementary loss); the router z-loss, mean(logsumexp(logits)^2);
and DeepSeek-V3's auxiliary-loss-free bias, a per-expert offset added to the scores only to choose
the experts (never to weight them). The bias is a parameter with no gradient that the optimizer
leaves alone (optim.py); the train step moves it by `bias_rate` toward underloaded experts
(`update_router_bias`).

Shape suffixes: T tokens (batch x length, flattened), D embed, F expert hidden, E experts,
K experts per token, C capacity per expert, S sequences, L length.
"""

from collections.abc import Iterator
import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from pretrax.config_types import MoeConfig
from pretrax.model import expert_parallel, layers
from pretrax.model import stack as stack_lib

ROUTER_BIAS = 'router_bias'  # The parameter name optim.py keeps out of the optimizer.

# The dropless experts' grouped matmul: `jax.lax.ragged_dot`, or a stand-in with its signature
# while tracing under `grouped_matmul` (`pretrax plan` plans a grouped kernel's memory that way).
_GROUPED_MATMUL = contextvars.ContextVar('grouped_matmul', default=jax.lax.ragged_dot)


@contextlib.contextmanager
def grouped_matmul(fn) -> Iterator[None]:
  token = _GROUPED_MATMUL.set(fn)
  try:
    yield
  finally:
    _GROUPED_MATMUL.reset(token)


class Routing(NamedTuple):
  expert_TK: jax.Array  # int32: the chosen experts, best first.
  weight_TK: jax.Array  # float32: their weights in the sum of outputs.
  probs_TE: jax.Array  # float32: scores normalised to sum to 1 per token (for the balance loss).
  logits_TE: jax.Array  # float32


class MoeStats(NamedTuple):
  """What a layer reports: its losses (unweighted) and its load, summed over its tokens."""

  balance_loss: jax.Array  # Per batch: E * sum_e f_e P_e.
  sequence_balance_loss: jax.Array  # The same per sequence, averaged over sequences.
  z_loss: jax.Array
  load_E: jax.Array  # float32: token copies routed to each expert.
  dropped: jax.Array  # float32: token copies dropped for capacity.


def route(x_TD: jax.Array, router_DE: jax.Array, bias_E: jax.Array, cfg: MoeConfig) -> Routing:
  """The router, in float32: scores, the top-k choice (steered by the bias), their weights."""
  logits_TE = x_TD.astype(jnp.float32) @ router_DE.astype(jnp.float32)
  if cfg.score == 'sigmoid':
    scores_TE = jax.nn.sigmoid(logits_TE)
    probs_TE = scores_TE / jnp.sum(scores_TE, axis=-1, keepdims=True)
  else:
    scores_TE = probs_TE = jax.nn.softmax(logits_TE, axis=-1)
  # The bias chooses, never weighs: no gradient reaches it through the choice either.
  _, expert_TK = jax.lax.top_k(scores_TE + jax.lax.stop_gradient(bias_E), cfg.top_k)
  weight_TK = jnp.take_along_axis(scores_TE, expert_TK, axis=-1)
  if cfg.renormalise:
    weight_TK = weight_TK / (jnp.sum(weight_TK, axis=-1, keepdims=True) + 1e-20)
  return Routing(expert_TK.astype(jnp.int32), weight_TK, probs_TE, logits_TE)


def balance_loss(
  load_E: jax.Array, probs_TE: jax.Array, valid_T: jax.Array | None = None
) -> jax.Array:
  """E * sum_e f_e * P_e over some tokens: f_e the share of their copies sent to e (`load_E`
  counts them), P_e the mean probability of e over the real tokens (`valid_T`; all by default).
  1 when routing is uniform; E when every token picks one expert; 0 with no real token."""
  E = probs_TE.shape[-1]
  valid_T = jnp.ones(probs_TE.shape[:1], jnp.float32) if valid_T is None else valid_T
  mean_probs_E = valid_T @ probs_TE / jnp.maximum(jnp.sum(valid_T), 1.0)
  return E * jnp.sum(load_E / jnp.maximum(jnp.sum(load_E), 1.0) * mean_probs_E)


def without_padding(routing: Routing, valid_T: jax.Array) -> Routing:
  """Padding (valid_T False) routed nowhere: expert E, one past the last, which takes no slot and
  no load, and weight 0, so a padded token changes no real token's output or statistics."""
  E = routing.probs_TE.shape[-1]
  return routing._replace(
    expert_TK=jnp.where(valid_T[:, None], routing.expert_TK, E),
    weight_TK=jnp.where(valid_T[:, None], routing.weight_TK, 0.0),
  )


def stats(
  routing: Routing, num_sequences: int, dropped: jax.Array, valid_T: jax.Array | None = None
) -> MoeStats:
  """The layer's statistics over its real tokens (`valid_T`, all by default); padding must have
  been routed nowhere (`without_padding`)."""
  E = routing.probs_TE.shape[-1]
  T, K = routing.expert_TK.shape
  S = num_sequences
  valid_T = jnp.ones((T,), jnp.float32) if valid_T is None else valid_T.astype(jnp.float32)
  # Each sequence's load, counted once: the batch's load is their sum. Expert E (padding) is
  # outside one_hot's range: a row of zeros.
  onehot_STKE = jax.nn.one_hot(routing.expert_TK.reshape(S, T // S, K), E, dtype=jnp.float32)
  load_SE = jnp.sum(onehot_STKE, axis=(1, 2))
  load_E = jnp.sum(load_SE, axis=0)
  valid_SL = valid_T.reshape(S, T // S)
  per_sequence_S = jax.vmap(balance_loss)(load_SE, routing.probs_TE.reshape(S, T // S, E), valid_SL)
  has_tokens_S = (jnp.sum(valid_SL, axis=-1) > 0).astype(jnp.float32)  # All-padding rows: out.
  z_T = jnp.square(jax.nn.logsumexp(routing.logits_TE, axis=-1))
  return MoeStats(
    balance_loss=balance_loss(load_E, routing.probs_TE, valid_T),
    sequence_balance_loss=has_tokens_S @ per_sequence_S / jnp.maximum(jnp.sum(has_tokens_S), 1.0),
    z_loss=valid_T @ z_T / jnp.maximum(jnp.sum(valid_T), 1.0),
    load_E=load_E,
    dropped=dropped,
  )


def _activate(h_XF: jax.Array, gate_XF: jax.Array | None) -> jax.Array:
  """SwiGLU when there is a gate (llama), else GELU (gpt2): as the dense Mlp."""
  return layers.gelu_tanh(h_XF) if gate_XF is None else jax.nn.silu(gate_XF) * h_XF


def dropless(
  x_TD: jax.Array,
  routing: Routing,
  wi_EDF: jax.Array,
  gate_EDF: jax.Array | None,
  wo_EFD: jax.Array,
) -> jax.Array:
  """Every token copy through its expert, none dropped; on a mesh, split over the devices by
  `expert_parallel.dropless_sharded` (each its own tokens, and its own experts under expert
  parallelism)."""
  if expert_parallel.on_mesh():
    return expert_parallel.dropless_sharded(
      _dropless_local, x_TD, routing, wi_EDF, gate_EDF, wo_EFD
    )
  return _dropless_local(x_TD, routing.expert_TK, routing.weight_TK, wi_EDF, gate_EDF, wo_EFD, 0)


def _dropless_local(x_TD, expert_TK, weight_TK, wi_EDF, gate_EDF, wo_EFD, first_expert):
  """The copies routed to experts first_expert ... first_expert + E - 1 (the weights' experts)
  through them: copies sorted by expert, one grouped matmul per weight; other copies give 0."""
  T, K = expert_TK.shape
  E = wi_EDF.shape[0]
  local_TK = expert_TK - first_expert
  here_TK = (local_TK >= 0) & (local_TK < E)
  # Copies of other devices' experts sort last, past every group (key E), and are masked below.
  flat_X = jnp.where(here_TK, local_TK, E).reshape(T * K)  # X = T*K token copies, token-major.
  order_X = jnp.argsort(flat_X, stable=True)
  x_XD = jnp.take(x_TD, order_X // K, axis=0)
  sizes_E = jnp.bincount(flat_X, length=E + 1)[:E].astype(jnp.int32)
  ragged_dot = _GROUPED_MATMUL.get()
  h_XF = ragged_dot(x_XD, wi_EDF, sizes_E)
  gate_XF = None if gate_EDF is None else ragged_dot(x_XD, gate_EDF, sizes_E)
  y_XD = ragged_dot(_activate(h_XF, gate_XF), wo_EFD, sizes_E)
  # Back to token-major order, then each token's K outputs weighed and summed.
  y_TKD = jnp.zeros_like(y_XD).at[order_X].set(y_XD).reshape(T, K, -1)
  y_TKD = jnp.where(here_TK[..., None], y_TKD.astype(jnp.float32), 0.0)
  return jnp.einsum('TKD,TK->TD', y_TKD, weight_TK)


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  return max(1, math.ceil(num_tokens * top_k / num_experts * factor))


def with_capacity(
  x_TD: jax.Array,
  routing: Routing,
  wi_EDF: jax.Array,
  gate_EDF: jax.Array | None,
  wo_EFD: jax.Array,
  factor: float,
  groups: int = 1,
) -> tuple[jax.Array, jax.Array]:
  """The experts on fixed (E, C, D) buffers, one per group of tokens (the layer's groups are its
  sequences, as GShard's); returns (output, copies dropped).

  Under a mesh, the tokens of a group live where their sequence does (the `batch` axes); the
  buffers then move so that each device holds its experts' slots of every group (`experts` over
  the expert axis) - an all-to-all both ways, the only communication expert parallelism needs."""
  T, K = routing.expert_TK.shape
  E, D = wi_EDF.shape[0], x_TD.shape[-1]
  G, N = groups, T // groups
  C = capacity(N, K, E, factor)
  x_GND = x_TD.reshape(G, N, D)
  expert_GKN = routing.expert_TK.reshape(G, N, K).transpose(0, 2, 1)
  slot_GKN = jax.vmap(_slots, in_axes=(0, None))(expert_GKN, E)
  kept_GKN = slot_GKN < C
  # Dropped copies scatter out of bounds ('drop') and gather zeros ('fill').
  slot_GKN = jnp.where(kept_GKN, slot_GKN, C)
  # vmap over groups: a scatter with a batch dimension, which the partitioner splits by group.
  buffer_GECD = jax.vmap(_dispatch, in_axes=(0, 0, 0, None))(x_GND, expert_GKN, slot_GKN, (E, C))
  buffer_GECD = layers.constrain(buffer_GECD, ('batch', None, 'capacity', 'activation_embed'))
  buffer_GECD = layers.constrain(buffer_GECD, _AT_EXPERTS)  # All-to-all: tokens to experts.
  h_GECF = jnp.einsum('GECD,EDF->GECF', buffer_GECD, wi_EDF)
  gate_GECF = None if gate_EDF is None else jnp.einsum('GECD,EDF->GECF', buffer_GECD, gate_EDF)
  y_GECD = jnp.einsum('GECF,EFD->GECD', _activate(h_GECF, gate_GECF), wo_EFD)
  y_GECD = layers.constrain(y_GECD, _AT_EXPERTS)
  y_GECD = layers.constrain(y_GECD, ('batch', None, 'capacity', 'activation_embed'))  # And back.
  y_GKND = jax.vmap(_combine)(y_GECD, expert_GKN, slot_GKN)
  weight_GNK = routing.weight_TK.reshape(G, N, K)
  y_GND = jnp.einsum('GKND,GNK->GND', y_GKND.astype(jnp.float32), weight_GNK)
  return y_GND.reshape(T, D), jnp.sum(~kept_GKN).astype(jnp.float32)


_AT_EXPERTS = ('expert_batch', 'experts', 'capacity', 'activation_embed')


def _slots(expert_KN: jax.Array, num_experts: int) -> jax.Array:
  """Each copy's slot in its expert's buffer, in choice-major order: every token's first choice is
  placed before any second choice."""
  K, N = expert_KN.shape
  onehot_KNE = jax.nn.one_hot(expert_KN, num_experts, dtype=jnp.int32)
  before_KNE = (jnp.cumsum(onehot_KNE.reshape(K * N, -1), axis=0) - 1).reshape(K, N, -1)
  return jnp.sum(before_KNE * onehot_KNE, axis=-1)


def _dispatch(x_ND, expert_KN, slot_KN, buffer_shape: tuple[int, int]) -> jax.Array:
  K, (N, D) = expert_KN.shape[0], x_ND.shape
  x_KND = jnp.broadcast_to(x_ND, (K, N, D))
  buffer_ECD = jnp.zeros((*buffer_shape, D), x_ND.dtype)
  return buffer_ECD.at[expert_KN, slot_KN].set(x_KND, mode='drop')


def _combine(y_ECD, expert_KN, slot_KN) -> jax.Array:
  return y_ECD.at[expert_KN, slot_KN].get(mode='fill', fill_value=0)


def dense_reference(
  x_TD: jax.Array,
  routing: Routing,
  wi_EDF: jax.Array,
  gate_EDF: jax.Array | None,
  wo_EFD: jax.Array,
) -> jax.Array:
  """Every expert on every token, masked by the routing: the definition the fast paths must equal
  (tests only: E times the FLOPs)."""
  E = wi_EDF.shape[0]
  h_TEF = jnp.einsum('TD,EDF->TEF', x_TD, wi_EDF)
  gate_TEF = None if gate_EDF is None else jnp.einsum('TD,EDF->TEF', x_TD, gate_EDF)
  y_TED = jnp.einsum('TEF,EFD->TED', _activate(h_TEF, gate_TEF), wo_EFD)
  combine_TE = jnp.einsum(
    'TKE,TK->TE', jax.nn.one_hot(routing.expert_TK, E, dtype=jnp.float32), routing.weight_TK
  )
  return jnp.einsum('TED,TE->TD', y_TED.astype(jnp.float32), combine_TE)


def update_router_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3's update: each expert's bias up by `rate` if it got fewer copies than the mean,
  down if more; unchanged when its load is the mean."""
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


class MoeMlp(nnx.Module):
  """The routed experts (and any shared experts) in place of a block's MLP."""

  def __init__(
    self,
    embed_dim: int,
    cfg: MoeConfig,
    *,
    gated: bool,
    std: float,
    out_std: float,
    param_dtype: jnp.dtype,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
  ):
    D, E, F = embed_dim, cfg.num_experts, cfg.expert_dim
    self.cfg, self.dtype = cfg, dtype
    self.router = layers.param(rngs, layers.normal(std), (D, E), ('embed', 'router'), jnp.float32)
    self.router_bias = layers.param(rngs, layers.zeros, (E,), ('router',), jnp.float32)
    # The experts' own names for embed and hidden dims, so that mesh.rules can shard the expert
    # dim over a mesh axis that the dense layers use for `embed` (expert parallelism over fsdp).
    names_in = ('experts', 'expert_embed', 'expert_mlp')
    names_out = ('experts', 'expert_mlp', 'expert_embed')
    self.wi = layers.param(rngs, layers.normal(std), (E, D, F), names_in, param_dtype)
    self.wi_gate = (
      layers.param(rngs, layers.normal(std), (E, D, F), names_in, param_dtype) if gated else None
    )
    self.wo = layers.param(rngs, layers.normal(out_std), (E, F, D), names_out, param_dtype)
    self.shared = (
      layers.Mlp(
        D,
        F * cfg.shared_experts,
        gated=gated,
        use_bias=False,
        std=std,
        out_std=out_std,
        param_dtype=param_dtype,
        dtype=dtype,
        rngs=rngs,
      )
      if cfg.shared_experts
      else None
    )

  def __call__(
    self, x_BLD: jax.Array, valid_BL: jax.Array | None = None
  ) -> tuple[jax.Array, MoeStats]:
    """The experts' output for x, and the routing statistics of its real tokens (`valid_BL`:
    False for padding, which goes to no expert; all real by default)."""
    B, L, D = x_BLD.shape
    x_TD = x_BLD.reshape(B * L, D)
    routing = route(x_TD, self.router[...], self.router_bias[...], self.cfg)
    valid_T = None if valid_BL is None else valid_BL.reshape(B * L)
    if valid_T is not None:
      routing = without_padding(routing, valid_T)
    wi = self.wi[...].astype(self.dtype)
    gate = None if self.wi_gate is None else self.wi_gate[...].astype(self.dtype)
    wo = self.wo[...].astype(self.dtype)
    if self.cfg.capacity_factor > 0:
      factor = self.cfg.capacity_factor
      y_TD, dropped = with_capacity(x_TD, routing, wi, gate, wo, factor, groups=B)
    else:
      y_TD, dropped = dropless(x_TD, routing, wi, gate, wo), jnp.zeros((), jnp.float32)
    y_BLD = y_TD.reshape(B, L, D).astype(x_BLD.dtype)
    if self.shared is not None:
      y_BLD = y_BLD + self.shared(x_BLD)
    return y_BLD, stats(routing, B, dropped, valid_T)


# ---- What the train step does with the layers' statistics ---------------------------------------


def layer_sums(all_stats: tuple[MoeStats, ...], cfg: MoeConfig) -> dict[str, jax.Array]:
  """The MoE layers' statistics as loss sums ({} for a dense model): the weighted auxiliary loss
  (mean over layers) that joins the objective, each loss, the copies dropped, and the (layers,
  experts) loads. Sums, so that micro-batches add up."""
  if not all_stats:
    return {}
  balance = jnp.mean(jnp.stack([s.balance_loss for s in all_stats]))
  sequence = jnp.mean(jnp.stack([s.sequence_balance_loss for s in all_stats]))
  z = jnp.mean(jnp.stack([s.z_loss for s in all_stats]))
  return {
    'moe_aux_loss': (
      cfg.balance_loss * balance + cfg.sequence_balance_loss * sequence + cfg.router_z_loss * z
    ),
    'moe_balance_loss': balance,
    'moe_sequence_balance_loss': sequence,
    'moe_router_z_loss': z,
    'moe_dropped': jnp.sum(jnp.stack([s.dropped for s in all_stats])),
    'moe_load': jnp.stack([s.load_E for s in all_stats]),
  }


def routing_metrics(
  sums: dict[str, jax.Array], micro_batches: int, layers_: tuple[int, ...]
) -> dict[str, jax.Array]:
  """Scalar metrics of the step's routing: the losses (per micro-batch), the share of token copies
  dropped, and per layer the busiest expert's load over the mean and the loads' coefficient of
  variation (1 and 0 when balanced), named by block; `moe_imbalance` is the worst layer's."""
  if 'moe_load' not in sums:
    return {}
  load_LE = sums['moe_load']
  mean_L = jnp.mean(load_LE, axis=-1)
  imbalance_L = jnp.max(load_LE, axis=-1) / jnp.maximum(mean_L, 1e-9)
  cv_L = jnp.std(load_LE, axis=-1) / jnp.maximum(mean_L, 1e-9)
  out = {
    name: sums[name] / micro_batches
    for name in ('moe_balance_loss', 'moe_sequence_balance_loss', 'moe_router_z_loss')
  }
  out['moe_dropped_fraction'] = sums['moe_dropped'] / jnp.maximum(jnp.sum(load_LE), 1.0)
  out['moe_imbalance'] = jnp.max(imbalance_L)
  for row, layer in enumerate(layers_):
    out[f'moe_imbalance_layer{layer}'] = imbalance_L[row]
    out[f'moe_load_cv_layer{layer}'] = cv_L[row]
  return out


def with_updated_biases(params, load_LE: jax.Array, layers_: tuple[int, ...], rate: float):
  """`params` with each MoE layer's router bias moved by `update_router_bias` (aux-loss-free
  balancing); the layers in `layers_` order, as `load_LE`'s rows. With model.scan_layers the MoE
  layers are the stack's, all of them (config_check refuses moe.every > 1), in that order."""
  if stack_lib.STACK in params:
    mlp = dict(params[stack_lib.STACK]['mlp'])
    update = jax.vmap(functools.partial(update_router_bias, rate=rate))
    mlp[ROUTER_BIAS] = update(mlp[ROUTER_BIAS], load_LE)
    return {**params, stack_lib.STACK: {**params[stack_lib.STACK], 'mlp': mlp}}
  blocks = dict(params['blocks'])
  for row, layer in enumerate(layers_):
    mlp = dict(blocks[layer]['mlp'])
    mlp[ROUTER_BIAS] = update_router_bias(mlp[ROUTER_BIAS], load_LE[row], rate)
    blocks[layer] = {**blocks[layer], 'mlp': mlp}
  return {**params, 'blocks': blocks}
