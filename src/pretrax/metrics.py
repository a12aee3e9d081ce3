"""Where numbers go: metrics.jsonl, TensorBoard, the progress line; and FLOPs for MFU."""

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

from pretrax.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets, keyed by the start of JAX's
# `device_kind` (e.g. 'NVIDIA H100 80GB HBM3', 'TPU v5 lite' for v5e, 'TPU v6 lite' for v6e).
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v5': 459e12,
    'TPU v6 lite': 918e12,
    'TPU v6e': 918e12,
    'NVIDIA H100': 989e12,  # SXM; the PCIe card is slower (below).
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (matmul parameters) + 12 x layers x (N x H) x seq_len.

  Matmul parameters include the output projection (tied or not) but not the embedding lookups.
  The attention term counts the full L x L score and value matmuls, forward and backward, as PaLM
  and nanoGPT do: causal attention is not halved, so MFU is comparable with theirs.
  """
  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attn = D * N * H * 2 + D * K * H * 2
  mlp = D * F * (3 if cfg.flavour == 'llama' else 2)
  matmul_params = cfg.num_layers * (attn + mlp) + D * cfg.vocab_size
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * N * H * seq_len


def measure_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of a large float32 matmul under jit on the default device (the CPU's usable peak)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def device_peak_flops(device_kind: str) -> float | None:
  """The data-sheet peak of one device of this kind, or None; the longest matching key wins, so
  'NVIDIA H100 PCIe' is not read as an H100 SXM."""
  keys = [k for k in PEAK_FLOPS if device_kind.startswith(k)]
  return PEAK_FLOPS[max(keys, key=len)] if keys else None


def peak_flops(configured: float = 0.0) -> tuple[float, str]:
  """(FLOP/s of all the job's devices together, where the figure comes from).

  Accelerators: the data-sheet figure per device (or `configured`) times the device count. CPU:
  the measured matmul rate, once: fake CPU devices share the same cores.
  """
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return configured or measure_matmul_peak(), 'config' if configured else 'measured CPU matmul'
  count = jax.device_count()
  if configured:
    return configured * count, f'config x {count}'
  flops = device_peak_flops(device.device_kind)
  if flops:
    return flops * count, f'{device.device_kind} data sheet x {count}'
  return measure_matmul_peak() * count, f'measured {device.device_kind} matmul x {count}'


class MetricsWriter:
  """Appends records to DIR/metrics.jsonl and TensorBoard; only process 0 writes.

  On resume from step k, records after k (written by the run that died) are dropped first, so the
  file never holds a step twice: the resumed run writes them again, with the same values.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    _truncate_after(self.path, resume_step)
    from tensorboardX import SummaryWriter  # Pure Python; no TensorFlow.
    self._tb = SummaryWriter(logdir=workdir, purge_step=resume_step + 1 if resume_step else None)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in record.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps(clean) + '\n')
    step = clean['step']
    for key, value in clean.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _plain(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  return value


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get('step', 0) <= step]
  if len(kept) != len(lines):
    with open(path, 'w') as f:
      f.writelines(kept)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def progress_line(*, step: int, total: int, loss: float, lr: float, tokens_per_s: float,
                  mfu: float, ms_per_step: float, eta_s: float) -> str:
  width = len(str(total))
  return (f'step {step:>{width}}/{total} | loss {loss:.4f} | lr {lr:.2e} | '
          f'{tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | {ms_per_step:.1f} ms/step | '
          f'ETA {format_duration(eta_s)}')
