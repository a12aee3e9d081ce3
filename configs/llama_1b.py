"""A Llama-3.2-1B-shaped model with a 32k vocabulary (1.04B): RoPE, RMSNorm, SwiGLU, GQA.

  pretrax train --config=configs/llama_1b.py --workdir=runs/llama_1b \
      --config.data.path='/data/corpus/*.txt' --config.tokenizer.path=/data/tok.model

16 layers, width 2048, 32 query heads and 8 key/value heads of 64, MLP 8192, tied embeddings,
RoPE theta 500000, bfloat16 compute, sequences of 2048, the loss in chunks of 256 positions. For
accelerators (FSDP over all devices); on a CPU it builds under `jax.eval_shape`.
"""

from pretrax.config import base_config


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.steps = 50000
  c.log_every = 50
  c.eval_every = 2000
  c.eval_batches = 50
  c.model.flavour = 'llama'
  c.model.num_layers = 16
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.embed_dim = 2048
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500000.0
  c.model.norm_eps = 1e-5
  c.model.dtype = 'bfloat16'
  # Nothing recomputed (remat='full' costs a third more FLOPs): `pretrax plan --devices=8` puts
  # four micro-batches of 8 sequences per device at 51 GiB; with two it needs 94 GiB (84 with
  # remat='dots_attention', 92 with 'full'), more than 80 GiB GPUs hold.
  c.model.remat = 'none'
  c.model.loss_chunk = 256
  # Unrolled: scanned (model.scan_layers) with nothing recomputed, `pretrax plan --devices=8`
  # puts a device at 79.0 GiB against 50.8 (the scan keeps every block's residuals stacked); it
  # pays with remat: 31.6 GiB scanned against 45.9 with 'dots_attention', 9.0 against 49.6 with
  # 'full'. Not switched before a GPU measures the recomputation's cost (docs/scaling.md).
  c.model.scan_layers = False
  c.optim.grad_accum_steps = 4
  c.model.vocab_multiple = 128
  c.data.seq_len = 2048
  c.data.batch_size = 256
  c.tokenizer.model_type = 'bpe'
  c.tokenizer.vocab_size = 32000
  c.optim.lr = 3e-4
  c.optim.min_lr = 3e-5
  c.optim.schedule = 'wsd'
  c.optim.warmup_steps = 2000
  c.optim.b2 = 0.95
  c.checkpoint.every = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
