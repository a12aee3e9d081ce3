"""The Mixture-of-Experts configs: the two llama_1b-sized ones fit 8 devices of 80 GiB by
`pretrax plan`, and a token costs them about llama_1b's FLOPs; moe_tiny and its dense variant have
the same active parameters, and benchmarks/moe.py, which compares them, runs end to end."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, load_config, pretrax_env, run_python
from pretrax import metrics, run_config

GiB = 1024**3
BIG = ('moe_8x_1b', 'moe_64e')


def _flops_per_token(name: str, arg: str | None = None) -> float:
  c = run_config.build(load_config(name, arg), check_data=False)
  return metrics.flops_per_token(run_config.model_config(c, c.tokenizer.vocab_size), c.data.seq_len)


@pytest.mark.parametrize('name', BIG)
def test_big_moe_configs_cost_a_token_what_llama_1b_does(name):
  """Active compute within 10% of the dense reference (measured: 7.04 and 6.97 GFLOPs against
  7.03): the experts a token goes through are as wide as llama_1b's MLP."""
  ratio = _flops_per_token(name) / _flops_per_token('llama_1b')
  assert 0.9 <= ratio <= 1.1, ratio


@pytest.mark.slow
def test_big_moe_configs_fit_8_devices_of_80_gib():
  """`pretrax plan` on 8 fake devices, each config as written (measured: 48.8 and 60.7 GiB)."""
  out = json.loads(
    run_python(
      f"""
      import json
      from conftest import load_config
      from pretrax import plan as plan_lib
      from pretrax import run_config

      plan_lib.use_fake_cpu_devices(8)  # As `pretrax plan --devices=8`: scheduled for memory.
      out = {{}}
      for name in {BIG!r}:
        c = run_config.build(load_config(name), num_devices=8, check_data=False)
        p = plan_lib.plan(c, plan_lib.vocab_size(c))
        out[name] = {{'peak': p.peak_bytes, 'params': p.num_params, 'active': p.active_params,
                      'experts': p.experts, 'warnings': p.warnings}}
      print(json.dumps(out))
      """,
      devices=8,
      timeout=600,
    ).splitlines()[-1]
  )
  for name, got in out.items():
    assert got['peak'] <= 80 * GiB, (name, got['peak'] / GiB)
    assert got['warnings'] == [], (name, got['warnings'])
  # 3.45B held, 1.04B active (2 of 8 experts); 5.96B held, 1.03B active (8 of 64, one shared).
  assert out['moe_8x_1b']['experts'] == [2, 8]
  assert (
    3.4e9 <= out['moe_8x_1b']['params'] <= 3.5e9 and 1.0e9 <= out['moe_8x_1b']['active'] <= 1.1e9
  )
  assert out['moe_64e']['experts'] == [8, 64]
  assert 5.9e9 <= out['moe_64e']['params'] <= 6.0e9 and 1.0e9 <= out['moe_64e']['active'] <= 1.1e9


def test_moe_tiny_and_its_dense_variant_have_equal_active_parameters():
  def mlp_width(arg):
    c = run_config.build(load_config('moe_tiny', arg), check_data=False)
    moe = c.model.moe
    return moe.expert_dim * moe.top_k if moe.num_experts else c.model.mlp_dim

  assert mlp_width(None) == mlp_width('dense') == 512
  # The routers (128 x 8 a layer) are all the MoE adds to a token's FLOPs: under 1%.
  ratio = _flops_per_token('moe_tiny') / _flops_per_token('moe_tiny', 'dense')
  assert 1.0 < ratio < 1.01, ratio


@pytest.mark.slow
def test_moe_benchmark_quick_prints_its_table(tmp_path):
  """benchmarks/moe.py --quick: both sweeps (one rate, 10 steps), the side-by-side step times, the
  table and the goal lines (whatever they say after 10 steps)."""
  result = subprocess.run(
    [sys.executable, 'benchmarks/moe.py', '--quick', f'--out={tmp_path}'],
    cwd=REPO,
    text=True,
    capture_output=True,
    timeout=300,
    env=pretrax_env(),
  )
  assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
  rows = [
    line for line in result.stdout.splitlines() if line.startswith('| ') and '---' not in line
  ]
  header = [c.strip() for c in rows[0].strip('|').split('|')]
  cells = {
    row[0]: dict(zip(header, row, strict=True))
    for row in ([c.strip() for c in line.strip('|').split('|')] for line in rows[1:])
  }
  assert set(cells) == {'dense', 'moe'}, result.stdout
  number = r'[\d,]+(\.\d+)?'
  for got in cells.values():
    assert got['best lr'] == '0.002', got
    for column in ('held-out loss at best lr', 'step ms (side by side)', 'tokens/s (side by side)'):
      assert re.fullmatch(number, got[column]), (column, got)
  # The same active parameters (the MoE's routers aside), more of them in all.
  dense_all, dense_active = (int(n.replace(',', '')) for n in cells['dense'][header[1]].split('/'))
  moe_all, moe_active = (int(n.replace(',', '')) for n in cells['moe'][header[1]].split('/'))
  assert dense_all == dense_active and moe_all > 2 * dense_all, cells
  assert dense_active < moe_active < 1.01 * dense_active, cells
  for start in ('MoE / dense step time (side by side): ', 'MoE expert load CV after step '):
    assert any(line.startswith(start) for line in result.stdout.splitlines()), result.stdout
