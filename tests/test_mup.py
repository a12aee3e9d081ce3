"""model.mup_base_width (muP, width transfer): a coordinate check for AdamW and Muon (activations
move by the same amount in a few steps at 1x, 4x and 16x the base width, where the standard
parametrisation's move grows with the width), each parameter's role read from its logical axes,
the base width itself being the standard parametrisation bit for bit, and the settings'
validation."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from pretrax import config as config_lib
from pretrax import metrics, mup, run_config, train
from pretrax import state as state_lib
from pretrax.interop import hf_arch, hf_fields

VOCAB, BATCH, LENGTH = 64, 4, 16
BASE = 32
WIDTHS = (BASE, 4 * BASE, 16 * BASE)


def _run_state(width: int, base: int, name: str = 'adamw', arg: str | None = None, **changes):
  """A tiny model (2 layers, 2 heads: head_dim grows with the width) and its optimizer at a fixed
  lr: constant schedule, no warmup, no decay, no clipping."""
  c = load_config('tiny', arg)
  c.model.embed_dim, c.model.mup_base_width = width, base
  c.model.num_heads, c.model.num_kv_heads = 2, 0
  c.data.seq_len = LENGTH
  c.optim.name, c.optim.schedule, c.optim.warmup_steps = name, 'constant', 0
  c.optim.lr = c.optim.min_lr = 1e-2
  c.optim.weight_decay, c.optim.clip_norm = 0.0, 0.0
  for key, value in changes.items():
    c.update_from_flattened_dict({key: value})
  return state_lib.build(run_config.build(c, check_data=False), VOCAB)


def _train(run: state_lib.RunState, steps: int):
  """(block 0's output, logits) on one fixed batch before and after `steps` updates on it, and the
  parameters after them."""
  rng = np.random.default_rng(0)
  ids_BL = jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH + 1)), jnp.int32)
  inputs_BL, targets_BL = ids_BL[:, :-1], ids_BL[:, 1:]
  segments_BL = jnp.ones((BATCH, LENGTH), jnp.int32)
  positions_BL = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))

  state = run.init(0)
  params, opt_state = state['params'], state['opt_state']
  # Block 0 always reads the initial embeddings: its output's change is its own weights' doing.
  x_BLD = nnx.merge(run.model_def, params).embed_tokens(inputs_BL, positions_BL)

  @jax.jit
  def features(params):
    model = nnx.merge(run.model_def, params)
    block_BLD, _ = model.blocks[0](x_BLD, segments_BL, positions_BL, None, None)
    return block_BLD, model(inputs_BL, segments_BL, positions_BL)

  def loss(params):
    logits_BLV = features(params)[1]
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV, targets_BL).mean()

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = run.optimizer.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  before = features(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return before, features(params), params


def _changes(base: int, name: str, arg: str | None, **changes) -> np.ndarray:
  """RMS of the change in (block 0's output, logits) after 3 steps, one row per width of WIDTHS."""
  rows = []
  for width in WIDTHS:
    before, after, _ = _train(_run_state(width, base, name, arg, **changes), steps=3)
    rows.append(
      [float(jnp.sqrt(jnp.mean(jnp.square(a - b)))) for a, b in zip(after, before, strict=True)]
    )
  return np.asarray(rows)


@pytest.mark.slow
@pytest.mark.parametrize(
  'name, arg, changes',
  [
    ('adamw', None, {}),  # gpt2: LayerNorm, learned positions, the tied output multiplier.
    ('muon', 'llama', {'model.tie_embeddings': False}),  # RoPE, RMSNorm, SwiGLU; untied head.
  ],
)
def test_coordinate_check(name, arg, changes):
  """Under muP the activations' change after 3 steps at one lr stays within a factor 2 of the
  base width's up to 16x the width (measured, 4x and 16x: block 0 0.78 and 0.71, logits 0.78 and
  0.71 for AdamW on gpt2; 1.10, 1.10 and 0.84, 0.79 for Muon on llama); under the standard
  parametrisation it grows with the width (16x: block 0 193 and 48 times, logits 8.8 and 7.7)."""
  mup_changes = _changes(BASE, name, arg, **changes)
  ratios = mup_changes[1:] / mup_changes[0]
  assert ((0.5 < ratios) & (ratios < 2.0)).all(), (mup_changes, ratios)
  standard = _changes(0, name, arg, **changes)
  assert (standard[-1] / standard[0] > 4.0).all(), standard


def test_the_base_width_is_the_standard_parametrisation_bit_for_bit():
  """At m = 1 every multiplier is 1: the same init, attention, logits and updates as
  mup_base_width=0 (and so as before muP existed), for AdamW and for Muon."""
  for name in ('adamw', 'muon'):
    standard = _train(_run_state(64, 0, name, **{'model.num_layers': 1}), steps=2)
    at_base = _train(_run_state(64, 64, name, **{'model.num_layers': 1}), steps=2)
    for a, b in zip(jax.tree.leaves(standard), jax.tree.leaves(at_base), strict=True):
      np.testing.assert_array_equal(a, b)


def test_attention_logits_are_scaled_by_sqrt_base_head_dim_over_head_dim():
  """A muP model (untied head, so attention is its only change in the forward pass) computes what
  the standard model computes with its queries times sqrt(base head_dim / head_dim): at 4x the
  width with 2 heads, head_dim 64 and base 16, logits sqrt(16) / 64 = (1/2) / sqrt(64)."""
  untied = {'model.tie_embeddings': False}
  mup_run = _run_state(128, 32, **untied)
  standard = _run_state(128, 0, **untied)
  assert mup_run.model_cfg.attention_mult == 0.5
  params = mup_run.init(0)['params']
  queries_halved = jax.tree.map(lambda x: x, params)
  for block in queries_halved['blocks'].values():
    block['attn']['q'] = block['attn']['q'] * 0.5
  ids_BL = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, LENGTH)), jnp.int32)
  segments_BL = jnp.ones((BATCH, LENGTH), jnp.int32)
  positions_BL = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))

  def logits(run, p):
    return nnx.merge(run.model_def, p)(ids_BL, segments_BL, positions_BL)

  np.testing.assert_allclose(
    logits(mup_run, params), logits(standard, queries_halved), rtol=1e-5, atol=1e-6
  )
  assert not np.allclose(logits(mup_run, params), logits(standard, params), rtol=1e-3)


def _roles(arg: str | None = None, num_classes: int = 0, **changes) -> dict[str, str]:
  """Each parameter of a tiny model (layer 0's, and those outside the blocks) -> its muP role."""
  c = load_config('tiny', arg)
  for key, value in changes.items():
    c.update_from_flattened_dict({key: value})
  run = state_lib.build(run_config.build(c, check_data=False), VOCAB, num_classes=num_classes)
  out = {}
  flat = jax.tree_util.tree_flatten_with_path(run.logical_axes, is_leaf=lambda x: type(x) is tuple)
  for path, names in flat[0]:
    name = state_lib.param_path(path)
    if not name.startswith('blocks/') or name.startswith('blocks/0/'):
      out[name.removeprefix('blocks/0/')] = mup.role(names)
  return out


def test_each_parameters_role_follows_from_its_logical_axes():
  gpt2 = _roles(**{'model.use_bias': True, 'model.tie_embeddings': False})
  assert {k for k, v in gpt2.items() if v == 'hidden'} == {
    'attn/q',
    'attn/k',
    'attn/v',
    'attn/o',
    'mlp/wi',
    'mlp/wo',
  }
  assert {k: v for k, v in gpt2.items() if v in ('input', 'output')} == {
    'embed/embedding': 'input',
    'pos_embed': 'input',
    'head': 'output',
  }
  for vector in ('attn/q_bias', 'attn/o_bias', 'mlp/bi', 'attn_norm/scale', 'attn_norm/bias'):
    assert gpt2[vector] == 'vector', vector
  moe = _roles('llama', **{'model.moe.num_experts': 4, 'model.qk_norm': 'head'})
  assert moe['mlp/wi'] == moe['mlp/wo'] == 'hidden'  # Each expert a hidden matrix.
  assert moe['mlp/router'] == 'output'  # A readout over a fixed number of experts.
  assert moe['attn/q_norm/scale'] == 'vector'
  mlm = _roles('llama', **{'objective': 'masked_lm'})
  assert mlm['mlm_dense'] == 'hidden' and mlm['mlm_bias'] == 'vector'
  classifier = _roles('llama', 3, **{'objective': 'classification'})
  assert (classifier['mlm_dense'], classifier['classifier']) == ('hidden', 'output')
  tanh = _roles('llama', 3, **{'objective': 'classification', 'finetune.head': 'tanh'})
  assert tanh['pooler'] == 'hidden'
  with pytest.raises(ValueError, match="'new_axis' .* is not in pretrax.mup.AXES"):
    mup.role(('embed', 'new_axis'))


def _first_updates(base: int, name: str, zero_grads: bool = False, **changes):
  """One update at width 128 (llama, untied head) from fixed gradients, with muP's base width
  `base` (0: off); the parameters are the muP run's, the same in both."""
  untied = {'model.tie_embeddings': False, **changes}
  params = _run_state(128, 32, name, 'llama', **untied).init(0)['params']
  run = _run_state(128, base, name, 'llama', **untied)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape, p.dtype), params)
  if zero_grads:
    grads = jax.tree.map(jnp.zeros_like, params)
  return run.optimizer.update(grads, run.optimizer.init(params), params)[0]


@pytest.mark.parametrize(
  'name, expected',
  [
    ('adamw', {'q': 0.25, 'wi': 0.25, 'head': 0.25, 'embedding': 1.0, 'norm': 1.0}),
    ('muon', {'q': 0.5, 'wi': 0.5, 'head': 0.25, 'embedding': 1.0, 'norm': 1.0}),
  ],
)
def test_each_step_is_scaled_by_its_lr_multiplier_and_the_decay_is_not(name, expected):
  """At m = 4, from the same gradients, each parameter's step against the standard
  parametrisation's: AdamW's hidden and output ones x 1/4, embeddings' and norms' x 1; Muon's
  matrices x 1/2 (their update's spectral norm is then the base width's). Weight decay's step,
  lr x weight_decay x the weight, is the same in both (as mup's MuAdamW keeps it)."""
  mup_updates, standard = _first_updates(32, name), _first_updates(0, name)

  def pick(tree):
    block = tree['blocks'][0]
    return {
      'q': block['attn']['q'],
      'wi': block['mlp']['wi'],
      'head': tree['head'],
      'embedding': tree['embed']['embedding'],
      'norm': tree['final_norm']['scale'],
    }

  for key, a in pick(mup_updates).items():
    np.testing.assert_allclose(a, expected[key] * pick(standard)[key], rtol=1e-5, err_msg=key)
  decay = {'optim.weight_decay': 0.1}
  mup_decay = _first_updates(32, name, zero_grads=True, **decay)
  standard_decay = _first_updates(0, name, zero_grads=True, **decay)
  for key, a in pick(mup_decay).items():
    np.testing.assert_array_equal(a, pick(standard_decay)[key], err_msg=key)
  assert np.abs(pick(mup_decay)['wi']).max() > 0  # The decay moved it.


def test_init_multipliers():
  """At m = 4 the init std of hidden weights is init_std / 2, of the (untied) head init_std / 4,
  of the embeddings init_std."""
  run = _run_state(128, 32, 'adamw', 'llama', **{'model.tie_embeddings': False})
  assert run.model_cfg.width_mult == 4.0
  params = run.init(0)['params']
  assert np.std(params['blocks'][0]['mlp']['wi']) == pytest.approx(0.02 / 2, rel=0.05)
  assert np.std(params['head']) == pytest.approx(0.02 / 4, rel=0.05)
  assert np.std(params['embed']['embedding']) == pytest.approx(0.02, rel=0.05)


def test_the_base_head_dim_follows_how_head_dim_is_set():
  """Heads that widen with the model (head_dim 0): the base width's head_dim; a head_dim written
  out stays at every width; an explicit base head_dim is kept. Resolving twice changes nothing."""

  def resolved(**changes):
    c = load_config('tiny')  # embed_dim 64, 2 heads.
    for key, value in changes.items():
      c.update_from_flattened_dict({key: value})
    return run_config.build(c, check_data=False).model

  model = resolved(**{'model.mup_base_width': 16})
  assert (model.head_dim, model.mup_base_head_dim) == (32, 8)
  written = resolved(**{'model.mup_base_width': 16, 'model.head_dim': 32, 'model.num_heads': 4})
  assert written.mup_base_head_dim == 32
  explicit = resolved(**{'model.mup_base_width': 16, 'model.mup_base_head_dim': 4})
  assert explicit.mup_base_head_dim == 4
  assert resolved().mup_base_head_dim == 0  # Off.
  run = run_config.build(load_config('tiny'), check_data=False)
  assert run_config.resolve(run_config.to_dict(run)) == run


@pytest.mark.parametrize(
  'changes, message',
  [
    (
      {'model.mup_base_width': -64},
      'model.mup_base_width=-64 must be 0 \\(off\\) or the embed_dim',
    ),
    (
      {'model.mup_base_width': 64, 'model.mup_base_head_dim': -1},
      'model.mup_base_head_dim=-1 must be 0 or more',
    ),
    ({'model.mup_base_head_dim': 16}, 'does nothing without model.mup_base_width: set'),
    (
      {'model.mup_base_width': 33},
      'model.mup_base_width=33 is not a multiple of model.num_heads=2, .* choose a multiple, or '
      'set model.mup_base_head_dim',
    ),
  ],
)
def test_mup_settings_are_validated(changes, message):
  c = load_config('tiny')
  for key, value in changes.items():
    c.update_from_flattened_dict({key: value})
  with pytest.raises(config_lib.ConfigError, match=message):
    run_config.build(c, check_data=False)


def test_a_mup_model_is_neither_exported_nor_imported():
  """Transformers configs hold no muP multipliers: export refuses, and so does starting a muP run
  from a transformers model (its weights would compute something else)."""
  c = load_config('tiny')
  plain = run_config.model_config(run_config.build(c, check_data=False), VOCAB)
  c.model.mup_base_width = 32
  m = run_config.model_config(run_config.build(c, check_data=False), VOCAB)
  with pytest.raises(hf_arch.ConversionError, match='cannot export: a muP model'):
    hf_arch.architecture(m)
  config_json = hf_arch.hf_config(plain, hf_arch.architecture(plain), 'float32')
  assert hf_fields.mismatches(plain, config_json) == []
  assert hf_fields.mismatches(m, config_json) == [
    'model.mup_base_width=32 but transformers models have no muP multipliers '
    '(model.mup_base_width=0)'
  ]


def test_a_short_mup_run_lowers_the_loss(tiny_config, tmp_path):
  """The train step, checkpoints and metrics with muP on (width 64 from base 32, Muon)."""
  c = tiny_config
  c.model.mup_base_width, c.optim.name = 32, 'muon'
  c.steps, c.log_every, c.eval_every = 30, 1, 30
  train.train(run_config.build(c, num_devices=jax.device_count()), str(tmp_path))
  losses = [r['loss'] for r in metrics.read_metrics(str(tmp_path)) if 'loss' in r]
  assert losses[-1] < losses[0] - 2.0, (losses[0], losses[-1])
