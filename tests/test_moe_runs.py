"""A Mixture-of-Experts model runs like any other: as an encoder and a decoder of either flavour,
with every objective, fine-tuned from its checkpoint, sampled, evaluated, and killed then resumed
to the same run. Bad MoE settings are in tests/test_cli.py."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, built_once, pretrax_env, run_cli
from pretrax import checkpoint, metrics, run_config, saved_run, tokenizer, train
from pretrax import sample as sample_lib
from pretrax import state as state_lib
from pretrax.downstream import scoring
from pretrax.downstream import tasks as tasks_lib

# 4 experts, 2 per token, with the balancing bias (a parameter the step sets, outside the
# optimizer: what a checkpoint, a fine-tune and a resume must all carry).
MOE = {'num_experts': 4, 'top_k': 2, 'bias_rate': 0.01}
# The encoder as configs/shakespeare_mlm.py builds one: Llama blocks; a sigmoid router too.
ENCODER = {'model.flavour': 'llama', 'model.moe.score': 'sigmoid'}
# The decoder: GPT-2 blocks; dropout, so that its keys must also continue after a kill; a save
# every 5 steps, so that the kill comes long before the end.
DECODER = {'model.dropout': 0.1, 'checkpoint.every': 5}


def _overrides(moe: dict, **fields) -> list[str]:
  return [f'--config.model.moe.{k}={v}' for k, v in moe.items()] + [
    f'--config.{k}={v}' for k, v in fields.items()
  ]


def _train_args(workdir, corpus_path: str, *overrides: str) -> list[str]:
  return [
    'train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    '--config.log_every=1',
    PEAK_FLOPS_ARG,
    *overrides,
  ]


def _records(workdir) -> list[dict]:
  return [r for r in metrics.read_metrics(str(workdir)) if 'loss' in r]


def _assert_trained(workdir, moe_layers=(0, 1), drops=False, fell_by=1.5) -> None:
  """The loss fell, every step logged finite routing metrics for each MoE layer, and the held-out
  loss is finite."""
  records = _records(workdir)
  losses = [r['loss'] for r in records]
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - fell_by, losses
  names = ['moe_balance_loss', 'moe_router_z_loss', 'moe_imbalance', 'moe_dropped_fraction']
  for layer in moe_layers:
    names += [f'moe_imbalance_layer{layer}', f'moe_load_cv_layer{layer}']
  for r in records:
    assert all(np.isfinite(r[n]) for n in names), r
    assert r['moe_imbalance'] >= 1.0 and r['moe_balance_loss'] > 0, r
  prefix = 'moe_imbalance_layer'
  assert sorted(int(k[len(prefix) :]) for k in records[-1] if k.startswith(prefix)) == [*moe_layers]
  dropped = max(r['moe_dropped_fraction'] for r in records)
  assert dropped > 0 if drops else dropped == 0, dropped
  evals = [r for r in metrics.read_metrics(str(workdir)) if 'eval_loss' in r]
  assert evals and np.isfinite(evals[-1]['eval_loss']), evals


# ---- Every objective ---------------------------------------------------------------------------


@pytest.fixture(scope='session')
def encoder(tmp_path_factory, corpus_path) -> str:
  """A masked-LM MoE encoder, trained 30 steps by the command line (which ends by filling in
  masked held-out text: its stdout is kept in stdout.txt beside the run)."""

  def build(out):
    args = _train_args(
      out / 'run',
      corpus_path,
      '--config.objective=masked_lm',
      '--config.steps=30',
      '--config.eval_every=30',
      '--config.sample.length=64',
      *_overrides(MOE, **ENCODER),
    )
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / 'stdout.txt').write_text(result.stdout)

  return os.path.join(built_once(tmp_path_factory, 'moe_encoder', build), 'run')


@pytest.fixture(scope='session')
def decoder(tmp_path_factory, corpus_path) -> str:
  """A causal MoE decoder, 40 steps by the command line, that nothing interrupts."""

  def build(out):
    args = _train_args(out, corpus_path, '--config.steps=40', *_overrides(MOE, **DECODER))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]

  return built_once(tmp_path_factory, 'moe_decoder', build)


def test_an_moe_encoder_trains_with_masked_lm_and_fills_in_masks(encoder):
  _assert_trained(encoder)
  assert saved_run.load(encoder).run.model_cfg.attention == 'bidirectional'
  with open(os.path.join(os.path.dirname(encoder), 'stdout.txt')) as f:
    out = f.read()
  assert 'predicted: ' in out and 'chosen tokens right' in out, out[-2000:]


def test_an_moe_decoder_trains_with_causal_lm(decoder):
  _assert_trained(decoder)


@pytest.mark.parametrize(
  'objective, flavour, moe, drops',
  [
    # T5's objective on GPT-2 blocks, with a shared expert and a capacity with room to spare.
    ('span_corruption', 'gpt2', {'shared_experts': 1, 'capacity_factor': 2.0}, False),
    # A prefix LM on Llama blocks, one expert a token, and a capacity that must drop tokens.
    ('prefix_lm', 'llama', {'top_k': 1, 'capacity_factor': 0.5}, True),
    # UL2's mixture, micro-batched, with the first block dense.
    ('causal_lm:1,span_corruption:1,prefix_lm:1', 'gpt2', {'first_dense': 1}, False),
  ],
  ids=['span_corruption', 'prefix_lm', 'mixture'],
)
def test_an_moe_decoder_trains_with_every_objective(
  tiny_config, tmp_path, capsys, objective, flavour, moe, drops
):
  c = tiny_config
  c.objective, c.model.flavour = objective, flavour
  c.steps, c.log_every, c.eval_every = 30, 1, 30
  c.optim.grad_accum_steps = 2 if ',' in objective else 1
  for name, value in {**MOE, **moe}.items():
    c.model.moe[name] = value
  result = train.train(run_config.build(c, num_devices=jax.device_count()), str(tmp_path))
  _assert_trained(tmp_path, moe_layers=(1,) if 'first_dense' in moe else (0, 1), drops=drops)
  # A capacity under 1 runs and says once what it costs: at least half the copies at 0.5 (more
  # where the routing is uneven).
  warned = 'warning: model.moe.capacity_factor=0.5' in capsys.readouterr().out
  assert warned == drops
  if drops:
    assert min(r['moe_dropped_fraction'] for r in _records(tmp_path)) > 0.45
  if ',' in objective:  # A mixture reports each objective's held-out loss too.
    for name in ('causal_lm', 'span_corruption', 'prefix_lm'):
      assert np.isfinite(result['eval'][f'eval_loss_{name}'])


# ---- Fine-tuning from an MoE checkpoint --------------------------------------------------------


@pytest.fixture(scope='session')
def finetune_records(tmp_path_factory) -> dict[str, str]:
  """Classification records (the city in the text is the label) and sft records (answer with
  the city), letters only: any corpus's character tokenizer reads them."""
  cities = ['rome', 'oslo', 'lima', 'kiev', 'bern', 'doha']

  def build(out):
    rng = np.random.default_rng(0)
    letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
    people = [''.join(rng.choice(letters, 5)) for _ in range(600)]
    city = rng.choice(cities, 600)
    verb = rng.choice(['love', 'like', 'miss'], 600)
    with open(out / 'cls.jsonl', 'w') as f:
      for p, c, v in zip(people, city, verb, strict=True):
        f.write(json.dumps({'text': f'{p} says we {v} {c}', 'label': str(c)}) + '\n')
    with open(out / 'qa.jsonl', 'w') as f:
      for p, c in zip(people, city, strict=True):
        f.write(json.dumps({'prompt': f'{p} lives in {c}. city?\n', 'response': str(c)}) + '\n')

  root = built_once(tmp_path_factory, 'moe_finetune_records', build)
  return {'classification': os.path.join(root, 'cls.jsonl'), 'sft': os.path.join(root, 'qa.jsonl')}


@pytest.mark.parametrize('objective', ['classification', 'sft'])
def test_a_fine_tune_from_an_moe_checkpoint_learns(request, tmp_path, finetune_records, objective):
  """A classifier on the MoE encoder, sft of the MoE decoder: both start from the checkpoint (its
  experts and router biases) and their loss falls."""
  base, fields = (
    (request.getfixturevalue('encoder'), ENCODER)
    if objective == 'classification'
    else (request.getfixturevalue('decoder'), DECODER)
  )
  steps = 150 if objective == 'classification' else 60
  result = run_cli(
    *_train_args(
      tmp_path,
      finetune_records[objective],
      f'--config.objective={objective}',
      f'--config.init_from={base}',
      f'--config.steps={steps}',
      f'--config.eval_every={steps}',
      '--config.optim.lr=3e-3',
      *_overrides(MOE, **fields),
    )
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'initialised from {base}' in result.stdout
  _assert_trained(tmp_path, fell_by=0.5)
  final = [r for r in metrics.read_metrics(str(tmp_path)) if 'eval_accuracy' in r][-1]
  assert final['eval_accuracy'] > 1.5 * final['eval_baseline_accuracy'], final


# ---- Sampling, evaluation, a kill ----------------------------------------------------------------


def test_pretrax_sample_and_eval_read_an_moe_checkpoint(decoder, tmp_path):
  model = saved_run.load(decoder)
  assert model.run.model_cfg.moe.num_experts == 4
  sampled = run_cli(
    'sample', f'--workdir={decoder}', '--prompt=ROMEO:', '--length=24', '--temperature=0'
  )
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  greedy = sample_lib.generate(
    model.run.model_def,
    model.params,
    model.tok,
    'ROMEO:',
    length=24,
    seq_len=model.config.data.seq_len,
    temperature=0.0,
  )
  assert sampled.stdout.rstrip('\n') == greedy

  questions = [
    {'context': 'ROMEO:\nBut soft, what light', 'choices': [' through', ' xqzv'], 'gold': 0},
    {'context': 'First Citizen:\n', 'choices': ['Before we proceed', 'zzz', 'All'], 'gold': 0},
    {'context': 'KING', 'choices': [' RICHARD', ' HENRY'], 'gold': 1},
  ]
  task = tmp_path / 'qa.jsonl'
  task.write_text(''.join(json.dumps(q) + '\n' for q in questions))
  out = tmp_path / 'out'
  evaluated = run_cli('eval', f'--workdir={decoder}', f'--tasks={task}', f'--output={out}')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert any(line.startswith('| qa | 3 |') for line in evaluated.stdout.splitlines())
  samples = [json.loads(line) for line in (out / 'samples_qa.jsonl').read_text().splitlines()]
  # Each request scored alone (other batch shapes, other padding) gives the same log-likelihood:
  # a dropless layer routes every token on its own, whatever shares its batch.
  alone = scoring.score_requests(
    model.run.model_def,
    model.params,
    model.tok,
    tasks_lib.load(str(task)).requests,
    seq_len=model.config.data.seq_len,
    batch_tokens=1,
  )
  for s, a in zip(samples, alone, strict=True):
    assert s['loglik'] == pytest.approx(a.loglik, abs=1e-4), (s, a)


def _final_params(workdir, step: int):
  mngr = checkpoint.manager(str(workdir), read_only=True)
  c = run_config.from_saved(checkpoint.restore_config(mngr, step))
  tok = tokenizer.Tokenizer.load(os.path.join(workdir, 'tokenizer.model'))
  state, _ = checkpoint.restore(mngr, step, state_lib.build(c, tok.vocab_size).abstract)
  mngr.close()
  return jax.device_get(state['params'])


def test_an_moe_run_killed_mid_run_resumes_to_the_uninterrupted_run(decoder, tmp_path, corpus_path):
  args = _train_args(tmp_path, corpus_path, '--config.steps=40', *_overrides(MOE, **DECODER))
  proc = subprocess.Popen(
    [sys.executable, '-m', 'pretrax.cli', *args],
    cwd=REPO,
    text=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    env=pretrax_env(),
  )

  saves = checkpoint.directory(str(tmp_path))

  def committed() -> bool:
    """A save is renamed to its step once complete (it is 5.orbax-checkpoint-tmp-... until then,
    with commit_success.txt already inside)."""
    return os.path.isdir(saves) and any(name.isdigit() for name in os.listdir(saves))

  try:
    # Killed as soon as a checkpoint is complete (step 5): 35 steps before the run would end.
    while proc.poll() is None and not committed():
      time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # No handler runs: nothing is saved on the way out.
  finally:
    _, err = proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGKILL, ('finished before the kill', err[-2000:])
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  saved = mngr.latest_step()
  mngr.close()
  assert saved is not None and saved < 40

  resumed = run_cli(*args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'at step {saved}' in resumed.stdout

  def losses(w):  # A list, not a dict: a step logged twice after the resume must show.
    return [(r['step'], r['loss'], r['moe_imbalance']) for r in _records(w)]

  assert losses(tmp_path) == losses(decoder)  # Bit for bit, the routing too.
  assert [r[0] for r in losses(tmp_path)] == list(range(1, 41))
  for x, y in zip(
    jax.tree.leaves(_final_params(decoder, 40)),
    jax.tree.leaves(_final_params(tmp_path, 40)),
    strict=True,
  ):
    np.testing.assert_array_equal(x, y)
