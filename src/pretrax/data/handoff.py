"""What processes preparing one directory hand each other: files one writes, all wait for.

Process 0 writes a shared file (the tokenizer, a fine-tuning store's manifest) atomically
(store.write_atomic / write_json); every process, process 0 included, then waits for it with
wait_for, polling every WAIT_S. So a file that exists is whole, and every process goes on with the
same bytes.
"""

from collections.abc import Callable, Iterable
import os
import time

from pretrax import tokenizer as tokenizer_lib
from pretrax.data import sources
from pretrax.data import store as store_lib

WAIT_S = 5.0  # Poll interval while waiting for other hosts.


def tokenizer_at(
  path: str,
  spec: dict,
  sample: Callable[[], Iterable[str]],
  process_index: int,
  log: Callable[[str], None],
) -> tokenizer_lib.Tokenizer:
  """The tokenizer at `path`, written there first by process 0 (a copy of spec['path'], or one
  trained on `sample()` as `spec` says) and waited for by the other processes."""
  if not os.path.exists(path) and process_index == 0:
    if 'path' in spec:
      with open(spec['path'], 'rb') as f:
        proto = f.read()
    else:
      start = time.perf_counter()
      texts = list(sample())  # Bounded by spec['sample_mb'].
      if not any(texts):
        raise sources.DataError(
          'the corpus has no training text to fit a tokenizer on: check '
          'data.path, data.text_field and data.eval_fraction.'
        )
      proto = tokenizer_lib.train(
        texts,
        model_type=spec['model_type'],
        vocab_size=spec['vocab_size'],
        num_sentinels=spec['sentinels'],
      )
      log(
        f'trained a {spec["model_type"]} tokenizer on a sample of at most '
        f'{spec["sample_mb"]} MB in {time.perf_counter() - start:.1f} s'
      )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    store_lib.write_atomic(path, proto)
  wait_for(path, 'process 0 to write the tokenizer')
  return tokenizer_lib.Tokenizer.load(path)


def wait_for(path: str, what: str, timeout_s: float = 24 * 3600) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise sources.DataError(
        f'waited {timeout_s:.0f} s for {what} ({path}): start every '
        'process of the preparation with the same --output.'
      )
    time.sleep(WAIT_S)
