"""llama_1b with fine-grained experts (DeepSeek's shape): 64 a layer, 8 per token and one shared.

  pretrax train --config=configs/moe_64e.py --workdir=runs/moe_64e \
      --config.data.path='/data/corpus/*.txt' --config.tokenizer.path=/data/tok.model

configs/llama_1b.py with every MLP replaced by 64 routed SwiGLU experts of width 896 and one shared
expert of that width that every token goes through: 5.96B parameters, 1.03B active. 8 + 1 experts
of 896 are 8064 hidden units a token, llama_1b's 8192 less 1.6%, so a token costs about llama_1b's
FLOPs (6.97 GFLOPs against 7.03). DeepSeek-V3's router: sigmoid scores, the 8 chosen
renormalised, auxiliary-loss-free balancing (a bias moved by 0.001 a step toward underloaded
experts) and a small per-sequence balancing loss instead of the batch one.

Expert parallelism over all devices (64 experts: 1, 2, 4, ... 64 of them), 8 whole experts a
device on 8, with the dense weights sharded over the same devices (`embed=fsdp+expert`: FSDP where
the experts are not). Over FSDP alone (`mesh.fsdp=-1`, `mesh.expert=1`) every device gathers all
64 experts' weights and gradients: 73 and 71 GiB of temporaries a device with 8 and 16
micro-batches, 81.5 and 79.3 GiB in all. Experts of fixed capacity (1.25 times an even share, per
sequence): dropless experts split over devices gather every token of the devices they span onto
each (306 GiB a device here, counting the grouped matmul as a kernel holds it). Eight
micro-batches of 32 sequences:

  pretrax plan --config=configs/moe_64e.py --devices=8 --device_memory_gib=80

puts a device at 60.7 GiB. For accelerators; on a CPU it builds under `jax.eval_shape`.
"""

import os

from pretrax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  c = config_lib.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'llama_1b.py'))
  c.model.moe.num_experts = 64
  c.model.moe.top_k = 8
  c.model.moe.shared_experts = 1
  # (8 routed + 1 shared) x 896 = 8064 hidden units a token, about llama_1b's 8192; 896 = 7 x 128.
  c.model.moe.expert_dim = 896
  c.model.moe.capacity_factor = 1.25  # Not dropless: see the docstring.
  c.model.moe.score = 'sigmoid'
  c.model.moe.bias_rate = 0.001
  c.model.moe.balance_loss = 0.0
  c.model.moe.sequence_balance_loss = 0.0001
  c.model.moe.router_z_loss = 0.001
  c.optim.grad_accum_steps = 8
  # Expert parallelism over every device, whose dense weights it also shards (FSDP): see above.
  c.mesh.fsdp = 1
  c.mesh.expert = -1
  c.mesh.rules = 'embed=fsdp+expert'
  return c
