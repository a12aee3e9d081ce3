"""GPT-2 small (124M): 12 layers, 12 heads, width 768, context 1024, for accelerators.

  pretrax train --config=configs/gpt2_small.py --workdir=runs/gpt2_small \
      --config.data.path='/data/corpus/*.txt'

GPT-2's layout (learned positions, LayerNorm with biases, GELU, tied embeddings), vocabulary
padded to 50304, bfloat16 compute. Expect the loss to fall below 4 within a few thousand steps on
web text; on a CPU it builds (`jax.eval_shape`) but is too large to train in reasonable time.
"""

from pretrax.config import base_config


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.steps = 20000
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 50
  c.model.flavour = 'gpt2'
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.embed_dim = 768
  c.model.use_bias = True
  c.model.vocab_multiple = 64
  c.model.dtype = 'bfloat16'
  c.data.seq_len = 1024
  c.data.batch_size = 512
  # The loss in chunks of 256 positions: the float32 logits (64 x 1024 x 50304 per device) and
  # their gradient never exist whole. `pretrax plan --devices=8` then puts one micro-batch of 64
  # sequences per device at 54 GiB (31 GiB with two micro-batches; 57 GiB for two without
  # chunking), so it fits 80 GiB GPUs without gradient accumulation.
  c.model.loss_chunk = 256
  c.model.scan_layers = True  # One compiled block, scanned (docs/scaling.md).
  c.optim.grad_accum_steps = 1
  c.tokenizer.model_type = 'bpe'
  c.tokenizer.vocab_size = 50257
  c.optim.lr = 6e-4
  c.optim.min_lr = 6e-5
  c.optim.warmup_steps = 700
  c.optim.b2 = 0.95
  c.checkpoint.every = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
