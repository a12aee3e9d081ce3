"""The optimizer's decay mask and schedules, and parameter shardings that follow the rules table."""

import textwrap

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from conftest import load_config, run_python
from pretrax import optim, run_config, sharding
from pretrax import state as state_lib
from pretrax.config_types import OptimSection


def _optim_cfg(**changes) -> OptimSection:
  c = load_config('tiny')
  c.steps = 100
  for k, v in changes.items():
    c.optim[k] = v
  return run_config.build(c, check_data=False).optim


def test_decay_mask_spares_embeddings_norms_and_biases_by_default():
  c = load_config('tiny')
  c.model.use_bias = True
  run = state_lib.build(run_config.build(c, check_data=False), vocab_size=64)
  params = run.abstract['params']
  mask = optim.decay_mask(params, _optim_cfg())
  assert mask['embed']['embedding'] is False
  assert mask['pos_embed'] is False
  assert mask['final_norm']['scale'] is False
  assert mask['blocks'][0]['mlp']['bi'] is False
  assert mask['blocks'][0]['mlp']['wi'] is True and mask['blocks'][0]['attn']['q'] is True
  both = optim.decay_mask(params, _optim_cfg(decay_embeddings=True, decay_norms_and_biases=True))
  assert all(jax.tree.leaves(both))


@pytest.mark.parametrize('schedule', ['cosine', 'wsd', 'constant'])
def test_schedules_warm_up_then_follow_their_shape(schedule):
  cfg = _optim_cfg(schedule=schedule, lr=1.0, min_lr=0.1, warmup_steps=10, decay_fraction=0.2)
  lr = np.array([float(optim.schedule(cfg)(s)) for s in range(101)])
  np.testing.assert_allclose(lr[:11], np.linspace(0, 1, 11), atol=1e-6)
  if schedule == 'cosine':
    assert np.all(np.diff(lr[10:]) <= 1e-7) and abs(lr[100] - 0.1) < 1e-6
  elif schedule == 'wsd':
    np.testing.assert_allclose(lr[10:81], 1.0, atol=1e-6)  # Stable until the last 20%.
    assert abs(lr[100] - 0.1) < 1e-6 and np.all(np.diff(lr[80:]) < 0)
  else:
    np.testing.assert_allclose(lr[10:], 1.0, atol=1e-6)


def test_unknown_logical_axis_is_an_error():
  with pytest.raises(sharding.ShardingError, match="'shards_of_nothing' has no rule"):
    sharding.logical_to_spec(('embed', 'shards_of_nothing'), sharding.DEFAULT_RULES)


def _mesh(c):
  return run_config.build(c, check_data=False).mesh


def test_rules_from_config_override_the_table_and_reject_impossible_entries():
  c = load_config('tiny')
  c.mesh.rules = 'embed=, mlp=fsdp+tensor'
  rules = sharding.rules(_mesh(c))
  assert rules['embed'] is None and rules['mlp'] == ('fsdp', 'tensor')
  assert sharding.logical_to_spec(('embed', 'mlp'), rules) == P(None, ('fsdp', 'tensor'))
  # A dispatched capacity buffer's groups keep the batch's axes less the experts' ones, unless set.
  c.mesh.rules = 'experts=fsdp'
  assert sharding.rules(_mesh(c))['expert_batch'] == ('data', 'expert')
  c.mesh.rules = 'experts=fsdp, expert_batch=data'
  assert sharding.rules(_mesh(c))['expert_batch'] == 'data'
  c.mesh.rules = 'mlp=fsdp+tensor'  # embed is on fsdp too: one axis, two dims.
  with pytest.raises(sharding.ShardingError, match="map mesh axis 'fsdp' to two dimensions"):
    sharding.logical_to_spec(('embed', 'mlp'), sharding.rules(_mesh(c)))
  for bad, message in (
    ('embd=fsdp', 'expected LOGICAL=AXIS'),
    ('embed=model', "unknown mesh axis 'model'"),
  ):
    c.mesh.rules = bad
    with pytest.raises(sharding.ShardingError, match=message):
      sharding.rules(_mesh(c))


def test_mesh_shape_resolves_minus_one_and_rejects_bad_shapes():
  c = load_config('tiny')
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 2, 2
  assert sharding.mesh_shape(_mesh(c), 8) == {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}
  c.mesh.data, c.mesh.expert = 1, 2
  assert sharding.mesh_shape(_mesh(c), 8) == {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 2}
  c.mesh.data = 3
  with pytest.raises(sharding.ShardingError, match='needs 24 devices but there are 8'):
    sharding.mesh_shape(_mesh(c), 8)


def test_every_logical_name_in_every_config_resolves():
  for name in ('tiny', 'shakespeare_char', 'gpt2_small', 'llama_1b'):
    c = load_config(name)
    run = state_lib.build(run_config.build(c, check_data=False), c.tokenizer.vocab_size)
    assert jax.tree.leaves(run.shardings['params'])


def test_params_and_moments_are_sharded_as_the_rules_say_on_8_devices():
  """On a (2, 2, 2) mesh of fake CPU devices; a subprocess, since devices are fixed at start-up."""
  script = textwrap.dedent("""
      import jax
      from conftest import load_config
      from pretrax import run_config
      from pretrax import state as state_lib
      from jax.sharding import PartitionSpec as P
      c = load_config('tiny', 'llama')
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
      c = run_config.build(c, num_devices=8, check_data=False)
      run = state_lib.build(c, vocab_size=64)
      state = run.init(0)
      attn = state['params']['blocks'][0]['attn']
      assert attn['q'].sharding.spec == P('fsdp', 'tensor', None), attn['q'].sharding.spec
      assert state['params']['embed']['embedding'].sharding.spec == P('tensor', 'fsdp')
      assert state['params']['final_norm']['scale'].sharding.spec == P(None,)
      mu = state['opt_state'][1][0].mu['blocks'][0]['mlp']['wo']
      assert mu.sharding.spec == P('tensor', 'fsdp'), mu.sharding.spec
      assert len(attn['q'].addressable_shards) == 8
      # A vocabulary the tensor axis cannot split evenly names the field that rounds it up.
      from pretrax import sharding
      try:
        state_lib.build(c, vocab_size=63)
        raise AssertionError('63 rows split 2 ways must be refused')
      except sharding.ShardingError as e:
        assert 'vocab, size 63' in str(e) and '--config.model.vocab_multiple' in str(e), e
      # An expert width the tensor axis cannot split names the field that sets it.
      c = load_config('tiny', 'llama')
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
      c.model.moe.num_experts, c.model.moe.expert_dim = 4, 25
      c = run_config.build(c, num_devices=8, check_data=False)
      try:
        state_lib.build(c, vocab_size=64)
        raise AssertionError('an expert width of 25 split 2 ways must be refused')
      except sharding.ShardingError as e:
        assert 'expert_mlp, size 25' in str(e) and 'model.moe.expert_dim' in str(e), e
      print('ok', jax.device_count())
  """)
  stdout = run_python(script, devices=8, timeout=300)
  assert stdout.strip().endswith('ok 8')
