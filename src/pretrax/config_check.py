"""Validation in one place: every impossible combination fails here, before anything compiles, with
a ConfigError naming the fields and the fix; and the corpus files a config names.

Imports config.py and config_specs.py, and locally data/sources.py (file checks) and sharding.py
(whole experts per device). `cautions` names what can run but likely was not meant.
"""

import math
import os

import ml_collections

from pretrax.config import (
  ATTENTION_BACKENDS,
  DTYPES,
  FINETUNE_OBJECTIVES,
  FLAVOURS,
  HEAD_INITS,
  OPTIMIZERS,
  POOLERS,
  POOLINGS,
  QK_NORMS,
  ROUTER_SCORES,
  SCHEDULES,
  STDLIB_CORPUS,
  TOKENIZER_TYPES,
  ConfigError,
  one_of,
  require,
)
from pretrax.config_specs import (
  REMAT_POLICIES,
  attention_kind,
  init_source,
  mixture,
  objective_mixture,
  profile_steps,
  remat_policy,
)
from pretrax.config_types import RunConfig


def validate(
  c: ml_collections.ConfigDict, *, num_devices: int = 1, check_data: bool = True
) -> None:
  """Raises ConfigError naming the fields and the fix for anything that cannot run."""
  objective_mixture(c.objective)
  one_of('tokenizer.model_type', c.tokenizer.model_type, TOKENIZER_TYPES)
  _validate_model(c.model, c.data.seq_len)
  _validate_qk_norm(c.model)
  _validate_mup(c.model)
  _validate_moe(c.model.moe, c.model.num_layers)
  _validate_scan(c.model)
  _validate_expert_mesh(c, num_devices)
  _validate_batches(c.data, c.optim, num_devices)
  _validate_optim(c.optim)
  _validate_objectives(c)
  _validate_run(c)
  if check_data:
    _validate_files(c)


def _validate_model(m: ml_collections.ConfigDict, seq_len: int) -> None:
  one_of('model.flavour', m.flavour, FLAVOURS)
  one_of('model.param_dtype', m.param_dtype, DTYPES)
  one_of('model.dtype', m.dtype, DTYPES)
  one_of('model.remat', remat_policy(m.remat), REMAT_POLICIES)
  one_of('model.attention_backend', m.attention_backend, ATTENTION_BACKENDS)
  for name in ('num_layers', 'num_heads', 'embed_dim'):
    require(m[name] > 0, f'model.{name}={m[name]} must be positive.')
  for name in ('loss_chunk', 'max_segments'):
    require(m[name] >= 0, f'model.{name}={m[name]} must be 0 or more.')
  require(
    m.fp8_min_dim >= 1,
    f'model.fp8_min_dim={m.fp8_min_dim} must be at least 1 (1: every block projection in FP8).',
  )
  require(
    m.head_dim > 0 or m.embed_dim % m.num_heads == 0,
    f'model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}: '
    'change one of them or set model.head_dim.',
  )
  kv_heads = m.num_kv_heads or m.num_heads
  require(
    m.num_heads % kv_heads == 0,
    f'model.num_kv_heads={kv_heads} does not divide model.num_heads={m.num_heads}: '
    'grouped-query attention needs whole groups.',
  )
  if m.flavour == 'llama':
    head_dim = m.head_dim or m.embed_dim // m.num_heads
    require(head_dim % 2 == 0, f'model head_dim={head_dim} must be even for RoPE.')
  require(
    m.max_len == 0 or seq_len <= m.max_len,
    f'data.seq_len={seq_len} exceeds model.max_len={m.max_len}: '
    'raise model.max_len or lower data.seq_len.',
  )
  require(0.0 <= m.dropout < 1.0, f'model.dropout={m.dropout} must be in [0, 1).')


def _validate_qk_norm(m: ml_collections.ConfigDict) -> None:
  """model.qk_norm: a known kind, and a flavour whose norms are RMSNorm (the one qk-norm built)."""
  one_of('model.qk_norm', m.qk_norm or 'none', QK_NORMS)
  require(
    m.qk_norm in ('', 'none') or m.flavour == 'llama',
    f'model.qk_norm={m.qk_norm!r} needs model.flavour=llama (RMSNorm): set model.qk_norm=none.',
  )


def _validate_mup(m: ml_collections.ConfigDict) -> None:
  """model.mup_base_width and mup_base_head_dim: off (0) or a base model this config could be.
  Any positive base width is allowed, above the model's width too (m < 1 is muP all the same)."""
  base, base_head = m.mup_base_width, m.mup_base_head_dim
  require(
    base >= 0,
    f'model.mup_base_width={base} must be 0 (off) or the embed_dim the hyperparameters were '
    'tuned at.',
  )
  require(base_head >= 0, f'model.mup_base_head_dim={base_head} must be 0 or more.')
  require(
    base or not base_head,
    f'model.mup_base_head_dim={base_head} does nothing without model.mup_base_width: set '
    'model.mup_base_width to the width tuned at, or model.mup_base_head_dim=0.',
  )
  require(
    not base or base_head or m.head_dim or base % m.num_heads == 0,
    f'model.mup_base_width={base} is not a multiple of model.num_heads={m.num_heads}, so the base '
    'model has no whole head_dim: choose a multiple, or set model.mup_base_head_dim.',
  )


def _validate_moe(moe: ml_collections.ConfigDict, num_layers: int) -> None:
  """model.moe: sizes that can route, layers that exist, weights that cannot be negative."""
  one_of('model.moe.score', moe.score, ROUTER_SCORES)
  for name in ('num_experts', 'expert_dim', 'shared_experts', 'first_dense'):
    require(moe[name] >= 0, f'model.moe.{name}={moe[name]} must be 0 or more.')
  for name in ('capacity_factor', 'balance_loss', 'sequence_balance_loss', 'router_z_loss'):
    require(moe[name] >= 0, f'model.moe.{name}={moe[name]} must be 0 or more.')
  require(moe.bias_rate >= 0, f'model.moe.bias_rate={moe.bias_rate} must be 0 or more (0: off).')
  require(moe.every >= 1, f'model.moe.every={moe.every} must be at least 1.')
  if not moe.num_experts:
    return
  require(
    1 <= moe.top_k <= moe.num_experts,
    f'model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}.',
  )
  require(
    moe.first_dense < num_layers,
    f'model.moe.first_dense={moe.first_dense} leaves no MoE layer of model.num_layers='
    f'{num_layers}: lower it, or set model.moe.num_experts=0 for a dense model.',
  )


def _validate_scan(m: ml_collections.ConfigDict) -> None:
  """model.scan_layers: one scanned body needs identical layers; a Mixture-of-Experts model may
  lead with dense ones (moe.first_dense, kept unrolled), but not alternate (moe.every > 1)."""
  require(
    not (m.scan_layers and m.moe.num_experts and m.moe.every > 1),
    f'model.scan_layers=True needs identical layers after model.moe.first_dense, but '
    f'model.moe.every={m.moe.every} alternates dense and MoE layers: set '
    '--config.model.scan_layers=False (or model.moe.every=1).',
  )


def _validate_expert_mesh(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Whole experts on each device: the mesh axes that mesh.rules gives `experts` divide their
  number (JAX needs even shards; the parameter check would only say so after the data is read)."""
  if not c.model.moe.num_experts:
    return
  from pretrax import sharding  # Local: it imports JAX, which validation otherwise does without.

  try:
    ici, dcn = sharding.mesh_shapes(c.mesh, num_devices)
    experts = sharding.rules(c.mesh)['experts']
  except sharding.ShardingError:
    return  # A mesh or rule that cannot be made says so where the run makes it.
  parts = dict(zip(sharding.MESH_AXES, zip(ici, dcn, strict=True), strict=True))
  axes = [a for a in sharding.axes_of(experts) if math.prod(parts[a]) > 1]
  ways = math.prod(math.prod(parts[a]) for a in axes)

  def field(axis: str) -> str:  # The settings that make the axis this size.
    per_granule, granules = parts[axis]
    return f'mesh.{axis}={per_granule}' + (f' x mesh.dcn_{axis}={granules}' if granules > 1 else '')

  num_experts = c.model.moe.num_experts
  require(
    num_experts % ways == 0,
    f'model.moe.num_experts={num_experts} cannot be split over the {ways} devices of mesh '
    f'{"axes" if len(axes) > 1 else "axis"} {"+".join(axes)} ({", ".join(map(field, axes))}), '
    f'to which mesh.rules maps the experts: make num_experts a multiple of {ways}, change the '
    'mesh, or keep every expert on every device with --config.mesh.rules=experts=',
  )


# The largest learning rate `cautions` lets a fine-tune from init_from pass without a word.
FINETUNE_LR = 3e-4


def cautions(c: RunConfig, *, fp8_gains: bool = True) -> list[str]:
  """What can run but likely was not meant, one line each (train.py logs them as warnings).
  `fp8_gains`: whether this run's devices have FP8 tensor cores (model/fp8.py, gains_on)."""
  out = _fp8_cautions(c, fp8_gains)
  factor = c.model.moe.capacity_factor
  if c.model.moe.num_experts and 0 < factor < 1:
    # Not refused: a factor below 1 is a legitimate trade of quality for speed, and the run
    # measures what it drops; but it drops that much even when the routing is perfectly even.
    out.append(
      f'model.moe.capacity_factor={factor:g} gives each expert fewer slots than an even share '
      f'of the tokens: about {1 - factor:.0%} of token copies are dropped at every step however '
      'balanced the routing (moe_dropped_fraction); 1 to 1.25 is usual, 0 drops none.'
    )
  if c.objective in FINETUNE_OBJECTIVES and c.init_from and c.optim.lr > FINETUNE_LR:
    # Not refused: a short fine-tune of a tiny model can take it; but a pre-training rate
    # usually erases what the run starts from.
    out.append(
      f'optim.lr={c.optim.lr:g} fine-tunes {c.init_from} at a pre-training rate: fine-tunes use '
      f"1e-5 to {FINETUNE_LR:g} (BERT 2e-5 to 5e-5) with a warmup; the encoder configs' "
      ':classify variant sets that recipe.'
    )
  return out


def _fp8_cautions(c: RunConfig, fp8_gains: bool) -> list[str]:
  """model.fp8 where it cannot pay: on devices without FP8 tensor cores, or on a model whose
  projections are all narrower than model.fp8_min_dim (not refused: both run, correctly)."""
  m = c.model
  if not m.fp8:
    return []
  out = []
  if not fp8_gains:
    out.append(
      'model.fp8 is on, but these devices have no FP8 tensor cores: their matmuls upcast the '
      "FP8 operands, slower than bfloat16 and with FP8's rounding all the same. FP8 gains only "
      'on NVIDIA GPUs of compute capability 8.9 or more (Ada, Hopper, Blackwell).'
    )
  # (input, output) widths of the blocks' projections: q, k and v, o, the dense MLP's in and out.
  widths = [
    (m.embed_dim, m.num_heads * m.head_dim),
    (m.embed_dim, m.num_kv_heads * m.head_dim),
    (m.embed_dim, m.mlp_dim),
  ]
  if all(min(pair) < m.fp8_min_dim for pair in widths):
    out.append(
      f'model.fp8 is on, but no block projection has both widths at least model.fp8_min_dim='
      f'{m.fp8_min_dim} (embed_dim={m.embed_dim}, mlp_dim={m.mlp_dim}, heads x head_dim='
      f'{m.num_heads * m.head_dim}): every matmul stays in {m.dtype}; lower model.fp8_min_dim to '
      'convert them.'
    )
  return out


def _validate_batches(
  d: ml_collections.ConfigDict, o: ml_collections.ConfigDict, num_devices: int
) -> None:
  require(d.seq_len > 1, f'data.seq_len={d.seq_len} must be at least 2.')
  require(
    0 <= d.window_stride <= d.seq_len,
    f'data.window_stride={d.window_stride} must be between 0 (= seq_len) and '
    f'data.seq_len={d.seq_len}: a larger stride would skip tokens.',
  )
  require(
    0.0 < d.eval_fraction < 1.0,
    f'data.eval_fraction={d.eval_fraction} must be strictly between 0 and 1.',
  )
  require(d.batch_size > 0, f'data.batch_size={d.batch_size} must be positive.')
  require(d.shard_mb > 0, f'data.shard_mb={d.shard_mb} must be positive.')
  per_step = num_devices * o.grad_accum_steps
  require(o.grad_accum_steps >= 1, f'optim.grad_accum_steps={o.grad_accum_steps} must be >= 1.')
  require(
    d.batch_size % per_step == 0,
    f'data.batch_size={d.batch_size} is not divisible by {num_devices} device(s) x '
    f'optim.grad_accum_steps={o.grad_accum_steps}: make it a multiple of {per_step}.',
  )
  mixture(d.mixture)


def _validate_optim(o: ml_collections.ConfigDict) -> None:
  one_of('optim.name', o.name, OPTIMIZERS)
  one_of('optim.schedule', o.schedule, SCHEDULES)
  require(
    0.0 <= o.muon_momentum < 1.0,
    f'optim.muon_momentum={o.muon_momentum} must be in [0, 1) (0.95 is usual).',
  )
  require(o.ns_steps >= 1, f'optim.ns_steps={o.ns_steps} must be at least 1 (5 is usual).')
  require(o.spike_window >= 0, f'optim.spike_window={o.spike_window} must be >= 0 (0: off).')
  require(
    o.spike_threshold > 0,
    f'optim.spike_threshold={o.spike_threshold} must be positive (standard deviations).',
  )
  require(o.warmup_steps >= 0, f'optim.warmup_steps={o.warmup_steps} must be >= 0.')
  require(o.schedule_steps >= 0, f'optim.schedule_steps={o.schedule_steps} must be >= 0.')
  require(0 <= o.min_lr <= o.lr, f'optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}.')
  require(
    0.0 < o.decay_fraction <= 1.0, f'optim.decay_fraction={o.decay_fraction} must be in (0, 1].'
  )


def _validate_objectives(c: ml_collections.ConfigDict) -> None:
  """The masked LM's and span corruption's settings; what a fine-tune and in-loop tasks need."""
  lm, sc = c.masked_lm, c.span_corruption
  require(0.0 < lm.rate < 1.0, f'masked_lm.rate={lm.rate} must be strictly between 0 and 1.')
  require(
    lm.mask_token_fraction >= 0
    and lm.random_token_fraction >= 0
    and lm.mask_token_fraction + lm.random_token_fraction <= 1.0,
    f'masked_lm.mask_token_fraction={lm.mask_token_fraction} and '
    f'masked_lm.random_token_fraction={lm.random_token_fraction} must be >= 0 and sum '
    'to at most 1 (the rest stay unchanged).',
  )
  require(
    0.0 < sc.noise_density < 1.0,
    f'span_corruption.noise_density={sc.noise_density} must be strictly between 0 and 1.',
  )
  require(
    sc.mean_span_length >= 1.0,
    f'span_corruption.mean_span_length={sc.mean_span_length} must be at least 1.',
  )
  init_source(c.init_from)
  if c.objective in FINETUNE_OBJECTIVES:
    require(
      not c.data.mixture and not c.data.prepared,
      f'objective={c.objective} reads records from data.path (and finetune.eval_path): '
      'data.mixture and data.prepared are for pre-training corpora.',
    )
  _validate_classifier(c.finetune)
  require(
    c.eval.tasks_every >= 0 and c.eval.limit >= 0,
    f'eval.tasks_every={c.eval.tasks_every} and eval.limit={c.eval.limit} must be >= 0 '
    '(0: every eval_every steps; all questions).',
  )
  require(
    not c.eval.tasks or attention_kind(c.objective) != 'bidirectional',
    f'eval.tasks scores continuations by their likelihood under a decoder; objective='
    f'{c.objective} trains a model that does not give one: set eval.tasks="".',
  )


def _validate_classifier(f: ml_collections.ConfigDict) -> None:
  """The classification head's settings and the record layout they read."""
  one_of('finetune.pooling', f.pooling, POOLINGS)
  one_of('finetune.head', f.head, POOLERS)
  one_of('finetune.head_init', f.head_init, HEAD_INITS)
  if f.template:
    require(
      '{text}' in f.template,
      f"finetune.template={f.template!r} has no '{{text}}': it must say where the text goes.",
    )
    require(
      ('{text_pair}' in f.template) == bool(f.text_pair_field),
      f'finetune.template={f.template!r} and finetune.text_pair_field={f.text_pair_field!r}: '
      "a template places the second text with '{text_pair}' exactly when the records have one.",
    )
  require(
    f.pooling != 'mask' or '<mask>' in f.template,
    "finetune.pooling='mask' reads the example's <mask>: set finetune.template to a layout "
    "with one, e.g. '{text} is about <mask>.'.",
  )


def _validate_run(c: ml_collections.ConfigDict) -> None:
  """Steps, intervals, checkpoints, profiling, the tokenizer sample."""
  require(c.steps > 0, f'steps={c.steps} must be positive.')
  for name in ('log_every', 'eval_every'):
    require(c[name] > 0, f'{name}={c[name]} must be positive.')
  require(c.checkpoint.every > 0, f'checkpoint.every={c.checkpoint.every} must be positive.')
  require(c.checkpoint.keep > 0, f'checkpoint.keep={c.checkpoint.keep} must be positive.')
  profile_steps(c.profile_steps)
  require(
    c.tokenizer.sample_mb > 0, f'tokenizer.sample_mb={c.tokenizer.sample_mb} must be positive.'
  )


def _validate_files(c: ml_collections.ConfigDict) -> None:
  """The files the config names exist."""
  if c.objective in FINETUNE_OBJECTIVES and c.finetune.eval_path:
    from pretrax.data import sources  # Local: validation only needs the file system part.

    require(
      bool(sources.expand_paths(c.finetune.eval_path)),
      f'finetune.eval_path={c.finetune.eval_path!r} matches no file: point it at the '
      'held-out records, or set it to "" to hold out data.eval_fraction of data.path.',
    )
  if not c.data.prepared:
    resolve_data_paths(c)
    if c.tokenizer.path:
      require(
        os.path.isfile(c.tokenizer.path),
        f'tokenizer.path={c.tokenizer.path!r} does not exist: point it at a SentencePiece '
        '.model file, or set it to "" to train one on the data.',
      )


def resolve_data_paths(c: ml_collections.ConfigDict) -> list[str]:
  """The files the config names, or the fallback corpus; a clear error if there are none."""
  from pretrax.data import sources  # Local: validation only needs the file system part.

  if c.data.mixture:
    files = []
    for name, path, _ in mixture(c.data.mixture):
      found = sources.expand_paths(path)
      require(
        bool(found),
        f'data.mixture source {name}={path!r} matches no file: point it at '
        'files, directories or globs.',
      )
      files += found
    return files
  files = sources.expand_paths(c.data.path) if c.data.path else []
  if files:
    return files
  if c.data.fallback:
    one_of('data.fallback', c.data.fallback, (STDLIB_CORPUS,))
    return sources.stdlib_files()
  raise ConfigError(
    f'data.path={c.data.path!r} matches no file: point --config.data.path at a text file, '
    'a directory or a glob.'
  )
