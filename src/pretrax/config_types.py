"""The resolved run config as frozen dataclasses, one per section of config.py's base config.

Every module below the command line takes these (or the one section it needs), never a
ConfigDict: run_config.py builds them once, with every "0 means another field's value" default
resolved, so a field holds what it means. A field's documentation is the comment on its line in
config.py, printed by `--print_config`; tests/test_config.py keeps these fields and config.py's in
step.

Imports only config_specs.py (the string languages), and through it config.py.
"""

import dataclasses

from pretrax.config_specs import mixture


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """model.moe: the Mixture-of-Experts layers (model/moe.py); 0 experts is a dense model."""

  num_experts: int = 0
  top_k: int = 2
  expert_dim: int = 0  # Resolved: model.mlp_dim when 0.
  shared_experts: int = 0
  every: int = 1
  first_dense: int = 0
  score: str = 'softmax'  # softmax | sigmoid
  renormalise: bool = True
  capacity_factor: float = 0.0  # 0: dropless.
  balance_loss: float = 0.01
  sequence_balance_loss: float = 0.0
  router_z_loss: float = 0.001
  bias_rate: float = 0.0

  def is_moe(self, layer: int) -> bool:
    """Whether block `layer` (0-based) has experts rather than a dense MLP."""
    return (
      self.num_experts > 0
      and layer >= self.first_dense
      and (layer - self.first_dense) % self.every == 0
    )


@dataclasses.dataclass(frozen=True)
class ModelSection:
  flavour: str
  vocab_size: int  # 0: the tokenizer's (known once the data is), rounded up to vocab_multiple.
  vocab_multiple: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  mlp_dim: int
  max_len: int
  use_bias: bool
  tie_embeddings: bool
  dropout: float
  norm_eps: float
  rope_theta: float
  qk_norm: str
  init_std: float
  mup_base_width: int
  mup_base_head_dim: int  # Resolved: the base width's head_dim when 0 (see config.py).
  param_dtype: str
  dtype: str
  remat: str
  scan_layers: bool
  loss_chunk: int
  max_segments: int
  attention_backend: str
  fp8: bool
  fp8_min_dim: int
  moe: MoeConfig


@dataclasses.dataclass(frozen=True)
class Source:
  """One weighted corpus of a run: `data.path` alone is the one source, named '' (its store is the
  store root; a mixture's sources each have a subdirectory)."""

  name: str
  path: str
  weight: float


@dataclasses.dataclass(frozen=True)
class DataSection:
  path: str
  fallback: str
  separator: str
  text_field: str
  skip_bad_records: bool
  mixture: str
  prepare_workers: int
  shard_mb: float
  seq_len: int
  window_stride: int
  batch_size: int
  eval_fraction: float
  worker_count: int
  prepared: str

  @property
  def sources(self) -> tuple[Source, ...]:
    """The weighted corpora: data.mixture's sources, or data.path as one source."""
    if self.mixture:
      return tuple(Source(*spec) for spec in mixture(self.mixture))
    return (Source('', self.path, 1.0),)


@dataclasses.dataclass(frozen=True)
class MaskedLMSection:
  rate: float
  mask_token_fraction: float
  random_token_fraction: float
  whole_word: bool


@dataclasses.dataclass(frozen=True)
class SpanCorruptionSection:
  noise_density: float
  mean_span_length: float


@dataclasses.dataclass(frozen=True)
class FinetuneSection:
  eval_path: str
  prompt_field: str
  response_field: str
  messages_field: str
  label_field: str
  labels: str
  text_pair_field: str
  template: str
  pooling: str  # mean | first | mask
  head: str  # mlm | tanh
  head_init: str  # label_words | random


@dataclasses.dataclass(frozen=True)
class EvalSection:
  tasks: str
  tasks_every: int
  limit: int


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
  path: str
  model_type: str
  vocab_size: int
  sentinels: int
  sample_mb: float


@dataclasses.dataclass(frozen=True)
class OptimSection:
  name: str
  lr: float
  min_lr: float
  schedule: str
  schedule_steps: int
  warmup_steps: int
  decay_fraction: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_embeddings: bool
  decay_norms_and_biases: bool
  clip_norm: float
  grad_accum_steps: int
  z_loss: float
  muon_momentum: float
  ns_steps: int
  skip_nonfinite: bool
  spike_window: int
  spike_threshold: float


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int
  keep: int
  async_save: bool
  fallback: bool


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int
  fsdp: int
  expert: int
  tensor: int
  dcn_data: int
  dcn_fsdp: int
  rules: str


@dataclasses.dataclass(frozen=True)
class FaultSection:
  poison_step: int


@dataclasses.dataclass(frozen=True)
class SampleSection:
  prompt: str
  length: int
  temperature: float
  top_k: int


@dataclasses.dataclass(frozen=True)
class RunConfig:
  seed: int
  steps: int
  objective: str
  init_from: str
  log_every: int
  eval_every: int
  eval_batches: int
  peak_flops: float
  profile_steps: str
  compile_cache: str
  model: ModelSection
  data: DataSection
  masked_lm: MaskedLMSection
  span_corruption: SpanCorruptionSection
  finetune: FinetuneSection
  eval: EvalSection
  tokenizer: TokenizerSection
  optim: OptimSection
  checkpoint: CheckpointSection
  mesh: MeshSection
  fault: FaultSection
  sample: SampleSection


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What the model is built from: the model section with the tokenizer's vocabulary and what the
  objective asks of the architecture (its attention, an MLM head, a classification head)."""

  flavour: str
  vocab_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  mlp_dim: int
  max_len: int
  use_bias: bool
  tie_embeddings: bool
  dropout: float
  norm_eps: float
  rope_theta: float
  init_std: float
  param_dtype: str
  dtype: str
  remat: str  # none | dots | dots_attention | full | offload
  attention: str = 'causal'  # causal | prefix (bidirectional over batch.prefix) | bidirectional
  mlm_head: bool = False  # BERT's head: dense, GELU, norm, then the (tied) projection with a bias.
  num_classes: int = (
    0  # > 0: a pooled classification head (Transformer.classify) over this many labels.
  )
  pooling: str = 'mean'  # mean | first | mask: the states the classification head reads.
  pooler: str = (
    'mlm'  # mlm (the MLM head's transform) | tanh (BERT's pooler), before the classifier.
  )
  mask_id: int = -1  # The token that pooling='mask' reads.
  attention_backend: str = 'auto'  # auto | xla | cudnn | splash | cpu (see model/attention.py)
  loss_chunk: int = 0  # Positions per chunk of the output projection and loss; 0: all at once.
  max_segments: int = 16  # Documents per row for cuDNN's variable-length attention; 0: dense mask.
  moe: MoeConfig = MoeConfig()  # No experts: a dense model.
  qk_norm: str = 'none'  # none | head | full: RMSNorm of queries and keys before RoPE (llama).
  mup_base_width: int = 0  # muP (pretrax.mup): the embed_dim tuned at; 0: standard parametrisation.
  mup_base_head_dim: int = 0  # muP: the head_dim at mup_base_width (resolved by run_config).
  scan_layers: bool = False  # Blocks stacked on a 'layers' axis and scanned (model/stack.py).
  fp8: bool = False  # FP8 matmuls in the blocks' projections (model/fp8.py).
  fp8_min_dim: int = 1024  # With fp8: only weights whose two dims are both at least this.

  @property
  def block_fp8_min_dim(self) -> int | None:
    """What the blocks' projections pass to layers.dense: fp8_min_dim with fp8 on, else None."""
    return self.fp8_min_dim if self.fp8 else None

  @property
  def width_mult(self) -> float:
    """muP's m: embed_dim over the width the hyperparameters were tuned at (1 when off)."""
    return self.embed_dim / self.mup_base_width if self.mup_base_width else 1.0

  @property
  def attention_mult(self) -> float:
    """What muP multiplies queries by, on top of attention's 1/sqrt(head_dim): logits scaled by
    sqrt(base head_dim) / head_dim, muP's 1/d that equals 1/sqrt(d) at the base (1 when off)."""
    if not self.mup_base_width:
      return 1.0
    assert self.mup_base_head_dim > 0, 'run_config.resolve sets it whenever muP is on'
    return (self.mup_base_head_dim / self.head_dim) ** 0.5
