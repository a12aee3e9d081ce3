"""Benchmark: the Mixture-of-Experts expert MLP alone, by each of pretrax's two computations
(model/moe.py), against a dense MLP of the same FLOPs, and what the grouped matmul lowered to.

  python benchmarks/moe_kernels.py --stage=versions|moe|all [--out=DIR] [--dry_run] [--reps=N]

Prints one JSON line per measurement (and appends it to DIR/kernels.jsonl with --out, beside
benchmarks/kernels.py's records):

- versions: as benchmarks/kernels.py's (python, jax, jaxlib, device, cuDNN, XLA_FLAGS).
- moe: per shape, forward + backward (the output and jax.vjp of a fixed random cotangent w.r.t.
  the tokens, the experts' weights and the routing weights) of SwiGLU experts, by
  - dense: tokens x top_k rows through one expert-sized MLP, plain matmuls: the same
    multiply-adds as the experts', the reference;
  - dropless: moe.dropless (copies sorted by expert, three jax.lax.ragged_dot);
  - dropless_cudnn: the same compiled with XLA's cuDNN ragged-dot fusion option
    (xla_gpu_experimental_use_ragged_dot_fusion; 'skipped' where this XLA has no such option);
  - capacity: moe.with_capacity at CAPACITY_FACTOR, one group per sequence (as the layer's);
  - route: moe.route alone (router matmul, softmax, top-k, weights). The routing is EXCLUDED
    from the three above, which all take one fixed routing (random tokens and router weights:
    near-uniform scores, so roughly balanced loads; the record gives the busiest expert's load
    over the mean).
  Shapes: moe_8x_1b (configs/moe_8x_1b.py: embed 2048, 8 experts of 4096, 2 a token) and moe_64e
  (configs/moe_64e.py: 64 experts of 896, 8 a token; its shared expert left out), each on 16k
  tokens (a micro-batch of 8 sequences of 2048). Each record: ms (median), compile_s, tflops (the
  useful FLOPs only, 18 x tokens x top_k x embed x expert_dim: the copies the routing asks for,
  whatever a computation does beyond them), speed_vs_dense (the dense ms / this ms),
  xla_flops_ratio (XLA's own FLOP count of the compiled program over the useful one: about the
  number of experts where every expert sees every row), dropped_fraction (capacity: copies past
  an expert's buffer), and for the dropless ones the lowering (grouped_matmul_lowering): the
  ragged dots traced, those JAX handed XLA (to_xla; 0 where JAX expands them itself, as for
  CPUs), those left in the compiled program as grouped matmuls, the matmul-like ops found, and a
  verdict: 'grouped', 'partial', 'dense-fallback' or 'unknown'.

bfloat16 on accelerators, float32 on CPU. --dry_run (automatic on CPU) uses tiny shapes, so the
stage finishes in seconds. Exits 1 if any measurement failed (its record says why).
"""

import collections
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import kernels  # benchmarks/kernels.py: its Recorder, timer and version record.
import numpy as np

from pretrax.config_types import MoeConfig
from pretrax.model import moe


class Shape(NamedTuple):
  tokens: int  # T: a micro-batch's tokens.
  seq_len: int  # The capacity computation's group (one sequence, as the layer's).
  embed: int  # D
  expert_dim: int  # F
  experts: int  # E
  top_k: int  # K


SHAPES = {
  'moe_8x_1b': Shape(16384, 2048, 2048, 4096, 8, 2),
  'moe_64e': Shape(16384, 2048, 2048, 896, 64, 8),
}
SHAPES_DRY = {
  'moe_8x_1b': Shape(256, 64, 64, 128, 4, 2),
  'moe_64e': Shape(256, 64, 64, 32, 16, 4),
}
CAPACITY_FACTOR = 1.25
# XLA:GPU's switch for cuDNN grouped GEMMs in place of its default rewrite of a ragged dot into
# a dense one (openxla/xla #40189: cuDNN 9.21+ forward and data gradient, 9.24+ weight gradient).
CUDNN_RAGGED_DOT = {'xla_gpu_experimental_use_ragged_dot_fusion': True}
# What a grouped matmul looks like once compiled: a ragged-dot instruction that survived (inside
# a cuDNN or Triton fusion, or TPU's own), a grouped-GEMM library call (hipBLASLt, cuBLASLt), or a
# kernel of JAX's own (Pallas) named so.
GROUPED = re.compile(r'group|ragged', re.IGNORECASE)
KERNEL_CALL = re.compile(r'triton|mosaic|pallas|tpu_custom_call', re.IGNORECASE)
GEMM_CALL = re.compile(r'gemm|matmul|cublas', re.IGNORECASE)
GEMM_FUSION = re.compile(r'gemm|cudnn|triton', re.IGNORECASE)
# One instruction of HLO text: `[ROOT] %name = SHAPE opcode(operands), attributes`. The opcode is
# the first lowercase word before '(' after '=' (shapes and layouts hold none: `T(8,128)`).
INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+ = (.*)$', re.MULTILINE)
OPCODE = re.compile(r'([a-z][a-z0-9\-]*)\(')
CALL_TARGET = re.compile(r'custom_call_target="([^"]+)"')
KERNEL_NAME = re.compile(r'\bname\s*=\s*\\?"([^"\\]+)')
FUSION_KIND = re.compile(r'"kind":"(__[^"]+)"')
# A ragged-dot op in StableHLO text, not its dimension-numbers attribute (#chlo.ragged_dot<...>).
XLA_RAGGED_DOT = re.compile(r'(?<![#\w.])(?:chlo|mhlo|stablehlo)\.ragged_dot\b(?!<)')


def hlo_ops(hlo: str) -> dict[str, int]:
  """Counts of what says how a compiled program multiplies: the ragged-dot, dot and while
  instructions, each custom call's target ('custom-call:TARGET', and ':KERNEL' for a kernel
  launcher such as Triton's) and each fusion's backend kind ('fusion:KIND'). Names of
  instructions and operands and their metadata are never read: after XLA rewrites a ragged dot
  into a dense one, the new instructions keep its name and op_name."""
  ops = collections.Counter()
  for rest in INSTRUCTION.findall(hlo):
    opcode = OPCODE.search(rest)
    opcode = opcode.group(1) if opcode else ''
    if opcode in ('ragged-dot', 'dot', 'while'):
      ops[opcode] += 1
    elif opcode == 'custom-call' and (target := CALL_TARGET.search(rest)):
      key = f'custom-call:{target.group(1)}'
      config = rest[rest.find('backend_config=') :] if 'backend_config=' in rest else ''
      if KERNEL_CALL.search(key) and (kernel := KERNEL_NAME.search(config)):
        key += f':{kernel.group(1)}'
      ops[key] += 1
    elif opcode == 'fusion' and (kind := FUSION_KIND.search(rest)):
      ops[f'fusion:{kind.group(1)}'] += 1
  return dict(sorted(ops.items()))


def grouped_matmul_lowering(hlo: str, traced: int) -> dict:
  """What `traced` ragged dots became in the compiled program `hlo` (its as_text()).

  grouped: the ragged-dot instructions left (a backend that runs them as such) plus the grouped
  GEMM calls and kernels. verdict: 'grouped' if every traced one is; 'partial' if some are (cuDNN
  before 9.24 groups the forward and data gradient but rewrites the weight gradient); 'unknown'
  if none is but the program launches a kernel of its own (it may be a grouped one under another
  name); 'dense-fallback' if none is and the program multiplies by dots, GEMM calls or while
  loops (every expert on every row, or one expert after another); else 'unknown'."""
  ops = hlo_ops(hlo)
  calls = [op for op in ops if op.startswith('custom-call:')]
  grouped = ops.get('ragged-dot', 0) + sum(ops[op] for op in calls if GROUPED.search(op))
  multiplies = (
    'dot' in ops
    or 'while' in ops
    or any(GEMM_CALL.search(op) for op in calls)
    or any(op.startswith('fusion:') and GEMM_FUSION.search(op) for op in ops)
  )
  if traced and grouped >= traced:
    verdict = 'grouped'
  elif grouped:
    verdict = 'partial'
  elif multiplies and not any(KERNEL_CALL.search(op) for op in calls):
    verdict = 'dense-fallback'
  else:
    verdict = 'unknown'
  return {'grouped': grouped, 'ops': ops, 'verdict': verdict}


class Inputs(NamedTuple):
  x_TD: jax.Array
  wi_EDF: jax.Array
  gate_EDF: jax.Array
  wo_EFD: jax.Array
  router_DE: jax.Array  # float32, as the layer's.
  expert_TK: jax.Array  # The fixed routing the expert computations take.
  weight_TK: jax.Array


def make_inputs(shape: Shape, dtype: jnp.dtype) -> Inputs:
  """Random tokens and weights (std 1/sqrt(fan-in)) and the routing moe.route gives them."""
  T, D, F, E, K = shape.tokens, shape.embed, shape.expert_dim, shape.experts, shape.top_k
  keys = jax.random.split(jax.random.key(0), 5)
  x_TD = jax.random.normal(keys[0], (T, D), dtype)
  router_DE = jax.random.normal(keys[4], (D, E), jnp.float32) * D**-0.5
  cfg = MoeConfig(num_experts=E, top_k=K, expert_dim=F)
  routing = jax.jit(moe.route, static_argnums=3)(x_TD, router_DE, jnp.zeros(E), cfg)
  return Inputs(
    x_TD,
    (jax.random.normal(keys[1], (E, D, F), jnp.float32) * D**-0.5).astype(dtype),
    (jax.random.normal(keys[2], (E, D, F), jnp.float32) * D**-0.5).astype(dtype),
    (jax.random.normal(keys[3], (E, F, D), jnp.float32) * F**-0.5).astype(dtype),
    router_DE,
    routing.expert_TK,
    routing.weight_TK,
  )


def programs(shape: Shape, inputs: Inputs) -> dict:
  """name: (f(*differentiated, *fixed) -> (output, aux), differentiated, fixed, useful FLOPs)."""
  T, D, F, E, K = shape.tokens, shape.embed, shape.expert_dim, shape.experts, shape.top_k
  experts = (inputs.x_TD, inputs.wi_EDF, inputs.gate_EDF, inputs.wo_EFD, inputs.weight_TK)
  useful = 18.0 * T * K * D * F  # 3 matmuls of 2 x rows x D x F, forward and twice backward.

  def dense(x_XD, wi_DF, gate_DF, wo_FD):
    return (jax.nn.silu(x_XD @ gate_DF) * (x_XD @ wi_DF)) @ wo_FD, {}

  def dropless(x_TD, wi_EDF, gate_EDF, wo_EFD, weight_TK, expert_TK):
    routing = moe.Routing(expert_TK, weight_TK, None, None)
    return moe.dropless(x_TD, routing, wi_EDF, gate_EDF, wo_EFD), {}

  def capacity(x_TD, wi_EDF, gate_EDF, wo_EFD, weight_TK, expert_TK):
    routing = moe.Routing(expert_TK, weight_TK, None, None)
    groups = T // shape.seq_len
    y_TD, dropped = moe.with_capacity(
      x_TD, routing, wi_EDF, gate_EDF, wo_EFD, CAPACITY_FACTOR, groups
    )
    return y_TD, {'dropped': dropped}

  def route(x_TD, router_DE, bias_E):
    routing = moe.route(x_TD, router_DE, bias_E, MoeConfig(num_experts=E, top_k=K))
    return (routing.weight_TK, routing.probs_TE), {}  # Probabilities: the balance loss's.

  x_XD = jax.random.normal(jax.random.key(1), (T * K, D), inputs.x_TD.dtype)
  one = (x_XD, inputs.wi_EDF[0], inputs.gate_EDF[0], inputs.wo_EFD[0])
  fixed = (inputs.expert_TK,)
  return {
    'dense': (dense, one, (), useful),
    'dropless': (dropless, experts, fixed, useful),
    'dropless_cudnn': (dropless, experts, fixed, useful),
    'capacity': (capacity, experts, fixed, useful),
    'route': (route, (inputs.x_TD, inputs.router_DE), (jnp.zeros(E),), 6.0 * T * D * E),
  }


def forward_backward(f, num_differentiated: int):
  """g(*args, cotangent) -> (output, gradients of the first `num_differentiated` args, aux)."""

  def g(*args):
    *args, cotangent = args
    differentiated, fixed = args[:num_differentiated], args[num_differentiated:]
    out, vjp, aux = jax.vjp(lambda *d: f(*d, *fixed), *differentiated, has_aux=True)
    return out, vjp(cotangent), aux

  return g


def cotangent(f, args: tuple):
  """A fixed random cotangent for f's output (each leaf its shape and dtype)."""
  out, _ = jax.eval_shape(f, *args)
  leaves, tree = jax.tree.flatten(out)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  draws = [jax.random.normal(k, a.shape, jnp.float32) for k, a in zip(keys, leaves, strict=True)]
  return tree.unflatten([d.astype(a.dtype) for d, a in zip(draws, leaves, strict=True)])


def xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()  # A dict; a list of one per program in older JAX.
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return cost.get('flops')


def lowering(g, args: tuple, lowered, compiled) -> dict:
  """grouped_matmul_lowering of the compiled program, with the ragged dots JAX traced and those
  it handed XLA (none where JAX expands them itself, as for CPUs)."""
  traced = str(jax.make_jaxpr(g)(*args)).count('ragged_dot_general[')
  to_xla = len(XLA_RAGGED_DOT.findall(lowered.as_text()))
  return {'traced': traced, 'to_xla': to_xla, **grouped_matmul_lowering(compiled.as_text(), traced)}


def moe_case(
  record, base: dict, program: tuple, options: dict | None, reps: int, dense_ms: float | None
) -> float | None:
  """Compiles, inspects and times one program; records it; returns its ms (None if it failed)."""
  f, differentiated, fixed, useful = program
  g = forward_backward(f, len(differentiated))
  try:
    args = (*differentiated, *fixed, cotangent(f, (*differentiated, *fixed)))
    start = time.perf_counter()
    lowered = jax.jit(g).lower(*args)
    compiled = lowered.compile(compiler_options=options)
    compile_s = time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except  # Record it; go on to the next one.
    key = 'skipped' if 'No such compile option' in str(e) else 'error'
    record(dict(base, **{key: f'{type(e).__name__}: {e}'[:2000]}))
    return None
  try:
    ms = kernels.median_ms(compiled, args, reps)
    _, _, aux = compiled(*args)
    flops = xla_flops(compiled)
    extra = {'lowering': lowering(g, args, lowered, compiled)} if 'dropless' in base['impl'] else {}
    if 'dropped' in aux:
      extra['dropped_fraction'] = float(aux['dropped']) / base['copies']
    record(
      dict(
        base,
        ms=ms,
        compile_s=compile_s,
        tflops=useful / (ms / 1000) / 1e12,
        speed_vs_dense=(dense_ms or ms) / ms,  # The dense one is its own reference.
        xla_flops_ratio=flops / useful if flops else None,
        **extra,
      )
    )
    return ms
  except Exception as e:  # pylint: disable=broad-except
    record(dict(base, error=f'{type(e).__name__}: {e}'[:2000]))
    return None


def shape_cases(record, name: str, shape: Shape, dtype: jnp.dtype, reps: int) -> None:
  """Every computation of one shape; dense first, the reference the others are compared with."""
  inputs = make_inputs(shape, dtype)
  load_E = np.bincount(np.asarray(inputs.expert_TK).ravel(), minlength=shape.experts)
  base = {
    'stage': 'moe',
    'shape': name,
    **shape._asdict(),
    'copies': shape.tokens * shape.top_k,
    'dtype': jnp.dtype(dtype).name,
    'load_max_over_mean': float(load_E.max() / load_E.mean()),
  }
  dense_ms = None
  for impl, program in programs(shape, inputs).items():
    options = CUDNN_RAGGED_DOT if impl == 'dropless_cudnn' else None
    # Every time but route's leaves the routing out: it was computed once, beforehand.
    routing = {} if impl == 'route' else {'routing': 'excluded (timed alone: impl route)'}
    ms = moe_case(record, dict(base, impl=impl, **routing), program, options, reps, dense_ms)
    dense_ms = ms if impl == 'dense' else dense_ms


def stage_moe(record: kernels.Recorder, dry: bool, dtype: jnp.dtype, reps: int) -> None:
  for name, shape in (SHAPES_DRY if dry else SHAPES).items():
    try:
      shape_cases(record, name, shape, dtype, reps)
    except Exception as e:  # pylint: disable=broad-except  # The inputs failed (memory?).
      record({'stage': 'moe', 'shape': name, 'error': f'{type(e).__name__}: {e}'[:2000]})


STAGES = {'versions': kernels.stage_versions, 'moe': stage_moe}


def main() -> None:
  kernels.main(STAGES, __doc__)


if __name__ == '__main__':
  main()
