"""The Mixture-of-Experts layer against its definitions: the fast paths equal every expert run on
every token and masked, capacity drops what it must, the losses equal their hand formulas, and
the balancing bias steers the choice toward underloaded experts."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pretrax import config as config_lib
from pretrax import metrics, run_config
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax.config_types import MoeConfig
from pretrax.data.batch import Batch
from pretrax.model import moe

T, D, F, E = 48, 8, 16, 6


def _weights(gated: bool, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (T, D))
  router = jax.random.normal(k[1], (D, E))
  wi = jax.random.normal(k[2], (E, D, F)) * 0.3
  gate = jax.random.normal(k[3], (E, D, F)) * 0.3 if gated else None
  wo = jax.random.normal(k[4], (E, F, D)) * 0.3
  return x, router, wi, gate, wo


def _value_and_grads(expert_fn, cfg: moe.MoeConfig, gated: bool):
  x, router, wi, gate, wo = _weights(gated)

  def loss(x, router, wi, gate, wo):
    routing = moe.route(x, router, jnp.zeros(E), cfg)
    return jnp.sum(jnp.sin(expert_fn(x, routing, wi, gate, wo)))

  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, router, wi, gate, wo)


@pytest.mark.parametrize('score', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('gated', [False, True])
@pytest.mark.parametrize('top_k', [1, 2])
def test_dropless_and_ample_capacity_equal_every_expert_on_every_token(score, gated, top_k):
  cfg = moe.MoeConfig(num_experts=E, top_k=top_k, expert_dim=F, score=score)
  reference = _value_and_grads(moe.dense_reference, cfg, gated)
  ample = float(E)  # Capacity T * k: room for every copy even if all pick one expert.
  for fast in (moe.dropless, lambda *a: moe.with_capacity(*a, factor=ample)[0]):
    value, grads = _value_and_grads(fast, cfg, gated)
    np.testing.assert_allclose(value, reference[0], rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, reference[1], strict=True):
      if g_ref is not None:
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('groups', [1, 4])
def test_capacity_drops_the_copies_past_each_experts_slots_first_choices_first(groups):
  """Each group of T / groups tokens (a sequence, in the model) has its own C slots per expert."""
  cfg = moe.MoeConfig(num_experts=E, top_k=2, expert_dim=F)
  x, router, wi, gate, wo = _weights(gated=False)
  routing = moe.route(x, router, jnp.zeros(E), cfg)
  factor, N = 0.5, T // groups
  C = moe.capacity(N, 2, E, factor)
  y, dropped = moe.with_capacity(x, routing, wi, gate, wo, factor, groups=groups)
  # By hand, per group: walk first choices of every token, then second choices, filling C slots.
  expert = np.asarray(routing.expert_TK)
  kept = np.zeros((T, 2), bool)
  for g in range(groups):
    used = np.zeros(E, int)
    for k in range(2):
      for t in range(g * N, (g + 1) * N):
        e = expert[t, k]
        kept[t, k] = used[e] < C
        used[e] += 1
  assert float(dropped) == (~kept).sum() > 0
  masked = routing._replace(weight_TK=routing.weight_TK * kept)
  np.testing.assert_allclose(y, moe.dense_reference(x, masked, wi, gate, wo), atol=1e-5)


def test_balance_and_z_losses_equal_their_formulas():
  cfg = moe.MoeConfig(num_experts=E, top_k=2, expert_dim=F)
  x, router, *_ = _weights(gated=False)
  routing = moe.route(x, router, jnp.zeros(E), cfg)
  s = moe.stats(routing, num_sequences=4, dropped=jnp.zeros(()))
  expert, probs, logits = (np.asarray(a, np.float64) for a in routing[:1] + routing[2:])
  expert = expert.astype(int)

  def by_hand(expert, probs):
    share = np.array([(expert == e).sum() for e in range(E)]) / expert.size
    return E * np.sum(share * probs.mean(axis=0))

  np.testing.assert_allclose(s.balance_loss, by_hand(expert, probs), rtol=1e-5)
  per_sequence = [
    by_hand(expert[i * 12 : i * 12 + 12], probs[i * 12 : i * 12 + 12]) for i in range(4)
  ]
  np.testing.assert_allclose(s.sequence_balance_loss, np.mean(per_sequence), rtol=1e-5)
  z = np.log(np.exp(logits).sum(axis=-1))
  np.testing.assert_allclose(s.z_loss, np.mean(z**2), rtol=1e-5)
  np.testing.assert_array_equal(s.load_E, [(expert == e).sum() for e in range(E)])
  # Uniform routing scores 1; everything on one expert scores E.
  uniform = jnp.full((T, E), 1.0 / E)
  one_each = jnp.full(E, T / E)  # Every expert gets its share of the copies.
  assert float(moe.balance_loss(one_each, uniform)) == pytest.approx(1.0)
  collapsed = jax.nn.one_hot(jnp.zeros(T, int), E)
  all_on_one = jnp.zeros(E).at[0].set(T)
  assert float(moe.balance_loss(all_on_one, collapsed)) == pytest.approx(E)


def test_the_bias_steers_the_choice_toward_underloaded_experts_and_never_the_weights():
  cfg = moe.MoeConfig(num_experts=E, top_k=1, expert_dim=F, renormalise=False)
  x, router, *_ = _weights(gated=False)
  x = x + 1.0  # Inputs with a common direction: one expert is nearly everyone's favourite.
  bias, biases, loads = jnp.zeros(E), [], []
  for _ in range(200):
    routing = moe.route(x, router, bias, cfg)
    load = moe.stats(routing, 1, jnp.zeros(())).load_E
    loads.append(np.asarray(load))
    bias = moe.update_router_bias(bias, load, rate=0.01)
    biases.append(np.asarray(bias))
  favourite = int(np.argmax(loads[0]))
  assert loads[0][favourite] > T / 2
  # One step: the overloaded expert down by the rate, the underloaded ones up by it.
  expected = np.where(loads[0] > T / E, -0.01, np.where(loads[0] < T / E, 0.01, 0.0))
  np.testing.assert_allclose(biases[0], expected, rtol=1e-6)
  # The busiest expert's load over the last 20 updates is far below where it started.
  assert np.mean([load.max() for load in loads[-20:]]) < 0.6 * loads[0].max()
  # Weights are the router's scores, whatever the bias.
  routing = moe.route(x, router, bias, cfg)
  scores = jax.nn.softmax(x @ router, axis=-1)
  np.testing.assert_allclose(
    routing.weight_TK, jnp.take_along_axis(scores, routing.expert_TK, axis=-1), rtol=1e-6
  )
  grad = jax.grad(lambda b: jnp.sum(moe.route(x, router, b, cfg).weight_TK))(bias)
  assert not np.any(np.asarray(grad))


# ---- The layer in the model and the train step --------------------------------------------------


def _moe_run(**moe_fields):
  """A 3-layer llama whose layers 1 and 2 have 4 experts, its config and its state builder."""
  c = config_lib.base_config()
  c.model.flavour, c.model.num_layers, c.model.embed_dim, c.model.num_heads = 'llama', 3, 32, 2
  c.data.seq_len, c.data.batch_size = 16, 4
  c.model.moe.num_experts, c.model.moe.expert_dim, c.model.moe.first_dense = 4, 24, 1
  for name, value in moe_fields.items():
    c.model.moe[name] = value
  run_cfg = run_config.build(c, check_data=False)
  return run_cfg, state_lib.build(run_cfg, 50)


def _batch(seed: int = 0) -> Batch:
  ids = jax.random.randint(jax.random.key(seed), (4, 17), 1, 50)
  ones = jnp.ones((4, 16), jnp.int32)
  return Batch(
    inputs=ids[:, :-1],
    segment_ids=ones,
    positions=jnp.broadcast_to(jnp.arange(16), (4, 16)),
    targets=ids[:, 1:],
    weights=ones.astype(jnp.float32),
    prefix=jnp.zeros_like(ones),
    objective=jnp.zeros_like(ones),
  )


def _step(run_cfg, run, state, batch):
  step = step_lib.jit_train_step(
    run.model_def, run.optimizer, run.schedule, step_lib.step_config(run_cfg)
  )
  return step(state, batch)


def test_the_router_bias_is_set_by_the_step_never_by_the_optimizer():
  run_cfg, run = _moe_run(bias_rate=0.125, balance_loss=0.01)
  state = run.init(0)
  model = nnx.merge(run.model_def, state['params'])
  assert [type(b.mlp).__name__ for b in model.blocks] == ['Mlp', 'MoeMlp', 'MoeMlp']
  leaves = jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]
  names = [jax.tree_util.keystr(path) for path, _ in leaves]
  assert not [n for n in names if 'router_bias' in n]  # No moments, no count: nothing of it.
  assert [n for n in names if "'router'" in n]  # The router's weight is trained as usual.
  new, step_metrics = _step(run_cfg, run, state, _batch())
  for layer in (1, 2):
    moved = np.asarray(new['params']['blocks'][layer]['mlp']['router_bias'])
    # Exactly one step of the rule: +-rate (0 for an expert at exactly the mean load).
    assert set(np.abs(moved).tolist()) <= {0.0, 0.125} and np.abs(moved).max() == 0.125
  assert {'moe_imbalance', 'moe_imbalance_layer1', 'moe_load_cv_layer2'} <= set(step_metrics)
  assert float(step_metrics['moe_dropped_fraction']) == 0.0  # Dropless.
  # Without a rate the bias stays exactly zero (weight decay never touches it either).
  run_cfg, run = _moe_run(bias_rate=0.0)
  new, _ = _step(run_cfg, run, run.init(0), _batch())
  assert not np.any(np.asarray(new['params']['blocks'][1]['mlp']['router_bias']))


def test_the_balancing_losses_join_the_objective_with_their_weights():
  def router_grad(**weights):
    run_cfg, run = _moe_run(**weights)
    params = run.init(0)['params']
    cfg = step_lib.step_config(run_cfg)
    grads, sums = step_lib._grads(params, _batch(), jnp.float32(64), run.model_def, cfg, None)
    return np.asarray(grads['blocks'][1]['mlp']['router']), sums

  off = {'balance_loss': 0.0, 'router_z_loss': 0.0, 'sequence_balance_loss': 0.0}
  none, sums = router_grad(**off)
  balanced, _ = router_grad(**{**off, 'balance_loss': 1.0})
  assert not np.allclose(none, balanced)
  assert float(sums['moe_aux_loss']) == 0.0 and float(sums['moe_balance_loss']) >= 1.0 - 1e-6


def test_capacity_and_dropless_models_give_the_same_loss_with_room_for_every_token():
  losses = []
  for factor in (0.0, 8.0):
    run_cfg, run = _moe_run(capacity_factor=factor)
    _, step_metrics = _step(run_cfg, run, run.init(0), _batch())
    losses.append(float(step_metrics['loss']))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  run_cfg, run = _moe_run(capacity_factor=0.25)
  _, step_metrics = _step(run_cfg, run, run.init(0), _batch())
  assert 0.0 < float(step_metrics['moe_dropped_fraction']) < 1.0


def test_mfu_counts_the_active_parameters_of_an_moe_model():
  run_cfg, run = _moe_run(top_k=2, shared_experts=1)
  params = run.abstract['params']
  mlp = params['blocks'][1]['mlp']
  # Active per MoE layer: the router, and top_k + shared experts' worth of the expert weights.
  expert = sum(mlp[w].size for w in ('wi', 'wi_gate', 'wo')) // 4
  shared = sum(x.size for x in jax.tree.leaves(mlp['shared']))
  assert shared == expert  # One shared expert is one expert's width.
  active_moe = mlp['router'].size + 2 * expert + shared
  dense_mlp = sum(x.size for x in jax.tree.leaves(params['blocks'][0]['mlp']))
  counted = metrics.flops_per_token(run.model_cfg, 16)
  dense = metrics.flops_per_token(dataclasses.replace(run.model_cfg, moe=MoeConfig()), 16)
  # The same model with dense MLPs everywhere, less two dense MLPs, plus two MoE layers' active.
  assert counted == dense - 6.0 * 2 * dense_mlp + 6.0 * 2 * active_moe


@pytest.mark.parametrize('factor', [0.0, 1.0])
def test_padding_goes_to_no_expert_and_changes_no_real_tokens_output_or_statistics(factor):
  """Two batches with the same real tokens and different padding: with capacity, routed padding
  would take slots from the real tokens of its row; it must also count in no load or loss."""
  cfg = moe.MoeConfig(num_experts=E, top_k=2, expert_dim=F, capacity_factor=factor)
  layer = moe.MoeMlp(D, cfg, gated=True, std=0.5, out_std=0.5, param_dtype=jnp.float32,
                     dtype=jnp.float32, rngs=nnx.Rngs(0))  # fmt: skip
  x, *_ = _weights(gated=False)
  x_BLD = x.reshape(4, T // 4, D)
  valid_BL = jnp.arange(T // 4)[None, :] < jnp.array([[12], [6], [12], [3]])
  other_BLD = jnp.where(valid_BL[..., None], x_BLD, 5.0 * jnp.flip(x_BLD, axis=1))
  y, s = layer(x_BLD, valid_BL)
  y_other, s_other = layer(other_BLD, valid_BL)
  np.testing.assert_allclose(y[valid_BL], y_other[valid_BL], rtol=1e-6, atol=1e-6)
  for a, b in zip(s, s_other, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert float(jnp.sum(s.load_E)) == 2 * int(jnp.sum(valid_BL))  # Real tokens' copies only.
  # Only the real tokens: the statistics of the same tokens without any padding.
  _, s_real = layer(x_BLD[1:2, :6], None)
  _, s_padded = layer(x_BLD[1:2], valid_BL[1:2])
  for name in ('balance_loss', 'sequence_balance_loss', 'z_loss', 'load_E'):
    np.testing.assert_allclose(getattr(s_padded, name), getattr(s_real, name), rtol=1e-6)
