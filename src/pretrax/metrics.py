"""Where numbers go: metrics.jsonl, TensorBoard, the progress line; and FLOPs for MFU."""

import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from pretrax import paths
from pretrax import workdir as workdir_lib
from pretrax.config_types import ModelConfig

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
  and nanoGPT do: causal attention is not halved, so MFU is comparable with theirs. An MoE layer
  counts its active parameters, those a token goes through: the router (D x E) and top_k +
  shared_experts experts of D x expert_dim x (3 or 2), not all the experts it holds.
  """
  D, N, K, H, F = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attn = D * N * H * 2 + D * K * H * 2
  per_width = D * (3 if cfg.flavour == 'llama' else 2)  # MLP parameters per hidden unit.
  moe = cfg.moe
  active_moe = D * moe.num_experts + per_width * moe.expert_dim * (moe.top_k + moe.shared_experts)
  mlps = sum(active_moe if moe.is_moe(layer) else per_width * F for layer in range(cfg.num_layers))
  matmul_params = cfg.num_layers * attn + mlps + D * cfg.vocab_size
  return 6.0 * matmul_params + 12.0 * cfg.num_layers * N * H * seq_len


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a large float32 matmul under jit on the default device (the CPU's usable peak).
  1024 reaches the rate 2048 does on a 2-core CPU (108 against 99 GFLOP/s, measured side by
  side) in a tenth of the time (0.18 s against 2.2 s), which every run's start-up pays."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


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
  return measure_matmul_peak(4096, 10) * count, f'measured {device.device_kind} matmul x {count}'


class MetricsWriter:
  """Appends records to DIR/metrics.jsonl and TensorBoard; only process 0 writes.

  On resume from step k, records after k (written by the run that died) are dropped first, so the
  file never holds a step twice: the resumed run writes them again, with the same values.

  A bucket object cannot be appended to, so there the file is kept in memory and rewritten whole:
  at most every UPLOAD_EVERY_S seconds, and at every `flush()`. The loop flushes when it saves a
  checkpoint, so a resumed run finds the records of every step up to the one it resumes from.
  """

  UPLOAD_EVERY_S = 30.0

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = paths.path(workdir_lib.metrics_file(workdir))
    self.remote = paths.is_remote(workdir)
    self._tb: Any | None = None  # tensorboardX's (untyped) SummaryWriter; None: off or closed.
    self._lines: list[str] = []
    self._uploaded_at = time.monotonic()
    self._unsaved = False
    self.torn = 0  # Lines of an earlier run cut mid-write, dropped.
    if not enabled:
      return
    if not self.remote:
      self.path.parent.mkdir(parents=True, exist_ok=True)
    lines = _lines(self.path)
    records, self.torn = _parse(lines)
    kept = [
      line
      for line, r in zip(lines, records, strict=True)
      if r is not None and r.get('step', 0) <= resume_step
    ]
    if self.remote:
      self._lines = kept
    if len(kept) != len(lines):
      self.path.write_text(''.join(kept))
    self._tb = _summary_writer(str(self.path.parent), resume_step + 1 if resume_step else None)

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in record.items()}
    line = json.dumps(clean) + '\n'
    if self.remote:
      self._lines.append(line)
      self._unsaved = True
      if time.monotonic() - self._uploaded_at >= self.UPLOAD_EVERY_S:
        self._upload()
    else:
      with open(self.path, 'a') as f:
        f.write(line)
    step = clean['step']
    assert self._tb is not None, 'MetricsWriter.write after close()'
    for key, value in clean.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def _upload(self) -> None:
    self.path.write_text(''.join(self._lines))
    self._uploaded_at = time.monotonic()
    self._unsaved = False

  def flush(self) -> None:
    """Everything written so far reaches the workdir (on a bucket, one upload of each file)."""
    if not self.enabled:
      return
    if self._unsaved:
      self._upload()
    assert self._tb is not None, 'MetricsWriter.flush after close()'
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self.flush()
      self._tb.close()
      self._tb = None


def _summary_writer(logdir: str, purge_step: int | None):
  """tensorboardX's SummaryWriter (pure Python, no TensorFlow; gs:// through google-cloud-storage).

  tensorboardX imports torch whenever it is installed, to accept torch tensors: 2-5 s at every
  start. pretrax passes it floats, so torch is kept out of that import unless already loaded.
  """
  hide_torch = 'torch' not in sys.modules
  if hide_torch:
    # `import torch` raises ImportError, as if it were not installed. None in sys.modules is
    # Python's documented way to say so; typeshed types the dict as holding modules only.
    sys.modules['torch'] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hide_torch:
      del sys.modules['torch']
  return SummaryWriter(logdir=logdir, purge_step=purge_step)


def _plain(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  return value


def _lines(path) -> list[str]:
  if not path.exists():
    return []
  return [
    line if line.endswith('\n') else line + '\n'
    for line in path.read_text().splitlines()
    if line.strip()
  ]


def _parse(lines: list[str]) -> tuple[list[dict | None], int]:
  """Each line's record, None for a line cut mid-write (a crash or power loss while it was
  written), and how many such lines there were."""
  records = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    records.append(record if isinstance(record, dict) else None)
  return records, sum(r is None for r in records)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of a run's metrics.jsonl (lines cut mid-write left out); FileNotFoundError when
  the run wrote none."""
  path = paths.path(workdir_lib.metrics_file(workdir))
  if not path.exists():
    raise FileNotFoundError(f'no metrics in {workdir}: {path} does not exist.')
  return [r for r in _parse(_lines(path))[0] if r is not None]


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


def progress_line(
  *,
  step: int,
  total: int,
  loss: float,
  lr: float,
  tokens_per_s: float,
  mfu: float,
  ms_per_step: float,
  eta_s: float,
  imbalance: float | None = None,
) -> str:
  """The progress line; `imbalance`, an MoE model's worst expert load over the mean."""
  width = len(str(total))
  experts = '' if imbalance is None else f' | expert load {imbalance:.2f}x mean'
  return (
    f'step {step:>{width}}/{total} | loss {loss:.4f} | lr {lr:.2e}{experts} | '
    f'{tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% | {ms_per_step:.1f} ms/step | '
    f'ETA {format_duration(eta_s)}'
  )
