"""`pretrax plan`: what one device will hold for a config and its mesh, before paying for any.

  pretrax plan --config=configs/llama_1b.py --devices=8 --device_memory_gib=16

Per parameter: its logical axes, the PartitionSpec the rules give it and the bytes of one device's
shard. Per device: parameters, optimizer state, and XLA's own memory analysis of the real jitted
train step (lowered on abstract inputs, so nothing is allocated), whose temporaries are the
activations kept for the backward pass plus the step's scratch space.

Attention is planned as a fused kernel holds it (`attention_memory='fused'`, the default): cuDNN
and splash keep their inputs, output and per-row log-sum-exp, never the T x T scores that XLA:CPU's
attention keeps. The step is compiled with a stand-in of exactly that footprint in place of
attention (its values are meaningless; nothing runs). `attention_memory='compiled'` plans the
attention this machine would run.

Dropless Mixture-of-Experts layers are planned the same way, as a grouped-matmul kernel (megablox
on TPUs, cuDNN's grouped matmul on GPUs) holds them (`expert_memory='grouped'`, the default): one
(copies, hidden) output per matmul. XLA:CPU has no such kernel: it lowers `ragged_dot` to every
expert on every token copy, experts times the FLOPs and the memory (`expert_memory='compiled'`).

A Mixture-of-Experts model holds more parameters than a token goes through: `num_params` counts
them all, `active_params` those of the top_k experts a token is routed to (and everything else:
embeddings, attention, routers, shared experts), and `flops_per_token` is the training FLOPs of
`pretrax.metrics.flops_per_token`, which counts the active ones.
"""

from collections.abc import Iterable, Sequence
import contextlib
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp

from pretrax import metrics, run_config
from pretrax import state as state_lib
from pretrax.config_types import RunConfig
from pretrax.data.batch import Batch
from pretrax.model import attention as attention_lib
from pretrax.model import moe as moe_lib

GiB = 1024**3
# A replicated parameter earns a warning from this size, or from this share of all parameters
# (small models: a replicated table there is as much a mistake as a 1 GiB one in a large model).
REPLICATED_WARN_BYTES = 1024**2
REPLICATED_WARN_SHARE = 0.01


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  path: str  # e.g. blocks.0.attn.q
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple[str | None, ...]
  spec: jax.sharding.PartitionSpec
  bytes_per_device: int  # One device's shard.
  replicated: bool  # Held whole by every device of a mesh of more than one.


@dataclasses.dataclass(frozen=True)
class Plan:
  """Bytes are per device. `xla` is the compiled train step's memory analysis."""

  flavour: str
  num_params: int
  mesh: dict[str, int]
  platform: str
  params: tuple[ParamPlan, ...]
  param_bytes: int
  opt_state_bytes: int
  batch_bytes: int
  xla: dict[str, int]
  compile_s: float
  warnings: tuple[str, ...]
  attention_memory: str = 'fused'  # fused | compiled (see the module docstring)
  active_params: int = 0  # Those a token goes through (num_params for a dense model).
  experts: tuple[int, int] = (0, 0)  # (top_k, num_experts); (0, 0) for a dense model.
  flops_per_token: float = 0.0  # Training FLOPs, active parameters only (metrics.flops_per_token).
  # Dropless experts: grouped | compiled (see the module docstring); '' where there are none.
  expert_memory: str = ''

  @property
  def temp_bytes(self) -> int:
    return self.xla['temp_size_in_bytes']

  @property
  def peak_bytes(self) -> int:
    """Inputs + outputs + temporaries + code (see `peak_bytes`)."""
    return _peak(self.xla)


_XLA_FIELDS = (
  'argument_size_in_bytes',
  'output_size_in_bytes',
  'alias_size_in_bytes',
  'temp_size_in_bytes',
  'generated_code_size_in_bytes',
)


def vocab_size(c: RunConfig) -> int:
  """The vocabulary the model will have without training a tokenizer: model.vocab_size, else the
  tokenizer file's size, else tokenizer.vocab_size (an upper bound for char tokenizers)."""
  if c.model.vocab_size:
    return c.model.vocab_size
  if c.tokenizer.path and os.path.isfile(c.tokenizer.path):
    from pretrax import tokenizer

    return tokenizer.Tokenizer.load(c.tokenizer.path).vocab_size
  return c.tokenizer.vocab_size


def use_fake_cpu_devices(n: int) -> None:
  """Plan on `n` CPU devices; call before anything starts a JAX backend (devices are fixed then).

  XLA:CPU's default scheduler orders work for concurrency, not memory, and so keeps everything that
  remat would recompute alive: its temporaries ignore `model.remat`. Accelerators schedule for
  memory; so must we, for the plan to mean something.
  """
  flag = '--xla_cpu_enable_concurrency_optimized_scheduler=false'
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip()
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', n)


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
  return math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize


def _abstract_batch(c: RunConfig, run: state_lib.RunState) -> Batch[jax.ShapeDtypeStruct]:
  """The shapes of a batch on the run's mesh (RunState.abstract_batch)."""
  return run.abstract_batch(c)


def _compile_train_step(c: RunConfig, run: state_lib.RunState, batch: Batch[jax.ShapeDtypeStruct]):
  """The train step exactly as `train` jits it, compiled for the abstract state and batch."""
  return run.jit_train_step(c).lower(run.abstract, batch).compile()


def _warnings(params: Sequence[ParamPlan], mesh: dict[str, int], state_bytes: int) -> list[str]:
  num_devices = math.prod(mesh.values())
  if num_devices == 1:
    return []
  # Pure data parallelism replicates by design: say so once. (An expert axis splits the experts
  # alone: the other parameters of an MoE model are then named one by one.)
  if mesh['fsdp'] * mesh['tensor'] == 1 and all(p.replicated for p in params):
    return [
      f'the mesh shards no parameter (fsdp=1, tensor=1): each of the {num_devices} devices '
      f'holds all parameters and optimizer state ({_human(state_bytes)}); set '
      '--config.mesh.fsdp=-1 --config.mesh.data=1 if that is too much.'
    ]
  total = sum(math.prod(p.shape) * jnp.dtype(p.dtype).itemsize for p in params)
  out = []
  for p in params:
    if p.replicated and (
      p.bytes_per_device >= REPLICATED_WARN_BYTES
      or p.bytes_per_device >= REPLICATED_WARN_SHARE * total
    ):
      out.append(
        f'{p.path} {p.shape} ({_human(p.bytes_per_device)}) is replicated on all '
        f'{num_devices} devices: its logical axes ({_axes(p.logical_axes)}) map to no '
        'mesh axis of size > 1; map one to fsdp or tensor with --config.mesh.rules.'
      )
  return out


ATTENTION_MEMORY = ('fused', 'compiled')


@jax.custom_vjp
def _fused_attention_stand_in(q_BTNH, k_BSKH, v_BSKH):
  return _stand_in_forward(q_BTNH, k_BSKH, v_BSKH)[0]


def _stand_in_forward(q_BTNH, k_BSKH, v_BSKH):
  """An output of attention's shape and a float32 log-sum-exp per query and head, from every
  input: the buffers a flash kernel's forward makes and its backward reads."""
  out_BTNH = q_BTNH * (jnp.mean(k_BSKH) + jnp.mean(v_BSKH)).astype(q_BTNH.dtype)
  lse_BNT = jnp.swapaxes(jnp.sum(q_BTNH, axis=-1, dtype=jnp.float32), 1, 2)
  return out_BTNH, lse_BNT


def _stand_in_fwd(q_BTNH, k_BSKH, v_BSKH):
  out_BTNH, lse_BNT = _stand_in_forward(q_BTNH, k_BSKH, v_BSKH)
  return out_BTNH, (q_BTNH, k_BSKH, v_BSKH, out_BTNH, lse_BNT)


def _stand_in_bwd(residuals, d_out_BTNH):
  q_BTNH, k_BSKH, v_BSKH, out_BTNH, lse_BNT = residuals
  # Every residual is read, as the kernel's backward reads them, so XLA keeps them all.
  scale = jnp.sum(lse_BNT) + jnp.sum(q_BTNH, dtype=jnp.float32)
  return (
    d_out_BTNH * out_BTNH * scale.astype(q_BTNH.dtype),
    k_BSKH * scale.astype(k_BSKH.dtype),
    v_BSKH * scale.astype(v_BSKH.dtype),
  )


_fused_attention_stand_in.defvjp(_stand_in_fwd, _stand_in_bwd)


@contextlib.contextmanager
def _attention_planned_as(attention_memory: str):
  """Within it, the model's attention is the fused kernel's stand-in (for 'fused')."""
  if attention_memory == 'compiled':
    yield
    return
  real = attention_lib.attention
  attention_lib.attention = lambda q, k, v, *args, **kwargs: _fused_attention_stand_in(q, k, v)
  try:
    yield
  finally:
    attention_lib.attention = real


EXPERT_MEMORY = ('grouped', 'compiled')


def _grouped_matmul(
  lhs_MK,
  rhs_GKN,
  group_sizes_G,
  precision=None,
  preferred_element_type=None,
  group_offset=None,
  out_sharding=None,
):
  """A stand-in with `jax.lax.ragged_dot`'s signature and a grouped kernel's footprint: one
  (M, K) x (K, N) matmul forward, and backward an (M, K) gradient for the rows and a (G, K, N) one
  for the weights, each from one matmul of M rows. Which rows go to which group changes neither."""
  del group_sizes_G, group_offset, out_sharding
  return jnp.matmul(
    lhs_MK,
    jnp.sum(rhs_GKN, axis=0),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def _experts_planned_as(expert_memory: str):
  """A context in which the dropless experts' grouped matmul is a grouped kernel's stand-in (for
  'grouped'): XLA:CPU's own lowering of `ragged_dot` runs every group on every row."""
  if expert_memory == 'compiled':
    return contextlib.nullcontext()
  return moe_lib.grouped_matmul(_grouped_matmul)


def active_params(
  sizes_and_axes: Iterable[tuple[int, tuple[str | None, ...]]], top_k: int, num_experts: int
) -> int:
  """Parameters a token goes through, from each tensor's (size, logical axes): of one split over
  experts (logical axis `experts`), the share of its top_k experts; every other one whole (a
  dense model's all)."""
  return sum(
    size * top_k // num_experts if 'experts' in axes else size for size, axes in sizes_and_axes
  )


def _count(params: Sequence[ParamPlan]) -> int:
  return sum(math.prod(p.shape) for p in params)


def plan(
  c: RunConfig,
  vocab_size: int,
  devices: Sequence[jax.Device] | None = None,
  attention_memory: str = 'fused',
  expert_memory: str = 'grouped',
) -> Plan:
  """The per-device memory plan of `c` on `devices` (default: all); compiles, allocates nothing.
  `attention_memory`: 'fused' plans attention as cuDNN or splash holds it, 'compiled' as this
  machine's kernel does; `expert_memory`: 'grouped' plans dropless experts as a grouped-matmul
  kernel holds them, 'compiled' as this machine runs them (see the module docstring)."""
  if attention_memory not in ATTENTION_MEMORY:
    raise ValueError(f'attention_memory={attention_memory!r} is not one of {ATTENTION_MEMORY}.')
  if expert_memory not in EXPERT_MEMORY:
    raise ValueError(f'expert_memory={expert_memory!r} is not one of {EXPERT_MEMORY}.')
  devices = list(devices if devices is not None else jax.devices())
  run = state_lib.build(c, vocab_size, devices)
  mesh = dict(run.mesh.shape)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(run.abstract['params'])
  # jaxlib's PyTreeDef is compiled and has no type stubs: mypy cannot see its methods.
  axes_of = treedef.flatten_up_to(run.logical_axes)  # type: ignore[attr-defined]
  params = tuple(
    ParamPlan(
      path=jax.tree_util.keystr(path, simple=True, separator='.'),
      shape=x.shape,
      dtype=str(x.dtype),
      logical_axes=axes,
      spec=x.sharding.spec,
      bytes_per_device=_shard_bytes(x),
      replicated=len(devices) > 1 and x.sharding.shard_shape(x.shape) == x.shape,
    )
    for (path, x), axes in zip(leaves, axes_of, strict=True)
  )
  param_bytes = sum(p.bytes_per_device for p in params)
  opt_state_bytes = sum(_shard_bytes(x) for x in jax.tree.leaves(run.abstract['opt_state']))
  batch = _abstract_batch(c, run)

  start = time.perf_counter()
  with _attention_planned_as(attention_memory), _experts_planned_as(expert_memory):
    analysis = _compile_train_step(c, run, batch).memory_analysis()
  compile_s = time.perf_counter() - start
  if analysis is None:
    raise RuntimeError(
      f'XLA gave no memory analysis on {devices[0].platform}; plan on CPU with --devices=N instead.'
    )
  moe = c.model.moe
  return Plan(
    flavour=c.model.flavour,
    num_params=_count(params),
    mesh=mesh,
    platform=devices[0].platform,
    params=params,
    param_bytes=param_bytes,
    opt_state_bytes=opt_state_bytes,
    batch_bytes=sum(_shard_bytes(x) for x in jax.tree.leaves(batch)),
    xla=xla_fields(analysis),
    compile_s=compile_s,
    warnings=tuple(_warnings(params, mesh, param_bytes + opt_state_bytes)),
    attention_memory=attention_memory,
    active_params=active_params(
      ((math.prod(p.shape), p.logical_axes) for p in params), moe.top_k, moe.num_experts
    ),
    experts=(moe.top_k, moe.num_experts) if moe.num_experts else (0, 0),
    flops_per_token=metrics.flops_per_token(run_config.model_config(c, vocab_size), c.data.seq_len),
    expert_memory=expert_memory if moe.num_experts and not moe.capacity_factor else '',
  )


def xla_fields(analysis) -> dict[str, int]:
  """The sizes a plan keeps from XLA's memory analysis (`compiled.memory_analysis()`)."""
  return {k: int(getattr(analysis, k)) for k in _XLA_FIELDS}


def peak_bytes(analysis) -> int:
  """Per-device bytes of a compiled step: inputs + outputs + temporaries + code, the donated
  state counted once (it is an input and an output in the same buffers)."""
  return _peak(xla_fields(analysis))


def _peak(x: dict[str, int]) -> int:
  """The one formula behind `peak_bytes` and `Plan.peak_bytes`, on `xla_fields`' sizes."""
  return (
    x['argument_size_in_bytes']
    + x['output_size_in_bytes']
    - x['alias_size_in_bytes']
    + x['temp_size_in_bytes']
    + x['generated_code_size_in_bytes']
  )


def device_memory_bytes(device: jax.Device) -> int | None:
  """What one device can hold: the allocator's limit on accelerators; on a CPU, the host's
  available memory shared by its local devices. None where neither is known."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    try:
      with open('/proc/meminfo') as f:
        info = dict(line.split(':', 1) for line in f)
      available = int(info['MemAvailable'].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
      return None
    return available // max(jax.local_device_count(), 1)
  return None


# ---------------------------------------------------------------------------------------------
# The table.


def _human(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB'):
    if abs(n) < 1024:
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.2f} GiB'


def _human_flops(n: float) -> str:
  units = ('', 'k', 'M', 'G', 'T', 'P')
  i = 0
  while abs(n) >= 1000 and i < len(units) - 1:
    n, i = n / 1000, i + 1
  return f'{n:.2f} {units[i]}FLOPs'


def _axes(names) -> str:
  """Mesh or logical axes as the rules write them: `-` for none, `a+b` for several."""
  return ', '.join('-' if a is None else '+'.join(a) if isinstance(a, tuple) else a for a in names)


def verdict(p: Plan, device_memory_gib: float) -> str:
  need, have = p.peak_bytes / GiB, device_memory_gib
  if p.peak_bytes <= have * GiB:
    return f'fits: {need:.2f} of {have:.1f} GiB per device ({need / have:.0%})'
  return f'does NOT fit: {need:.2f} GiB per device needed, {have:.1f} GiB available'


def format_plan(p: Plan, device_memory_gib: float | None = None) -> str:
  mesh = ' '.join(f'{k}={v}' for k, v in p.mesh.items())
  rows = [('parameter', 'shape', 'logical axes', 'mesh axes', 'per device')]
  rows += [
    (
      q.path,
      'x'.join(map(str, q.shape)) or 'scalar',
      _axes(q.logical_axes),
      _axes(q.spec) or '(replicated)',
      _human(q.bytes_per_device),
    )
    for q in p.params
  ]
  widths = [max(len(r[i]) for r in rows) for i in range(5)]
  n = math.prod(p.mesh.values())
  top_k, num_experts = p.experts
  active = (
    f' ({p.active_params:,} active: {top_k} of {num_experts} experts a token)'
    if num_experts
    else ''
  )
  lines = [
    f'{p.flavour}, {p.num_params:,} parameters{active}; mesh {mesh} '
    f'({n} {p.platform} device{"s" if n > 1 else ""})',
    f'{_human_flops(p.flops_per_token)} per token (training: forward and backward)',
    '',
  ]
  lines += [
    '  '.join(
      f'{v:<{w}}' if i < 4 else f'{v:>{w}}' for i, (v, w) in enumerate(zip(r, widths, strict=True))
    ).rstrip()
    for r in rows
  ]
  x = p.xla
  totals = [
    ('parameters', p.param_bytes),
    ('optimizer state', p.opt_state_bytes),
    ('batch', p.batch_bytes),
    ('activations + temporaries (XLA)', p.temp_bytes),
    ('peak estimate', p.peak_bytes),
  ]
  lines += ['', 'per device:'] + [f'  {name:<33}{_human(n):>12}' for name, n in totals]
  lines.append(
    f'  (XLA: arguments {_human(x["argument_size_in_bytes"])}, outputs '
    f'{_human(x["output_size_in_bytes"])}, donated {_human(x["alias_size_in_bytes"])}, '
    f'code {_human(x["generated_code_size_in_bytes"])}; '
    f'compiled in {p.compile_s:.1f} s)'
  )
  if p.attention_memory == 'fused':
    lines.append(
      '  (attention as a fused kernel (cuDNN, splash) holds it: inputs, output and '
      "log-sum-exp, no T x T scores; --attention_memory=compiled for this machine's)"
    )
  elif p.platform == 'cpu':
    lines.append(
      '  (compiled by XLA:CPU, which keeps attention scores that a fused '
      'kernel (cuDNN on GPUs) never stores: for GPUs, an upper bound)'
    )
  if p.expert_memory == 'grouped':
    lines.append(
      '  (dropless experts as a grouped-matmul kernel (megablox, cuDNN) holds them: one output '
      "row per token copy, not XLA:CPU's every expert on every copy)"
    )
  if device_memory_gib:
    lines += ['', verdict(p, device_memory_gib)]
  if p.warnings:
    lines += ['', 'warnings:'] + [f'  {w}' for w in p.warnings]
  return '\n'.join(lines)
