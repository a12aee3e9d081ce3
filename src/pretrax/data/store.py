"""The token store: a corpus tokenized once, on disk, read back by index.

Layout of a store directory:
  manifest.json                 written last: a store without it is incomplete and never read
  plan.json                     the inputs and settings being prepared (refuses a different resume)
  tokenizer.model               the SentencePiece model of every token
  {split}-GGGGG-PPPP.tokens     uint16 token ids (uint32 when the vocabulary needs it), each
                                document followed by EOS; split is train or eval
  {split}-GGGGG-PPPP.docs       uint64: where each document ends in that .tokens file
  parts/GGGGG-PPPP.json         one per finished part (counts, where the next part starts)

Inputs are cut into groups of files, each group into parts of about data.shard_mb of input. Both are
functions of the input bytes alone, so the data files are the same bytes whatever the number of
workers or hosts that wrote them, and whether or not the work was interrupted.

Reading needs only the manifest: each split is its parts' token files, memory-mapped, so training
starts at once and holds nothing proportional to the corpus.
"""

import dataclasses
import json
import os

import numpy as np

from pretrax import tokenizer as tokenizer_lib

FORMAT_VERSION = 2
MANIFEST = 'manifest.json'
PLAN = 'plan.json'
TOKENIZER_FILE = 'tokenizer.model'
PARTS_DIR = 'parts'
SPLITS = ('train', 'eval')


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def part_name(group: int, part: int) -> str:
  return f'{group:05d}-{part:04d}'


def write_atomic(path: str, data: bytes) -> None:
  """Writes `path` whole or not at all (a unique temporary name, fsync, rename)."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, value) -> None:
  write_atomic(path, (json.dumps(value, indent=1, sort_keys=True) + '\n').encode())


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


class PartWriter:
  """Both splits of one part, written to temporary files and renamed into place by `close`."""

  def __init__(self, out_dir: str, group: int, part: int, dtype: np.dtype):
    self.out_dir, self.name, self.dtype = out_dir, part_name(group, part), dtype
    self.files = {}
    self.tokens = {s: 0 for s in SPLITS}
    self.documents = {s: 0 for s in SPLITS}
    for split in SPLITS:
      for kind in ('tokens', 'docs'):
        self.files[split, kind] = open(self._path(split, kind) + '.tmp', 'wb')

  def _path(self, split: str, kind: str) -> str:
    return os.path.join(self.out_dir, f'{split}-{self.name}.{kind}')

  def write(self, split: str, tokens: np.ndarray, doc_ends: np.ndarray) -> None:
    """Appends tokens; `doc_ends` are the ends of the documents they finish, relative to them."""
    self.files[split, 'tokens'].write(tokens.astype(self.dtype, copy=False).tobytes())
    ends = doc_ends.astype(np.uint64) + np.uint64(self.tokens[split])
    self.files[split, 'docs'].write(ends.tobytes())
    self.tokens[split] += len(tokens)
    self.documents[split] += len(doc_ends)

  def close(self) -> dict:
    for (split, kind), f in self.files.items():
      f.flush()
      os.fsync(f.fileno())
      f.close()
      os.replace(self._path(split, kind) + '.tmp', self._path(split, kind))
    return {'name': self.name, 'tokens': dict(self.tokens), 'documents': dict(self.documents)}

  def abort(self) -> None:
    """Closes and deletes the unfinished files: a failed part leaves nothing behind."""
    for (split, kind), f in self.files.items():
      f.close()
      if os.path.exists(tmp := self._path(split, kind) + '.tmp'):
        os.remove(tmp)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a store: its parts' tokens, memory-mapped, with their start offsets."""

  tokens: tuple[np.ndarray, ...]
  starts: np.ndarray  # int64: where each part begins in the split's concatenated stream.

  @property
  def num_tokens(self) -> int:
    return int(self.starts[-1]) if len(self.starts) else 0

  def read(self, start: int, length: int) -> np.ndarray:
    """`length` tokens of the split from `start`, across parts if need be (int32)."""
    out = np.empty(length, np.int32)
    k = int(np.searchsorted(self.starts, start, side='right')) - 1
    done = 0
    while done < length:
      local = start + done - int(self.starts[k])
      piece = self.tokens[k][local : local + length - done]
      out[done : done + len(piece)] = piece
      done += len(piece)
      k += 1
    return out


class Store:
  """A complete store opened for reading."""

  def __init__(self, path: str):
    from pretrax.data import sources

    manifest = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest):
      hint = (
        'its preparation did not finish: run the same `pretrax prepare` command again to finish it'
        if os.path.exists(os.path.join(path, PLAN))
        else 'make one with `pretrax prepare --config=... --output=DIR`'
      )
      raise sources.DataError(f'{path} is not a complete token store (no {MANIFEST}): {hint}.')
    self.path = path
    self.manifest = read_json(manifest)
    if self.manifest.get('format') != FORMAT_VERSION:
      raise sources.DataError(
        f'{path} is a token store of format {self.manifest.get("format")}, '
        f'this pretrax reads format {FORMAT_VERSION}: prepare it again.'
      )
    self.dtype = np.dtype(self.manifest['dtype'])
    self.tokenizer_path = os.path.join(path, TOKENIZER_FILE)
    self._splits: dict[str, Split] = {}

  @property
  def vocab_size(self) -> int:
    return int(self.manifest['vocab_size'])

  def split(self, name: str) -> Split:
    if name not in self._splits:
      parts = self.manifest['splits'][name]['parts']
      arrays = tuple(
        np.memmap(
          os.path.join(self.path, f'{name}-{p["name"]}.tokens'),
          self.dtype,
          'r',
          shape=(p['tokens'],),
        )
        for p in parts
      )
      starts = np.concatenate([[0], np.cumsum([p['tokens'] for p in parts])]).astype(np.int64)
      self._splits[name] = Split(arrays, starts)
    return self._splits[name]

  def most_frequent_token(self, tok: tokenizer_lib.Tokenizer, sample: int = 1 << 22) -> int:
    """The most frequent non-special token of the first `sample` training tokens: the floor of
    the accuracy metric (a bounded read, not a scan)."""
    train = self.split('train')
    tokens = train.read(0, min(sample, train.num_tokens))
    counts = np.bincount(tokens, minlength=tok.vocab_size)
    counts[tok.special_ids()] = 0
    return int(np.argmax(counts))
