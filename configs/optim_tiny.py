"""A small Llama-style LM on Tiny Shakespeare with a BPE vocabulary: the optimizer comparisons'
model (benchmarks/optimizers.py).

  pretrax sweep --config=configs/optim_tiny.py --workdir=runs/optim-adamw
  pretrax sweep --config=configs/optim_tiny.py:muon --workdir=runs/optim-muon
  pretrax sweep --config=configs/optim_tiny.py:mup --workdir=runs/optim-mup \
      --sweep=configs/optim_tiny.py:widths

4 layers of width 128 (4 heads), 1024 BPE pieces, 400 steps of 16 x 64 tokens, cosine decay
after 40 warmup steps. Variants: `:muon` (optim.name=muon), `:mup` (width transfer from width
64: model.mup_base_width=64), `:sp` (the standard parametrisation, for the widths sweep).
Sweeps (get_sweep): the learning rates (default), or `widths`: embed_dim 64 and 256 (4x apart)
at every learning rate.

Without ../shared/data/tinyshakespeare.txt it trains on the Python standard library's sources.
"""

from pretrax import sweep
from pretrax.config import STDLIB_CORPUS, base_config, shared_data

LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2)
WIDTHS = (64, 256)


def get_config(arg: str | None = None):
  c = base_config()
  c.steps = 400
  c.log_every = 25
  c.eval_every = 40  # Divides 400 and :muon's 0.8 x 400 in benchmarks/optimizers.py.
  c.eval_batches = 16
  c.model.flavour = 'llama'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.tie_embeddings = False
  c.data.path = shared_data(__file__, 'tinyshakespeare.txt')
  c.data.fallback = STDLIB_CORPUS
  c.data.seq_len = 64
  c.data.window_stride = 32
  c.data.batch_size = 16
  c.tokenizer.model_type = 'bpe'
  c.tokenizer.vocab_size = 1024
  c.optim.lr = 4e-3
  c.optim.min_lr = 0.0  # The same schedule's shape at every learning rate.
  c.optim.warmup_steps = 40
  c.optim.b2 = 0.99
  c.checkpoint.every = 400
  c.sample.length = 0
  if arg == 'muon':
    c.optim.name = 'muon'
  elif arg == 'mup':
    c.model.mup_base_width = WIDTHS[0]
  elif arg and arg != 'sp':
    raise ValueError(f'configs/optim_tiny.py: unknown variant {arg!r}; use muon, mup or sp.')
  return c


def get_sweep(arg: str | None = None):
  lrs = sweep.values('optim.lr', list(LEARNING_RATES))
  if arg == 'widths':
    return sweep.product(sweep.values('model.embed_dim', list(WIDTHS)), lrs)
  if arg:
    raise ValueError(f'configs/optim_tiny.py: unknown sweep {arg!r}; use nothing or "widths".')
  return lrs
