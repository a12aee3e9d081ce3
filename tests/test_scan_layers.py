"""model.scan_layers: the stacked, scanned blocks are the unrolled model (same init, loss and
gradients), shard and optimise per layer, and convert to and from the unrolled layout."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, run_python
from pretrax import checkpoint, metrics, optim, run_config, saved_run, train
from pretrax import config as config_lib
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.data.batch import Batch
from pretrax.interop import hf_export, hf_import, safetensors
from pretrax.model import stack

VOCAB = 64

CASES = {  # name: (config arg, overrides)
  'llama_dropout_remat': ('llama', {'model.dropout': 0.1, 'model.remat': 'dots'}),
  'gpt2_dropout': (None, {'model.dropout': 0.1, 'model.use_bias': True}),
  'moe_first_dense': (
    'llama',
    {'model.num_layers': 3, 'model.moe.num_experts': 4, 'model.moe.first_dense': 1},
  ),
  'mlm_encoder_full_remat': (
    None,
    {'objective': 'masked_lm', 'model.dropout': 0.1, 'model.remat': 'full'},
  ),
}


def _config(arg=None, overrides=None, scan=False, corpus_path=''):
  c = load_config('tiny', arg)
  c.data.seq_len = 16
  if corpus_path:
    c.data.path, c.data.fallback = corpus_path, ''
  for key, value in (overrides or {}).items():
    section, _, leaf = key.rpartition('.')
    node = c
    for part in filter(None, section.split('.')):
      node = node[part]
    node[leaf] = value
  c.model.scan_layers = scan
  return c


def _flat(tree) -> dict:
  return {state_lib.param_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unrolled(tree, run) -> dict:
  """A params-shaped tree of either layout, by unrolled path."""
  from pretrax.model import transformer

  return stack.to_unrolled(_flat(tree), transformer.first_scanned(run.model_cfg))


def _batch(seed: int = 0) -> Batch:
  k1, k2 = jax.random.split(jax.random.key(seed))
  B, L = 4, 16
  return Batch(
    inputs=jax.random.randint(k1, (B, L), 1, VOCAB),
    segment_ids=jnp.ones((B, L), jnp.int32).at[:, 12:].set(2),
    positions=jnp.concatenate([jnp.arange(12), jnp.arange(4)])[None].repeat(B, 0),
    targets=jax.random.randint(k2, (B, L), 1, VOCAB),
    weights=jnp.ones((B, L), jnp.float32),
  )


def _grads(c, seed=3):
  rc = run_config.build(c, check_data=False)
  run = state_lib.build(rc, VOCAB)
  params = run.init_params(0)
  cfg = step_lib.step_config(rc)
  rng = jax.random.key(seed) if cfg.dropout else None
  grads, sums = step_lib._grads(params, _batch(), jnp.float32(64.0), run.model_def, cfg, rng)
  return run, params, grads, sums


@pytest.mark.parametrize('name', list(CASES))
def test_scanned_model_starts_from_the_unrolled_parameters_with_their_loss_and_gradients(name):
  arg, overrides = CASES[name]
  run_a, params_a, grads_a, sums_a = _grads(_config(arg, overrides, scan=False))
  run_b, params_b, grads_b, sums_b = _grads(_config(arg, overrides, scan=True))
  assert stack.STACK in params_b and stack.STACK not in params_a
  pa, pb = _unrolled(params_a, run_a), _unrolled(params_b, run_b)
  assert set(pa) == set(pb)
  for path in pa:  # Same draws, stacked: bit for bit.
    np.testing.assert_array_equal(pa[path], pb[path], err_msg=path)
  np.testing.assert_allclose(sums_a['loss_sum'], sums_b['loss_sum'], rtol=1e-6)
  if 'moe_load' in sums_a:  # The routing statistics per layer, in order.
    np.testing.assert_allclose(sums_a['moe_load'], sums_b['moe_load'], rtol=1e-6)
    np.testing.assert_allclose(sums_a['moe_aux_loss'], sums_b['moe_aux_loss'], rtol=1e-6)
  ga, gb = _unrolled(grads_a, run_a), _unrolled(grads_b, run_b)
  for path in ga:
    np.testing.assert_allclose(ga[path], gb[path], rtol=1e-4, atol=1e-7, err_msg=path)


def test_moe_every_other_layer_cannot_scan_and_says_so():
  c = _config('llama', {'model.moe.num_experts': 4, 'model.moe.every': 2}, scan=True)
  with pytest.raises(config_lib.ConfigError, match='scan_layers=False'):
    run_config.build(c, check_data=False)


@pytest.mark.parametrize('name', ['adamw', 'muon'])
def test_the_optimizer_treats_each_stacked_layer_as_the_unrolled_one(name):
  """Muon orthogonalises each layer's matrix on its own ('layers' is a batch axis), AdamW's decay
  spares stacked norms and biases: the updates are the unrolled ones, stacked."""
  updates = {}
  for scan in (False, True):
    c = _config('llama', {'optim.name': name, 'optim.weight_decay': 0.1}, scan=scan)
    run, params, grads, _ = _grads(c)
    state = run.optimizer.init(params)
    _, state = run.optimizer.update(grads, state, params)
    u, _ = run.optimizer.update(grads, state, params)  # Past the warmup's zero step size.
    updates[scan] = _unrolled(u, run)
  assert np.abs(updates[False]['blocks/0/attn/q']).max() > 0
  for path in updates[False]:
    want = np.asarray(updates[False][path])
    # Newton-Schulz runs in bfloat16: gradients equal to float32 rounding may round apart there.
    atol = 0.1 * np.abs(want).max()
    np.testing.assert_allclose(updates[True][path], want, rtol=0, atol=atol, err_msg=path)
  decays = optim.decay_mask(params, run_config.build(c, check_data=False).optim)[stack.STACK]
  assert not decays['attn_norm']['scale'] and decays['attn']['q']  # (layers, D) is a vector.


def test_stacked_params_and_moments_are_sharded_as_the_rules_say_on_8_devices():
  script = """
      import jax
      from jax.sharding import PartitionSpec as P
      from conftest import load_config
      from pretrax import run_config
      from pretrax import state as state_lib
      c = load_config('tiny', 'llama')
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
      c.model.scan_layers = True
      c.model.moe.num_experts, c.model.moe.first_dense, c.model.num_layers = 4, 1, 3
      c = run_config.build(c, num_devices=8, check_data=False)
      run = state_lib.build(c, vocab_size=64)
      names = jax.tree.leaves(run.logical_axes['stack'], is_leaf=lambda x: isinstance(x, tuple))
      assert all(n[0] == 'layers' for n in names), names
      state = run.init(0)
      q = state['params']['stack']['attn']['q']
      assert q.shape[0] == 2 and q.sharding.spec == P(None, 'fsdp', 'tensor', None), q.sharding
      wi = state['params']['stack']['mlp']['wi']  # (layers, experts, embed, hidden)
      assert wi.sharding.spec == P(None, 'expert', 'fsdp', 'tensor'), wi.sharding.spec
      dense = state['params']['blocks'][0]['mlp']['wi']  # The leading dense layer, unrolled.
      assert dense.sharding.spec == P('fsdp', 'tensor'), dense.sharding.spec
      mu = state['opt_state'][1][0].mu['stack']['attn']['o']
      assert mu.sharding.spec == P(None, 'tensor', None, 'fsdp'), mu.sharding.spec
      print('ok', jax.device_count())
  """
  assert run_python(script, devices=8, timeout=300).strip().endswith('ok 8')


# ---- Checkpoints: init_from both ways, resume refused, Hugging Face export ---------------------


@pytest.fixture(scope='module')
def char_tokenizer(corpus_path) -> tokenizer_lib.Tokenizer:
  with open(corpus_path, encoding='utf-8') as f:
    return tokenizer_lib.Tokenizer(
      tokenizer_lib.train([f.read()], model_type='char', vocab_size=400)
    )


def _saved_run(c, tok, workdir: str):
  """A step-7 checkpoint of `c`'s model with random parameters (seed 0, then noise, so that
  biases and norms are not their init); returns the run and params."""
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, tok.vocab_size)
  state = run.init(0)
  flat = _unrolled(state['params'], run)  # Noise drawn per unrolled path: equal in both layouts.
  noisy = {
    p: x + 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(1), i), x.shape, x.dtype)
    for i, (p, x) in enumerate(sorted(flat.items()))
  }
  from pretrax.model import transformer

  m = run.model_cfg
  target = stack.to_layout(noisy, transformer.first_scanned(m), m.num_layers)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(state['params'])
  state['params'] = jax.tree_util.tree_unflatten(
    treedef, [target[state_lib.param_path(k)] for k, _ in leaves]
  )
  state['step'] = jnp.asarray(7, state['step'].dtype)
  mngr = checkpoint.manager(workdir, async_save=False)
  checkpoint.save(mngr, 7, state, run_config.to_dict(c))
  checkpoint.wait(mngr)
  mngr.close()
  tok.save(os.path.join(workdir, 'tokenizer.model'))
  return run, state['params']


@pytest.mark.parametrize('arg', ['llama', None])
def test_init_from_converts_either_layout_to_the_other(tmp_path, corpus_path, char_tokenizer, arg):
  for scan_from in (False, True):
    src = str(tmp_path / f'from_{scan_from}')
    run_src, params_src = _saved_run(_config(arg, scan=scan_from), char_tokenizer, src)
    c = _config(arg, scan=not scan_from, corpus_path=corpus_path)
    c.init_from, c.tokenizer.path = src, os.path.join(src, 'tokenizer.model')
    rc = run_config.build(c, check_data=False)
    run = state_lib.build(rc, char_tokenizer.vocab_size)
    params = saved_run.initial_params(rc, run, log=lambda _: None)
    assert (stack.STACK in params) == (not scan_from)
    want, got = _unrolled(params_src, run_src), _unrolled(params, run)
    assert set(want) == set(got)
    for path in want:
      np.testing.assert_array_equal(np.asarray(want[path]), np.asarray(got[path]), err_msg=path)


def test_resuming_with_the_other_layout_is_refused_naming_the_fix(tiny_config, tmp_path):
  tiny_config.steps = 2
  train.train(run_config.build(tiny_config, num_devices=jax.device_count()), str(tmp_path))
  tiny_config.model.scan_layers = True
  with pytest.raises(config_lib.ConfigError, match='scan_layers=False to resume.*init_from'):
    train.train(run_config.build(tiny_config, num_devices=jax.device_count()), str(tmp_path))


@pytest.mark.parametrize(
  'arg, overrides',
  [
    ('llama', {}),
    (None, {'model.use_bias': True}),  # GPT-2's fused c_attn reads three stacked arrays.
    (  # GLM-4.5's MoE: dense first layers, then experts.
      'llama',
      {
        'model.num_layers': 3,
        'model.moe.num_experts': 4,
        'model.moe.first_dense': 1,
        'model.moe.score': 'sigmoid',
      },
    ),
  ],
)
def test_hf_export_of_a_scanned_run_equals_the_unrolled_one_and_imports_back_stacked(
  tmp_path, char_tokenizer, arg, overrides
):
  tensors = {}
  for scan in (False, True):
    workdir, out = str(tmp_path / f'run_{scan}'), str(tmp_path / f'hf_{scan}')
    run, params = _saved_run(_config(arg, overrides, scan=scan), char_tokenizer, workdir)
    hf_export.export(workdir, out, log=lambda _: None)
    reader = safetensors.Reader(out)
    tensors[scan] = {name: reader.read(name) for name in reader.names()}
    with open(os.path.join(out, 'config.json')) as f:
      tensors[scan]['config.json'] = f.read()
  assert set(tensors[False]) == set(tensors[True])
  for name, value in tensors[False].items():
    np.testing.assert_array_equal(value, tensors[True][name], err_msg=name)
  # Imported into the scanned config: the scanned run's parameters, stacked, bit for bit.
  c = _config(arg, overrides, scan=True)
  c.tokenizer.path = os.path.join(str(tmp_path / 'run_True'), 'tokenizer.model')
  imported = hf_import.import_model(
    out, run_config.build(c, check_data=False), str(tmp_path / 'imported'), log=lambda _: None
  )
  want = _flat(params)
  assert set(imported) == set(want) and any(p.startswith('stack/') for p in want)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(imported[path]), np.asarray(value), err_msg=path)


@pytest.mark.slow
def test_a_scanned_run_learns_and_resumes_bit_exactly(tiny_config, tmp_path):
  """MoE after a dense layer, balancing bias, dropout, micro-batches: the loss falls, and a stopped
  and resumed run is the uninterrupted one bit for bit."""
  c = tiny_config
  c.model.scan_layers, c.model.num_layers, c.model.dropout = True, 3, 0.1
  c.model.moe.num_experts, c.model.moe.first_dense, c.model.moe.bias_rate = 4, 1, 0.01
  c.optim.grad_accum_steps = 2
  c.steps, c.log_every, c.eval_every, c.checkpoint.every = 30, 1, 10, 10
  straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
  train.train(run_config.build(c, num_devices=jax.device_count()), straight)
  c.optim.schedule_steps, c.steps = 30, 17
  train.train(run_config.build(c, num_devices=jax.device_count()), stopped)
  c.steps = 30
  train.train(run_config.build(c, num_devices=jax.device_count()), stopped)

  def losses(workdir):
    return [(r['step'], r['loss']) for r in metrics.read_metrics(workdir) if 'loss' in r]

  a, b = losses(straight), losses(stopped)
  assert a == b and [s for s, _ in b] == list(range(1, 31))
  assert a[-1][1] < a[0][1] - 1.0, (a[0], a[-1])
  imbalance = [
    [r.get('moe_imbalance_layer2') for r in metrics.read_metrics(w) if 'loss' in r]
    for w in (straight, stopped)
  ]
  assert imbalance[0] == imbalance[1] and None not in imbalance[0]


def test_stack_conversions_round_trip():
  values = {
    'embed/embedding': np.zeros((3, 2)),
    **{f'blocks/{i}/attn/q': np.full((2, 2), i) for i in range(4)},
  }
  stacked = stack.to_layout(values, 1, 4)
  assert set(stacked) == {'embed/embedding', 'blocks/0/attn/q', 'stack/attn/q'}
  assert stacked['stack/attn/q'].shape == (3, 2, 2) and stacked['stack/attn/q'][2, 0, 0] == 3
  back = stack.to_layout(stacked, 4, 4)
  assert set(back) == set(values)
  for path, x in values.items():
    np.testing.assert_array_equal(back[path], x)


def _draws(c) -> int:
  """The places the model's initialiser draws random numbers: random_bits equations, each call
  of a nested jaxpr (jax.random's jitted samplers) counted where it is called, a loop's body
  once (JAX prints a jaxpr called twice once, so its text cannot count them)."""
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, VOCAB)

  def count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == 'random_bits'
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else (value,):
          sub = getattr(sub, 'jaxpr', sub)  # A closed jaxpr's own.
          if hasattr(sub, 'eqns'):
            n += count(sub)
    return n

  return count(jax.make_jaxpr(lambda: state_lib._params(run.model_cfg, 0))().jaxpr)


@pytest.mark.parametrize('scan', [False, True])
def test_the_initialiser_does_not_grow_with_depth(scan):
  """Alike layers are drawn by one compiled builder (stack.alike): 2 and 6 layers draw in as many
  places, so start-up's initialisation compiles the same program whatever the depth."""
  shallow, deep = (_config('llama', {'model.num_layers': n}, scan=scan) for n in (2, 6))
  assert _draws(shallow) == _draws(deep) > 0


@pytest.mark.parametrize('scan', [False, True])
def test_blocks_draw_what_one_after_another_would(scan):
  """Each block's values are those of building Block(cfg, i, rngs) for i in turn, for a
  Mixture-of-Experts model's dense layer and its experts' layers (two runs of alike layers),
  and the parameters after the blocks draw on from where they would. Both under jit, as every
  initialisation runs (eagerly, op by op, a draw may round an ulp apart from its compiled self)."""
  from flax import nnx

  from pretrax.model import transformer

  c = run_config.build(_config(*CASES['moe_first_dense'], scan=scan), check_data=False)
  cfg = state_lib.build(c, VOCAB).model_cfg

  def one_after_another():
    rngs = nnx.Rngs(params=5)
    transformer.layers.Embed(  # What the model builds before its blocks.
      cfg.vocab_size,
      cfg.embed_dim,
      std=cfg.init_std,
      param_dtype=jnp.float32,
      dtype=jnp.float32,
      rngs=rngs,
    )
    blocks = [nnx.to_pure_dict(nnx.state(transformer.Block(cfg, i, rngs))) for i in range(3)]
    return blocks, nnx.to_pure_dict(nnx.state(transformer._norm(cfg, rngs)))

  blocks, final_norm = jax.jit(one_after_another)()
  model = jax.jit(lambda: nnx.to_pure_dict(nnx.state(transformer.build(cfg, 5))))()
  built = stack.to_unrolled(_flat(model), transformer.first_scanned(cfg))
  assert cfg.num_layers == len(blocks)
  by_hand = {f'blocks/{i}/{p}': v for i, b in enumerate(blocks) for p, v in _flat(b).items()}
  assert {k for k in built if k.startswith('blocks/')} == by_hand.keys()
  for path, v in by_hand.items():
    assert np.array_equal(built[path], v), path
  for path, v in _flat(final_norm).items():
    assert np.array_equal(built[f'final_norm/{path}'], v), path
