"""Tokenizers round-trip any text exactly and keep the special ids fixed."""

import pytest

from pretrax import tokenizer

AWKWARD = (
  '  leading spaces, trailing  \n\n\ttabs\r\nCRLF; ünïcødé, 中文, emoji 😀, ligature ﬁ, '
  'zero-width\u200bspace, NFKC-sensitive ① ², nul-free binary-ish \x7f\x01 end '
)


@pytest.fixture(scope='module')
def training_text(corpus_path) -> str:
  with open(corpus_path, encoding='utf-8') as f:
    return f.read(100_000)


@pytest.mark.parametrize('model_type,vocab_size', [('char', 512), ('bpe', 600), ('unigram', 600)])
def test_round_trip_is_exact(training_text, model_type, vocab_size):
  tok = tokenizer.Tokenizer(
    tokenizer.train([training_text], model_type=model_type, vocab_size=vocab_size)
  )
  for text in (AWKWARD, training_text[:5000], '', ' ', '\n'):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tokenizer.UNK_ID not in ids  # Byte fallback: nothing is unknown.
  assert tok.encode_batch([AWKWARD, 'x']) == [tok.encode(AWKWARD), tok.encode('x')]


def test_special_ids_are_fixed(training_text):
  tok = tokenizer.Tokenizer(tokenizer.train([training_text], model_type='char'))
  sp = tok._sp
  assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
  assert sp.piece_to_id(tokenizer.MASK_PIECE) == tokenizer.MASK_ID
  sizes = tok.bytes_per_token()
  assert sizes[:5].tolist() == [0, 0, 0, 0, 0]
  text = 'héllo wörld\n'
  assert sum(sizes[i] for i in tok.encode(text)) == len(text.encode('utf-8'))


def test_save_and_load(tmp_path, training_text):
  tok = tokenizer.Tokenizer(tokenizer.train([training_text], model_type='bpe', vocab_size=400))
  path = tmp_path / 'tok.model'
  tok.save(str(path))
  again = tokenizer.Tokenizer.load(str(path))
  assert again.encode(AWKWARD) == tok.encode(AWKWARD)


def test_a_vocabulary_too_small_for_the_text_is_one_clear_error():
  text = 'hello world ' * 100 + ''.join(chr(0x4E00 + i) for i in range(500))
  with pytest.raises(
    tokenizer.TokenizerError,
    match=r'training a bpe tokenizer of 300 pieces '
    r'failed: .*--config.tokenizer.vocab_size',
  ):
    tokenizer.train([text], model_type='bpe', vocab_size=300)
