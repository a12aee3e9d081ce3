"""Benchmark: the accelerator's kernels alone (matmul peak, attention per backend and mask, the LM
loss with and without chunking), each against its reference.

  python benchmarks/kernels.py --stage=versions|matmul|attention|loss|all [--out=DIR] [--dry_run]
      [--reps=N]

Prints one JSON line per measurement (and appends it to DIR/kernels.jsonl with --out):

- versions: python, jax, jaxlib, flax, numpy, platform, device kind and count, cuDNN, XLA_FLAGS.
- matmul: a jitted square (n, n) x (n, n) matmul, median ms and 2 n^3 / time in TFLOP/s.
- attention: forward + backward (the output and jax.vjp of a fixed random cotangent w.r.t. q, k,
  v) of pretrax.model.attention.attention for gpt2_small's and llama_1b's shapes, per mask kind
  (causal one segment, causal packed, bidirectional packed, prefix LM) and backend ('xla', the
  reference; 'cudnn' with max_segments 0, the dense mask, and 16, the variable-length path;
  'cpu'). Each record has the median ms, the max |diff| of the output and of each gradient
  against 'xla' on real tokens only (padding may legitimately differ), and the kernel that ran:
  'xla' where attention logged a fallback to it (the reason is in the record), else for cuDNN
  the kernel the rows select ('cudnn plain', 'cudnn variable-length' or 'cudnn dense mask'),
  and cuDNN only where the compiled program calls cuDNN's fused attention.
- loss: value_and_grad w.r.t. (x, head) of the mean LM loss for each model's head, with the
  logits whole (chunk 0: loss.cross_entropy) and chunked (loss.chunked_cross_entropy): median ms,
  XLA's compiled temporaries, and max |diff| of the loss and the gradients against chunk 0.

bfloat16 on accelerators, float32 on CPU. --dry_run (automatic on CPU) uses tiny shapes, so
every stage finishes in seconds. Exits 1 if any measurement failed (its record says why) or if
any cuDNN output or gradient differs from xla's by more than CUDNN_BOUND of xla's largest |value|:
each such one is printed, and a last record {'stage': 'attention_bound', 'bound', 'beyond'} after
the attention stage keeps the bound and those lines.
"""

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from pretrax import loss
from pretrax.model import attention, attention_cudnn

# name: (B, T, N, K, H), as configs/gpt2_small.py and configs/llama_1b.py shape attention.
ATTENTION_SHAPES = {'gpt2_small': (8, 1024, 12, 12, 64), 'llama_1b': (4, 2048, 32, 8, 64)}
ATTENTION_SHAPES_DRY = {'gpt2_small': (2, 128, 4, 4, 16), 'llama_1b': (2, 128, 4, 2, 16)}
MASKS = ('causal_one_segment', 'causal_packed', 'bidirectional_packed', 'prefix_lm')
# (backend, max_segments); 'xla' first: it is the reference the others are held to.
BACKENDS = (('xla', 0), ('cudnn', 0), ('cudnn', 16), ('cpu', 0))
# name: (B, L, D, V); V is each model's padded vocabulary (llama_1b: 32000, a multiple of 128).
LOSS_SHAPES = {'gpt2_small': (8, 1024, 768, 50304), 'llama_1b': (4, 2048, 2048, 32000)}
LOSS_SHAPES_DRY = {'gpt2_small': (2, 64, 32, 512), 'llama_1b': (2, 64, 64, 384)}
LOSS_CHUNKS, LOSS_CHUNKS_DRY = (0, 256, 512), (0, 16, 32)
MATMUL_SIZES, MATMUL_SIZES_DRY = (8192, 16384), (512, 1024)
# JAX lowers cuDNN's fused attention to custom calls named so (forward and backward).
CUDNN_ATTENTION_CALL = '__cudnn$fmha'
# How far cuDNN's attention may be from xla's, as a fraction of xla's largest |value| of the same
# output or gradient. bfloat16 keeps 8 significant bits, so each rounding may move a value by 2^-8
# (3.9e-3) of itself, and the two kernels round at different places (cuDNN's online softmax, its
# own order of the sums over T). On the H200 (2026-12-04, bf16, T 1024 and 2048) they differed by
# 1 or 2 units in the last place of the largest value: at most 8.7e-3 of it (llama_1b,
# bidirectional packed, dq; 0.0156 against 1.8), 6.5e-3 for the output. 2^-5 is 8 such roundings,
# 3.6x that, and still passes 2 units in the last place of a largest value just above a power of
# two (up to 1.6e-2). Real faults are far beyond it: on CPU, in float32 on packed causal rows of
# 256, losing the segment boundaries moved the output and gradients by 0.7-1.1 of the largest
# value, and a softmax scale 10% off moved the output by 6.6e-2 of it.
CUDNN_BOUND = 2**-5


class Recorder:
  """Prints each record as one JSON line, appends it to DIR/kernels.jsonl, keeps them all and
  counts failures."""

  def __init__(self, out_dir: str | None):
    self.path = os.path.join(out_dir, 'kernels.jsonl') if out_dir else None
    self.errors = 0
    self.records: list[dict] = []

  def __call__(self, record: dict) -> None:
    self.errors += 'error' in record
    self.records.append(record)
    line = json.dumps(record)
    print(line, flush=True)
    if self.path:
      with open(self.path, 'a') as f:
        f.write(line + '\n')


class FallbackLog(logging.Handler):
  """The warnings attention logs while a program is traced ('attention: REASON, using xla ...')."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.messages.append(record.getMessage())


def median_ms(compiled, args: tuple, reps: int) -> float:
  """Median wall time of `compiled(*args)` over `reps` calls after one untimed call."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def max_diff(a: jax.Array, b: jax.Array | float, real: jax.Array | None = None) -> float:
  """max |a - b| in float32, over the positions where `real` (broadcast from the left) holds."""
  diff = jnp.abs(a.astype(jnp.float32) - jnp.asarray(b).astype(jnp.float32))
  if real is not None:
    diff = jnp.where(real.reshape(real.shape + (1,) * (diff.ndim - real.ndim)), diff, 0.0)
  return float(jnp.max(diff))


def compare(values: dict, reference: dict | None, real: jax.Array | None = None) -> dict:
  """max_diff of each value against the reference's, and the reference's own max |value| (the
  scale the differences are judged by); None each where the reference failed."""
  if reference is None:
    return {'max_diff': None, 'ref_max_abs': None}
  return {
    'max_diff': {k: max_diff(v, reference[k], real) for k, v in values.items()},
    'ref_max_abs': {k: max_diff(v, 0.0, real) for k, v in reference.items()},
  }


def beyond_bound(records: list[dict], bound: float = CUDNN_BOUND) -> list[str]:
  """One line for each output or gradient of a cuDNN attention record whose max |diff| from xla's
  is more than `bound` times xla's max |value| of it, or is not a number."""
  beyond = []
  for r in records:
    if r.get('stage') != 'attention' or r.get('backend') != 'cudnn' or not r.get('max_diff'):
      continue  # No reference (xla failed: its own record counts as the failure), or no run.
    for name, diff in r['max_diff'].items():
      limit = bound * r['ref_max_abs'][name]
      if not diff <= limit:  # Written so that NaN fails.
        beyond.append(
          f'{r["shape"]} {r["mask"]} cudnn max_segments={r["max_segments"]} '
          f'({r["ran"]}): {name} differs from xla by {diff:.3g} > {limit:.3g} '
          f"({bound:g} x xla's max |{name}| {r['ref_max_abs'][name]:.3g})"
        )
  return beyond


def finish(record: Recorder) -> int:
  """Holds the attention records to CUDNN_BOUND (printing and recording what exceeds it); the exit
  status: 1 if a measurement failed or exceeded the bound, else 0."""
  beyond = []
  if any(r.get('stage') == 'attention' for r in record.records):
    beyond = beyond_bound(record.records)
    for line in beyond:
      print(f'beyond the bound: {line}', file=sys.stderr, flush=True)
    record({'stage': 'attention_bound', 'bound': CUDNN_BOUND, 'beyond': beyond})
  return 1 if record.errors or beyond else 0


def cudnn_version() -> int | None:
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=import-outside-toplevel

    return cuda_versions.cudnn_get_version() if cuda_versions else None
  except Exception:  # pylint: disable=broad-except  # No CUDA plugin, or an older layout.
    return None


def stage_versions(record: Recorder, dry: bool, dtype: jnp.dtype, reps: int) -> None:
  del dry, dtype, reps
  device = jax.devices()[0]
  record(
    {
      'stage': 'versions',
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jaxlib': jaxlib.__version__,
      'flax': flax.__version__,
      'numpy': np.__version__,
      'platform': attention.current_platform(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'compute_capability': getattr(device, 'compute_capability', None),
      'cudnn': cudnn_version(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
    }
  )


def stage_matmul(record: Recorder, dry: bool, dtype: jnp.dtype, reps: int) -> None:
  for n in MATMUL_SIZES_DRY if dry else MATMUL_SIZES:
    base = {'stage': 'matmul', 'n': n, 'dtype': jnp.dtype(dtype).name}
    try:
      a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
      compiled = jax.jit(jnp.matmul).lower(a, b).compile()
      ms = median_ms(compiled, (a, b), reps)
      record(dict(base, ms=ms, tflops=2 * n**3 / (ms / 1000) / 1e12))
    except Exception as e:  # pylint: disable=broad-except  # Record it; the next size may run.
      record(dict(base, error=f'{type(e).__name__}: {e}'[:2000]))


def packed_segments(rng: np.random.Generator, B: int, T: int) -> np.ndarray:
  """(B, T) segment ids: each row 4 to 8 documents of random lengths as contiguous runs
  1, 1, 2, 2, 2, 3, ...; every other row ends in up to T/8 padding (0)."""
  ids_BT = np.zeros((B, T), np.int32)
  for b in range(B):
    real = T - (int(rng.integers(1, T // 8 + 1)) if b % 2 else 0)
    starts = np.sort(rng.choice(np.arange(1, real), int(rng.integers(4, 9)) - 1, replace=False))
    ids_BT[b, :real] = 1 + np.searchsorted(starts, np.arange(real), side='right')
  return ids_BT


def document_prefix(ids_BT: np.ndarray) -> np.ndarray:
  """(B, T) 1 on the first quarter (at least one token) of each document, as a prefix LM's."""
  prefix_BT = np.zeros_like(ids_BT)
  for b, ids_T in enumerate(ids_BT):
    for segment in np.unique(ids_T[ids_T > 0]):
      where = np.flatnonzero(ids_T == segment)
      prefix_BT[b, where[: max(1, len(where) // 4)]] = 1
  return prefix_BT


def mask_inputs(mask: str, B: int, T: int, rng: np.random.Generator) -> tuple:
  """(causal, segment_ids_BT, prefix_BT or None) of a mask kind."""
  if mask == 'causal_one_segment':
    return True, jnp.ones((B, T), jnp.int32), None
  ids_BT = packed_segments(rng, B, T)
  prefix_BT = jnp.asarray(document_prefix(ids_BT)) if mask == 'prefix_lm' else None
  return mask != 'bidirectional_packed', jnp.asarray(ids_BT), prefix_BT


def attention_program(backend: str, max_segments: int, causal: bool):
  """The jitted output and gradients (w.r.t. q, k, v) of attention for cotangent d_out."""

  def fwd_bwd(q_BTNH, k_BSKH, v_BSKH, d_out_BTNH, segment_ids_BT, prefix_BT):
    def f(q_BTNH, k_BSKH, v_BSKH):
      return attention.attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        segment_ids_BT,
        causal=causal,
        prefix_BT=prefix_BT,
        backend=backend,
        max_segments=max_segments,
      )

    out_BTNH, vjp = jax.vjp(f, q_BTNH, k_BSKH, v_BSKH)
    return out_BTNH, vjp(d_out_BTNH)

  return jax.jit(fwd_bwd)


def compile_watching_fallbacks(program, args: tuple, fallbacks: FallbackLog):
  """(compiled, the fallbacks attention logged while tracing, whether the program calls cuDNN's
  fused attention)."""
  # attention warns once per reason per process; forget earlier ones so that this trace logs its
  # own fallback even where an earlier variant logged the same reason.
  attention._warned.clear()  # pylint: disable=protected-access
  fallbacks.messages.clear()
  lowered = program.lower(*args)
  # The custom call is in what JAX hands XLA; XLA either runs it as cuDNN or fails to compile.
  return lowered.compile(), list(fallbacks.messages), CUDNN_ATTENTION_CALL in lowered.as_text()


def which_ran(
  backend: str,
  max_segments: int,
  fallback: list[str],
  calls_cudnn: bool,
  ids_BT: np.ndarray,
  prefix: bool,
) -> str:
  """The kernel that ran: 'xla' where attention logged a fallback to it; for cuDNN, the kernel
  the batch's rows select (attention_cudnn.cudnn_kernel: plain, variable-length or dense mask, the
  variable-length form only where max_segments and the setup allow it), and only if the
  compiled program calls cuDNN at all."""
  if any(m.endswith(f'using xla instead of {backend}.') for m in fallback):
    ran = 'xla'
  elif backend != 'cudnn':
    ran = backend
  elif not max_segments or prefix:
    ran = 'cudnn dense mask'
  else:
    allowed = not any(m.endswith('instead of cudnn variable-length.') for m in fallback)
    fits = attention_cudnn.segment_layout(ids_BT, max_segments)[2] if allowed else None
    ran = 'cudnn ' + attention_cudnn.CUDNN_KERNELS[int(attention_cudnn.cudnn_kernel(ids_BT, fits))]
  if ran.startswith('cudnn') and not calls_cudnn:
    ran = 'unknown: no cuDNN attention call in the compiled program'
  return ran


def attention_case(
  record: Recorder,
  name: str,
  shape: tuple,
  mask: str,
  dtype: jnp.dtype,
  reps: int,
  fallbacks: FallbackLog,
) -> None:
  """Every backend for one shape and mask kind, held to the first ('xla')."""
  B, T, N, K, H = shape
  keys = jax.random.split(jax.random.key(0), 4)
  args = (
    jax.random.normal(keys[0], (B, T, N, H), dtype),
    jax.random.normal(keys[1], (B, T, K, H), dtype),
    jax.random.normal(keys[2], (B, T, K, H), dtype),
    jax.random.normal(keys[3], (B, T, N, H), dtype),
  )
  causal, ids_BT, prefix_BT = mask_inputs(mask, B, T, np.random.default_rng(0))
  real_BT = ids_BT != 0
  reference = None
  for backend, max_segments in BACKENDS:
    base = {
      'stage': 'attention',
      'shape': name,
      'B': B,
      'T': T,
      'N': N,
      'K': K,
      'H': H,
      'dtype': jnp.dtype(dtype).name,
      'mask': mask,
      'backend': backend,
      'max_segments': max_segments,
    }
    try:
      program = attention_program(backend, max_segments, causal)
      compiled, fallback, calls_cudnn = compile_watching_fallbacks(
        program, (*args, ids_BT, prefix_BT), fallbacks
      )
      ms = median_ms(compiled, (*args, ids_BT, prefix_BT), reps)
      out, grads = compiled(*args, ids_BT, prefix_BT)
      values = dict(zip(('out', 'dq', 'dk', 'dv'), (out, *grads), strict=True))
      reference = values if backend == 'xla' else reference
      ran = which_ran(
        backend, max_segments, fallback, calls_cudnn, ids_BT, prefix=prefix_BT is not None
      )
      record(
        dict(
          base,
          ran=ran,
          fallback=fallback,
          calls_cudnn=calls_cudnn,
          ms=ms,
          **compare(values, reference, real_BT),
        )
      )
    except Exception as e:  # pylint: disable=broad-except  # Record it; go on to the next one.
      record(dict(base, error=f'{type(e).__name__}: {e}'[:2000]))


def stage_attention(record: Recorder, dry: bool, dtype: jnp.dtype, reps: int) -> None:
  fallbacks = FallbackLog()
  logging.getLogger(attention.__name__).addHandler(fallbacks)
  for name, shape in (ATTENTION_SHAPES_DRY if dry else ATTENTION_SHAPES).items():
    for mask in MASKS:
      attention_case(record, name, shape, mask, dtype, reps, fallbacks)


def loss_program(chunk: int):
  """The jitted value_and_grad w.r.t. (x, head) of the mean loss; chunk 0: logits whole."""

  def mean_loss(x_BLD, head_DV, targets_BL, weights_BL):
    if chunk:
      sums = loss.chunked_cross_entropy(x_BLD, head_DV, targets_BL, weights_BL, chunk=chunk)
    else:
      logits_BLV = jnp.einsum('BLD,DV->BLV', x_BLD, head_DV).astype(jnp.float32)
      sums = loss.cross_entropy(logits_BLV, targets_BL, weights_BL)
    # objective_sum: what training differentiates (the chunked loss's reports carry no gradient).
    return sums['objective_sum'] / sums['weight_sum']

  return jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1)))


def loss_case(
  record: Recorder, name: str, shape: tuple, chunks: tuple, dtype: jnp.dtype, reps: int
) -> None:
  """Every chunk size for one head shape, held to the first (0, unchunked)."""
  B, L, D, V = shape
  keys = jax.random.split(jax.random.key(1), 4)
  args = (
    jax.random.normal(keys[0], (B, L, D), dtype),
    (jax.random.normal(keys[1], (D, V), jnp.float32) * D**-0.5).astype(dtype),
    jax.random.randint(keys[2], (B, L), 0, V),
    # About one target in ten weighs nothing, as padding and prompts do.
    (jax.random.uniform(keys[3], (B, L)) > 0.1).astype(jnp.float32),
  )
  reference = None
  for chunk in chunks:
    base = {
      'stage': 'loss',
      'shape': name,
      'B': B,
      'L': L,
      'D': D,
      'V': V,
      'dtype': jnp.dtype(dtype).name,
      'chunk': chunk,
    }
    try:
      compiled = loss_program(chunk).lower(*args).compile()
      memory = compiled.memory_analysis()  # None where a backend has no analysis.
      ms = median_ms(compiled, args, reps)
      value, (d_x, d_head) = compiled(*args)
      values = {'loss': value, 'dx': d_x, 'dhead': d_head}
      reference = values if chunk == 0 else reference
      record(
        dict(
          base,
          ms=ms,
          temp_bytes=int(memory.temp_size_in_bytes) if memory else None,
          loss=float(value),
          **compare(values, reference),
        )
      )
    except Exception as e:  # pylint: disable=broad-except  # Record it; go on to the next one.
      record(dict(base, error=f'{type(e).__name__}: {e}'[:2000]))


def stage_loss(record: Recorder, dry: bool, dtype: jnp.dtype, reps: int) -> None:
  for name, shape in (LOSS_SHAPES_DRY if dry else LOSS_SHAPES).items():
    loss_case(record, name, shape, LOSS_CHUNKS_DRY if dry else LOSS_CHUNKS, dtype, reps)


STAGES = {
  'versions': stage_versions,
  'matmul': stage_matmul,
  'attention': stage_attention,
  'loss': stage_loss,
}


def main(stages=STAGES, doc: str = __doc__) -> None:
  """The command line of this script, and of benchmarks/moe_kernels.py with its own stages."""
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0])
  parser.add_argument('--stage', choices=[*stages, 'all'], default='all')
  parser.add_argument('--out', default='', help='Also append each record to OUT/kernels.jsonl.')
  parser.add_argument('--dry_run', action='store_true', help='Tiny shapes (automatic on CPU).')
  parser.add_argument('--reps', type=int, default=0, help='Timed calls (default 10; 3 dry).')
  args = parser.parse_args()
  on_cpu = jax.default_backend() == 'cpu'
  dry = args.dry_run or on_cpu
  dtype = jnp.float32 if on_cpu else jnp.bfloat16  # bfloat16 is no faster on CPUs.
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  record = Recorder(args.out)
  for name in stages if args.stage == 'all' else [args.stage]:
    stages[name](record, dry, dtype, args.reps or (3 if dry else 10))
  sys.exit(finish(record))


if __name__ == '__main__':
  main()
