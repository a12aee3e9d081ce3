"""Speed tooling: benchmarks/throughput.py, the data-sheet peaks, and the profiling switch."""

import glob
import json
import re
import subprocess
import sys

import pytest

from conftest import PEAK_FLOPS_ARG, REPO, load_config, run_cli
from pretrax import config as config_lib
from pretrax import config_check, config_specs, metrics, run_config
from pretrax.data import prepare


@pytest.mark.parametrize(
  'kind,peak',
  [
    ('NVIDIA H200', 989e12),
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12),  # v6e
    ('TPU v4', 275e12),
  ],
)
def test_peak_table_reads_jax_device_kinds(kind, peak):
  assert metrics.device_peak_flops(kind) == peak


def test_unknown_device_kind_has_no_peak():
  assert metrics.device_peak_flops('cpu') is None
  assert metrics.device_peak_flops('Tesla T4') is None


@pytest.mark.parametrize('pipeline', ['text', 'prepared'])
def test_benchmark_prints_a_table_and_json(tmp_path, corpus_path, pipeline):
  out = tmp_path / 'row.json'
  args = [f'--config.data.path={corpus_path}', '--config.data.fallback=']
  if pipeline == 'prepared':
    c = load_config('tiny')
    c.data.path, c.data.fallback = corpus_path, ''
    run = run_config.build(c)
    prepare.prepare(run, str(tmp_path / 'prepared'), workers=1, log=lambda _: None)
    args.append(f'--config.data.prepared={tmp_path / "prepared"}')
  result = subprocess.run(
    [
      sys.executable,
      'benchmarks/throughput.py',
      '--config=configs/tiny.py',
      '--steps=3',
      '--warmup=1',
      '--pipeline_batches=5',
      f'--json={out}',
      *args,
    ],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [line for line in result.stdout.splitlines() if line.startswith('|')]
  assert len(lines) == 3, result.stdout
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  cells = dict(zip(header, (c.strip() for c in lines[2].strip('|').split('|')), strict=True))
  number = r'[\d,]+(\.\d+)?'
  assert re.fullmatch(number, cells['step ms']), cells
  assert re.fullmatch(number, cells['tokens/s']), cells
  assert re.fullmatch(number + '%', cells['MFU']), cells
  assert re.fullmatch(number + 'x', cells['pipeline / step']), cells
  assert cells['batch x seq'] == '8 x 32'
  assert 'measured CPU matmul' in cells['peak FLOP/s (source)']
  assert cells['pipeline tokens/s'].endswith(f'({pipeline})')
  row = json.loads(out.read_text())
  assert row['step_ms'] > 0 and 0 < row['mfu'] < 1.5 and row['pipeline_ratio'] > 0
  assert row['tokens_per_s'] == pytest.approx(8 * 32 / (row['step_ms'] / 1000))
  assert row['xla_flops_per_step'] > 0
  # The optimizer's share: AdamW's update alone, and no Newton-Schulz.
  assert cells['optimizer'] == 'adamw' and cells['NS / model FLOPs'] == '0.00%'
  assert re.fullmatch(number + r' \(\d+%\)', cells['update ms (share)']), cells
  assert 0 < row['update_ms'] and row['update_share'] == pytest.approx(
    row['update_ms'] / row['step_ms']
  )


def test_flops_only_counts_newton_schulz_against_the_model_without_running():
  """llama_1b at its batch of 256 x 2048 under Muon (docs/configs.md quotes this estimate)."""
  result = subprocess.run(
    [
      sys.executable,
      'benchmarks/throughput.py',
      '--config=configs/llama_1b.py',
      '--config.optim.name=muon',
      '--flops_only',
    ],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'batch 256 x 2048: model 3.69e+15 FLOPs per step, Newton-Schulz 4.57e+13 (1.24%' in (
    result.stdout
  )


def test_profile_steps_writes_a_trace(tmp_path, corpus_path):
  workdir = tmp_path / 'run'
  result = run_cli(
    'train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    '--config.steps=4',
    '--config.eval_every=4',
    '--config.eval_batches=1',
    '--config.profile_steps=2:2',
    PEAK_FLOPS_ARG,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert glob.glob(str(workdir / 'profile' / '**' / '*.xplane.pb'), recursive=True)
  assert f'profile of steps 2-3 in {workdir / "profile"}' in result.stdout


def test_bad_profile_steps_fail_with_one_line(tmp_path):
  result = run_cli(
    'train', '--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.profile_steps=2'
  )
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('pretrax ')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert "profile_steps='2' must be START:COUNT" in lines[0]


@pytest.mark.parametrize('spec,steps', [('', None), ('10:3', (10, 12)), ('1:1', (1, 1))])
def test_profile_steps_parse(spec, steps):
  assert config_specs.profile_steps(spec) == steps


@pytest.mark.parametrize('spec', ['0:2', '3', '3:0', 'a:b', '3:-1'])
def test_profile_steps_refuse_nonsense(spec):
  c = load_config('tiny')
  c.profile_steps = spec
  with pytest.raises(config_lib.ConfigError, match='profile_steps'):
    config_check.validate(c, check_data=False)
