"""Benchmark: the blocks' projections as FP8 matmuls (model.fp8, model/fp8.py) against the compute
dtype's, forward and backward, with FP8's error against float32.

  python benchmarks/fp8.py --stage=versions|fp8|all [--out=DIR] [--dry_run] [--reps=N]

Prints one JSON line per measurement (and appends it to DIR/kernels.jsonl with --out, beside
benchmarks/kernels.py's records), then a table of the fp8 stage:

- versions: as benchmarks/kernels.py's (python, jax, jaxlib, device, cuDNN, XLA_FLAGS).
- fp8: per projection of gpt2_small and llama_1b (a micro-batch of 8192 tokens; (T, I, O) for
  tokens x weight (I, O)), the output and jax.vjp of a fixed random cotangent w.r.t. the tokens
  and the weight, of a plain matmul in the compute dtype (bfloat16 on accelerators) and of
  fp8.matmul. Each record: both median ms, fp8_speedup (the plain ms / fp8's), the TFLOP/s of
  each (6 T I O useful FLOPs), converts (whether model.fp8_min_dim's default would convert it),
  the relative Frobenius error of fp8's output, dx and dw against float32 (and the compute
  dtype's own, for scale), and fp8_gemms: the cuBLASLt FP8 GEMM custom calls in the compiled
  program ('$f8' in their target), 3 where XLA runs all three products on FP8 tensor cores, 0
  where it upcast them (every CPU; a GPU without FP8 tensor cores).

The errors do not depend on the device: e4m3 for the forward operands predicts ~0.038 for the
output, e5m2 for the gradient ~0.059 for dx and dw (tests/test_fp8.py). --dry_run (automatic on
CPU) uses tiny shapes, so it finishes in seconds. Exits 1 if any measurement failed.
"""

import re

import jax
import jax.numpy as jnp
import kernels  # benchmarks/kernels.py: its Recorder, timer, version record and command line.
import numpy as np

from pretrax import config as config_lib
from pretrax.model import fp8

TOKENS = 8192  # gpt2_small: 8 x 1024; llama_1b: 4 x 2048.
# name: (T, I, O) of each distinct block projection, from configs/gpt2_small.py and llama_1b.py.
SHAPES = {
  'gpt2_small q/k/v/o': (TOKENS, 768, 768),
  'gpt2_small wi': (TOKENS, 768, 3072),
  'gpt2_small wo': (TOKENS, 3072, 768),
  'llama_1b q/o': (TOKENS, 2048, 2048),
  'llama_1b k/v': (TOKENS, 2048, 512),
  'llama_1b wi/wi_gate': (TOKENS, 2048, 8192),
  'llama_1b wo': (TOKENS, 8192, 2048),
}
SHAPES_DRY = {'tiny wi': (256, 64, 256), 'tiny wo': (256, 256, 64), 'small': (512, 512, 512)}
FP8_GEMM = re.compile(r'custom_call_target="__cublas\$lt\$matmul\$f8')


def forward_backward(matmul):
  """(y, dx, dw) of `matmul` at (x, w) for the cotangent g, as one jitted program."""

  def f(x, w, g):
    y, vjp = jax.vjp(matmul, x, w)
    return (y, *vjp(g))

  return jax.jit(f)


def relative_error(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fp8_case(record, name: str, shape: tuple[int, int, int], dtype, reps: int) -> dict:
  tokens, inner, outer = shape
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x32 = jax.random.normal(kx, (tokens, inner))
  w32 = jax.random.normal(kw, (inner, outer)) / np.sqrt(inner)
  g32 = jax.random.normal(kg, (tokens, outer))
  reference = forward_backward(lambda x, w: jnp.matmul(x, w, precision='highest'))(x32, w32, g32)
  args = tuple(a.astype(dtype) for a in (x32, w32, g32))
  out = {'stage': 'fp8', 'shape': name, 'T': tokens, 'I': inner, 'O': outer}
  out['dtype'] = jnp.dtype(dtype).name
  out['converts'] = fp8.converts(inner, outer, config_lib.base_config().model.fp8_min_dim)
  flops = 6 * tokens * inner * outer
  for label, matmul in (('plain', jnp.matmul), ('fp8', fp8.matmul)):
    compiled = forward_backward(matmul).lower(*args).compile()
    ms = kernels.median_ms(compiled, args, reps)
    got = compiled(*args)
    errors = [relative_error(a, b) for a, b in zip(got, reference, strict=True)]
    out.update(
      {
        f'{label}_ms': ms,
        f'{label}_tflops': flops / (ms / 1000) / 1e12,
        **{f'{label}_error_{k}': e for k, e in zip(('y', 'dx', 'dw'), errors, strict=True)},
      }
    )
    if label == 'fp8':
      out['fp8_gemms'] = len(FP8_GEMM.findall(compiled.as_text() or ''))
  out['fp8_speedup'] = out['plain_ms'] / out['fp8_ms']
  record(out)
  return out


def stage_fp8(record: kernels.Recorder, dry: bool, dtype: jnp.dtype, reps: int) -> None:
  rows = []
  for name, shape in (SHAPES_DRY if dry else SHAPES).items():
    try:
      rows.append(fp8_case(record, name, shape, dtype, reps))
    except Exception as e:  # pylint: disable=broad-except  # Record it; the next shape may run.
      record({'stage': 'fp8', 'shape': name, 'error': f'{type(e).__name__}: {e}'[:2000]})
  print(
    f'{"shape":22} {"T x I x O":>18} {"plain ms":>9} {"fp8 ms":>8} {"speedup":>7} '
    f'{"gemms":>5} {"err y":>6} {"err dx":>6} {"err dw":>6}'
  )
  for r in rows:
    dims = f'{r["T"]}x{r["I"]}x{r["O"]}'
    print(
      f'{r["shape"]:22} {dims:>18} {r["plain_ms"]:9.3f} {r["fp8_ms"]:8.3f} '
      f'{r["fp8_speedup"]:7.2f} {r["fp8_gemms"]:5d} {r["fp8_error_y"]:6.3f} '
      f'{r["fp8_error_dx"]:6.3f} {r["fp8_error_dw"]:6.3f}',
      flush=True,
    )


STAGES = {'versions': kernels.stage_versions, 'fp8': stage_fp8}


def main() -> None:
  kernels.main(STAGES, __doc__)


if __name__ == '__main__':
  main()
