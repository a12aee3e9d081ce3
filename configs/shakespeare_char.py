"""nanoGPT's CPU "baby GPT" on Tiny Shakespeare, character level; the quickstart.

  pretrax train --config=configs/shakespeare_char.py --workdir=runs/shakespeare

4 layers, 4 heads, width 128, context 64, batch 12, 2000 steps of AdamW (lr 1e-3 cosine to 1e-4,
warmup 100, betas 0.9/0.99, weight decay 0.1 on every matrix and the embeddings, as nanoGPT),
no dropout, 90/10 split by position, training windows at every offset (as nanoGPT samples them).
One departure: the output head is untied from the token embedding (nanoGPT ties them), which
measured 0.012-0.018 lower validation loss at 2000 steps on two seeds for +42k parameters.
Expect a validation loss of about 1.87 (nanoGPT: 1.8857) after 2000 steps, three to four minutes on
two CPU cores, then a sample of generated text.

Without ../shared/data/tinyshakespeare.txt (a fresh clone) it trains on the Python standard
library's sources instead; point --config.data.path at any text file to train on your own.

Sweep the peak learning rate around nanoGPT's 1e-3 (3 full runs; see get_sweep):

  pretrax sweep --config=configs/shakespeare_char.py --workdir=runs/shakespeare-lr
"""

from pretrax import sweep
from pretrax.config import STDLIB_CORPUS, base_config, shared_data


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.steps = 2000
  c.log_every = 100
  c.eval_every = 500
  c.eval_batches = 0
  c.model.flavour = 'gpt2'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.use_bias = False
  c.model.tie_embeddings = False  # Measured better here; see the docstring.
  c.model.dropout = 0.0
  c.data.path = shared_data(__file__, 'tinyshakespeare.txt')
  c.data.fallback = STDLIB_CORPUS
  c.data.seq_len = 64
  c.data.window_stride = 1  # Windows at every offset, as nanoGPT samples them.
  c.data.batch_size = 12
  c.data.eval_fraction = 0.1
  c.tokenizer.model_type = 'char'
  c.optim.lr = 1e-3
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 100
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.optim.decay_embeddings = True
  c.checkpoint.every = 500
  c.sample.prompt = '\n'
  c.sample.length = 300
  return c


def get_sweep(arg: str | None = None):
  del arg
  return sweep.values('optim.lr', [5e-4, 1e-3, 2e-3])
