"""The command line as a user runs it: errors, the quickstart, sampling, every objective.

Killed, stopped and misfed runs are in tests/faults/."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, REPO, fake_devices_env, load_config, require, run_cli
from pretrax import config as config_lib
from pretrax import config_check, metrics

TINY = 'configs/tiny.py'


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('pretrax ')]
  assert len(lines) == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
  'override,fragments',
  [
    ('--config.model.num_layrs=3', ('--config.model.num_layrs', 'did you mean model.num_layers')),
    # A field in the wrong section is named too, with the nearest whole names.
    ('--config.eval.every=4', ('--config.eval.every names no config field', 'eval_every')),
    ('--config.optim.sed=4', ('--config.optim.sed names no config field', 'did you mean seed?')),
    ('--config.model.num_layers=three', ('--config.model.num_layers', 'three')),
    ('--config.data.path=/no/such/file.txt', ('data.path', '/no/such/file.txt')),
  ],
)
def test_bad_overrides_fail_with_one_line(tmp_path, override, fragments):
  args = ['train', f'--config={TINY}', f'--workdir={tmp_path}', override]
  if 'data.path' in override:
    args.append('--config.data.fallback=')
  _one_line_error(run_cli(*args), *fragments)


@pytest.mark.parametrize(
  'changes,fragments',
  [
    ({'model.num_heads': 3}, ('model.num_heads=3', 'model.embed_dim=64')),
    ({'model.max_len': 16}, ('data.seq_len=32', 'model.max_len=16')),
    ({'model.num_kv_heads': 3, 'model.flavour': 'llama'}, ('model.num_kv_heads=3',)),
    ({'data.batch_size': 6, 'optim.grad_accum_steps': 4}, ('data.batch_size=6', 'multiple of 4')),
    ({'objective': 'causal'}, ('objective=',)),
    ({'model.moe.num_experts': 4, 'model.moe.top_k': 6}, ('top_k=6', 'num_experts=4')),
    ({'model.moe.num_experts': 4, 'model.moe.first_dense': 2}, ('first_dense=2', 'num_layers=2')),
  ],
)
def test_impossible_configs_name_the_fields(changes, fragments):
  c = load_config('tiny')
  for key, value in changes.items():
    section, _, field = key.rpartition('.')
    (c[section] if section else c)[field] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_check.validate(c, check_data=False)
  for fragment in fragments:
    assert fragment in str(error.value)


@pytest.mark.parametrize(
  'devices, overrides, fragments',
  [
    (1, ['model.moe.top_k=6'], ('model.moe.top_k=6', 'model.moe.num_experts=4')),
    # Expert parallelism: 4 experts do not split over 3 devices of the expert axis.
    (3, ['mesh.expert=3'], ('model.moe.num_experts=4', 'mesh axis expert (mesh.expert=3)')),
    # The same with the experts put on the fsdp axis instead. The dense weights split 3 ways
    # (width 48), so the experts are the one thing at fault.
    (
      3,
      ['mesh.rules=experts=fsdp,expert_embed=', 'mesh.fsdp=3', 'model.embed_dim=48'],
      ('model.moe.num_experts=4', 'mesh axis fsdp', 'a multiple of 3', 'mesh.rules=experts='),
    ),
  ],
  ids=['top_k', 'experts_over_expert', 'experts_over_fsdp'],
)
def test_bad_moe_settings_fail_in_one_line_before_anything_runs(
  tmp_path, devices, overrides, fragments
):
  workdir = tmp_path / 'run'
  settings = ['model.moe.num_experts=4', 'data.batch_size=6', *overrides]
  args = ['train', f'--config={TINY}', f'--workdir={workdir}', *(f'--config.{s}' for s in settings)]
  result = subprocess.run(
    [sys.executable, '-m', 'pretrax.cli', *args],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=300,
    env=fake_devices_env(devices),
  )
  _one_line_error(result, *fragments)
  assert not workdir.exists()  # Refused before reading data, let alone compiling.


def test_batch_must_split_over_devices():
  c = load_config('tiny')
  with pytest.raises(config_lib.ConfigError, match='not divisible by 3 device'):
    config_check.validate(c, num_devices=3, check_data=False)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_then_samples(tmp_path):
  workdir = tmp_path / 'shakespeare'
  result = run_cli(
    'train',
    '--config=configs/shakespeare_char.py',
    f'--workdir={workdir}',
    '--config.steps=30',
    '--config.log_every=10',
    '--config.eval_every=30',
    '--config.eval_batches=5',
    '--config.sample.length=40',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'step 30/30' in out and 'tok/s' in out and 'MFU' in out and 'ETA' in out
  assert 'compiled the train step' in out
  assert '---- sample' in out
  records = metrics.read_metrics(str(workdir))
  assert [r['step'] for r in records if 'loss' in r] == [10, 20, 30]
  assert [r['step'] for r in records if 'eval_loss' in r] == [30]
  prompt, length = 'ROMEO:\nWhat', 40  # Prompt + generation fit the 64-token context.
  sampled = run_cli(
    'sample', f'--workdir={workdir}', f'--prompt={prompt}', f'--length={length}', '--temperature=0'
  )
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  # Whitespace is a fine sample of a 30-step model trained on code (the fallback corpus).
  assert sampled.stdout.startswith(prompt) and len(sampled.stdout.rstrip('\n')) > len(prompt)
  _same_greedy_text_in_transformers(workdir, tmp_path, prompt, length, sampled.stdout.rstrip('\n'))


def _same_greedy_text_in_transformers(
  workdir, tmp_path, prompt: str, length: int, ours: str
) -> None:
  """The quickstart run, exported, greedy-decodes in transformers what `pretrax sample
  --temperature=0` printed; imported back, `pretrax train` continues where it left off."""
  torch = require('torch')
  transformers = require('transformers')
  out = tmp_path / 'hf'
  exported = run_cli('export', f'--workdir={workdir}', f'--out={out}')
  assert exported.returncode == 0, exported.stderr[-2000:]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = tok(prompt, add_special_tokens=False, return_tensors='pt').input_ids
  with torch.no_grad():
    generated = model.generate(
      ids, max_new_tokens=length, do_sample=False, eos_token_id=None, pad_token_id=0
    )
  assert tok.decode(generated[0], skip_special_tokens=False) == ours

  again = tmp_path / 'again'
  imported = run_cli(
    'import', f'--hf={out}', '--config=configs/shakespeare_char.py', f'--workdir={again}'
  )
  assert imported.returncode == 0, imported.stderr[-2000:]
  resumed = run_cli(
    'train',
    '--config=configs/shakespeare_char.py',
    f'--workdir={again}',
    '--config.steps=3',
    '--config.log_every=1',
    '--config.eval_every=3',
    '--config.eval_batches=1',
    '--config.sample.length=0',
    PEAK_FLOPS_ARG,
  )
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  first = [r for r in metrics.read_metrics(str(again)) if 'loss' in r][0]
  last = [r for r in metrics.read_metrics(str(workdir)) if 'loss' in r][-1]
  # A fresh model starts near ln(vocab) ~ 5.8; the imported one where the export left off.
  assert first['step'] == 1 and first['loss'] < last['loss'] + 0.3, (first, last)


@pytest.mark.slow
def test_a_configs_missing_default_corpus_falls_back_to_python_sources(tmp_path):
  # A fresh clone: the config's own ../shared/data path does not exist beside this copy of it.
  (tmp_path / 'clone' / 'configs').mkdir(parents=True)
  config = tmp_path / 'clone' / 'configs' / 'tiny.py'
  shutil.copy(os.path.join(REPO, TINY), config)
  result = run_cli(
    'train',
    f'--config={config}',
    f'--workdir={tmp_path / "run"}',
    '--config.steps=3',
    '--config.optim.warmup_steps=1',
    PEAK_FLOPS_ARG,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "training on the Python standard library's sources" in result.stdout
  assert '--config.data.path' in result.stdout
  # A path the user names never falls back: it is an error naming the path.
  typed = run_cli(
    'train',
    f'--config={config}',
    f'--workdir={tmp_path / "typed"}',
    '--config.data.path=/no/such/tinyshakespeare.txt',
  )
  assert typed.returncode == 2 and 'Traceback' not in typed.stderr
  assert "data.path='/no/such/tinyshakespeare.txt' matches no file" in typed.stderr


def test_tokenizer_command(tmp_path, corpus_path):
  out = tmp_path / 'tok.model'
  result = run_cli(
    'tokenizer', f'--input={corpus_path}', f'--output={out}', '--model_type=bpe', '--vocab_size=500'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  from pretrax import tokenizer

  tok = tokenizer.Tokenizer.load(str(out))
  assert tok.vocab_size == 500 and tok.decode(tok.encode('To be, or not')) == 'To be, or not'


def test_sample_without_a_run_is_a_clear_error(tmp_path):
  _one_line_error(run_cli('sample', f'--workdir={tmp_path}'), 'no checkpoints', 'pretrax train')


@pytest.mark.parametrize(
  'objective',
  ['masked_lm', 'span_corruption', 'prefix_lm', 'causal_lm:2,span_corruption:1,prefix_lm:1'],
)
def test_every_objective_trains_from_the_command_line(tmp_path, corpus_path, objective):
  result = run_cli(
    'train',
    f'--config={TINY}',
    f'--workdir={tmp_path}',
    f'--config.data.path={corpus_path}',
    f'--config.objective={objective}',
    '--config.steps=6',
    '--config.log_every=3',
    PEAK_FLOPS_ARG,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  records = metrics.read_metrics(str(tmp_path))
  assert [r['step'] for r in records if 'loss' in r] == [3, 6]
  evaluation = [r for r in records if 'eval_loss' in r][-1]
  assert np.isfinite(evaluation['eval_loss']) and 'eval_baseline_accuracy' in evaluation
  if ',' in objective:  # A mixture reports each objective's loss too.
    for name in ('causal_lm', 'span_corruption', 'prefix_lm'):
      assert np.isfinite(evaluation[f'eval_loss_{name}'])
