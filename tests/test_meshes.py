"""One model trained on many meshes of 8 fake CPU devices: the same losses on each, and checkpoints
that move between meshes and device counts and go on as if nothing had changed."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import (
  PEAK_FLOPS,
  PEAK_FLOPS_ARG,
  REPO,
  built_once,
  fake_devices_env,
  require,
  run_python,
)
from pretrax import metrics

TINY = os.path.join(REPO, 'configs', 'tiny.py')
STEPS, HALF = 10, 5
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]
# Four heads and a vocabulary padded to a multiple of 8, so that every mesh divides the weights.
MODEL = ['--config.model.num_heads=4', '--config.model.vocab_multiple=8']


def train_args(workdir, corpus_path, mesh=None) -> list[str]:
  args = [
    'train',
    f'--config={TINY}',
    f'--workdir={workdir}',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    f'--config.steps={STEPS}',
    '--config.log_every=1',
    '--config.eval_every=1000',
    f'--config.checkpoint.every={HALF}',
    PEAK_FLOPS_ARG,
    *MODEL,
  ]
  if mesh:
    args += [
      f'--config.mesh.{axis}={size}'
      for axis, size in zip(('data', 'fsdp', 'tensor'), mesh, strict=True)
    ]
  return args


def run_on(devices: int, args: list[str]) -> str:
  result = subprocess.run(
    [sys.executable, '-m', 'pretrax.cli', *args],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=600,
    env=fake_devices_env(devices),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Involuntary full rematerialization' not in result.stderr  # Shardings that XLA can follow.
  return result.stdout


def losses(workdir) -> list[float]:
  records = [(r['step'], r['loss']) for r in metrics.read_metrics(str(workdir)) if 'loss' in r]
  assert [s for s, _ in records] == list(range(1, STEPS + 1)), 'a step missing or logged twice'
  return [loss for _, loss in records]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus_path) -> dict:
  """Every mesh's run, in one process of 8 devices (one start-up for all four); the single-device
  run goes through the CLI, with the same settings as these. Made once for all workers."""

  def name(mesh):
    return 'x'.join(map(str, mesh))

  def build(root):
    script = f"""
        from conftest import load_config
        import jax
        from pretrax import run_config, train
        for mesh, workdir in {[(m, str(root / name(m))) for m in MESHES]!r}:
          c = load_config('tiny')
          c.data.path, c.data.fallback = {corpus_path!r}, ''
          c.steps, c.log_every, c.eval_every, c.checkpoint.every = {STEPS}, 1, 1000, {HALF}
          c.model.num_heads, c.model.vocab_multiple = 4, 8
          c.peak_flops = {PEAK_FLOPS!r}
          c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
          train.train(run_config.build(c, num_devices=jax.device_count()), workdir)
    """
    run_python(script, devices=8, timeout=900)
    run_on(1, train_args(root / '1x1x1', corpus_path))

  root = pathlib.Path(built_once(tmp_path_factory, 'meshes', build))
  return {'single': root / '1x1x1', **{mesh: root / name(mesh) for mesh in MESHES}}


@pytest.mark.slow
def test_every_mesh_trains_to_the_same_losses(runs):
  reference = losses(runs['single'])
  assert reference[-1] < reference[0] - 1.0  # It learns.
  for mesh in MESHES:
    np.testing.assert_allclose(losses(runs[mesh]), reference, rtol=1e-5, err_msg=str(mesh))


@pytest.mark.slow
@pytest.mark.parametrize(
  'devices,mesh', [(4, (1, 4, 1)), (1, None)], ids=['to_1x4x1_on_4_devices', 'to_one_device']
)
def test_a_checkpoint_from_2x2x2_resumes_on_another_mesh(
  runs, tmp_path, corpus_path, devices, mesh
):
  workdir = tmp_path / 'run'
  shutil.copytree(runs[(2, 2, 2)], workdir)
  shutil.rmtree(workdir / 'checkpoints' / str(STEPS))  # Back to the checkpoint at HALF.
  run_on(devices, train_args(workdir, corpus_path, mesh))
  np.testing.assert_allclose(losses(workdir), losses(runs[(2, 2, 2)]), rtol=1e-5)


@pytest.mark.slow
def test_sample_from_a_2x2x2_run_on_one_device(runs):
  text = run_on(1, ['sample', f'--workdir={runs[(2, 2, 2)]}', '--prompt=The', '--length=20'])
  assert text.startswith('The') and len(text.strip()) > len('The')


@pytest.mark.slow
def test_export_a_2x2x2_checkpoint_to_transformers(runs, tmp_path):
  """Export reads a checkpoint that 8 devices wrote in shards, one parameter at a time, on this
  one-device process; transformers then computes what pretrax computes from that checkpoint."""
  torch = require('torch')
  transformers = require('transformers')
  from flax import nnx
  import jax.numpy as jnp

  from pretrax import checkpoint, run_config
  from pretrax import state as state_lib
  from pretrax import tokenizer as tokenizer_lib
  from pretrax.interop import hf_export

  workdir = str(runs[(2, 2, 2)])
  hf_export.export(workdir, str(tmp_path / 'hf'), log=lambda _: None)
  model = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / 'hf')).eval()

  mngr = checkpoint.manager(workdir, read_only=True)
  # On this one device: the mesh data=-1, fsdp=1, tensor=1.
  c = run_config.on_local_devices(run_config.from_saved(checkpoint.restore_config(mngr, STEPS)))
  tok = tokenizer_lib.Tokenizer.load(os.path.join(workdir, 'tokenizer.model'))
  run = state_lib.build(c, tok.vocab_size)
  state, _ = checkpoint.restore(mngr, STEPS, run.abstract)
  mngr.close()
  ids = tok.encode('To be, or not to be')
  L = len(ids)
  ours = np.asarray(
    nnx.merge(run.model_def, state['params'])(
      jnp.asarray([ids]), jnp.ones((1, L), jnp.int32), jnp.arange(L)[None]
    )
  )[0]
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  assert np.abs(ours - theirs).max() < 1e-4
