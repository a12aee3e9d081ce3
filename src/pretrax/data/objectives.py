"""Host-side example builders: a window of tokens in, one training example out, per objective.

Every builder is a pure function of the window and a NumPy generator seeded from (seed, epoch,
window index), so an example's masks, spans and split points are fixed by the seed and the
example's identity: a resumed run sees exactly the masks it would have seen, and so does a run on
another number of processes.

An example (`Example`) is a record of equal-length arrays (at most seq_len), packed later into
a batch's rows (data/batch.py) like any other:
  inputs, targets  int32    what the model reads, what each position must predict
  weights          float32  1 where the prediction counts in the loss
  prefix           int32    1 where attention is bidirectional (the prefix), 0 where causal
  objective        int32    the objective's index in config.OBJECTIVES, for per-objective metrics

causal_lm        next-token prediction on the whole window.
prefix_lm        a random split: bidirectional over the prefix, next-token loss on the rest only.
span_corruption  T5's objective in decoder-only form: [text with each noise span replaced by a
                 sentinel] then [sentinel_0 span_0 sentinel_1 span_1 ...]; the first part is the
                 prefix and the loss is on the second.
masked_lm        BERT's: a rate of non-special tokens is chosen (whole words optionally); of those
                 80% become <mask>, 10% a random token, 10% stay; the loss is on the chosen ones.
                 The encoder attends both ways, so `prefix` is 1 everywhere.
"""

import dataclasses
from typing import NamedTuple

import numpy as np

from pretrax import config as config_lib
from pretrax import config_specs
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import RunConfig


class Example(NamedTuple):
  """One example's arrays, each as long as the example (see the module docstring)."""

  inputs: np.ndarray
  targets: np.ndarray
  weights: np.ndarray
  prefix: np.ndarray
  objective: np.ndarray


# Distinct generator streams for training and evaluation examples of the same window.
TRAIN_STREAM, EVAL_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class Objectives:
  """The mixture and every builder's settings, plus the vocabulary facts the builders need."""

  names: tuple[str, ...]
  weights: np.ndarray  # float64, sums to 1.
  seq_len: int
  vocab_size: int
  special: np.ndarray  # bool per id: never chosen for masking, never a random replacement.
  regular: np.ndarray  # int32 ids that are not special: the random replacements.
  word_starts: np.ndarray  # bool per id: a piece that begins a word.
  sentinels: np.ndarray  # int32 ids of <sentinel_0>, <sentinel_1>, ...
  mask_rate: float = 0.15
  mask_token_fraction: float = 0.8
  random_token_fraction: float = 0.1
  whole_word: bool = False
  noise_density: float = 0.15
  mean_span_length: float = 3.0

  @classmethod
  def from_config(cls, c: RunConfig, tok: tokenizer_lib.Tokenizer) -> 'Objectives':
    mixture = config_specs.objective_mixture(c.objective)
    names = tuple(name for name, _ in mixture)
    if 'span_corruption' in names and not len(tok.sentinel_ids):
      raise config_lib.ConfigError(
        'objective span_corruption needs sentinel pieces and this tokenizer has none: leave '
        'tokenizer.path empty to train one with them, or make one with `pretrax tokenizer '
        '--sentinels=100`.'
      )
    m, s = c.masked_lm, c.span_corruption
    special = tok.special_ids()
    return cls(
      names=names,
      weights=np.array([w for _, w in mixture]),
      seq_len=c.data.seq_len,
      vocab_size=tok.vocab_size,
      special=special,
      regular=np.flatnonzero(~special).astype(np.int32),
      word_starts=tok.word_starts(),
      sentinels=tok.sentinel_ids,
      mask_rate=m.rate,
      mask_token_fraction=m.mask_token_fraction,
      random_token_fraction=m.random_token_fraction,
      whole_word=m.whole_word,
      noise_density=s.noise_density,
      mean_span_length=s.mean_span_length,
    )

  def build(self, window: np.ndarray, *, seed: int, stream: int, epoch: int, index: int) -> Example:
    """The example for `window` (at most seq_len + 1 tokens), drawn from its own generator."""
    if self.names == ('causal_lm',):  # Nothing random to draw: skip making a generator.
      return causal_lm(window)  # Its objective, causal_lm's index, is 0.
    rng = np.random.default_rng([seed, stream, epoch, index])
    k = 0 if len(self.names) == 1 else int(rng.choice(len(self.names), p=self.weights))
    name = self.names[k]
    if name == 'causal_lm':
      example = causal_lm(window)
    elif name == 'prefix_lm':
      example = prefix_lm(window, rng)
    elif name == 'span_corruption':
      example = span_corruption(
        window,
        rng,
        sentinels=self.sentinels,
        noise_density=self.noise_density,
        mean_span_length=self.mean_span_length,
      )
    else:
      example = masked_lm(window[: self.seq_len], rng, self)
    return example._replace(
      objective=np.full(len(example.inputs), config_lib.OBJECTIVES.index(name), np.int32)
    )


def _example(inputs, targets, weights, prefix) -> Example:
  """An example of objective 0 (causal_lm); Objectives.build sets the objective it drew."""
  return Example(
    inputs=np.asarray(inputs, np.int32),
    targets=np.asarray(targets, np.int32),
    weights=np.asarray(weights, np.float32),
    prefix=np.asarray(prefix, np.int32),
    objective=np.zeros(len(inputs), np.int32),
  )


def causal_lm(window: np.ndarray) -> Example:
  n = len(window) - 1
  return _example(window[:-1], window[1:], np.ones(n), np.zeros(n))


def prefix_lm(window: np.ndarray, rng: np.random.Generator) -> Example:
  """Splits after a uniform number p in [1, n] of the n inputs: positions < p see each other both
  ways, and the loss is on predicting window[p:], i.e. from position p - 1 on."""
  n = len(window) - 1
  p = int(rng.integers(1, n + 1))
  index = np.arange(n)
  return _example(window[:-1], window[1:], index >= p - 1, index < p)


def masked_lm(tokens: np.ndarray, rng: np.random.Generator, o: Objectives) -> Example:
  candidates = ~o.special[tokens]
  num_candidates = int(candidates.sum())
  chosen = np.zeros(len(tokens), np.bool_)
  if num_candidates:
    # Rounded at random, up or down, so that the expected share is exactly the rate.
    exact = o.mask_rate * num_candidates
    budget = int(exact) + int(rng.random() < exact - int(exact))
    if o.whole_word:
      # A word is a word-start piece and the pieces after it; special tokens stand alone.
      starts = o.word_starts[tokens] | ~candidates
      starts[0] = True
      word_of = np.cumsum(starts) - 1
      sizes = np.bincount(word_of[candidates], minlength=word_of[-1] + 1)
      taken = 0
      for word in rng.permutation(np.flatnonzero(sizes)):  # BERT: whole words while they fit.
        if taken + sizes[word] <= budget:
          chosen |= (word_of == word) & candidates
          taken += sizes[word]
        if taken >= budget:
          break
    else:
      chosen[rng.choice(np.flatnonzero(candidates), budget, replace=False)] = True
  inputs = tokens.copy()
  where = np.flatnonzero(chosen)
  action = rng.random(len(where))
  to_mask = where[action < o.mask_token_fraction]
  to_random = where[
    (action >= o.mask_token_fraction) & (action < o.mask_token_fraction + o.random_token_fraction)
  ]
  inputs[to_mask] = tokenizer_lib.MASK_ID
  inputs[to_random] = o.regular[rng.integers(0, len(o.regular), len(to_random))]
  n = len(tokens)
  return _example(inputs, tokens, chosen, np.ones(n))


def _split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` items cut into `parts` non-empty runs at uniformly random places; their lengths."""
  cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [total]]))


def _span_counts(
  m: int, noise_density: float, mean_span_length: float, max_spans: int
) -> tuple[int, int]:
  """(noise tokens, noise spans) for m tokens, as T5 rounds them."""
  noise = min(max(1, int(round(m * noise_density))), m - 1)
  spans = min(max(1, int(round(noise / mean_span_length))), noise, m - noise, max_spans)
  return noise, spans


def span_corruption(
  window: np.ndarray,
  rng: np.random.Generator,
  *,
  sentinels: np.ndarray,
  noise_density: float,
  mean_span_length: float,
) -> Example:
  """Corrupts the first m tokens of the window, m as large as lets the corrupted text and the
  targets fit in the window's length together (each span costs two sentinels)."""

  def fits(m: int) -> bool:
    return m + 2 * _span_counts(m, noise_density, mean_span_length, len(sentinels))[1] <= len(
      window
    )

  lo, hi = 1, len(window)  # The largest m that fits, by bisection (the total grows with m).
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  m = lo
  if m < 2 or not fits(m):  # Nothing to corrupt: an example with no loss.
    return _example(window[:-1], window[1:], np.zeros(len(window) - 1), np.ones(len(window) - 1))
  tokens = window[:m]
  noise, spans = _span_counts(m, noise_density, mean_span_length, len(sentinels))
  # T5's layout: keep, noise, keep, noise, ... starting with kept text and ending with noise.
  lengths = np.stack([_split(m - noise, spans, rng), _split(noise, spans, rng)], axis=1).ravel()
  bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
  corrupted, targets = [], []  # Slices, joined once: no per-token Python.
  for i in range(spans):
    keep_start, noise_start, noise_end = bounds[2 * i], bounds[2 * i + 1], bounds[2 * i + 2]
    corrupted += [tokens[keep_start:noise_start], sentinels[i : i + 1]]
    targets += [sentinels[i : i + 1], tokens[noise_start:noise_end]]
  sequence = np.concatenate(corrupted + targets).astype(np.int32)
  n, c = len(sequence) - 1, sum(len(x) for x in corrupted)
  index = np.arange(n)
  return _example(sequence[:-1], sequence[1:], index >= c - 1, index < c)


def uncorrupt(sequence: np.ndarray, prefix_length: int, sentinels: np.ndarray) -> np.ndarray:
  """Puts the spans of a span-corruption sequence back in place: the original tokens."""
  corrupted, targets = sequence[:prefix_length], sequence[prefix_length:]
  span_of = {int(s): i for i, s in enumerate(sentinels)}
  spans: dict[int, list[int]] = {}
  current: int | None = None
  for t in targets.tolist():
    if t in span_of:
      current = span_of[t]
      spans[current] = []
    elif current is None:
      raise ValueError('span-corruption targets must start with a sentinel')
    else:
      spans[current].append(t)
  out: list[int] = []
  for t in corrupted.tolist():
    out.extend(spans[span_of[t]] if t in span_of else [t])
  return np.array(out, np.int32)
