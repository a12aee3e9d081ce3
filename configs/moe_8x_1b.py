"""llama_1b with 8 experts per layer, 2 per token (Mixtral's shape): 3.45B parameters, 1.04B active.

  pretrax train --config=configs/moe_8x_1b.py --workdir=runs/moe_8x_1b \
      --config.data.path='/data/corpus/*.txt' --config.tokenizer.path=/data/tok.model

configs/llama_1b.py with every MLP replaced by 8 SwiGLU experts of half its width (4096): the two
a token goes to hold as many weights as llama_1b's MLP, so a token costs llama_1b's FLOPs (7.04
GFLOPs against 7.03, the router's 2048 x 8 the difference) while the model holds four times the MLP
weights. Mixtral's router: softmax over the experts, the two chosen renormalised, Switch's balancing
loss (0.01) and the router z-loss.

Experts of fixed capacity (1.25 times an even share, per sequence), whose einsums every backend
compiles as planned. Dropless experts need a grouped-matmul kernel (TPUs; on GPUs, XLA's cuDNN
ragged-dot fusion where it is enabled), else `ragged_dot` runs every expert on every token copy;
`pretrax plan` counts them as a kernel holds them: 34.6 GiB a device with
`--config.model.moe.capacity_factor=0`. Eight micro-batches of 32 sequences:

  pretrax plan --config=configs/moe_8x_1b.py --devices=8 --device_memory_gib=80

puts a device at 48.8 GiB (72.9 GiB with llama_1b's four). For accelerators (FSDP over all devices);
on a CPU it builds under `jax.eval_shape`.
"""

import os

from pretrax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llama_1b.py'))
  c.model.moe.num_experts = 8
  c.model.moe.top_k = 2
  c.model.moe.expert_dim = c.model.mlp_dim // 2  # Two experts: llama_1b's MLP FLOPs.
  c.model.moe.capacity_factor = 1.25  # Not dropless: see the docstring.
  c.model.moe.balance_loss = 0.01
  c.model.moe.router_z_loss = 0.001
  c.optim.grad_accum_steps = 8
  return c
