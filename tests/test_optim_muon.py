"""optim.name=muon: which parameters Muon trains (read from their logical axes), that its update is
orthogonalised at AdamW's RMS, that its state is sharded like the parameters, that it trains, and
that a run cannot switch optimizers on resume."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config, run_python
from pretrax import config as config_lib
from pretrax import metrics, optim, optim_muon, run_config, train
from pretrax import state as state_lib

IN_HEADS = ((0,), (1, 2))  # (embed) x (heads, head_dim)
OUT_HEADS = ((0, 1), (2,))  # (heads, head_dim) x (embed)
MATRIX = ((0,), (1,))  # A 2-D weight: (embed) x (mlp), (mlp) x (embed)
EXPERTS = ((1,), (2,))  # (experts) of (embed) x (mlp), (mlp) x (embed)
# AdamW's typical update RMS, which Muon's updates are scaled to (Moonshot, arXiv 2502.16982).
ADAMW_RMS = 0.2


def _groups(name: str, arg: str | None = None, num_classes: int = 0, **changes) -> dict:
  """Each parameter of a tiny model (its path in layer 0 or outside the blocks) -> Muon's
  (reduction, output) axes, or 'adamw'."""
  c = load_config(name, arg)
  for key, value in changes.items():
    c.update_from_flattened_dict({key: value})
  run = state_lib.build(run_config.build(c, check_data=False), 64, num_classes=num_classes)
  dims = optim_muon.dimension_numbers(run.logical_axes)
  out = {}
  for path, d in jax.tree_util.tree_flatten_with_path(dims, is_leaf=optim_muon.is_dims)[0]:
    name = state_lib.param_path(path)
    if not name.startswith('blocks/') or name.startswith('blocks/0/'):
      out[name.removeprefix('blocks/0/')] = (
        'adamw' if isinstance(d, optax.MaskedNode) else (d.reduction_axis, d.output_axis)
      )
  return out


def test_muon_takes_the_blocks_hidden_matrices_and_adamw_the_rest():
  llama = _groups('tiny', 'llama', **{'model.qk_norm': 'head'})
  assert llama == {
    **{f'attn/{p}': IN_HEADS for p in 'qkv'},
    'attn/o': OUT_HEADS,
    **{f'mlp/{p}': MATRIX for p in ('wi', 'wi_gate', 'wo')},
    **{p: 'adamw' for p in ('attn/q_norm/scale', 'attn/k_norm/scale')},
    **{p: 'adamw' for p in ('attn_norm/scale', 'mlp_norm/scale', 'final_norm/scale')},
    'embed/embedding': 'adamw',
  }
  gpt2 = _groups('tiny', **{'model.use_bias': True, 'model.tie_embeddings': False})
  assert {k for k, v in gpt2.items() if v != 'adamw'} == {
    'attn/q',
    'attn/k',
    'attn/v',
    'attn/o',
    'mlp/wi',
    'mlp/wo',
  }
  for adamw in ('embed/embedding', 'pos_embed', 'head', 'attn/q_bias', 'attn/o_bias', 'mlp/bi'):
    assert gpt2[adamw] == 'adamw', adamw
  moe = _groups('tiny', 'llama', **{'model.moe.num_experts': 4, 'model.moe.shared_experts': 1})
  assert {k: moe[k] for k in ('mlp/wi', 'mlp/wi_gate', 'mlp/wo')} == dict.fromkeys(
    ('mlp/wi', 'mlp/wi_gate', 'mlp/wo'), EXPERTS
  )
  assert moe['mlp/shared/wi'] == moe['mlp/shared/wo'] == MATRIX
  assert moe['mlp/router'] == moe['mlp/router_bias'] == 'adamw'
  # The task heads over the blocks stay with AdamW, though their axes are the blocks' own.
  mlm = _groups('tiny', 'llama', **{'objective': 'masked_lm'})
  assert mlm['mlm_dense'] == mlm['mlm_bias'] == 'adamw' and mlm['attn/q'] == IN_HEADS
  classifier = _groups('tiny', 'llama', 3, **{'objective': 'classification'})
  assert classifier['mlm_dense'] == classifier['classifier'] == 'adamw'
  tanh = _groups('tiny', 'llama', 3, **{'objective': 'classification', 'finetune.head': 'tanh'})
  assert tanh['pooler'] == 'adamw'


def _optim_cfg(**changes):
  c = load_config('tiny')
  c.optim.name, c.optim.schedule, c.optim.warmup_steps = 'muon', 'constant', 0
  c.optim.lr, c.optim.min_lr, c.optim.weight_decay, c.optim.clip_norm = 1.0, 1.0, 0.0, 0.0
  for k, v in changes.items():
    c.optim[k] = v
  return run_config.build(c, check_data=False).optim


def _spread_matrix(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
  """A matrix with singular values spread evenly (log scale) over 1 to 0.01."""
  k = min(shape)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
  return (u * np.logspace(0, -2, k)) @ v.T


@pytest.mark.parametrize(
  'names, shape',
  [
    (('embed', 'mlp'), (64, 256)),
    (('mlp', 'embed'), (256, 64)),
    (('embed', 'heads', 'head_dim'), (64, 4, 32)),  # One 64 x 128 matrix.
  ],
)
def test_a_muon_update_is_orthogonalised_at_adamw_rms(names, shape):
  """A gradient whose singular values span a factor 100 gives an update whose singular values
  are within a factor 2 of each other (quintic Newton-Schulz lands them in ~[0.65, 1.2]), with
  an RMS of ~0.2 (ADAMW_RMS) whatever the matrix's shape; lr 1, no decay."""
  rng = np.random.default_rng(0)
  matrix = (shape[0], int(np.prod(shape[1:])))
  grad = _spread_matrix(matrix, rng).reshape(shape)
  axes = {'blocks': {0: {'w': names, 'norm': ('norm',)}}}
  params = {'blocks': {0: {'w': jnp.zeros(shape), 'norm': jnp.ones(8)}}}
  grads = {'blocks': {0: {'w': jnp.asarray(grad, jnp.float32), 'norm': jnp.ones(8)}}}
  opt = optim.optimizer(_optim_cfg(), axes)
  updates, _ = opt.update(grads, opt.init(params), params)
  update = -np.asarray(updates['blocks'][0]['w'], np.float64)
  rms = np.sqrt(np.mean(update**2))
  assert 0.85 * ADAMW_RMS < rms < 1.05 * ADAMW_RMS, rms
  singular = np.linalg.svd(update.reshape(matrix), compute_uv=False)
  singular /= ADAMW_RMS * np.sqrt(max(matrix))  # The orthogonalised matrix's.
  assert 0.6 < singular.min() and singular.max() < 1.25, (singular.min(), singular.max())
  # The norm's scale went through AdamW: its first update is -lr x sign(grad).
  np.testing.assert_allclose(updates['blocks'][0]['norm'], -1.0, rtol=1e-6)


@pytest.mark.parametrize(
  'names, shape',
  [
    (('embed', 'mlp'), (64, 256)),
    (('mlp', 'embed'), (256, 64)),  # Transposed first: the same FLOPs.
    (('experts', 'expert_embed', 'expert_mlp'), (4, 32, 96)),  # Four matrices.
    (('heads', 'head_dim', 'embed'), (4, 16, 128)),
  ],
)
def test_newton_schulz_flops_count_what_xla_compiles(names, shape):
  """The formula counts the matmuls; XLA's count of the compiled update adds a few percent of
  elementwise work (normalising, the polynomial's sums, the final scale)."""
  axes = {'blocks': {'w': names}}
  params = {'blocks': {'w': jnp.ones(shape)}}
  tx = optim_muon.orthogonalise(optim_muon.dimension_numbers(axes), ns_steps=5)
  compiled = jax.jit(lambda g: tx.update(g, tx.init(g))[0]).lower(params).compile()
  cost = compiled.cost_analysis()
  xla = (cost[0] if isinstance(cost, (list, tuple)) else cost)['flops']
  counted = optim_muon.newton_schulz_flops(params, axes, ns_steps=5)
  assert counted < xla < 1.15 * counted, (xla, counted)


def test_muon_state_is_sharded_like_its_parameters_on_8_devices():
  """On a (2, 2, 2) mesh, with MoE experts (a batch axis) split over the expert axis; one update
  jitted into those shardings, which run_python also checks XLA could follow."""
  script = textwrap.dedent("""
      import jax
      import optax
      from jax.sharding import PartitionSpec as P
      from conftest import load_config
      from pretrax import run_config
      from pretrax import state as state_lib
      c = load_config('tiny', 'llama')
      c.optim.name = 'muon'
      c.model.moe.num_experts, c.model.moe.first_dense = 4, 1  # Layer 0 dense, layer 1 MoE.
      c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = 1, 2, 2, 2
      c = run_config.build(c, num_devices=8, check_data=False)
      run = state_lib.build(c, vocab_size=64)
      state = run.init(0)
      groups = state['opt_state'][1].inner_states
      momentum = groups['muon'].inner_state[0].trace
      adam_mu = groups['adamw'].inner_state[0].mu
      params = state['params']
      checked = []
      def same(path, m, p):
        if not isinstance(m, optax.MaskedNode):
          assert m.sharding.spec == p.sharding.spec, (path, m.sharding.spec, p.sharding.spec)
          checked.append(jax.tree_util.keystr(path))
        return m
      masked = lambda x: isinstance(x, optax.MaskedNode)
      without_bias = jax.tree_util.tree_map(lambda x: x, params)
      del without_bias['blocks'][1]['mlp']['router_bias']  # Frozen: no optimizer state.
      for tree in (momentum, adam_mu):
        jax.tree_util.tree_map_with_path(same, tree, without_bias, is_leaf=masked)
      assert params['blocks'][1]['mlp']['wi'].sharding.spec == P('expert', 'fsdp', 'tensor')
      assert momentum['blocks'][1]['mlp']['wi'].sharding.spec == P('expert', 'fsdp', 'tensor')
      assert momentum['blocks'][0]['attn']['o'].sharding.spec == P('tensor', None, 'fsdp')
      assert adam_mu['embed']['embedding'].sharding.spec == P('tensor', 'fsdp')
      assert len(checked) == len(jax.tree.leaves(without_bias)), checked
      update = jax.jit(
        lambda s: run.optimizer.update(s['params'], s['opt_state'], s['params']),
        out_shardings=(run.shardings['params'], run.shardings['opt_state']),
      )
      updates, opt_state = update(state)
      assert all(bool(jax.numpy.isfinite(u).all()) for u in jax.tree.leaves(updates))
      print('ok', len(checked))
  """)
  assert run_python(script, devices=8, timeout=300).strip().startswith('ok')


def _train(c, workdir: str) -> dict:
  return train.train(run_config.build(c, num_devices=jax.device_count()), workdir)


def test_a_short_muon_run_lowers_the_loss(tiny_config, tmp_path):
  c = tiny_config
  c.optim.name = 'muon'
  c.steps, c.log_every, c.eval_every = 30, 1, 30
  _train(c, str(tmp_path))
  losses = [r['loss'] for r in metrics.read_metrics(str(tmp_path)) if 'loss' in r]
  assert losses[-1] < losses[0] - 2.0, (losses[0], losses[-1])


def test_resuming_with_another_optimizer_is_refused(tiny_config, tmp_path):
  tiny_config.steps = 2
  _train(tiny_config, str(tmp_path))
  tiny_config.optim.name = 'muon'
  with pytest.raises(config_lib.ConfigError, match='optim.name=adamw, not muon: set --config'):
    _train(tiny_config, str(tmp_path))


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('name', 'sgd', "optim.name='sgd' is not one of adamw, muon"),
    ('muon_momentum', 1.0, r'optim.muon_momentum=1.0 must be in \[0, 1\)'),
    ('ns_steps', 0, 'optim.ns_steps=0 must be at least 1'),
  ],
)
def test_muon_settings_are_validated(field, value, message):
  c = load_config('tiny')
  c.optim[field] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    run_config.build(c, check_data=False)
