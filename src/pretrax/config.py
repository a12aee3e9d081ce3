"""The base config, its validation, and the frozen dataclasses handed to the model and optimizer.

Experiment files in `configs/` start from `base_config()` and change a few fields. ConfigDicts stop
here: the model, the optimizer and the step take the frozen dataclasses built below, so a typo can
only happen in one place and is caught by the locked ConfigDict.
"""

import dataclasses
import difflib
import importlib.util
import inspect
import io
import os
import re
import tokenize
import types
from typing import Any

import ml_collections

from pretrax import errors

# The order is fixed: an example's `objective` field is an index into it.
OBJECTIVES = ('causal_lm', 'masked_lm', 'span_corruption', 'prefix_lm')
# Fine-tuning objectives, each on its own: they read records (data/examples.py), not a token stream.
FINETUNE_OBJECTIVES = ('sft', 'classification')
FLAVOURS = ('gpt2', 'llama')
SCHEDULES = ('cosine', 'linear', 'wsd', 'constant')
TOKENIZER_TYPES = ('char', 'bpe', 'unigram')
DTYPES = ('float32', 'bfloat16', 'float16')
ATTENTION_BACKENDS = ('auto', 'xla', 'cudnn', 'splash', 'cpu')  # = model.attention.BACKENDS
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


def field_comments() -> dict[str, str]:
  """What each field of base_config() means: the comment on its line, or the comment lines just
  above it, from this file's source."""
  lines = [line for fn in _SECTIONS for line in inspect.getsource(fn).splitlines()]
  comments, above = {}, []
  for line in lines:
    text = line.strip()
    if text.startswith('#'):
      above.append(text.lstrip('# ').strip())
      continue
    match = re.match(r'c\.([\w.]+) = (.*)$', text)
    if not match:
      above = []
      continue
    code = match.group(2)
    # The comment starts at a '#' outside the value's quotes.
    tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    inline = next((t.string.lstrip('# ') for t in tokens if t.type == tokenize.COMMENT), '')
    comments[match.group(1)] = ' '.join(above + ([inline] if inline else []))
    above = []
  return comments


def field_names(c: ml_collections.ConfigDict) -> list[str]:
  """Every field of `c` as `--config.` names it ('optim.lr'), its sections too ('optim')."""
  names = []
  for key in c.keys():
    names.append(key)
    if isinstance(c[key], ml_collections.ConfigDict):
      names += [f'{key}.{name}' for name in field_names(c[key])]
  return names


def nearest_fields(c: ml_collections.ConfigDict, name: str, count: int = 3) -> list[str]:
  """The fields of `c` most like `name`: the fix for a mistyped override. First those of `name`'s
  section with a last part like its own ('optim.lrr' -> 'optim.lr'), then whole names alike
  ('eval.every' -> 'eval_every'), then like last parts in other sections ('optim.sed' -> 'seed')."""
  fields = field_names(c)
  section, _, last = name.rpartition('.')
  lasts = [f.rpartition('.')[2] for f in fields]
  near_lasts = difflib.get_close_matches(last, lasts, n=count, cutoff=0.75)
  by_last = sorted(
    (f for f, f_last in zip(fields, lasts, strict=True) if f_last in near_lasts),
    key=lambda f: near_lasts.index(f.rpartition('.')[2]),
  )
  same_section = [f for f in by_last if f.rpartition('.')[0] == section]
  by_whole = difflib.get_close_matches(name, fields, n=count, cutoff=0.8)
  return list(dict.fromkeys(same_section + by_whole + by_last))[:count]


def describe(c: ml_collections.ConfigDict) -> str:
  """Every field of a resolved config, `key = value  # what it means`, one per line."""
  comments = field_comments()
  out = []

  def walk(node: ml_collections.ConfigDict, prefix: str) -> None:
    for key in node.keys():
      value, name = node[key], f'{prefix}{key}'
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, name + '.')
        continue
      comment = comments.get(name, '')
      out.append(f'{name} = {value!r}' + (f'  # {comment}' if comment else ''))

  walk(c, '')
  return '\n'.join(out)


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
  c.model.init_std = 0.02
  c.model.param_dtype = 'float32'
  c.model.dtype = 'float32'  # Compute dtype; bfloat16 on accelerators.
  # Rematerialisation per block: none | dots (keep matmul outputs, recompute the rest) |
  # dots_attention (keep matmul outputs and the attention output: recompute only norms and
  # activations) | full (keep only block inputs) | offload (matmul outputs to host memory).
  c.model.remat = 'none'
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
  """AdamW, its schedule and the guards on each update."""
  c.optim = ml_collections.ConfigDict()
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


_SECTIONS = (
  base_config,
  _model_fields,
  _data_fields,
  _objective_fields,
  _finetune_fields,
  _eval_fields,
  _tokenizer_fields,
  _optim_fields,
  _support_fields,
)  # Where field_comments() reads the comments.


# ---------------------------------------------------------------------------------------------
# Frozen views handed across the boundary.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
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
  attention: str = 'causal'  # causal | prefix (bidirectional over batch['prefix']) | bidirectional
  mlm_head: bool = False  # BERT's head: dense, GELU, norm, then the (tied) projection with a bias.
  num_classes: int = 0  # > 0: a pooled classification head (classify()) over this many labels.
  attention_backend: str = 'auto'  # auto | xla | cudnn | splash | cpu (see model/attention.py)
  loss_chunk: int = 0  # Positions per chunk of the output projection and loss; 0: all at once.
  max_segments: int = 16  # Documents per row for cuDNN's variable-length attention; 0: dense mask.


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float
  min_lr: float
  schedule: str
  warmup_steps: int
  decay_fraction: float
  total_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float
  decay_embeddings: bool
  decay_norms_and_biases: bool
  clip_norm: float


def model_config(
  c: ml_collections.ConfigDict, vocab_size: int, num_classes: int = 0
) -> ModelConfig:
  """The model's frozen config; `vocab_size` is the tokenizer's when the config leaves it 0;
  `num_classes`, the classification objective's label count (from its data)."""
  m = c.model
  if m.vocab_size:
    vocab_size = m.vocab_size
  vocab_size = -(-vocab_size // m.vocab_multiple) * m.vocab_multiple
  return ModelConfig(
    flavour=m.flavour,
    vocab_size=vocab_size,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    num_kv_heads=m.num_kv_heads or m.num_heads,
    embed_dim=m.embed_dim,
    head_dim=m.head_dim or m.embed_dim // m.num_heads,
    mlp_dim=m.mlp_dim or 4 * m.embed_dim,
    max_len=m.max_len or c.data.seq_len,
    use_bias=m.use_bias,
    tie_embeddings=m.tie_embeddings,
    dropout=m.dropout,
    norm_eps=m.norm_eps,
    rope_theta=m.rope_theta,
    init_std=m.init_std,
    param_dtype=m.param_dtype,
    dtype=m.dtype,
    remat=remat_policy(m.remat),
    attention=attention_kind(c.objective),
    mlm_head=c.objective == 'masked_lm',
    num_classes=num_classes if c.objective == 'classification' else 0,
    attention_backend=m.attention_backend,
    loss_chunk=m.get('loss_chunk', 0),  # .get: configs saved by older versions lack both.
    max_segments=m.get('max_segments', 16),
  )


def on_local_devices(
  c: ml_collections.ConfigDict, mesh: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
  """A copy of `c` on this machine's devices: its mesh `mesh` (another run's), or every local
  device on `data`. Reading a checkpoint back does not depend on the mesh that wrote it."""
  local = ml_collections.ConfigDict(c.to_dict())
  if mesh is None:
    local.mesh.data, local.mesh.fsdp, local.mesh.tensor = -1, 1, 1
    local.mesh.dcn_data, local.mesh.dcn_fsdp = 1, 1
  else:
    local.mesh = ml_collections.ConfigDict(mesh.to_dict())
  local.mesh.rules = local.mesh.get('rules', '')  # Absent from checkpoints of older versions.
  return local


REMAT_POLICIES = ('none', 'dots', 'dots_attention', 'full', 'offload')


def remat_policy(value) -> str:
  """model.remat as a policy name; checkpoints of older versions saved a bool (True: full)."""
  if isinstance(value, bool):
    return 'full' if value else 'none'
  return value


def objective_mixture(spec: str) -> tuple[tuple[str, float], ...]:
  """'prefix_lm' -> (('prefix_lm', 1.0),); 'causal_lm:3,prefix_lm:1' -> weights summing to 1."""
  if spec.strip() in FINETUNE_OBJECTIVES:
    return ((spec.strip(), 1.0),)
  parts = []
  for item in spec.split(','):
    name, _, weight = item.strip().partition(':')
    _require(
      name not in FINETUNE_OBJECTIVES,
      f'objective={spec!r}: {name} fine-tunes on records of its own and cannot be mixed '
      'with other objectives; run it on its own.',
    )
    _one_of('objective', name, OBJECTIVES + FINETUNE_OBJECTIVES)
    try:
      value = float(weight) if weight else 1.0
    except ValueError:
      value = -1.0
    _require(
      value > 0,
      f'objective={spec!r}: the weight of {name} must be a positive number '
      '(write NAME:WEIGHT,NAME:WEIGHT).',
    )
    parts.append((name, value))
  names = [n for n, _ in parts]
  _require(len(set(names)) == len(names), f'objective={spec!r} names an objective twice.')
  _require(
    len(names) == 1 or 'masked_lm' not in names,
    f'objective={spec!r}: masked_lm trains a bidirectional encoder and cannot be mixed '
    'with the decoder objectives; run it on its own.',
  )
  total = sum(w for _, w in parts)
  return tuple((n, w / total) for n, w in parts)


def attention_kind(objective: str) -> str:
  """The attention the objective needs: masked_lm an encoder's, prefix objectives a prefix."""
  names = [n for n, _ in objective_mixture(objective)]
  if names in (['masked_lm'], ['classification']):
    return 'bidirectional'
  return 'prefix' if set(names) & {'span_corruption', 'prefix_lm'} else 'causal'


def implied(flat: dict) -> dict:
  """A flattened config with every 'this value means another field's' default spelt out (0 steps
  of schedule = steps, ...): two configs mean the same run when these agree."""
  out = dict(flat)

  def get(key: str, default: Any = 0) -> Any:
    return flat.get(key, default)

  fills = {
    'optim.schedule_steps': get('steps'),
    'model.max_len': get('data.seq_len'),
    'model.mlp_dim': 4 * get('model.embed_dim'),
    'model.head_dim': get('model.embed_dim') // max(get('model.num_heads', 1), 1),
    'model.num_kv_heads': get('model.num_heads'),
    'data.window_stride': get('data.seq_len'),
  }
  for key, value in fills.items():
    if key in out and not out[key]:
      out[key] = value
  if out.get('tokenizer.sentinels', 0) < 0:
    uses_spans = 'span_corruption' in dict(objective_mixture(str(get('objective', 'causal_lm'))))
    out['tokenizer.sentinels'] = 100 if uses_spans else 0
  # Paths mean the files they name: 'a/../x.txt' and 'x.txt' are one corpus.
  for key in ('data.path', 'data.prepared', 'finetune.eval_path', 'tokenizer.path'):
    if out.get(key):
      out[key] = ','.join(canonical_path(p) for p in str(out[key]).split(',') if p.strip())
  if out.get('data.mixture'):
    out['data.mixture'] = ','.join(
      f'{name}={canonical_path(path)}:{weight!r}'
      for name, path, weight in mixture(str(out['data.mixture']))
    )
  if out.get('init_from'):
    path, step = init_source(str(out['init_from']))
    out['init_from'] = canonical_path(path) + ('' if step is None else f':{step}')
  return out


def canonical_path(path: str) -> str:
  """A local path resolved to the file it names (home, '..', symlinks, relative to this directory);
  a bucket path (gs://...) as written, since buckets have no such aliases."""
  path = path.strip()
  if not path or '://' in path:
    return path
  return os.path.realpath(os.path.expanduser(path))


def num_sentinels(c: ml_collections.ConfigDict) -> int:
  if c.tokenizer.sentinels >= 0:
    return c.tokenizer.sentinels
  uses_spans = 'span_corruption' in dict(objective_mixture(c.objective))
  return 100 if uses_spans else 0


def optim_config(c: ml_collections.ConfigDict) -> OptimConfig:
  o = c.optim
  return OptimConfig(
    lr=o.lr,
    min_lr=o.min_lr,
    schedule=o.schedule,
    warmup_steps=o.warmup_steps,
    decay_fraction=o.decay_fraction,
    total_steps=o.schedule_steps or c.steps,
    b1=o.b1,
    b2=o.b2,
    eps=o.eps,
    weight_decay=o.weight_decay,
    decay_embeddings=o.decay_embeddings,
    decay_norms_and_biases=o.decay_norms_and_biases,
    clip_norm=o.clip_norm,
  )


def profile_steps(spec: str) -> tuple[int, int] | None:
  """'START:COUNT' -> (first, last) step to trace, both included; '' -> None."""
  if not spec:
    return None
  start, _, count = spec.partition(':')
  ok = start.strip().isdigit() and count.strip().isdigit() and int(start) >= 1 and int(count) >= 1
  _require(
    ok,
    f'profile_steps={spec!r} must be START:COUNT with START >= 1 and COUNT >= 1, '
    'e.g. --config.profile_steps=10:3 traces steps 10 to 12.',
  )
  return int(start), int(start) + int(count) - 1


# ---------------------------------------------------------------------------------------------
# Validation: every impossible combination fails here, before anything compiles.


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
  _require(value in allowed, f'{name}={value!r} is not one of {", ".join(allowed)}.')


def validate(
  c: ml_collections.ConfigDict, *, num_devices: int = 1, check_data: bool = True
) -> None:
  """Raises ConfigError naming the fields and the fix for anything that cannot run."""
  objective_mixture(c.objective)
  _one_of('tokenizer.model_type', c.tokenizer.model_type, TOKENIZER_TYPES)
  _validate_model(c.model, c.data.seq_len)
  _validate_batches(c.data, c.optim, num_devices)
  _validate_optim(c.optim)
  _validate_objectives(c)
  _validate_run(c)
  if check_data:
    _validate_files(c)


def _validate_model(m: ml_collections.ConfigDict, seq_len: int) -> None:
  _one_of('model.flavour', m.flavour, FLAVOURS)
  _one_of('model.param_dtype', m.param_dtype, DTYPES)
  _one_of('model.dtype', m.dtype, DTYPES)
  _one_of('model.remat', remat_policy(m.remat), REMAT_POLICIES)
  _one_of('model.attention_backend', m.attention_backend, ATTENTION_BACKENDS)
  for name in ('num_layers', 'num_heads', 'embed_dim'):
    _require(m[name] > 0, f'model.{name}={m[name]} must be positive.')
  for name in ('loss_chunk', 'max_segments'):
    _require(m[name] >= 0, f'model.{name}={m[name]} must be 0 or more.')
  _require(
    m.head_dim > 0 or m.embed_dim % m.num_heads == 0,
    f'model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}: '
    'change one of them or set model.head_dim.',
  )
  kv_heads = m.num_kv_heads or m.num_heads
  _require(
    m.num_heads % kv_heads == 0,
    f'model.num_kv_heads={kv_heads} does not divide model.num_heads={m.num_heads}: '
    'grouped-query attention needs whole groups.',
  )
  if m.flavour == 'llama':
    head_dim = m.head_dim or m.embed_dim // m.num_heads
    _require(head_dim % 2 == 0, f'model head_dim={head_dim} must be even for RoPE.')
  _require(
    m.max_len == 0 or seq_len <= m.max_len,
    f'data.seq_len={seq_len} exceeds model.max_len={m.max_len}: '
    'raise model.max_len or lower data.seq_len.',
  )
  _require(0.0 <= m.dropout < 1.0, f'model.dropout={m.dropout} must be in [0, 1).')


def _validate_batches(
  d: ml_collections.ConfigDict, o: ml_collections.ConfigDict, num_devices: int
) -> None:
  _require(d.seq_len > 1, f'data.seq_len={d.seq_len} must be at least 2.')
  _require(
    0 <= d.window_stride <= d.seq_len,
    f'data.window_stride={d.window_stride} must be between 0 (= seq_len) and '
    f'data.seq_len={d.seq_len}: a larger stride would skip tokens.',
  )
  _require(
    0.0 < d.eval_fraction < 1.0,
    f'data.eval_fraction={d.eval_fraction} must be strictly between 0 and 1.',
  )
  _require(d.batch_size > 0, f'data.batch_size={d.batch_size} must be positive.')
  _require(d.shard_mb > 0, f'data.shard_mb={d.shard_mb} must be positive.')
  per_step = num_devices * o.grad_accum_steps
  _require(o.grad_accum_steps >= 1, f'optim.grad_accum_steps={o.grad_accum_steps} must be >= 1.')
  _require(
    d.batch_size % per_step == 0,
    f'data.batch_size={d.batch_size} is not divisible by {num_devices} device(s) x '
    f'optim.grad_accum_steps={o.grad_accum_steps}: make it a multiple of {per_step}.',
  )
  mixture(d.mixture)


def _validate_optim(o: ml_collections.ConfigDict) -> None:
  _one_of('optim.schedule', o.schedule, SCHEDULES)
  _require(o.spike_window >= 0, f'optim.spike_window={o.spike_window} must be >= 0 (0: off).')
  _require(
    o.spike_threshold > 0,
    f'optim.spike_threshold={o.spike_threshold} must be positive (standard deviations).',
  )
  _require(o.warmup_steps >= 0, f'optim.warmup_steps={o.warmup_steps} must be >= 0.')
  _require(o.schedule_steps >= 0, f'optim.schedule_steps={o.schedule_steps} must be >= 0.')
  _require(0 <= o.min_lr <= o.lr, f'optim.min_lr={o.min_lr} must be between 0 and optim.lr={o.lr}.')
  _require(
    0.0 < o.decay_fraction <= 1.0, f'optim.decay_fraction={o.decay_fraction} must be in (0, 1].'
  )


def _validate_objectives(c: ml_collections.ConfigDict) -> None:
  """The masked LM's and span corruption's settings; what a fine-tune and in-loop tasks need."""
  lm, sc = c.masked_lm, c.span_corruption
  _require(0.0 < lm.rate < 1.0, f'masked_lm.rate={lm.rate} must be strictly between 0 and 1.')
  _require(
    lm.mask_token_fraction >= 0
    and lm.random_token_fraction >= 0
    and lm.mask_token_fraction + lm.random_token_fraction <= 1.0,
    f'masked_lm.mask_token_fraction={lm.mask_token_fraction} and '
    f'masked_lm.random_token_fraction={lm.random_token_fraction} must be >= 0 and sum '
    'to at most 1 (the rest stay unchanged).',
  )
  _require(
    0.0 < sc.noise_density < 1.0,
    f'span_corruption.noise_density={sc.noise_density} must be strictly between 0 and 1.',
  )
  _require(
    sc.mean_span_length >= 1.0,
    f'span_corruption.mean_span_length={sc.mean_span_length} must be at least 1.',
  )
  init_source(c.init_from)
  if c.objective in FINETUNE_OBJECTIVES:
    _require(
      not c.data.mixture and not c.data.prepared,
      f'objective={c.objective} reads records from data.path (and finetune.eval_path): '
      'data.mixture and data.prepared are for pre-training corpora.',
    )
  _require(
    c.eval.tasks_every >= 0 and c.eval.limit >= 0,
    f'eval.tasks_every={c.eval.tasks_every} and eval.limit={c.eval.limit} must be >= 0 '
    '(0: every eval_every steps; all questions).',
  )
  _require(
    not c.eval.tasks or attention_kind(c.objective) != 'bidirectional',
    f'eval.tasks scores continuations by their likelihood under a decoder; objective='
    f'{c.objective} trains a model that does not give one: set eval.tasks="".',
  )


def _validate_run(c: ml_collections.ConfigDict) -> None:
  """Steps, intervals, checkpoints, profiling, the tokenizer sample."""
  _require(c.steps > 0, f'steps={c.steps} must be positive.')
  for name in ('log_every', 'eval_every'):
    _require(c[name] > 0, f'{name}={c[name]} must be positive.')
  _require(c.checkpoint.every > 0, f'checkpoint.every={c.checkpoint.every} must be positive.')
  _require(c.checkpoint.keep > 0, f'checkpoint.keep={c.checkpoint.keep} must be positive.')
  profile_steps(c.profile_steps)
  _require(
    c.tokenizer.sample_mb > 0, f'tokenizer.sample_mb={c.tokenizer.sample_mb} must be positive.'
  )


def _validate_files(c: ml_collections.ConfigDict) -> None:
  """The files the config names exist."""
  if c.objective in FINETUNE_OBJECTIVES and c.finetune.eval_path:
    from pretrax.data import sources  # Local: validation only needs the file system part.

    _require(
      bool(sources.expand_paths(c.finetune.eval_path)),
      f'finetune.eval_path={c.finetune.eval_path!r} matches no file: point it at the '
      'held-out records, or set it to "" to hold out data.eval_fraction of data.path.',
    )
  if not c.data.prepared:
    resolve_data_paths(c)
    if c.tokenizer.path:
      _require(
        os.path.isfile(c.tokenizer.path),
        f'tokenizer.path={c.tokenizer.path!r} does not exist: point it at a SentencePiece '
        '.model file, or set it to "" to train one on the data.',
      )


def init_source(spec: str) -> tuple[str, int | None]:
  """`init_from` as (path, step): 'runs/base' -> ('runs/base', None), 'runs/base:500' ->
  ('runs/base', 500); '' -> ('', None)."""
  path, sep, step = spec.rpartition(':')
  if sep and step.isdigit() and path and not path.endswith(':/'):
    return path, int(step)
  _require(
    not (sep and step and step.strip().lstrip('-').isdigit()),
    f'init_from={spec!r}: the step after ":" must be a non-negative integer.',
  )
  return spec, None


def mixture(spec: str) -> list[tuple[str, str, float]]:
  """(name, path, weight) of each source of a `data.mixture` ('NAME=PATH:WEIGHT,...'); '' is
  none. A path may hold colons (gs://...): the weight follows the last."""
  if not spec:
    return []
  items = [p.strip() for p in spec.split(',')]
  # Not skipped: a mixture of only empty items would pass validation and have no source to train.
  _require(
    all(items),
    f'data.mixture={spec!r} has an empty item: separate its NAME=PATH:WEIGHT '
    'items by single commas.',
  )
  out = []
  for item in items:
    name, _, rest = item.partition('=')
    path, _, weight = rest.rpartition(':')
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    _require(
      name.isidentifier() and bool(path) and 0 < value < float('inf'),
      f'data.mixture item {item!r} is not NAME=PATH:WEIGHT with a positive, finite weight, '
      'e.g. web=/data/web/*.parquet:0.7',
    )
    out.append((name, path, value))
  names = [n for n, _, _ in out]
  _require(len(set(names)) == len(names), f'data.mixture names a source twice: {names}.')
  return out


def resolve_data_paths(c: ml_collections.ConfigDict) -> list[str]:
  """The files the config names, or the fallback corpus; a clear error if there are none."""
  from pretrax.data import sources  # Local: validation only needs the file system part.

  if c.data.mixture:
    files = []
    for name, path, _ in mixture(c.data.mixture):
      found = sources.expand_paths(path)
      _require(
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
    _one_of('data.fallback', c.data.fallback, (STDLIB_CORPUS,))
    return sources.stdlib_files()
  raise ConfigError(
    f'data.path={c.data.path!r} matches no file: point --config.data.path at a text file, '
    'a directory or a glob.'
  )
