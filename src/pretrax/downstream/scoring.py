"""Multiple-choice requests scored by log-likelihood in a few fixed shapes; each task's metrics.

Shape suffixes: B rows, L positions, V vocabulary.

A request is tokenised as lm-eval-harness does (`split_tokens`); the model reads context and
continuation as one document and sums the log-probabilities of the continuation's tokens. One
forward pass also tells whether greedy decoding would have produced the continuation exactly: the
argmax at every continuation position is its token.

Requests are batched by length into buckets of powers of two up to `seq_len`, each bucket with a
fixed number of rows (`batch_tokens` // length, padded with empty rows), so scoring compiles once
per bucket, at most log2(seq_len) times, and never again for the same model: the training loop can
call `score_tasks` every N steps on its live (sharded) parameters without recompiling.
"""

import collections
from collections.abc import Iterator, Sequence
import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.downstream import tasks as tasks_lib

DEFAULT_BATCH_TOKENS = 8192
Window = tuple[list[int], list[int], int]  # (inputs, targets, scored): see `window`.
_SHORTEST_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Score:
  """What the model made of one request."""

  loglik: float  # Summed natural-log probability of the continuation's (scored) tokens.
  num_tokens: int  # Continuation tokens scored.
  is_greedy: bool  # Greedy decoding from the context reproduces the continuation exactly.


def split_tokens(
  tok: tokenizer_lib.Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids), as lm-eval-harness splits them.

  Whitespace at the end of the context moves to the start of the continuation (tokenizers attach
  a space to the word after it). The continuation's ids are what encoding context + continuation
  adds after the context's own ids; if that is nothing (the context's encoding swallowed the
  continuation), the continuation encoded on its own. An empty context is EOS: "a document
  starts", as training saw it.
  """
  trailing = len(context) - len(context.rstrip())
  if trailing:
    context, continuation = context[:-trailing], context[-trailing:] + continuation
  if not context:
    return [tokenizer_lib.EOS_ID], tok.encode(continuation)
  context_ids = tok.encode(context)
  continuation_ids = tok.encode(context + continuation)[len(context_ids) :]
  return context_ids, continuation_ids or tok.encode(continuation)


def window(
  context_ids: list[int], continuation_ids: list[int], seq_len: int
) -> tuple[list[int], list[int], int]:
  """(inputs, targets, scored): the model reads `inputs`, predicts `targets`, and the last
  `scored` targets are the continuation.

  The document is cut from the left to `seq_len` inputs, so context goes first. A continuation
  longer than `seq_len` keeps its last `seq_len` tokens: its log-likelihood is then that of those
  tokens given the continuation before them, and its greedy flag speaks for them alone.
  """
  document = context_ids + continuation_ids
  inputs, targets = document[:-1][-seq_len:], document[1:][-seq_len:]
  return inputs, targets, min(len(continuation_ids), seq_len)


def bucket_length(length: int, seq_len: int) -> int:
  """The padded length of a row of `length` inputs: a power of two, at most `seq_len`."""
  return min(seq_len, max(_SHORTEST_BUCKET, 1 << (length - 1).bit_length()))


def bucket_rows(length: int, batch_tokens: int) -> int:
  """Rows in every batch of a bucket: the token budget's worth, at least one."""
  return max(1, batch_tokens // length)


@functools.partial(jax.jit, static_argnames=('model_def',))
def _score_batch(
  params,
  inputs_BL: jax.Array,
  targets_BL: jax.Array,
  segment_ids_BL: jax.Array,
  prefix_BL: jax.Array,
  scored_BL: jax.Array,
  *,
  model_def: nnx.GraphDef,
) -> tuple[jax.Array, jax.Array]:
  """(log-likelihood, greedy) of each row's scored targets; empty rows give (0, True)."""
  B, L = inputs_BL.shape
  positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  # A decoder ignores `prefix_BL`; a prefix LM reads the context both ways, as it trained.
  logits_BLV = nnx.merge(model_def, params)(inputs_BL, segment_ids_BL, positions_BL, prefix_BL)
  logprobs_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32))
  target_logprob_BL = jnp.take_along_axis(logprobs_BLV, targets_BL[..., None], axis=-1)[..., 0]
  loglik_B = jnp.sum(jnp.where(scored_BL, target_logprob_BL, 0.0), axis=1)
  wrong_BL = scored_BL & (jnp.argmax(logits_BLV, axis=-1) != targets_BL)
  return loglik_B, ~jnp.any(wrong_BL, axis=1)


def _batches(
  windows: Sequence[Window], seq_len: int, batch_tokens: int
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
  """(request indices, arrays) per batch: requests grouped by bucket, rows padded to the
  bucket's fixed count with empty rows (segment 0, nothing scored)."""
  buckets = collections.defaultdict(list)
  for i, (inputs, _, _) in enumerate(windows):
    buckets[bucket_length(len(inputs), seq_len)].append(i)
  for L in sorted(buckets):
    rows = bucket_rows(L, batch_tokens)
    members = buckets[L]
    for start in range(0, len(members), rows):
      indices = members[start : start + rows]
      arrays = {
        k: np.zeros((rows, L), np.int32) for k in ('inputs', 'targets', 'segment_ids', 'prefix')
      }
      arrays['scored'] = np.zeros((rows, L), np.bool_)
      for row, i in enumerate(indices):
        inputs, targets, scored = windows[i]
        n = len(inputs)
        arrays['inputs'][row, :n] = inputs
        arrays['targets'][row, :n] = targets
        arrays['segment_ids'][row, :n] = 1
        arrays['prefix'][row, : n - scored + 1] = 1  # The inputs before the first continuation one.
        arrays['scored'][row, n - scored : n] = 1
      yield indices, arrays


def windows_of(
  tok: tokenizer_lib.Tokenizer, requests: Sequence[tasks_lib.Request], seq_len: int
) -> list[Window]:
  """Each request tokenised and cut to the model's window: what scoring reads, made once."""
  return [window(*split_tokens(tok, r.context, r.continuation), seq_len) for r in requests]


def score_windows(
  model_def: nnx.GraphDef,
  params,
  windows: Sequence[Window],
  *,
  seq_len: int,
  batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> list[Score]:
  """Each window's log-likelihood, token count and greedy flag, in the order given."""
  dispatched = [
    (
      indices,
      _score_batch(
        params,
        a['inputs'],
        a['targets'],
        a['segment_ids'],
        a['prefix'],
        a['scored'],
        model_def=model_def,
      ),
    )
    for indices, a in _batches(windows, seq_len, batch_tokens)
  ]
  logliks = np.zeros(len(windows), np.float64)
  greedy = np.zeros(len(windows), np.bool_)
  # Fetched once all batches are dispatched, so that building one overlaps scoring the last.
  for indices, (loglik_B, greedy_B) in jax.device_get(dispatched):
    logliks[indices] = loglik_B[: len(indices)]
    greedy[indices] = greedy_B[: len(indices)]
  return [
    Score(loglik=float(logliks[i]), num_tokens=windows[i][2], is_greedy=bool(greedy[i]))
    for i in range(len(windows))
  ]


def score_requests(
  model_def: nnx.GraphDef,
  params,
  tok: tokenizer_lib.Tokenizer,
  requests: Sequence[tasks_lib.Request],
  *,
  seq_len: int,
  batch_tokens: int = DEFAULT_BATCH_TOKENS,
) -> list[Score]:
  """Each request's log-likelihood, token count and greedy flag, in the order given."""
  return score_windows(
    model_def,
    params,
    windows_of(tok, requests, seq_len),
    seq_len=seq_len,
    batch_tokens=batch_tokens,
  )


def scored_continuation(context: str, continuation: str) -> str:
  """The continuation text as scored: with the context's trailing whitespace moved onto it."""
  return context[len(context.rstrip()) :] + continuation


def task_metrics(
  requests: Sequence[tasks_lib.Request], scores: Sequence[Score]
) -> dict[str, float]:
  """A task's metrics over its documents.

  acc       the share of documents whose highest-log-likelihood choice is the gold one.
  acc_norm  the same with each log-likelihood divided by its continuation's length in characters
            (so that long answers are not penalised for their length).
  bpb       bits per byte of the gold continuations: the sum over documents of the gold
            continuation's negative log-likelihood, in nats, divided by ln 2 and by the total UTF-8
            bytes of those continuations as scored (with any whitespace moved from the context;
            all of a continuation's bytes even when the window kept only its last tokens).
  gold_greedy  the share of documents whose gold continuation greedy decoding reproduces.
  chance    the accuracy of guessing: the mean over documents of 1 / number of choices.
  docs      the number of documents.
  Ties go to the first choice. Choices are numbered 0..k-1 within each document.
  """
  docs: dict = collections.defaultdict(list)
  for r, s in zip(requests, scores, strict=True):
    docs[r.doc_id].append((r, s))
  right = right_norm = gold_greedy = chance = 0.0
  gold_nats = gold_bytes = 0.0
  for choices in docs.values():
    choices.sort(key=lambda c: c[0].choice)
    gold = choices[0][0].gold
    logliks = np.array([s.loglik for _, s in choices])
    lengths = np.array([max(1, len(r.continuation)) for r, _ in choices])
    right += int(np.argmax(logliks)) == gold
    right_norm += int(np.argmax(logliks / lengths)) == gold
    chance += 1 / len(choices)
    r, s = choices[gold]
    gold_greedy += s.is_greedy
    gold_nats -= s.loglik
    gold_bytes += len(scored_continuation(r.context, r.continuation).encode('utf-8'))
  n = len(docs)
  return {
    'acc': right / n,
    'acc_norm': right_norm / n,
    'bpb': gold_nats / math.log(2) / max(gold_bytes, 1),
    'gold_greedy': gold_greedy / n,
    'chance': chance / n,
    'docs': n,
  }


def score_by_task(
  model_def: nnx.GraphDef,
  params,
  tok: tokenizer_lib.Tokenizer,
  tasks: Sequence[tasks_lib.Task],
  *,
  seq_len: int,
  batch_tokens: int = DEFAULT_BATCH_TOKENS,
  windows: Sequence[Window] | None = None,
) -> list[list[Score]]:
  """Each task's request scores, in its requests' order; all tasks' requests share the batches.
  `windows`: the tasks' requests already tokenised (`windows_of`), as a caller that scores the
  same tasks again and again keeps them."""
  if windows is None:
    windows = windows_of(tok, [r for t in tasks for r in t.requests], seq_len)
  scores = score_windows(model_def, params, windows, seq_len=seq_len, batch_tokens=batch_tokens)
  ends = np.cumsum([len(t.requests) for t in tasks])
  return [scores[end - len(t.requests) : end] for t, end in zip(tasks, ends, strict=True)]


def score_tasks(
  model_def: nnx.GraphDef,
  params,
  tok: tokenizer_lib.Tokenizer,
  tasks: Sequence[tasks_lib.Task],
  *,
  seq_len: int,
  batch_tokens: int = DEFAULT_BATCH_TOKENS,
  windows: Sequence[Window] | None = None,
) -> dict[str, dict[str, float]]:
  """Task name -> metrics (`task_metrics`) of a decoder's or prefix LM's parameters, live or
  restored, on any mesh."""
  per_task = score_by_task(
    model_def, params, tok, tasks, seq_len=seq_len, batch_tokens=batch_tokens, windows=windows
  )
  return {
    t.name: task_metrics(t.requests, scores) for t, scores in zip(tasks, per_task, strict=True)
  }
