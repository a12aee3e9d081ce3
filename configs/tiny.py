"""A tiny GPT that trains in seconds on a CPU; the tests use it.

  pretrax train --config=configs/tiny.py --workdir=runs/tiny

Expect the loss to fall from ~5.8 to ~3 in 50 steps (a few seconds after compiling). Variants:
`configs/tiny.py:llama` for the Llama flavour (RoPE, RMSNorm, SwiGLU, 2 KV heads).

Sweep the learning rate (3 trials, one after another; see get_sweep):

  pretrax sweep --config=configs/tiny.py --workdir=runs/tiny-lr

Expect about 2 minutes on 2 CPU cores and eval losses of ~3.39, ~3.36 and ~3.35 for lr 2e-3, 5e-3
and 1e-2, in runs/tiny-lr/results.md.
"""

from pretrax import sweep
from pretrax.config import STDLIB_CORPUS, base_config, shared_data


def get_config(arg: str | None = None):
  c = base_config()
  c.steps = 50
  c.log_every = 10
  c.eval_every = 50
  c.eval_batches = 4
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.embed_dim = 64
  c.data.path = shared_data(__file__, 'tinyshakespeare.txt')
  c.data.fallback = STDLIB_CORPUS
  c.data.seq_len = 32
  c.data.batch_size = 8
  c.optim.lr = 5e-3
  c.optim.min_lr = 5e-4
  c.optim.warmup_steps = 5
  c.checkpoint.every = 25
  if arg == 'llama':
    c.model.flavour = 'llama'
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
  elif arg:
    raise ValueError(f'configs/tiny.py: unknown variant {arg!r}; use nothing or "llama".')
  return c


def get_sweep(arg: str | None = None):
  del arg  # The same sweep for both variants.
  return sweep.values('optim.lr', [2e-3, 5e-3, 1e-2])
