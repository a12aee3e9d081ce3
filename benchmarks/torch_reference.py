"""A PyTorch baby GPT with nanoGPT's architecture, to time side by side with pretrax's step.

Not a dependency: the benchmark uses it when `torch` is importable (`pip install torch`). Written
from nanoGPT's published description of the model: pre-LayerNorm without biases, one fused q/k/v
projection, `scaled_dot_product_attention` with a causal mask, exact GELU MLP, tied output head,
N(0, 0.02) init with residual projections scaled by 1/sqrt(2 x layers); eager mode (nanoGPT's CPU
command passes --compile=False), AdamW with weight decay on matrices, global-norm clipping at 1.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(width, bias=False)
    self.qkv = nn.Linear(width, 3 * width, bias=False)
    self.attn_out = nn.Linear(width, width, bias=False)
    self.norm2 = nn.LayerNorm(width, bias=False)
    self.up = nn.Linear(width, 4 * width, bias=False)
    self.down = nn.Linear(4 * width, width, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    B, T, C = x.shape
    q, k, v = self.qkv(self.norm1(x)).split(C, dim=2)
    q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, C))
    return x + self.down(F.gelu(self.up(self.norm2(x))))


class BabyGPT(nn.Module):
  def __init__(self, vocab: int, context: int, width: int = 128, heads: int = 4, layers: int = 4):
    super().__init__()
    self.tokens = nn.Embedding(vocab, width)
    self.positions = nn.Embedding(context, width)
    self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
    self.norm = nn.LayerNorm(width, bias=False)
    for module in self.modules():
      if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    for block in self.blocks:
      for residual_out in (block.attn_out, block.down):
        nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * layers))

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.norm(x) @ self.tokens.weight.T


def make_step(vocab: int, context: int, batch: int, seed: int = 0):
  """A closure running one optimizer step on a fixed random batch; returns the loss."""
  torch.manual_seed(seed)
  model = BabyGPT(vocab, context)
  matrices = [p for p in model.parameters() if p.dim() >= 2]
  others = [p for p in model.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW(
    [{'params': matrices, 'weight_decay': 0.1}, {'params': others, 'weight_decay': 0.0}],
    lr=1e-3,
    betas=(0.9, 0.99),
  )
  ids = torch.randint(vocab, (batch, context))
  targets = torch.randint(vocab, (batch, context))

  def step() -> float:
    logits = model(ids)
    loss = F.cross_entropy(logits.view(-1, vocab), targets.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()

  return step
