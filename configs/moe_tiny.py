"""A small Mixture-of-Experts GPT on Tiny Shakespeare, character level; about a minute on a CPU.

  pretrax train --config=configs/moe_tiny.py --workdir=runs/moe_tiny

The quickstart's shape (configs/shakespeare_char.py: 4 layers, 4 heads, width 128, context 64)
with each MLP replaced by 8 experts of width 256, 2 per token: a token goes through 512 hidden
units, as the dense MLP's, while the model holds four times the MLP weights (2.46M parameters,
0.88M active). Softmax router, balanced by DeepSeek-V3's auxiliary-loss-free bias alone (no
balancing loss). Experts of fixed capacity (1.25 times an even share per sequence): on a CPU the
dropless layer's grouped matmul runs every expert on every token copy (XLA:CPU has no such kernel).
Expect a held-out loss of 1.97 after 600 steps (1m14s on 2 CPU cores), the expert loads' coefficient
of variation about 0.15 after the first 100 steps, 3% of token copies dropped.

Variant `:dense` is the same model with one MLP of 512 a layer: the same active parameters. It
reaches 2.04 at its best learning rate (4e-3, as the MoE's). benchmarks/moe.py sweeps both.

Sweep the learning rate (4 trials; see get_sweep), and the dense variant's:

  pretrax sweep --config=configs/moe_tiny.py --workdir=runs/moe_tiny-lr
  pretrax sweep --config=configs/moe_tiny.py:dense --workdir=runs/moe_tiny-dense-lr

Expect about 5 minutes each and held-out losses of 2.061, 1.989, 1.970 and 2.055 for lr 1e-3,
2e-3, 4e-3 and 8e-3 (dense: 2.211, 2.090, 2.040 and 2.073), in runs/moe_tiny-lr/results.md.

Without ../shared/data/tinyshakespeare.txt it trains on the Python standard library's sources.
"""

from pretrax import sweep
from pretrax.config import STDLIB_CORPUS, base_config, shared_data


def get_config(arg: str | None = None):
  c = base_config()
  c.steps = 600
  c.log_every = 10
  c.eval_every = 600
  c.eval_batches = 0
  c.model.flavour = 'gpt2'
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.mlp_dim = 512
  c.model.use_bias = False
  c.model.tie_embeddings = False
  c.model.dropout = 0.0
  c.data.path = shared_data(__file__, 'tinyshakespeare.txt')
  c.data.fallback = STDLIB_CORPUS
  c.data.seq_len = 64
  c.data.window_stride = 1  # Windows at every offset, as nanoGPT samples them.
  c.data.batch_size = 16
  c.data.eval_fraction = 0.1
  c.tokenizer.model_type = 'char'
  c.optim.lr = 4e-3  # The best of get_sweep's for both variants (benchmarks/moe.py).
  c.optim.min_lr = 1e-4
  c.optim.warmup_steps = 50
  c.optim.b2 = 0.99
  c.optim.weight_decay = 0.1
  c.checkpoint.every = 600
  if arg == 'dense':
    return c
  if arg:
    raise ValueError(f'configs/moe_tiny.py: unknown variant {arg!r}; use nothing or "dense".')
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.expert_dim = c.model.mlp_dim // 2  # Two experts: the dense MLP's width.
  c.model.moe.capacity_factor = 1.25
  c.model.moe.balance_loss = 0.0
  # Ten times DeepSeek-V3's rate, for a run of 600 steps: at 0.001 the bias had not caught up by
  # step 180 (layers 2 and 3 sent every token to one expert: load CV ~1); at 0.03 it overshoots
  # (CV 0.37 after step 100); 0.01 holds it at 0.15.
  c.model.moe.bias_rate = 0.01
  return c


def get_sweep(arg: str | None = None):
  del arg  # The same learning rates for the MoE and the dense variant.
  return sweep.values('optim.lr', [1e-3, 2e-3, 4e-3, 8e-3])
