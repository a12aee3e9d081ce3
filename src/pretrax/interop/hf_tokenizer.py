"""A pretrax SentencePiece model as a Hugging Face fast tokenizer that gives the same ids.

`LlamaTokenizer` and `T5Tokenizer` do not reproduce a lossless (identity-normalised, byte-fallback,
no dummy prefix) SentencePiece model. A `tokenizers` model built from the SentencePiece vocabulary
does: BPE with the merges implied by the vocabulary for `bpe` models, the same BPE without merges
for `char` models (every piece is one character), and Unigram with the same scores for `unigram`
models; spaces become '▁' before the model and back after, and byte pieces decode through UTF-8.

Two known differences, both documented in the README: the special pieces (`<pad>`, `<s>`,
`<mask>`, sentinels) are matched when they appear literally in text, as Hugging Face tokenizers
do (load with `split_special_tokens=True` to treat them as text, as SentencePiece does); and a
unigram model may split a word differently where two segmentations score exactly the same.
"""

import json
import os
from typing import Any

from sentencepiece import sentencepiece_model_pb2

from pretrax import tokenizer as tokenizer_lib

# protoc's generated module builds its message classes at import time and ships no stubs, so mypy
# sees none of them: typed Any once here rather than ignored at each use.
sp_pb2: Any = sentencepiece_model_pb2
SENTENCEPIECE_FILE = 'tokenizer.model'
_Piece = sp_pb2.ModelProto.SentencePiece


def _require_tokenizers():
  try:
    import tokenizers
  except ImportError:
    raise ImportError(
      "exporting a tokenizer needs the `tokenizers` package: pip install 'pretrax[hf]'"
    ) from None
  return tokenizers


def _bpe_merges(pieces) -> list[tuple[str, str]]:
  """SentencePiece BPE merges by score: a piece made of two pieces is a merge ranked by its own
  position in the vocabulary (SentencePiece orders merged pieces by when training made them)."""
  ids = {p.piece: i for i, p in enumerate(pieces)}
  merges = []
  for i, p in enumerate(pieces):
    if p.type != _Piece.NORMAL:
      continue
    for cut in range(1, len(p.piece)):
      left, right = p.piece[:cut], p.piece[cut:]
      if left in ids and right in ids:
        merges.append((i, ids[left], ids[right], left, right))
  return [(left, right) for *_, left, right in sorted(merges)]


def build(model_proto: bytes):
  """The `tokenizers.Tokenizer` equivalent to a pretrax SentencePiece model."""
  tk = _require_tokenizers()
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(model_proto)
  pieces = list(proto.pieces)
  kind = proto.trainer_spec.model_type
  if kind == sp_pb2.TrainerSpec.UNIGRAM:
    model = tk.models.Unigram(
      [(p.piece, p.score) for p in pieces], unk_id=tokenizer_lib.UNK_ID, byte_fallback=True
    )
  elif kind in (sp_pb2.TrainerSpec.BPE, sp_pb2.TrainerSpec.CHAR):
    merges = _bpe_merges(pieces) if kind == sp_pb2.TrainerSpec.BPE else []
    model = tk.models.BPE(
      vocab={p.piece: i for i, p in enumerate(pieces)},
      merges=merges,
      unk_token=pieces[tokenizer_lib.UNK_ID].piece,
      byte_fallback=True,
      fuse_unk=True,
    )
  else:
    raise ValueError(
      'only char, bpe and unigram SentencePiece models can be exported; this one '
      f'is {sp_pb2.TrainerSpec.ModelType.Name(kind)}.'
    )
  tokenizer = tk.Tokenizer(model)
  tokenizer.normalizer = tk.normalizers.Replace(' ', '\u2581')
  tokenizer.decoder = tk.decoders.Sequence(
    [tk.decoders.Replace('\u2581', ' '), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
  )
  specials = [p.piece for p in pieces if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)]
  tokenizer.add_special_tokens([tk.AddedToken(s, special=True, normalized=False) for s in specials])
  return tokenizer


def save(model_proto: bytes, out_dir: str, *, model_max_length: int) -> list[str]:
  """Writes tokenizer.json and tokenizer_config.json (what `AutoTokenizer.from_pretrained(out_dir)`
  loads) and the SentencePiece model itself (what `pretrax import` and SentencePiece load)."""
  tok = tokenizer_lib.Tokenizer(model_proto)
  build(model_proto).save(os.path.join(out_dir, 'tokenizer.json'))
  piece = tok.piece
  config = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'model_max_length': model_max_length,
    'pad_token': piece(tokenizer_lib.PAD_ID),
    'unk_token': piece(tokenizer_lib.UNK_ID),
    'bos_token': piece(tokenizer_lib.BOS_ID),
    'eos_token': piece(tokenizer_lib.EOS_ID),
    'mask_token': piece(tokenizer_lib.MASK_ID),
    'clean_up_tokenization_spaces': False,  # Decoding must give back the exact text.
  }
  if len(tok.sentinel_ids):
    config['additional_special_tokens'] = [piece(int(i)) for i in tok.sentinel_ids]
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  tok.save(os.path.join(out_dir, SENTENCEPIECE_FILE))
  return ['tokenizer.json', 'tokenizer_config.json', SENTENCEPIECE_FILE]
