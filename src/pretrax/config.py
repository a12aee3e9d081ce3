"""The base config and its sections, the allowed values of its fields, loading config files, and
ConfigError.

Experiment files in `configs/` start from `base_config()` and change a few fields. The comments on
the section functions' lines are the fields' documentation: config_fields.py reads them back from
this source (SECTIONS). This module imports no other config module; above it, in order:
config_fields.py (comments, describe), config_specs.py (the string languages), config_types.py
(the typed run config), config_check.py (validation), run_config.py (ConfigDict -> RunConfig).
"""

import importlib.util
import os
import types

import ml_collections

from pretrax import errors

# The order is fixed: an example's `objective` field is an index into it.
OBJECTIVES = ('causal_lm', 'masked_lm', 'span_corruption', 'prefix_lm')
# Fine-tuning objectives, each on its own: they read records (data/examples.py), not a token stream.
FINETUNE_OBJECTIVES = ('sft', 'classification')
FLAVOURS = ('gpt2', 'llama')
SCHEDULES = ('cosine', 'linear', 'wsd', 'constant')
OPTIMIZERS = ('adamw', 'muon')
TOKENIZER_TYPES = ('char', 'bpe', 'unigram')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_BACKENDS = ('auto', 'xla', 'cudnn', 'splash', 'cpu')  # = model.attention.BACKENDS
ROUTER_SCORES = ('softmax', 'sigmoid')
QK_NORMS = ('none', 'head', 'full')  # '' is also 'none'.
POOLINGS = ('mean', 'first', 'mask')  # finetune.pooling
POOLERS = ('mlm', 'tanh')  # finetune.head
HEAD_INITS = ('label_words', 'random')  # finetune.head_init
# A corpus every machine has: the Python standard library's own sources.
STDLIB_CORPUS = 'python-stdlib'


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `--config=PATH[:ARG]` loads it (scripts, tests)."""
  return load_module(path).get_config(arg)


def load_module(path: str) -> types.ModuleType:
  """A config (or sweep) file as a module, imported from its path."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'pretrax_config_{name}', path)
  if spec is None or spec.loader is None:  # No loader takes a path without a Python suffix.
    raise ConfigError(f'{path} is not a Python file: a config is a .py file with get_config().')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shared_data(config_file: str, name: str) -> str:
  """`../shared/data/NAME` beside the repository holding `config_file` (where CI keeps corpora)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(config_file)))
  return os.path.normpath(os.path.join(repo, '..', 'shared', 'data', name))


class ConfigError(errors.PretraxError, ValueError):
  """A config that cannot run; the message names the fields and the fix."""


def require(ok: bool, message: str) -> None:
  """Raises ConfigError(message) unless `ok`: the one way the config modules fail."""
  if not ok:
    raise ConfigError(message)


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
  """Raises ConfigError unless field `name`'s `value` is one of `allowed`, listing them."""
  require(value in allowed, f'{name}={value!r} is not one of {", ".join(allowed)}.')


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every experiment; `configs/*.py` override a few of them."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.steps = 1000  # Total optimizer steps of the run (a resumed run continues to this).
  # causal_lm | masked_lm (an encoder) | span_corruption | prefix_lm, or a weighted mixture of
  # the decoder objectives chosen per example, e.g. 'causal_lm:2,span_corruption:1,prefix_lm:1'.
  # Fine-tuning: sft (a decoder on prompt/response records, loss on the responses) or
  # classification (an encoder with a pooled head on text/label records).
  c.objective = 'causal_lm'
  # Start from another run's parameters, with a fresh optimizer: 'WORKDIR' (its latest checkpoint),
  # 'WORKDIR:STEP', or a Hugging Face model directory. '' starts from random initialisation.
  c.init_from = ''
  c.log_every = 10
  c.eval_every = 250
  c.eval_batches = 0  # 0: the whole held-out split.
  # Peak FLOP/s per device for MFU; 0: data sheets for accelerators, measured on CPU.
  c.peak_flops = 0.0
  # 'START:COUNT': write a jax.profiler trace of steps START..START+COUNT-1 (numbered from 1, as in
  # the logs) to WORKDIR/profile/; '' traces nothing.
  c.profile_steps = ''
  # Where compiled programs are kept so that a restarted run loads them instead of compiling:
  # 'auto' (~/.cache/pretrax/xla, or $PRETRAX_CACHE_DIR/xla, or JAX_COMPILATION_CACHE_DIR),
  # 'workdir' (WORKDIR/xla_cache), a directory, or 'none' (compile every time).
  c.compile_cache = 'auto'
  _model_fields(c)
  _data_fields(c)
  _objective_fields(c)
  _finetune_fields(c)
  _eval_fields(c)
  _tokenizer_fields(c)
  _optim_fields(c)
  _support_fields(c)
  return c


def _model_fields(c: ml_collections.ConfigDict) -> None:
  """The model: its flavour, size, precision and attention."""
  c.model = ml_collections.ConfigDict()
  # gpt2: learned positions, LayerNorm, GELU. llama: RoPE, RMSNorm, SwiGLU.
  c.model.flavour = 'gpt2'
  c.model.vocab_size = 0  # 0: the tokenizer's size, rounded up to vocab_multiple.
  c.model.vocab_multiple = 1
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0: as many as query heads (no grouping).
  c.model.embed_dim = 128
  c.model.head_dim = 0  # 0: embed_dim // num_heads.
  c.model.mlp_dim = 0  # 0: 4 * embed_dim.
  c.model.max_len = 0  # Size of the position table (gpt2) or RoPE range; 0: data.seq_len.
  c.model.use_bias = False
  c.model.tie_embeddings = True
  c.model.dropout = 0.0
  c.model.norm_eps = 1e-5
  c.model.rope_theta = 10000.0
  # RMSNorm of queries and keys before RoPE (llama only): none ('' too) | head (each head over
  # head_dim, one scale shared by the heads: Qwen3) | full (the whole projection: OLMoE, OLMo-2).
  c.model.qk_norm = 'none'
  c.model.init_std = 0.02
  # Width transfer (muP, docs/configs.md): the embed_dim the hyperparameters were tuned at; at
  # another width, hidden weights' init and the learning rates scale so that the tuned values
  # carry over (model/optimizer multipliers in src/pretrax/mup.py). 0: off, the standard
  # parametrisation (init_std and optim.lr as they are at any width).
  c.model.mup_base_width = 0
  # muP's attention scales logits by sqrt(this) / head_dim. 0: the head_dim at the base width, i.e.
  # mup_base_width // num_heads when model.head_dim is 0 (heads keep their number and widen), or
  # model.head_dim when it is set (heads keep their size and grow in number).
  c.model.mup_base_head_dim = 0
  c.model.param_dtype = 'float32'
  c.model.dtype = 'float32'  # Compute dtype; bfloat16 on accelerators.
  # Rematerialisation per block: none | dots (keep matmul outputs, recompute the rest) |
  # dots_attention (keep matmul outputs and the attention output: recompute only norms and
  # activations) | full (keep only block inputs) | offload (matmul outputs to host memory).
  c.model.remat = 'none'
  # Keep the blocks' parameters stacked on a leading 'layers' axis and run them as one scanned
  # body (jax.lax.scan): the step compiles one block instead of num_layers, the same loss and
  # gradients. Checkpoints keep that layout; init_from and export convert (docs/scaling.md).
  c.model.scan_layers = False
  # Positions per chunk of the loss: the output projection, cross-entropy and their gradient run
  # chunk by chunk, so the (batch, seq_len, vocab) logits never exist whole; no extra FLOPs.
  # 0 computes all logits at once (simplest for small vocabularies and models).
  c.model.loss_chunk = 0
  # cuDNN attention on packed rows: the most documents a row may hold for the variable-length
  # (flash) kernel, which takes each row's segment lengths and offsets instead of a mask. A
  # batch with a fuller row runs the dense-mask kernel instead; 0 always passes the dense mask.
  c.model.max_segments = 16
  # auto: cuDNN on NVIDIA GPUs, splash on TPUs, the CPU kernel on CPUs, xla elsewhere; a shape,
  # dtype or mask a kernel cannot take falls back to xla with a logged reason.
  c.model.attention_backend = 'auto'
  # FP8 matmuls (docs/scaling.md) in the blocks' attention and dense MLP projections: operands
  # scaled per tensor at each step, e4m3 forward, e5m2 gradients. Faster only on GPUs with FP8
  # tensor cores (Hopper, Ada, Blackwell); never the embedding, output heads, router or experts.
  c.model.fp8 = False
  # With model.fp8: a projection runs in FP8 only if its weight's input and output widths are both
  # at least this; smaller matmuls gain too little to pay for quantising their operands.
  c.model.fp8_min_dim = 1024
  _moe_fields(c)


def _moe_fields(c: ml_collections.ConfigDict) -> None:
  """Mixture-of-Experts: in MoE layers each token goes through top_k of num_experts MLPs."""
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.num_experts = 0  # 0: every layer has a dense MLP (no experts).
  c.model.moe.top_k = 2  # Experts each token is sent to.
  c.model.moe.expert_dim = 0  # Hidden width of one expert's MLP; 0: model.mlp_dim.
  c.model.moe.shared_experts = 0  # Experts every token also goes through (DeepSeek's shared ones).
  c.model.moe.every = 1  # After the first_dense layers, every this many layers is an MoE layer.
  c.model.moe.first_dense = 0  # The first this many layers keep a dense MLP (DeepSeek-V3: 3).
  # The router's scores: softmax (Switch, Mixtral, Qwen) | sigmoid (DeepSeek-V3). It runs in
  # float32 whatever model.dtype is.
  c.model.moe.score = 'softmax'
  c.model.moe.renormalise = True  # Divide the chosen experts' scores by their sum.
  # Copies each expert takes, as a multiple of its even share (tokens x top_k / num_experts);
  # copies past it are dropped (counted in metrics). 0: dropless (a grouped matmul, none dropped).
  c.model.moe.capacity_factor = 0.0
  c.model.moe.balance_loss = 0.01  # Weight of the load-balancing loss over the batch (Switch).
  c.model.moe.sequence_balance_loss = 0.0  # The same per sequence (DeepSeek-V3: 0.0001).
  c.model.moe.router_z_loss = 0.001  # Weight of mean(logsumexp(router logits)^2) (ST-MoE).
  # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores only to
  # choose experts, moved by this much per step toward underloaded experts; 0: off (V3: 0.001).
  c.model.moe.bias_rate = 0.0


def _data_fields(c: ml_collections.ConfigDict) -> None:
  """The corpus, its store and the batches."""
  c.data = ml_collections.ConfigDict()
  # Files, directories (recursive) and globs, local or gs://, comma-separated: text (.txt and any
  # other suffix), JSON lines (.jsonl, .json) and Parquet; text and JSON lines may be .gz or .zst.
  c.data.path = ''
  # Corpus to use when the config's own `path` is missing (a fresh clone); STDLIB_CORPUS is the
  # only one. A --config.data.path given on the command line never falls back.
  c.data.fallback = ''
  c.data.separator = ''  # Text files: '' makes each file a document; else the string between them.
  c.data.text_field = 'text'  # JSON lines and Parquet: the field (column) that holds the text.
  # Skip (and count, in the store's manifest) malformed records, non-UTF-8 text and damaged
  # compressed files; else the first one stops the preparation, naming its file and line.
  c.data.skip_bad_records = False
  # Weighted sources instead of `path`: 'NAME=PATH:WEIGHT,...', e.g.
  # 'web=/data/web/*.parquet:0.7,code=/data/code:0.2,books=/data/books:0.1'. Each source is its
  # own store; batches mix them in these proportions and eval loss is reported per source.
  c.data.mixture = ''
  # Processes that tokenize when a run builds its store; -1: one per core for corpora over 64 MB,
  # none (threads in this process) for smaller ones.
  c.data.prepare_workers = -1
  c.data.shard_mb = 64.0  # Input text per store shard: the unit of resuming a preparation.
  c.data.seq_len = 64
  c.data.window_stride = 0  # Training windows start every this many tokens; 0: seq_len.
  c.data.batch_size = 12  # Global batch, in sequences, per optimizer step.
  # Documents held out, chosen by a hash of their text (the same for any number of hosts); a
  # corpus of one text document is cut by position instead (its last eval_fraction, as nanoGPT).
  c.data.eval_fraction = 0.1
  c.data.worker_count = 2  # Threads that build batches ahead of the step.
  # A token store from `pretrax prepare` (for a mixture: the directory holding one per source).
  # Without it, a run builds its store from `path` in WORKDIR/data, or reuses the one there.
  c.data.prepared = ''


def _objective_fields(c: ml_collections.ConfigDict) -> None:
  """The settings of the masked-LM and span-corruption objectives."""
  c.masked_lm = ml_collections.ConfigDict()
  c.masked_lm.rate = 0.15  # Share of non-special tokens chosen for prediction.
  c.masked_lm.mask_token_fraction = 0.8  # Of the chosen: replaced by <mask>,
  c.masked_lm.random_token_fraction = 0.1  # by a random token; the rest stay as they are.
  c.masked_lm.whole_word = False  # Choose whole words (a piece starting with a space + its tail).

  c.span_corruption = ml_collections.ConfigDict()
  c.span_corruption.noise_density = 0.15  # Share of tokens in the corrupted spans (T5: 0.15).
  c.span_corruption.mean_span_length = 3.0  # T5: 3.


def _finetune_fields(c: ml_collections.ConfigDict) -> None:
  """The records that the sft and classification objectives read (see data/examples.py)."""
  c.finetune = ml_collections.ConfigDict()
  # Held-out records for evaluation: files, directories or globs. '': hold out data.eval_fraction
  # of data.path's records, chosen by a hash of each record.
  c.finetune.eval_path = ''
  c.finetune.prompt_field = 'prompt'  # sft: {"prompt": ..., "response": ...} records,
  c.finetune.response_field = 'response'
  # or chat records {"messages": [{"role": ..., "content": ...}, ...]}, loss on the assistant's.
  c.finetune.messages_field = 'messages'
  c.finetune.label_field = 'label'  # classification: {"text": ..., "label": ...} (data.text_field).
  # classification: the label set, comma-separated ('negative,positive'); a record with another
  # label is bad input. '': every distinct label of the training records, sorted.
  c.finetune.labels = ''
  # classification: a second text per record ('text_pair', 'hypothesis'), for sentence pairs: read
  # as TEXT EOS PAIR EOS (RoBERTa's layout; the encoder has no segment embeddings). '': none.
  c.finetune.text_pair_field = ''
  # classification: each record laid out as this text, '{text}' (and '{text_pair}') replaced by
  # the record's, '<mask>' by the mask token: '{text} lives in <mask>.'. '': the text as it is.
  c.finetune.template = ''
  # classification: the head reads an example's final states at: mean (all its tokens) | first
  # (its first token) | mask (its first <mask>, which finetune.template places).
  c.finetune.pooling = 'mean'
  # classification head: mlm (the masked LM's transform, dense + GELU + norm, kept from init_from,
  # then a linear layer over the labels) | tanh (BERT's pooler, dense + tanh, new, then the layer).
  c.finetune.head = 'mlm'
  # label_words: the linear layer starts as init_from's output rows (and bias) of each label's
  # first piece (' positive'), so it starts as the masked LM's guess among the labels | random.
  c.finetune.head_init = 'label_words'


def classification_recipe(c: ml_collections.ConfigDict) -> None:
  """BERT's recipe for a classifier fine-tuned on a pre-trained encoder (the encoder configs'
  `:classify` variants): the whole encoder trains at a small learning rate, warmed up over the
  first tenth of the steps and decayed linearly, with BERT's weight decay, batches of 32 rows.
  BERT uses 2e-5 to 5e-5 at base size; small models take 1e-4 (benchmarks/transfer.py: 1e-4 gave
  0.69 held-out accuracy, 5e-5 0.60, 3e-5 0.59, 3e-4 0.66)."""
  c.objective = 'classification'
  c.steps = 300  # A few epochs of a few thousand short records; set it for yours.
  c.eval_every = 50
  c.log_every = 10
  c.checkpoint.every = 300
  c.data.batch_size = 32
  c.optim.lr = 1e-4
  c.optim.min_lr = 0.0
  c.optim.schedule = 'linear'
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.01
  c.sample.length = 0  # A classifier generates nothing.


def _eval_fields(c: ml_collections.ConfigDict) -> None:
  """Downstream tasks scored on the live parameters during training (see `pretrax eval`)."""
  c.eval = ml_collections.ConfigDict()
  # Multiple-choice tasks as `pretrax eval --tasks` names them: 'arc_easy,hellaswag:rc_5shot', or
  # JSON-lines files of {"context", "choices", "gold"}; '' scores none. Needs a decoder.
  c.eval.tasks = ''
  c.eval.tasks_every = 0  # Steps between scorings; 0: every eval_every steps.
  c.eval.limit = 200  # Questions scored per task (the first ones); 0: all of them.


def _tokenizer_fields(c: ml_collections.ConfigDict) -> None:
  """The tokenizer a run trains, or the one it is given."""
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''  # An existing SentencePiece .model; '': train one on the training split.
  c.tokenizer.model_type = 'char'
  c.tokenizer.vocab_size = 512  # Upper bound for `char` (its size is the alphabet's).
  c.tokenizer.sentinels = -1  # Sentinel pieces to reserve; -1: 100 if the objective uses them.
  c.tokenizer.sample_mb = 16.0  # Training text drawn from across the corpus for a new tokenizer.


def _optim_fields(c: ml_collections.ConfigDict) -> None:
  """The optimizer, its schedule and the guards on each update."""
  c.optim = ml_collections.ConfigDict()
  # adamw: AdamW for every parameter. muon: Muon (orthogonalised momentum) for the transformer
  # blocks' hidden matrices, AdamW for the rest; one lr and weight_decay for both (docs/configs.md).
  c.optim.name = 'adamw'
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-4
  c.optim.schedule = 'cosine'
  c.optim.schedule_steps = 0  # Length of the schedule; 0: steps. Set it to stop a run early.
  c.optim.warmup_steps = 100
  c.optim.decay_fraction = 0.2  # wsd: the share of steps spent decaying at the end.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = False
  c.optim.decay_norms_and_biases = False
  c.optim.clip_norm = 1.0  # 0 disables clipping.
  c.optim.grad_accum_steps = 1
  c.optim.z_loss = 0.0
  c.optim.muon_momentum = 0.95  # muon: momentum of the hidden matrices (Nesterov).
  c.optim.ns_steps = 5  # muon: Newton-Schulz iterations that orthogonalise each update.
  # A non-finite loss or gradient stops the run (default) or, if true, skips that update.
  c.optim.skip_nonfinite = False
  # Loss-spike skipping: skip an update whose loss is more than spike_threshold standard deviations
  # above the mean of the last spike_window accepted losses; 0 (default) never skips.
  c.optim.spike_window = 0
  c.optim.spike_threshold = 6.0


def _support_fields(c: ml_collections.ConfigDict) -> None:
  """Checkpoints, the device mesh, fault injection, the final sample."""
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  # Resume from the newest intact checkpoint if the latest is damaged.
  c.checkpoint.fallback = False

  c.mesh = ml_collections.ConfigDict()
  # Devices per axis within one TPU slice / GPU node; -1: all devices not used by the others.
  # Small models want `data` (replicated weights, no gathers), large ones `fsdp`.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  # Expert parallelism: a Mixture-of-Experts layer's experts split over this many devices, tokens
  # sent to their experts' devices and back; dense layers use the axis as data parallelism.
  c.mesh.expert = 1
  c.mesh.tensor = 1
  # Slices / nodes spanned over the data-centre network by each data-parallel axis (hybrid mesh).
  c.mesh.dcn_data = 1
  c.mesh.dcn_fsdp = 1
  # Overrides of sharding.DEFAULT_RULES: 'LOGICAL=AXIS[+AXIS],...'; an empty AXIS replicates.
  c.mesh.rules = ''

  c.fault = ml_collections.ConfigDict()
  c.fault.poison_step = 0  # Testing: make the loss of this step (1-based) NaN; 0: never.

  c.sample = ml_collections.ConfigDict()
  c.sample.prompt = ''
  # Tokens to print at the end of training; 0 prints none. A masked LM shows its predictions on
  # this many held-out tokens instead of generating.
  c.sample.length = 0
  c.sample.temperature = 0.8
  c.sample.top_k = 0


SECTIONS = (
  base_config,
  _model_fields,
  _moe_fields,
  _data_fields,
  _objective_fields,
  _finetune_fields,
  _eval_fields,
  _tokenizer_fields,
  _optim_fields,
  _support_fields,
)  # Where config_fields.field_comments() reads the comments.
