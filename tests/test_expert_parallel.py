"""Expert parallelism on 8 fake CPU devices: an MoE model's loss and gradients on every expert-
parallel degree (with data, fsdp and tensor parallelism beside it) equal one device's, the experts
sit where the rules put them, the tokens travel by the collectives each computation is meant to
use, and a run resumes on another degree as if nothing had changed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, fake_devices_env, run_python
from pretrax import metrics

# (data, fsdp, expert, tensor) meshes of 8 devices: every expert-parallel degree, alone and with
# the other axes; (1, 4, 1, 2) and (8, 1, 1, 1) keep every expert on every device.
MESHES = {
  'dropless': [
    (1, 1, 8, 1),
    (2, 1, 4, 1),
    (1, 2, 4, 1),
    (1, 1, 4, 2),
    (2, 1, 2, 2),
    (1, 4, 1, 2),
    (8, 1, 1, 1),
  ],
  'capacity': [(1, 1, 8, 1), (1, 2, 4, 1), (1, 2, 2, 2), (4, 1, 2, 1)],
}

_GRADS_ON_MESHES = r"""
import json, re
import jax, jax.numpy as jnp, numpy as np
from pretrax import config as config_lib, run_config, state as state_lib, step as step_lib
from pretrax.data.batch import Batch

def config(mesh, factor):
  c = config_lib.base_config()
  c.model.flavour, c.model.num_layers, c.model.embed_dim, c.model.num_heads = 'llama', 2, 32, 4
  c.model.vocab_multiple = 8
  c.data.seq_len, c.data.batch_size = 16, 8
  c.model.moe.num_experts, c.model.moe.expert_dim, c.model.moe.top_k = 8, 24, 2
  c.model.moe.shared_experts, c.model.moe.capacity_factor = 1, factor
  c.mesh.data, c.mesh.fsdp, c.mesh.expert, c.mesh.tensor = mesh
  return run_config.build(c, num_devices=int(np.prod(mesh)), check_data=False)

ids = jax.random.randint(jax.random.key(0), (8, 17), 1, 50)
ones = jnp.ones((8, 16), jnp.int32)
BATCH = Batch(inputs=ids[:, :-1], segment_ids=ones, targets=ids[:, 1:],
              positions=jnp.broadcast_to(jnp.arange(16), (8, 16)), weights=ones.astype(jnp.float32),
              prefix=jnp.zeros_like(ones), objective=jnp.zeros_like(ones))

def grads(mesh, factor):
  c = config(mesh, factor)
  run = state_lib.build(c, 56, devices=jax.devices()[: int(np.prod(mesh))])
  params = run.init_params(0)
  cfg = step_lib.step_config(c)
  fn = lambda p, b: step_lib._grads(p, b, jnp.float32(128), run.model_def, cfg, None)
  step = jax.jit(step_lib._traced_with(fn, run.activation_sharding))
  batch = jax.device_put(BATCH, run.batch_sharding)
  g, sums = step(params, batch)
  wi = params['blocks'][0]['mlp']['wi']
  hlo = step.lower(params, batch).compile().as_text()
  return {
    'loss': float(sums['objective_sum']),
    'grads': [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(g))],
    'wi_spec': [a if a is None or isinstance(a, str) else list(a) for a in wi.sharding.spec],
    'wi_shard': list(wi.addressable_shards[0].data.shape),
    'collectives': [op for op in ('all-to-all', 'all-gather', 'reduce-scatter') if op in hlo],
    # The longest sort: dropless sorts token copies by expert (8 x 16 tokens x top-2 in all).
    'sorted': max(
      [int(n) for n in re.findall(r'= \(?s32\[(\d+)\]\S* (?:s32\[\d+\]\S* )?sort\(', hlo)] or [0]
    ),
  }

out = {}
for kind, factor in (('dropless', 0.0), ('capacity', 2.0)):
  out[kind] = {'single': grads((1, 1, 1, 1), factor)}
  for mesh in MESHES[kind]:
    out[kind][str(mesh)] = grads(mesh, factor)
print(json.dumps(out))
"""


@pytest.fixture(scope='module')
def on_meshes() -> dict:
  script = f'MESHES = {MESHES!r}\n' + _GRADS_ON_MESHES
  return json.loads(run_python(script, devices=8, timeout=900).splitlines()[-1])


@pytest.mark.parametrize('kind', ['dropless', 'capacity'])
def test_every_expert_parallel_degree_gives_one_devices_loss_and_gradients(on_meshes, kind):
  single = on_meshes[kind]['single']
  assert single['collectives'] == []
  for mesh in MESHES[kind]:
    got = on_meshes[kind][str(mesh)]
    # A sum over 128 tokens' losses (~550): the reduction order moves its last bits only.
    np.testing.assert_allclose(got['loss'], single['loss'], rtol=1e-6, err_msg=str(mesh))
    for g, ref in zip(got['grads'], single['grads'], strict=True):
      np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-6, err_msg=str(mesh))


@pytest.mark.parametrize('kind', ['dropless', 'capacity'])
def test_experts_live_on_their_devices_and_tokens_travel_to_them(on_meshes, kind):
  for mesh in MESHES[kind]:
    data, fsdp, expert, tensor = mesh
    got = on_meshes[kind][str(mesh)]
    # The rules: experts over `expert`, each expert's embed over fsdp and hidden over tensor.
    assert got['wi_spec'] == ['expert', 'fsdp', 'tensor'], mesh
    assert got['wi_shard'] == [8 // expert, 32 // fsdp, 24 // tensor], mesh
    if expert > 1 and kind == 'capacity':  # Its (groups, experts, capacity, embed) buffers move.
      assert 'all-to-all' in got['collectives'], mesh
    elif expert > 1:  # Every token to every device of the axis, each expert's share summed back.
      assert {'all-gather', 'reduce-scatter'} <= set(got['collectives']), mesh
      assert 'all-to-all' not in got['collectives'], mesh
  if kind == 'dropless':  # A device sorts its own tokens' copies (and its expert group's).
    assert on_meshes[kind]['single']['sorted'] == 256
    for mesh in MESHES[kind]:
      data, fsdp, expert, tensor = mesh
      assert on_meshes[kind][str(mesh)]['sorted'] == 256 // (data * fsdp), mesh


# ---- A run that changes its expert-parallel degree when it resumes ------------------------------

TINY = os.path.join(REPO, 'configs', 'tiny.py')
STEPS, HALF = 8, 4


def _train(workdir, corpus_path, expert: int, devices: int) -> None:
  args = [
    'train',
    f'--config={TINY}:llama',
    f'--workdir={workdir}',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    f'--config.steps={STEPS}',
    '--config.log_every=1',
    '--config.eval_every=1000',
    f'--config.checkpoint.every={HALF}',
    '--config.checkpoint.async_save=false',
    '--config.model.vocab_multiple=8',
    '--config.model.moe.num_experts=8',
    '--config.model.moe.top_k=2',
    '--config.model.moe.bias_rate=0.01',
    f'--config.mesh.expert={expert}',
    PEAK_FLOPS_ARG,
  ]
  result = subprocess.run(
    [sys.executable, '-m', 'pretrax.cli', *args],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=600,
    env=fake_devices_env(devices),
  )
  assert result.returncode == 0, result.stderr[-3000:]


def _losses(workdir) -> list[float]:
  records = [(r['step'], r['loss']) for r in metrics.read_metrics(str(workdir)) if 'loss' in r]
  assert [s for s, _ in records] == list(range(1, STEPS + 1))
  return [loss for _, loss in records]


@pytest.mark.slow
def test_a_run_resumes_on_another_expert_parallel_degree(tmp_path, corpus_path):
  """8 experts over 4 devices (data 2) for the whole run; the same run stopped at HALF goes on
  with the experts over 2 devices (data 4) and on one device: the same losses."""
  whole = tmp_path / 'whole'
  _train(whole, corpus_path, expert=4, devices=8)
  for expert, devices in ((2, 8), (1, 1)):
    resumed = tmp_path / f'resumed_{expert}'
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / 'checkpoints' / str(STEPS))  # Back to the checkpoint at HALF.
    _train(resumed, corpus_path, expert=expert, devices=devices)
    np.testing.assert_allclose(_losses(resumed), _losses(whole), rtol=1e-5, err_msg=str(expert))
  assert _losses(whole)[-1] < _losses(whole)[0]
