"""BERT-base sized masked LM (~110M parameters with a 32k vocabulary), for accelerators.

  pretrax train --config=configs/bert_base.py --workdir=runs/bert_base \
      --config.data.path='/data/corpus/*.txt'

BERT-base's shape: 12 layers, 12 heads, width 768, MLP 3072, biases, GELU, learned positions,
dropout 0.1, the MLM head tied to the embeddings with a bias, 15% masking with 80/10/10, whole-word
masking (BERT's later release), AdamW at 1e-4 with 10k warmup steps and linear decay, batch 256 of
128 tokens (BERT's first phase; raise data.seq_len to 512 for the second). Two departures from the
original, both from the same building blocks as the decoders: pre-LayerNorm blocks (stabler,
RoBERTa-era practice) and a SentencePiece unigram vocabulary instead of WordPiece; no next-sentence
prediction, as RoBERTa showed it does not help.

Variant `:classify` fine-tunes a classifier on the trained encoder with BERT's recipe
(config.classification_recipe) at BERT's base-size learning rate, 3e-5:

  pretrax train --config=configs/bert_base.py:classify --workdir=runs/bert_cls \
      --config.init_from=runs/bert_base --config.data.path=train.jsonl \
      --config.finetune.eval_path=dev.jsonl --config.steps=3000 --config.optim.warmup_steps=300
"""

from pretrax.config import base_config, classification_recipe


def get_config(arg: str | None = None):
  c = base_config()
  c.objective = 'masked_lm'
  c.masked_lm.whole_word = True
  c.steps = 1_000_000
  c.log_every = 100
  c.eval_every = 10_000
  c.eval_batches = 50
  c.model.flavour = 'gpt2'
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.embed_dim = 768
  c.model.mlp_dim = 3072
  c.model.max_len = 512
  c.model.use_bias = True
  c.model.dropout = 0.1
  c.model.norm_eps = 1e-12
  c.model.vocab_multiple = 128
  c.model.dtype = 'bfloat16'
  c.model.scan_layers = True  # One compiled block, scanned (docs/scaling.md).
  c.data.seq_len = 128
  c.data.batch_size = 256
  c.tokenizer.model_type = 'unigram'
  c.tokenizer.vocab_size = 32000
  c.optim.schedule = 'linear'
  c.optim.lr = 1e-4
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 10_000
  c.optim.b2 = 0.999
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.01
  c.checkpoint.every = 10_000
  c.mesh.data = -1
  c.mesh.fsdp = 1
  if arg == 'classify':
    classification_recipe(c)
    c.optim.lr = 3e-5  # BERT's fine-tuning grid: 2e-5, 3e-5, 5e-5 at this size.
  elif arg:
    raise ValueError(f'configs/bert_base.py: unknown variant {arg!r}; use "classify".')
  return c
