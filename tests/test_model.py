"""The model: causality and document isolation by gradient, remat, GELU, GQA, every config
builds."""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, load_config
from pretrax import optim, run_config
from pretrax import state as state_lib
from pretrax.data.batch import Batch
from pretrax.model import attention, layers, masks, transformer

L = 16


def small_model(
  flavour: str = 'gpt2', objective: str = 'causal_lm', **overrides
) -> transformer.Transformer:
  c = load_config('tiny', 'llama' if flavour == 'llama' else None)
  c.data.seq_len = L
  c.objective = objective
  for k, v in overrides.items():
    c.model[k] = v
  return transformer.build(run_config.model_config(run_config.build(c, check_data=False), 50), 0)


def embedding_grads(model, ids_BL, segment_ids_BL, positions_BL, out_position, prefix_BL=None):
  """d(sum of logits at `out_position`) / d(input embeddings at every position): (B, L)."""
  graphdef, params = nnx.split(model)

  def out(x_BLD):
    logits = nnx.merge(graphdef, params).decode(x_BLD, segment_ids_BL, positions_BL, prefix_BL)
    return jnp.sum(logits[:, out_position])

  x_BLD = model.embed_tokens(ids_BL, positions_BL)
  grads_BLD = jax.jit(jax.grad(out))(x_BLD)
  return jnp.max(jnp.abs(grads_BLD), axis=-1)


@pytest.mark.parametrize('flavour', ['gpt2', 'llama'])
def test_output_does_not_depend_on_later_inputs(flavour):
  model = small_model(flavour)
  ids = jnp.arange(L, dtype=jnp.int32)[None] % 50
  seg = jnp.ones((1, L), jnp.int32)
  pos = jnp.arange(L, dtype=jnp.int32)[None]
  t = 7
  g = embedding_grads(model, ids, seg, pos, t)[0]
  assert np.all(g[t + 1 :] == 0.0), g
  assert np.all(g[: t + 1] > 0.0), g


@pytest.mark.parametrize('flavour', ['gpt2', 'llama'])
def test_encoder_output_depends_on_later_inputs(flavour):
  model = small_model(flavour, objective='masked_lm')
  ids = jnp.arange(L, dtype=jnp.int32)[None] % 50
  seg = jnp.array([[1] * 12 + [0] * 4], jnp.int32)
  pos = jnp.array([list(range(12)) + [0] * 4], jnp.int32)
  g = embedding_grads(model, ids, seg, pos, 3)[0]
  assert np.all(g[:12] > 0.0), g  # Earlier and later tokens of its document alike.
  assert np.all(g[12:] == 0.0), 'the encoder attends to padding'


@pytest.mark.parametrize('flavour', ['gpt2', 'llama'])
def test_prefix_lm_sees_its_whole_prefix_and_only_the_past_after_it(flavour):
  model = small_model(flavour, objective='prefix_lm')
  ids = (jnp.arange(L, dtype=jnp.int32)[None] * 3) % 50
  # Two packed documents: positions 0-8 with a prefix of 4, then 9-15 with a prefix of 2.
  seg = jnp.array([[1] * 9 + [2] * 7], jnp.int32)
  pos = jnp.array([list(range(9)) + list(range(7))], jnp.int32)
  prefix = jnp.array([[1] * 4 + [0] * 5 + [1] * 2 + [0] * 5], jnp.int32)

  def grads(t):
    return embedding_grads(model, ids, seg, pos, t, prefix)[0]

  g = grads(1)  # Inside the first prefix: all of the prefix, nothing after it.
  assert np.all(g[:4] > 0) and np.all(g[4:] == 0), g
  g = grads(3)  # The prefix's last token does not see the first token after it.
  assert np.all(g[:4] > 0) and np.all(g[4:] == 0), g
  g = grads(4)  # The first token after the prefix: the prefix and itself.
  assert np.all(g[:5] > 0) and np.all(g[5:] == 0), g
  g = grads(9)  # The second document's prefix: its own prefix only.
  assert np.all(g[:9] == 0) and np.all(g[9:11] > 0) and np.all(g[11:] == 0), g


def test_prefix_mask_at_the_boundary():
  seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]], jnp.int32)
  prefix = jnp.array([[1, 1, 0, 0, 0, 1, 1, 0]], jnp.int32)
  mask = np.asarray(masks.attention_mask(seg, causal=True, prefix_BT=prefix)[0]).astype(int)
  np.testing.assert_array_equal(
    mask,
    [
      [1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0],
      [1, 1, 1, 1, 0, 0, 0, 0],
      [1, 1, 1, 1, 1, 0, 0, 0],
      [0, 0, 0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1, 1, 0],
      [0, 0, 0, 0, 0, 1, 1, 1],
    ],
  )


@pytest.mark.parametrize('flavour', ['gpt2', 'llama'])
def test_packed_documents_do_not_see_each_other(flavour):
  model = small_model(flavour)
  ids = (jnp.arange(L, dtype=jnp.int32)[None] * 7) % 50
  seg = jnp.array([[1] * 6 + [2] * 7 + [0] * 3], jnp.int32)
  pos = jnp.array([list(range(6)) + list(range(7)) + [0] * 3], jnp.int32)
  g = embedding_grads(model, ids, seg, pos, 10)[0]  # A token of document 2.
  assert np.all(g[:6] == 0.0), 'document 2 depends on document 1'
  assert np.all(g[13:] == 0.0), 'document 2 depends on padding'
  assert np.all(g[6:11] > 0.0)
  # The same document alone, at the start of a row, gives the same logits (at full float32
  # precision: GPUs otherwise multiply float32 in TF32, which differs by ~1e-4 between shapes).
  with jax.default_matmul_precision('float32'):
    packed = model(ids, seg, pos)[0, 6:13]
    alone = model(ids[:, 6:13], jnp.ones((1, 7), jnp.int32), pos[:, 6:13])[0]
  np.testing.assert_allclose(packed, alone, atol=1e-5)


def test_attention_mask_pattern():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(masks.attention_mask(seg, causal=True)[0])
  expected = np.array(
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool
  )
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize('policy', ['dots', 'dots_attention', 'full', 'offload'])
def test_remat_changes_nothing(policy):
  ids = jnp.arange(2 * L, dtype=jnp.int32).reshape(2, L) % 50
  seg = jnp.ones((2, L), jnp.int32)
  pos = jnp.tile(jnp.arange(L, dtype=jnp.int32), (2, 1))

  def loss_and_grads(remat):
    graphdef, params = nnx.split(small_model(remat=remat))

    def f(p):
      return jnp.mean(nnx.merge(graphdef, p)(ids, seg, pos) ** 2)

    return jax.jit(jax.value_and_grad(f))(params)

  (v0, g0), (v1, g1) = loss_and_grads('none'), loss_and_grads(policy)
  np.testing.assert_allclose(v0, v1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('policy, kept', [('dots', 0), ('dots_attention', 2), ('full', 0)])
def test_dots_attention_keeps_each_blocks_attention_output(capsys, policy, kept):
  """What the backward pass keeps, as JAX lists it: one named attention output per block (the
  tiny model has 2) with 'dots_attention', none with 'dots', which recomputes attention."""
  ids = jnp.zeros((2, L), jnp.int32)
  seg, pos = jnp.ones((2, L), jnp.int32), jnp.tile(jnp.arange(L, dtype=jnp.int32), (2, 1))
  graphdef, params = nnx.split(small_model(remat=policy))
  jax.ad_checkpoint.print_saved_residuals(
    lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, seg, pos)), params
  )
  saved = capsys.readouterr().out.splitlines()
  assert sum("named 'attention'" in line for line in saved) == kept


def test_dots_attention_keeps_the_splash_kernels_outputs(capsys):
  """Splash (in interpret mode here): its forward Pallas call's outputs are kept, so the backward
  does not rerun it; with 'dots' they are recomputed."""
  q = jax.random.normal(jax.random.key(0), (1, 128, 2, 16))
  ids = jnp.ones((1, 128), jnp.int32)

  def kept(policy):
    def f(q):
      out = attention.attention(
        q, q, q, ids, causal=True, backend='splash', platform='tpu', interpret=True
      )
      return jnp.sum(out**2)

    jax.ad_checkpoint.print_saved_residuals(
      jax.checkpoint(f, policy=transformer._REMAT_POLICIES[policy]()), q
    )
    return capsys.readouterr().out.count("output of jitted function '_splash_attention'")

  assert kept('dots_attention') >= 2 and kept('dots') == 0  # The output and the log-sum-exp.


def test_gelu_custom_gradient_matches_autodiff():
  x = jnp.linspace(-6.0, 6.0, 1001)

  def reference(v):
    return jnp.sum(jax.nn.gelu(v, approximate=True))

  np.testing.assert_allclose(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
  np.testing.assert_allclose(
    jax.grad(lambda v: jnp.sum(layers.gelu_tanh(v)))(x), jax.grad(reference)(x), atol=1e-5
  )


def test_grouped_query_attention_shapes_and_init_scale():
  model = small_model('llama')
  block = model.blocks[0].attn
  assert block.q.shape == (64, 4, 16) and block.k.shape == (64, 2, 16)
  # Output projections are scaled down by sqrt(2 * layers), as GPT-2 does.
  assert float(jnp.std(block.o[...])) < float(jnp.std(block.q[...]))


@pytest.mark.parametrize(
  'name', sorted(f[:-3] for f in os.listdir(os.path.join(REPO, 'configs')) if f.endswith('.py'))
)
def test_every_config_builds_abstractly(name):
  c = load_config(name)
  run = state_lib.build(run_config.build(c, check_data=False), c.tokenizer.vocab_size)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract['params']))
  expected = {'gpt2_small': (124e6, 125e6), 'llama_1b': (1.0e9, 1.1e9), 'bert_base': (109e6, 112e6)}
  if name in expected:
    low, high = expected[name]
    assert low <= params <= high, params
  # Every parameter has a sharding, and Adam's moments follow the parameters'.
  assert all(
    isinstance(s, jax.sharding.NamedSharding) for s in jax.tree.leaves(run.shardings['params'])
  )

  def is_adam(x):
    return isinstance(x, optax.ScaleByAdamState)

  adam = [s for s in jax.tree.leaves(run.shardings['opt_state'], is_leaf=is_adam) if is_adam(s)]
  # An MoE's router bias is set by the step, not the optimizer: it has no moments.
  optimized = optim.without_frozen(run.shardings['params'])
  params_specs = [s.spec for s in jax.tree.leaves(optimized)]
  assert len(adam) == 1 and any(spec != jax.sharding.PartitionSpec() for spec in params_specs)
  for moments in (adam[0].mu, adam[0].nu):
    assert [s.spec for s in jax.tree.leaves(moments)] == params_specs


@pytest.mark.parametrize('num_kv_heads', [4, 2])
def test_cpu_attention_matches_the_generic_path(num_kv_heads):
  """The CPU kernel (explicit softmax backward) against jax.nn.dot_product_attention."""
  B, T, N, H = 2, 12, 4, 8
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (B, T, N, H))
  k = jax.random.normal(keys[1], (B, T, num_kv_heads, H))
  v = jax.random.normal(keys[2], (B, T, num_kv_heads, H))
  seg = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
  d_out = jax.random.normal(keys[3], (B, T, N, H))
  prefix = jnp.array([[1] * 3 + [0] * 2 + [1] * 4 + [0] * 3, [1] * 6 + [0] * 6])

  def run(backend, causal, prefix_BT):
    def f(q, k, v):
      out = attention.attention(q, k, v, seg, causal=causal, prefix_BT=prefix_BT, backend=backend)
      return jnp.sum(out * d_out)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

  for causal, prefix_BT in ((True, None), (True, prefix), (False, None)):
    value_cpu, grads_cpu = run('cpu', causal, prefix_BT)
    value_ref, grads_ref = run('xla', causal, prefix_BT)
    np.testing.assert_allclose(value_cpu, value_ref, rtol=1e-5)
    for a, b in zip(grads_cpu, grads_ref, strict=True):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_layer_norm_gradient_matches_autodiff():
  x = jax.random.normal(jax.random.key(1), (3, 5, 16)) * 3 + 1
  scale = jax.random.normal(jax.random.key(2), (16,))
  d_y = jax.random.normal(jax.random.key(3), (3, 5, 16))

  def reference(x, scale):
    centred = x - jnp.mean(x, -1, keepdims=True)
    return centred / jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + 1e-5) * scale

  ours = jax.grad(lambda x, s: jnp.sum(layers.layer_norm(x, s, 1e-5) * d_y), (0, 1))(x, scale)
  ref = jax.grad(lambda x, s: jnp.sum(reference(x, s) * d_y), (0, 1))(x, scale)
  np.testing.assert_allclose(layers.layer_norm(x, scale, 1e-5), reference(x, scale), atol=1e-5)
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4)


def _param_paths(model) -> dict[str, tuple[int, ...]]:
  return {
    state_lib.param_path(k): v.shape
    for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
  }


def test_qk_norm_off_by_default_adds_nothing():
  """'' and 'none' build the same llama as the default, with no qk-norm parameter: today's models
  are unchanged, parameter for parameter and logit for logit."""
  ids = jnp.arange(L, dtype=jnp.int32)[None] % 50
  seg, pos = jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None]
  default, empty = small_model('llama'), small_model('llama', qk_norm='')
  assert default.cfg.qk_norm == empty.cfg.qk_norm == 'none'  # Resolved: one spelling.
  assert not any('q_norm' in p or 'k_norm' in p for p in _param_paths(default))
  for a, b in zip(
    jax.tree.leaves(nnx.state(default)), jax.tree.leaves(nnx.state(empty)), strict=True
  ):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(default(ids, seg, pos), empty(ids, seg, pos))


@pytest.mark.parametrize('kind, q, k', [('head', (16,), (16,)), ('full', (64,), (32,))])
def test_qk_norm_normalises_each_head_or_all_heads_and_trains(kind, q, k):
  from pretrax import step as step_lib  # pylint: disable=C0415

  paths = _param_paths(small_model('llama', qk_norm=kind))
  assert (paths['blocks/0/attn/q_norm/scale'], paths['blocks/0/attn/k_norm/scale']) == (q, k)
  # RMS 1 over each head (head) or over all of them together (full), with the initial scale.
  norm = small_model('llama', qk_norm=kind).blocks[0].attn.q_norm
  x_BLNH = jax.random.normal(jax.random.key(0), (2, 3, 4, 16)) * jnp.arange(1.0, 5.0)[:, None]
  y_BLNH = norm(x_BLNH)
  rms_BLN = jnp.sqrt(jnp.mean(y_BLNH**2, axis=-1))
  if kind == 'head':
    np.testing.assert_allclose(rms_BLN, 1.0, rtol=1e-4)
  else:
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(rms_BLN**2, axis=-1)), 1.0, rtol=1e-4)
    assert float(jnp.max(rms_BLN) / jnp.min(rms_BLN)) > 2  # The heads keep their proportions.

  # One train step: the loss is finite and the scales (logical axis 'norm') learn.
  c = load_config('tiny', 'llama')
  c.data.seq_len, c.model.qk_norm, c.optim.warmup_steps = L, kind, 0
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, 50)
  specs = {
    state_lib.param_path(p): s.spec
    for p, s in jax.tree_util.tree_flatten_with_path(run.shardings['params'])[0]
  }
  assert specs['blocks/0/attn/q_norm/scale'] == specs['blocks/0/attn_norm/scale']
  state = run.init(0)
  train_step = step_lib.jit_train_step(
    run.model_def, run.optimizer, run.schedule, step_lib.step_config(c)
  )
  B = c.data.batch_size
  ids = jax.random.randint(jax.random.key(1), (B, L + 1), 1, 50)
  batch = Batch(
    inputs=ids[:, :-1],
    segment_ids=jnp.ones((B, L), jnp.int32),
    positions=jnp.tile(jnp.arange(L, dtype=jnp.int32), (B, 1)),
    targets=ids[:, 1:],
    weights=jnp.ones((B, L), jnp.float32),
    prefix=jnp.zeros((B, L), jnp.int32),
    objective=jnp.zeros((B, L), jnp.int32),
  )
  before = np.asarray(state['params']['blocks'][0]['attn']['q_norm']['scale'])
  state, metrics = train_step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  assert np.any(np.asarray(state['params']['blocks'][0]['attn']['q_norm']['scale']) != before)


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'qk_norm': 'head', 'flavour': 'gpt2'}, "model.qk_norm='head' needs model.flavour=llama"),
    ({'qk_norm': 'layer'}, "model.qk_norm='layer' is not one of none, head, full"),
  ],
)
def test_qk_norm_is_refused_where_it_cannot_be_built(overrides, message):
  from pretrax import config as config_lib  # pylint: disable=C0415

  c = load_config('tiny', 'llama')
  c.model.update(overrides)
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    run_config.build(c, check_data=False)
  assert '\n' not in str(e.value)
