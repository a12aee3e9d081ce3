"""Training end to end (in process): the loss falls, and a stopped-and-resumed run is the same
run."""

import os

import jax
import numpy as np
import pytest

from conftest import PEAK_FLOPS, SHAKESPEARE, load_config
from pretrax import checkpoint, metrics, run_config, tokenizer, train
from pretrax import config as config_lib
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax.data.batch import Batch


def _train(c, workdir: str) -> dict:
  """`train.train` on `c` as the command line builds it: validated for this process's devices."""
  return train.train(run_config.build(c, num_devices=jax.device_count()), workdir)


def test_loss_falls_on_real_text(tiny_config, tmp_path):
  tiny_config.steps, tiny_config.log_every = 60, 1
  result = _train(tiny_config, str(tmp_path))
  records = [r for r in metrics.read_metrics(str(tmp_path)) if 'loss' in r]
  first, last = records[0]['loss'], records[-1]['loss']
  assert last < first - 2.0, (first, last)
  eval_loss = result['eval']['eval_loss']
  vocab = tokenizer.Tokenizer.load(str(tmp_path / 'tokenizer.model')).vocab_size
  assert eval_loss < np.log(vocab) - 2.0  # Far better than guessing uniformly.
  assert result['eval']['eval_bits_per_byte'] > 0
  assert os.listdir(tmp_path / 'checkpoints')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))


def _final_params(workdir, c, step):
  tok = tokenizer.Tokenizer.load(os.path.join(workdir, 'tokenizer.model'))
  run = state_lib.build(run_config.build(c, check_data=False), tok.vocab_size)
  mngr = checkpoint.manager(workdir, read_only=True)
  state, _ = checkpoint.restore(mngr, step, run.abstract)
  mngr.close()
  return jax.device_get(state['params'])


@pytest.mark.parametrize(
  'accum, objective, experts, optimizer',
  [
    (1, 'causal_lm', 0, 'adamw'),
    (2, 'causal_lm', 0, 'adamw'),
    (1, 'masked_lm', 0, 'adamw'),
    (2, 'causal_lm:1,span_corruption:1,prefix_lm:1', 0, 'adamw'),
    # Mixture-of-Experts: the routing losses and the balancing bias (a parameter the step sets
    # itself, outside the optimizer) must also continue where they stopped.
    (2, 'causal_lm', 4, 'adamw'),
    # Muon's momentum (and AdamW's moments of the other parameters), experts as a batch axis.
    (1, 'causal_lm', 4, 'muon'),
  ],
)
def test_stop_and_resume_equals_uninterrupted(
  tiny_config, tmp_path, accum, objective, experts, optimizer
):
  c = tiny_config
  c.steps, c.log_every, c.eval_every, c.checkpoint.every = 30, 1, 10, 10
  c.optim.grad_accum_steps = accum
  c.optim.name = optimizer
  c.model.moe.num_experts, c.model.moe.bias_rate = experts, 0.01
  c.objective = objective  # Masks, spans and splits must also be the same after resuming.
  c.model.dropout = 0.1  # Dropout keys must also continue where they stopped.
  straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
  _train(c, straight)

  # Stop after 17 of the schedule's 30 steps, then run the same command to the end.
  c.optim.schedule_steps = 30
  c.steps = 17
  _train(c, stopped)
  c.steps = 30
  _train(c, stopped)

  a, b = metrics.read_metrics(straight), metrics.read_metrics(stopped)
  train_steps = [r['step'] for r in b if 'loss' in r]
  assert train_steps == list(range(1, 31)), 'a step is missing or logged twice'

  def losses(recs):
    return [(r['step'], r['loss']) for r in recs if 'loss' in r]

  def evals(recs):
    return [(r['step'], r['eval_loss']) for r in recs if 'eval_loss' in r]

  assert losses(a) == losses(b)  # Bit for bit.
  assert evals(b)[-1] == evals(a)[-1]
  routing = [[(r['step'], r.get('moe_imbalance')) for r in recs if 'loss' in r] for recs in (a, b)]
  assert routing[0] == routing[1]
  for x, y in zip(
    jax.tree.leaves(_final_params(straight, c, 30)),
    jax.tree.leaves(_final_params(stopped, c, 30)),
    strict=True,
  ):
    np.testing.assert_array_equal(x, y)


def test_gradient_accumulation_matches_the_full_batch(tiny_config, tmp_path):
  c = tiny_config
  c.steps, c.log_every, c.eval_every = 5, 1, 5
  _train(c, str(tmp_path / 'full'))
  c.optim.grad_accum_steps = 4
  _train(c, str(tmp_path / 'accumulated'))
  full = [r['loss'] for r in metrics.read_metrics(str(tmp_path / 'full')) if 'loss' in r]
  accumulated = [
    r['loss'] for r in metrics.read_metrics(str(tmp_path / 'accumulated')) if 'loss' in r
  ]
  np.testing.assert_allclose(full, accumulated, rtol=2e-5)


def test_resume_with_a_different_model_is_refused(tiny_config, tmp_path):
  tiny_config.steps = 2
  _train(tiny_config, str(tmp_path))
  tiny_config.model.num_layers = 3
  with pytest.raises(config_lib.ConfigError, match='model.num_layers: 2 -> 3'):
    _train(tiny_config, str(tmp_path))


@pytest.mark.slow
def test_masked_lm_learns_well_beyond_the_most_frequent_token(corpus_path, tmp_path):
  """A shortened configs/shakespeare_mlm.py: masked accuracy at least twice the baseline's."""
  c = load_config('shakespeare_mlm')
  c.data.path, c.data.fallback = corpus_path, ''
  c.steps, c.eval_every, c.log_every, c.sample.length = 300, 300, 100, 0
  c.peak_flops = PEAK_FLOPS
  result = _train(c, str(tmp_path))['eval']
  # Twice the baseline is the bar on Shakespeare (61% vs 15% after the full run; 300 steps reach
  # 2.8 times it). Without ../shared the corpus is Python source, where spaces are a third of the
  # text and the baseline is twice as high; 300 steps reach 1.7-1.8 times it there (Python 3.11 to
  # 3.13; 400 steps, 1.8-1.9).
  bar = 2.0 if os.path.exists(SHAKESPEARE) else 1.5
  assert result['eval_accuracy'] > bar * result['eval_baseline_accuracy'], result


def _spike_setup():
  """A tiny run with a 4-loss spike window, its jitted step, one batch to memorise, and a batch
  of random targets that must look like a spike once the window is full."""
  c = load_config('tiny')
  c.optim.spike_window, c.optim.spike_threshold = 4, 3.0
  c.optim.warmup_steps, c.steps = 0, 100
  c = run_config.build(c, check_data=False)
  run = state_lib.build(c, vocab_size=64)
  step = step_lib.jit_train_step(
    run.model_def, run.optimizer, run.schedule, step_lib.step_config(c)
  )
  rng = np.random.default_rng(0)
  B, L = c.data.batch_size, c.data.seq_len
  inputs = rng.integers(5, 64, (B, L)).astype(np.int32)
  batch = Batch(
    inputs=inputs,
    segment_ids=np.ones((B, L), np.int32),
    positions=np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
    targets=np.roll(inputs, -1, axis=1),
    weights=np.ones((B, L), np.float32),
    prefix=np.zeros((B, L), np.int32),
    objective=np.zeros((B, L), np.int32),
  )
  state = run.init(0)
  surprise = batch._replace(targets=rng.integers(5, 64, (B, L)).astype(np.int32))
  return c, run, step, state, batch, surprise


def test_a_loss_spike_is_skipped_and_kept_out_of_the_window():
  _, _, step, state, batch, surprise = _spike_setup()
  for _ in range(20):  # Memorise one batch: the window fills with low, steady losses.
    state, m = step(state, batch)
    assert int(m['skipped']) == 0
  before = jax.device_get(state)
  state, m = step(state, surprise)
  assert int(m['spike']) == 1 and int(m['skipped']) == 1, jax.device_get(m)
  after = jax.device_get(state)
  for x, y in zip(jax.tree.leaves(before['params']), jax.tree.leaves(after['params']), strict=True):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(before['loss_window']['losses'], after['loss_window']['losses'])
  assert int(after['loss_window']['count']) == 20 and int(after['step']) == 21
  state, m = step(state, batch)  # An ordinary loss is taken again and enters the window.
  assert int(m['skipped']) == 0 and int(jax.device_get(state)['loss_window']['count']) == 21


def test_the_spike_window_survives_a_checkpoint(tmp_path):
  """The window is train state: a resumed run judges the next loss against the same history (a
  fresh window would not judge it at all until full)."""
  c, run, step, state, batch, surprise = _spike_setup()
  for _ in range(20):
    state, _ = step(state, batch)
  mngr = checkpoint.manager(str(tmp_path), keep=1, async_save=False)
  checkpoint.save(mngr, 20, state, run_config.to_dict(c))
  checkpoint.wait(mngr)
  restored, _ = checkpoint.restore(mngr, 20, run.abstract)
  mngr.close()
  np.testing.assert_array_equal(
    jax.device_get(restored['loss_window']['losses']),
    jax.device_get(state['loss_window']['losses']),
  )
  assert int(restored['loss_window']['count']) == 20
  _, m = step(restored, surprise)
  assert int(m['spike']) == 1 and int(m['skipped']) == 1, jax.device_get(m)


def test_bfloat16_compute_tracks_float32(tiny_config, tmp_path):
  """Mixed precision as accelerators run it (float32 parameters and optimizer state, bfloat16
  matmuls and attention, float32 logits and loss) follows the float32 loss curve."""
  c = tiny_config
  c.steps, c.log_every, c.eval_every = 40, 1, 40
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    c.model.dtype = dtype
    result = _train(c, str(tmp_path / dtype))
    losses[dtype] = np.array(
      [r['loss'] for r in metrics.read_metrics(str(tmp_path / dtype)) if 'loss' in r]
    )
    losses[dtype + '_eval'] = result['eval']['eval_loss']
  f32, bf16 = losses['float32'], losses['bfloat16']
  assert f32[-1] < f32[0] - 1.5  # Both learn...
  # ...along the same curve: means over 5 steps (single steps of a model this small can swing
  # by 10% on one batch either way) agree within 3%.

  def window_means(x):
    return x.reshape(-1, 5).mean(axis=1)

  np.testing.assert_allclose(window_means(bf16), window_means(f32), rtol=0.03)
  assert abs(losses['bfloat16_eval'] - losses['float32_eval']) < 0.05
  params = _final_params(str(tmp_path / 'bfloat16'), c, 40)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))  # Master weights stay f32.
