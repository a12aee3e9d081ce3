"""The protocol of a directory that processes prepare together from one plan.

A store directory holds plan.json (what it is being made from) and, written last, a result file
(its manifest) that says it is whole. Every file is written atomically (store.write_atomic /
write_json), so a file that exists is whole and every process goes on with the same bytes.

  check_plan   the directory's plan.json against the plan: the same (or none yet) -> reuse it;
               another -> delete the directory and build it again, or refuse it (a run with
               checkpoints trained on what it holds); then plan.json is written if absent
  made_once    a file that process 0 makes if it is absent and every process waits for
  build_once   the two together: process 0 checks the plan and builds the directory unless its
               manifest is there; every process waits for the manifest
  wait_for     polls for a file every WAIT_S

An example store is built by build_once. A token store is prepared by every process (each takes
its share of the file groups, and whichever finishes last writes the manifest: prepare.py), so it
uses check_plan, made_once (its tokenizer) and wait_for directly.
"""

from collections.abc import Callable, Iterable
import dataclasses
import os
import shutil
import time

from pretrax import tokenizer as tokenizer_lib
from pretrax.data import plan as plan_lib
from pretrax.data import sources
from pretrax.data import store as store_lib

WAIT_S = 5.0  # Poll interval while waiting for other hosts.
_NEWS_S = 60.0  # While waiting, how often to say what for.


@dataclasses.dataclass(frozen=True)
class Stale:
  """What becomes of a directory that holds the work of another plan."""

  discard: bool  # Deleted and built again; else refused.
  refusal: Callable[[list[str]], str]  # The DataError's message, from the plan keys that differ.
  rebuilding: str  # The line logged when it is deleted.


def check_plan(out_dir: str, plan: dict, stale: Stale, log: Callable[[str], None]) -> None:
  """Reuses `out_dir` if its plan.json is `plan` (the plan's JSON), deletes it if it holds another
  plan's work and `stale.discard`, refuses it otherwise; then writes plan.json if it is absent."""
  path = os.path.join(out_dir, store_lib.PLAN)
  if os.path.exists(path):
    before = store_lib.read_json(path)
    if before != plan:
      if not stale.discard:
        changed = sorted(k for k in set(before) | set(plan) if before.get(k) != plan.get(k))
        raise sources.DataError(stale.refusal(changed))
      log(stale.rebuilding)
      shutil.rmtree(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  if not os.path.exists(path):
    store_lib.write_json(path, plan)


def made_once(path: str, make: Callable[[], None], process_index: int, what: str) -> None:
  """`path`, made by process 0 (`make` writes it) unless it exists; every process waits for it."""
  if process_index == 0 and not os.path.exists(path):
    make()
  wait_for(path, f'process 0 to {what}')


def build_once(
  out_dir: str,
  plan: dict,
  *,
  stale: Stale,
  build: Callable[[], None],
  process_index: int,
  what: str,
  log: Callable[[str], None],
) -> None:
  """The directory `out_dir` made from `plan` (its JSON): process 0 checks the plan (check_plan)
  and, unless the manifest is there, runs `build`, which writes the manifest last; every process
  waits for the manifest."""
  if process_index == 0:
    check_plan(out_dir, plan, stale, log)
  made_once(os.path.join(out_dir, store_lib.MANIFEST), build, process_index, what)


def tokenizer_at(
  path: str,
  spec: plan_lib.TokenizerSpec,
  sample: Callable[[float], Iterable[str]],
  process_index: int,
  log: Callable[[str], None],
) -> tokenizer_lib.Tokenizer:
  """The tokenizer at `path`, written there first by process 0 (a copy of the file `spec` names,
  or one trained on `sample(spec.sample_mb)`, at most that many MB of text) and waited for by the
  other processes."""

  def make() -> None:
    if isinstance(spec, plan_lib.TokenizerFile):
      with open(spec.path, 'rb') as f:
        proto = f.read()
    else:
      proto = _trained(spec, sample, log)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    store_lib.write_atomic(path, proto)

  made_once(path, make, process_index, 'write the tokenizer')
  return tokenizer_lib.Tokenizer.load(path)


def _trained(
  spec: plan_lib.TokenizerTraining,
  sample: Callable[[float], Iterable[str]],
  log: Callable[[str], None],
) -> bytes:
  start = time.perf_counter()
  texts = list(sample(spec.sample_mb))  # Bounded by spec.sample_mb.
  if not any(texts):
    raise sources.DataError(
      'the corpus has no training text to fit a tokenizer on: check '
      'data.path, data.text_field and data.eval_fraction.'
    )
  proto = tokenizer_lib.train(
    texts,
    model_type=spec.model_type,
    vocab_size=spec.vocab_size,
    num_sentinels=spec.sentinels,
  )
  log(
    f'trained a {spec.model_type} tokenizer on a sample of at most '
    f'{spec.sample_mb} MB in {time.perf_counter() - start:.1f} s'
  )
  return proto


def wait_for(
  path: str,
  what: str,
  timeout_s: float = 24 * 3600,
  *,
  news: Callable[[], str] | None = None,
  log: Callable[[str], None] = print,
) -> None:
  """Returns once `path` exists; DataError after `timeout_s`. Every minute, logs `news()` if
  given (what is still missing)."""
  deadline = time.monotonic() + timeout_s
  said = time.monotonic()
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise sources.DataError(
        f'waited {timeout_s:.0f} s for {what} ({path}): start every '
        'process of the preparation with the same --output.'
      )
    time.sleep(WAIT_S)
    if news is not None and time.monotonic() - said > _NEWS_S:
      said = time.monotonic()
      log(news())
