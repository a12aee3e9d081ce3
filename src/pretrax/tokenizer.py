"""SentencePiece tokenizers that round-trip any text exactly, with fixed special ids.

Ids 0-3 are pad, unk, bos, eos in every pretrax tokenizer; id 4 is the mask token (masked LM),
and span corruption's sentinels `<sentinel_0>`, `<sentinel_1>`, ... follow it when the tokenizer
is trained with them. Byte fallback means no text is ever unknown.
"""

from collections.abc import Iterable, Iterator
import io

import numpy as np
import sentencepiece as spm

from pretrax import errors, paths

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = '<mask>'
SENTINEL_PIECE = '<sentinel_{}>'
_WHITESPACE = frozenset(' \t\n\r\u2581')
# SentencePiece skips training sentences above its max length; we feed it chunks below that.
_TRAIN_CHUNK_CHARS = 4096


class TokenizerError(errors.PretraxError, ValueError):
  """A tokenizer that cannot be trained or used; the message names it and the fix."""


def _chunks(texts: Iterable[str], size: int = _TRAIN_CHUNK_CHARS) -> Iterator[str]:
  for text in texts:
    for start in range(0, len(text), size):
      yield text[start : start + size]


def train(
  texts: Iterable[str], *, model_type: str = 'char', vocab_size: int = 512, num_sentinels: int = 0
) -> bytes:
  """Trains a lossless SentencePiece model on `texts`; returns the serialized model.

  `num_sentinels` reserves that many sentinel pieces (ids 5, 6, ...) for span corruption.
  """
  model = io.BytesIO()
  try:
    _train_into(model, texts, model_type, vocab_size, num_sentinels)
  except RuntimeError as e:  # SentencePiece's own checks (a vocabulary too small for the text).
    message = ' '.join(str(e).split()).split('] ')[-1]
    raise TokenizerError(
      f'training a {model_type} tokenizer of {vocab_size} pieces failed: '
      f'{message} Set --config.tokenizer.vocab_size (or '
      'tokenizer.model_type) to fit the text.'
    ) from None
  return model.getvalue()


def _train_into(
  model: io.BytesIO, texts: Iterable[str], model_type: str, vocab_size: int, num_sentinels: int
) -> None:
  spm.SentencePieceTrainer.train(
    sentence_iterator=_chunks(texts),
    model_writer=model,
    model_type=model_type,
    vocab_size=vocab_size,
    # Lossless: no normalisation, whitespace kept as is, no dummy prefix, bytes for the unseen.
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    byte_fallback=True,
    character_coverage=1.0,
    split_digits=False,
    max_sentence_length=4 * _TRAIN_CHUNK_CHARS,  # In bytes; a chunk's UTF-8 fits.
    # `char` models have as many pieces as the alphabet has characters; the size is a bound.
    hard_vocab_limit=model_type != 'char',
    pad_id=PAD_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    control_symbols=[MASK_PIECE] + [SENTINEL_PIECE.format(i) for i in range(num_sentinels)],
    num_threads=2,
    minloglevel=2,
  )


class Tokenizer:
  """A loaded SentencePiece model with the few operations pretrax needs."""

  def __init__(self, model_proto: bytes, where: str = 'the tokenizer'):
    self.model_proto = model_proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except (RuntimeError, OSError, TypeError) as e:
      raise TokenizerError(
        f'{where} is not a SentencePiece model, damaged or cut short ({" ".join(str(e).split())}'
        "): restore it, or delete it to have it written again from the run's token store "
        '(or trained anew).'
      ) from None
    if self._sp.pad_id() != PAD_ID or self._sp.eos_id() != EOS_ID:
      raise TokenizerError(
        f'{where} is not a pretrax tokenizer: pad and eos must have ids 0 and '
        '3; train one with `pretrax tokenizer`.'
      )

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    return cls(paths.path(path).read_bytes(), where=str(path))

  def save(self, path: str) -> None:
    paths.path(path).write_bytes(self.model_proto)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=num_threads)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  @property
  def sentinel_ids(self) -> np.ndarray:
    """Ids of `<sentinel_0>`, `<sentinel_1>`, ... in order; empty if trained without them."""
    ids: list[int] = []
    while (i := self._sp.piece_to_id(SENTINEL_PIECE.format(len(ids)))) != self._sp.unk_id():
      ids.append(i)
    return np.array(ids, np.int32)

  def special_ids(self) -> np.ndarray:
    """Boolean table over ids: True for pad, unk, bos, eos, mask and sentinels (never text)."""
    return np.array(
      [self._sp.is_control(i) or self._sp.is_unknown(i) for i in range(self.vocab_size)], np.bool_
    )

  def word_starts(self) -> np.ndarray:
    """Boolean table over ids: True for pieces that begin a word (they start with whitespace,
    SentencePiece's convention), and for special ids. Whole-word masking groups each word start
    with the pieces after it."""
    starts = self.special_ids()
    for i in range(self.vocab_size):
      if self._sp.is_byte(i):
        starts[i] |= chr(int(self._sp.id_to_piece(i)[1:-1], 16)) in _WHITESPACE
      else:
        piece = self._sp.id_to_piece(i)
        starts[i] |= bool(piece) and piece[0] in _WHITESPACE
    return starts

  def bytes_per_token(self) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for control ids), for bits-per-byte."""
    sizes = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        sizes[i] = 1
      else:
        sizes[i] = len(self._sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))
    return sizes
