"""The pure train and eval steps: `train_step(state, batch) -> (state, metrics)`.

The state is a plain dict pytree {step, params, opt_state}; params are the model's parameters as a
nested dict, merged with the model's graph definition inside the loss. The caller binds the static
pieces with functools.partial and jits once.
"""

import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from pretrax import config as config_lib
from pretrax import config_specs
from pretrax import loss as loss_lib
from pretrax.config_types import MoeConfig, RunConfig
from pretrax.data.batch import Batch
from pretrax.model import layers
from pretrax.model import moe as moe_lib

TrainState = dict[str, Any]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  grad_accum_steps: int = 1
  z_loss: float = 0.0
  dropout: bool = False  # Whether the model uses dropout (then a per-step key is derived).
  seed: int = 0
  # With several (a mixture), the loss of each is reported too, as loss_NAME / eval_loss_NAME.
  objectives: tuple[str, ...] = ('causal_lm',)
  # Keep the old parameters and optimizer state when the loss or gradients are not finite.
  skip_nonfinite: bool = False
  # Also keep them when the loss exceeds the mean of the last `spike_window` accepted (finite,
  # not skipped) losses by `spike_threshold` standard deviations; 0 turns this off. The window
  # lives in the train state, so a resumed run judges spikes exactly as before.
  spike_window: int = 0
  spike_threshold: float = 6.0
  # Mixture-of-Experts: the blocks with experts (none: a dense model), and their settings (the
  # auxiliary losses' weights, the balancing bias's rate).
  moe_layers: tuple[int, ...] = ()
  moe: MoeConfig = MoeConfig()


def step_config(c: RunConfig) -> StepConfig:
  """The step's settings from a run's config."""
  return StepConfig(
    grad_accum_steps=c.optim.grad_accum_steps,
    z_loss=c.optim.z_loss,
    dropout=c.model.dropout > 0,
    seed=c.seed,
    objectives=tuple(name for name, _ in config_specs.objective_mixture(c.objective)),
    skip_nonfinite=c.optim.skip_nonfinite,
    spike_window=c.optim.spike_window,
    spike_threshold=c.optim.spike_threshold,
    moe_layers=tuple(i for i in range(c.model.num_layers) if c.model.moe.is_moe(i)),
    moe=c.model.moe,
  )


def init_state(
  params, optimizer: optax.GradientTransformation, spike_window: int = 0
) -> TrainState:
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': optimizer.init(params)}
  if spike_window:
    state['loss_window'] = {
      'losses': jnp.zeros((spike_window,), jnp.float32),
      'count': jnp.zeros((), jnp.int32),
    }
  return state


def _scored(batch: Batch[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(targets, weights) the loss reads: a classification batch's labels and label weights, a
  language-model batch's targets and weights."""
  labelled = batch.labels is not None
  targets = batch.labels if labelled else batch.targets
  weights = batch.label_weights if labelled else batch.weights
  assert targets is not None and weights is not None, 'a batch without targets or labels'
  return targets, weights


def _states(model, batch: Batch[jax.Array], dropout_rng: jax.Array | None):
  """(final states, MoE routing statistics) of a batch (Transformer.states_and_stats)."""
  return model.states_and_stats(
    batch.inputs,
    batch.segment_ids,
    batch.positions,
    batch.prefix,  # None in a classification batch; an encoder ignores it anyway.
    dropout_rng=dropout_rng,
  )


def _logits(
  model, x_BLD: jax.Array, batch: Batch[jax.Array], dropout_rng: jax.Array | None
) -> jax.Array:
  """Float32 logits of the final states: over the vocabulary at every position, or, for a
  classification batch (it has `labels`), over the classes of each packed example."""
  if batch.labels is not None:
    return model.classify(
      x_BLD, batch.inputs, batch.segment_ids, batch.labels.shape[1], dropout_rng=dropout_rng
    )
  return model.lm_head(x_BLD)


def _groups(batch: Batch[jax.Array], num_objectives: int) -> dict[str, Any]:
  """The per-objective grouping of the loss sums, when a mixture trains."""
  if num_objectives < 2:
    return {}
  return {'groups_BL': batch.objective, 'num_groups': len(config_lib.OBJECTIVES)}


def _sums(
  logits, targets, weights, batch: Batch[jax.Array], z_loss: float, num_objectives: int
) -> dict[str, jax.Array]:
  """The loss sums of a forward pass, per objective too when a mixture trains."""
  return loss_lib.cross_entropy(logits, targets, weights, z_loss, **_groups(batch, num_objectives))


def _forward_sums(
  params,
  batch: Batch[jax.Array],
  model_def: nnx.GraphDef,
  z_loss: float,
  dropout_rng: jax.Array | None,
  num_objectives: int,
) -> dict[str, jax.Array]:
  """The loss sums of a batch, with an MoE model's routing sums (moe.layer_sums). With
  model.loss_chunk the logits over the vocabulary are never built whole: the output projection
  runs inside the chunked loss."""
  model = nnx.merge(model_def, params)
  x_BLD, all_stats = _states(model, batch, dropout_rng)
  sums = _head_sums(model, x_BLD, batch, z_loss, dropout_rng, num_objectives)
  return {**sums, **moe_lib.layer_sums(all_stats, model.cfg.moe)}


def _head_sums(
  model,
  x_BLD: jax.Array,
  batch: Batch[jax.Array],
  z_loss: float,
  dropout_rng: jax.Array | None,
  num_objectives: int,
) -> dict[str, jax.Array]:
  """The loss sums of the final states: over the classes of each packed example, the whole
  vocabulary at once, or the vocabulary chunk by chunk (model.loss_chunk)."""
  targets_BL, weights_BL = _scored(batch)
  chunk = model.cfg.loss_chunk
  if not chunk or batch.labels is not None:
    logits = _logits(model, x_BLD, batch, dropout_rng)
    return _sums(logits, targets_BL, weights_BL, batch, z_loss, num_objectives)
  head_DV, bias_V = model.output_projection()
  return loss_lib.chunked_cross_entropy(
    model.head_input(x_BLD),
    head_DV,
    targets_BL,
    weights_BL,
    chunk=chunk,
    bias_V=bias_V,
    z_loss=z_loss,
    batch_shards=layers.shards('batch'),
    **_groups(batch, num_objectives),
  )


def _objective_metrics(sums, objectives: tuple[str, ...], prefix: str) -> Metrics:
  """loss_NAME for each objective of a mixture (its mean over its own target tokens)."""
  if len(objectives) < 2:
    return {}
  out = {}
  for name in objectives:
    k = config_lib.OBJECTIVES.index(name)
    out[f'{prefix}loss_{name}'] = sums['group_loss_sum'][k] / jnp.maximum(
      sums['group_weight_sum'][k], 1.0
    )
  return out


def _grads(
  params,
  batch: Batch[jax.Array],
  total_weight: jax.Array,
  model_def: nnx.GraphDef,
  cfg: StepConfig,
  dropout_rng: jax.Array | None,
):
  """Gradient of the batch's mean loss (the total weight of the full batch divides every part)."""

  def objective(p):
    sums = _forward_sums(p, batch, model_def, cfg.z_loss, dropout_rng, len(cfg.objectives))
    # The routing losses are means over a micro-batch's tokens: averaged over micro-batches.
    aux = sums.get('moe_aux_loss', 0.0) / cfg.grad_accum_steps
    return sums['objective_sum'] / total_weight + aux, sums

  return jax.grad(objective, has_aux=True)(params)


def train_step(
  state: TrainState,
  batch: Batch[jax.Array],
  *,
  model_def: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  cfg: StepConfig,
) -> tuple[TrainState, Metrics]:
  """One optimizer step over the global batch, accumulated over `grad_accum_steps` micro-batches."""
  step = state['step']
  # Derived from (seed, step), so a resumed run draws the same dropout masks.
  rng = jax.random.fold_in(jax.random.key(cfg.seed), step) if cfg.dropout else None
  # What the loss averages over: weighted targets, or a classification batch's examples.
  _, weights = _scored(batch)
  total_weight = jnp.maximum(jnp.sum(weights), 1.0)
  params = state['params']

  if cfg.grad_accum_steps == 1:
    grads, sums = _grads(params, batch, total_weight, model_def, cfg, rng)
  else:
    grads, sums = _accumulated_grads(params, batch, total_weight, model_def, cfg, rng)

  updates, opt_state = optimizer.update(grads, state['opt_state'], params)
  new_params = optax.apply_updates(params, updates)
  if cfg.moe_layers and cfg.moe.bias_rate:
    new_params = moe_lib.with_updated_biases(
      new_params, sums['moe_load'], cfg.moe_layers, cfg.moe.bias_rate
    )
  new_state = {'step': step + 1, 'params': new_params, 'opt_state': opt_state}
  grad_norm = optax.global_norm(grads)
  loss = sums['loss_sum'] / total_weight
  new_state, skip_metrics = _skip_bad_steps(state, new_state, loss, grad_norm, cfg)
  metrics = {
    'loss': loss,
    'z_loss': sums['z_loss_sum'] / total_weight,
    'accuracy': sums['correct_sum'] / total_weight,
    'grad_norm': grad_norm,
    'lr': schedule(step),
    'tokens': sums['weight_sum'],
    **_objective_metrics(sums, cfg.objectives, ''),
    **moe_lib.routing_metrics(sums, cfg.grad_accum_steps, cfg.moe_layers),
    **skip_metrics,
  }
  return new_state, metrics


def _accumulated_grads(
  params,
  batch: Batch[jax.Array],
  total_weight: jax.Array,
  model_def: nnx.GraphDef,
  cfg: StepConfig,
  rng: jax.Array | None,
):
  """The gradients and loss sums of the batch as `grad_accum_steps` micro-batches in a scan: the
  same sums as one pass (each micro-batch divides by the whole batch's weight)."""
  A = cfg.grad_accum_steps
  micro = jax.tree.map(lambda x: x.reshape((A, x.shape[0] // A) + x.shape[1:]), batch)

  def accumulate(carry, inputs):
    i, micro_batch = inputs
    micro_rng = None if rng is None else jax.random.fold_in(rng, i)
    g, s = _grads(params, micro_batch, total_weight, model_def, cfg, micro_rng)
    return jax.tree.map(jnp.add, carry, (g, s)), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  sums_shape = jax.eval_shape(
    lambda: _grads(params, jax.tree.map(lambda x: x[0], micro), total_weight, model_def, cfg, rng)[
      1
    ]
  )
  zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
  (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), (jnp.arange(A), micro))
  return grads, sums


def _skip_bad_steps(
  state: TrainState, new_state: TrainState, loss: jax.Array, grad_norm: jax.Array, cfg: StepConfig
) -> tuple[TrainState, Metrics]:
  """`new_state`, or `state`'s parameters and optimizer state kept where the step is skipped (a
  non-finite loss or gradient with optim.skip_nonfinite; a loss spike over the recent window with
  optim.spike_window), and the metrics that say so."""
  skip_metrics = {}
  accept = jnp.bool_(True)
  if cfg.skip_nonfinite:
    accept &= jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if cfg.spike_window:
    window = state['loss_window']
    mean, std = jnp.mean(window['losses']), jnp.std(window['losses'])
    # Judged only once the window is full; a floor on the spread keeps a flat window sane.
    spike = (window['count'] >= cfg.spike_window) & (
      loss > mean + cfg.spike_threshold * jnp.maximum(std, 1e-3 * jnp.abs(mean))
    )
    accept &= ~spike
    enters = accept & jnp.isfinite(loss)  # Non-finite and skipped losses never enter.
    slot = window['count'] % cfg.spike_window
    new_state['loss_window'] = {
      'losses': jnp.where(enters, window['losses'].at[slot].set(loss), window['losses']),
      'count': window['count'] + enters.astype(jnp.int32),
    }
    skip_metrics['spike'] = spike.astype(jnp.int32)
  if cfg.skip_nonfinite or cfg.spike_window:
    keep = functools.partial(jnp.where, accept)  # keep(new, old): old where the step is skipped.
    new_state['params'] = jax.tree.map(keep, new_state['params'], state['params'])
    new_state['opt_state'] = jax.tree.map(keep, new_state['opt_state'], state['opt_state'])
    skip_metrics['skipped'] = 1 - accept.astype(jnp.int32)
  return new_state, skip_metrics


def eval_step(
  params,
  batch: Batch[jax.Array],
  bytes_per_token: jax.Array,
  baseline_id: jax.Array,
  *,
  model_def: nnx.GraphDef,
  num_objectives: int = 1,
  exact_match: bool = False,
) -> Metrics:
  """Sums over one held-out batch; the caller adds them up and divides.

  baseline_correct_sum counts the targets equal to `baseline_id` (the training split's most
  frequent token, or label): the accuracy of always guessing it, a floor to compare accuracy
  with. With `exact_match` (sft), answer_sum counts the packed examples with weighted targets and
  exact_sum those whose every weighted target is the argmax: a response that greedy decoding
  from its prompt reproduces exactly.
  """
  targets, weights = _scored(batch)
  if exact_match:  # Needs every position's argmax: the logits whole.
    model = nnx.merge(model_def, params)
    logits = _logits(model, _states(model, batch, None)[0], batch, None)
    sums = {
      **_sums(logits, targets, weights, batch, 0.0, num_objectives),
      **_exact_sums(logits, batch),
    }
  else:
    sums = _forward_sums(params, batch, model_def, 0.0, None, num_objectives)
  if batch.labels is None:  # Bytes per token mean something for tokens, not labels.
    sums['byte_sum'] = jnp.sum(bytes_per_token[targets] * weights)
  sums['baseline_correct_sum'] = jnp.sum((targets == baseline_id) * weights)
  return sums


def _exact_sums(logits_BLV: jax.Array, batch: Batch[jax.Array]) -> Metrics:
  """answer_sum and exact_sum (see eval_step), per segment of each row."""
  targets_BL, weights_BL = _scored(batch)
  B, L = targets_BL.shape
  wrong_BL = (jnp.argmax(logits_BLV, axis=-1) != targets_BL) * weights_BL
  # One id per (row, segment); segment ids are at most L (at most one segment per token).
  segment_BL = jnp.arange(B)[:, None] * (L + 1) + batch.segment_ids
  wrong = jax.ops.segment_sum(wrong_BL.ravel(), segment_BL.ravel(), B * (L + 1))
  weight = jax.ops.segment_sum(weights_BL.ravel(), segment_BL.ravel(), B * (L + 1))
  answers = weight > 0
  return {'answer_sum': jnp.sum(answers), 'exact_sum': jnp.sum(answers & (wrong == 0))}


def _traced_with(fn, activation_sharding):
  """`fn`, tracing the model with activation sharding constraints from `activation_sharding`
  (logical names -> sharding; None leaves activations to the compiler)."""
  if activation_sharding is None:
    return fn

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with layers.activation_sharding(activation_sharding):
      return fn(*args, **kwargs)

  return traced


def jit_train_step(
  model_def: nnx.GraphDef,
  optimizer: optax.GradientTransformation,
  schedule: optax.Schedule,
  cfg: StepConfig,
  *,
  activation_sharding=None,
  **jit_kwargs,
):
  step_fn = functools.partial(
    train_step, model_def=model_def, optimizer=optimizer, schedule=schedule, cfg=cfg
  )
  return jax.jit(_traced_with(step_fn, activation_sharding), donate_argnums=0, **jit_kwargs)


def jit_eval_step(
  model_def: nnx.GraphDef,
  num_objectives: int = 1,
  *,
  exact_match: bool = False,
  activation_sharding=None,
  **jit_kwargs,
):
  step_fn = functools.partial(
    eval_step, model_def=model_def, num_objectives=num_objectives, exact_match=exact_match
  )
  return jax.jit(_traced_with(step_fn, activation_sharding), **jit_kwargs)
