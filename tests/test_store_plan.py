"""A store's plan: the typed plan writes the plan.json every existing store holds (pinned, byte for
byte), reads it back, and one protocol reuses, rebuilds or refuses a directory of another plan."""

import dataclasses
import gzip
import hashlib
import json
import os
import threading

import pytest

from conftest import load_config
from pretrax import config, run_config
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import RunConfig
from pretrax.data import corpus, dataset, examples, handoff, prepare, sources, store
from pretrax.data import plan as plan_lib

MTIME = 1_700_000_000.25
DOCS = [f'document {i} ' + 'word ' * (i % 7) for i in range(60)]
QA = [{'prompt': f'q{i}?', 'response': f'a{i}'} for i in range(40)]
CLS = [{'t': f'we like {x} {i}', 'y': x} for i, x in enumerate(['b', 'a'] * 20)]

# What the code before the typed plan (a dict) wrote for these inputs, with {DIR} for the inputs'
# directory and {SHA} for the tokenizer file's sha256. Keys in the order it built them.
_TRAINED = {'model_type': 'char', 'vocab_size': 400, 'sentinels': 0, 'sample_mb': 16.0}
_GIVEN = {'path': '{DIR}/char.model', 'sha256': '{SHA}'}
PINNED = {
  'text': {
    'format': 2,
    'unit_bytes': 1048576,
    'part_bytes': 64000000,
    'files': [['{DIR}/one.txt', 3000, MTIME]],
    'reading': {
      'separator': '',
      'text_field': 'text',
      'eval_fraction': 0.1,
      'position_boundary': 2700,
    },
    'skip_bad_records': False,
    'tokenizer': _TRAINED,
  },
  'jsonl': {
    'format': 2,
    'unit_bytes': 1048576,
    'part_bytes': 1000,
    'files': [['{DIR}/in/a.jsonl', 1165, MTIME], ['{DIR}/in/b.jsonl.gz', 165, MTIME]],
    'reading': {
      'separator': '',
      'text_field': 'body',
      'eval_fraction': 0.25,
      'position_boundary': 0,
    },
    'skip_bad_records': True,
    'tokenizer': _GIVEN,
  },
  'sft': {
    'kind': 'examples',
    'files': [['{DIR}/qa.jsonl', 1500, MTIME]],
    'eval_files': [['{DIR}/qa_eval.jsonl', 180, MTIME]],
    'eval_fraction': 0.1,
    'fields': {
      'objective': 'sft',
      'prompt': 'prompt',
      'response': 'response',
      'messages': 'messages',
      'text': 'text',
      'label': 'label',
      'labels': [],
    },
    'tokenizer': _TRAINED,
  },
  'classification': {
    'kind': 'examples',
    'files': [['{DIR}/cls.jsonl', 1270, MTIME]],
    'eval_files': [],
    'eval_fraction': 0.3,
    'fields': {
      'objective': 'classification',
      'prompt': 'prompt',
      'response': 'response',
      'messages': 'messages',
      'text': 't',
      'label': 'y',
      'labels': ['b', 'a'],
    },
    'tokenizer': _GIVEN,
  },
}


def _write(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  os.utime(path, (MTIME, MTIME))


def _lines(records: list[dict]) -> bytes:
  return ''.join(json.dumps(r) + '\n' for r in records).encode()


@pytest.fixture
def inputs(tmp_path) -> str:
  """The inputs of every pinned plan, with fixed bytes and mtimes, in one directory."""
  root = os.path.realpath(tmp_path / 'inputs')  # As sources.describe names the files.
  _write(f'{root}/one.txt', ''.join(chr(97 + i % 26) for i in range(3000)).encode())
  _write(f'{root}/in/a.jsonl', _lines([{'body': d} for d in DOCS[:30]]))
  _write(f'{root}/in/b.jsonl.gz', gzip.compress(_lines([{'body': d} for d in DOCS[30:]]), mtime=0))
  _write(
    f'{root}/char.model', tokenizer_lib.train([' '.join(DOCS)], model_type='char', vocab_size=400)
  )
  _write(f'{root}/qa.jsonl', _lines(QA))
  _write(f'{root}/qa_eval.jsonl', _lines(QA[:5]))
  _write(f'{root}/cls.jsonl', _lines(CLS))
  return root


def _pinned(case: str, root: str) -> dict:
  with open(f'{root}/char.model', 'rb') as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  text = json.dumps(PINNED[case]).replace('{DIR}', root).replace('{SHA}', sha)
  return json.loads(text)


def _token_config(case: str, root: str) -> RunConfig:
  c = config.base_config()
  c.tokenizer.model_type, c.tokenizer.vocab_size = 'char', 400
  if case == 'text':
    c.data.path = f'{root}/one.txt'
  else:
    c.data.path, c.tokenizer.path = f'{root}/in', f'{root}/char.model'
    c.data.text_field, c.data.shard_mb, c.data.eval_fraction = 'body', 0.001, 0.25
    c.data.skip_bad_records = True
  return run_config.resolve(c.to_dict())


def _example_config(case: str, root: str) -> RunConfig:
  c = load_config('tiny')
  c.objective, c.data.fallback = case, ''
  c.tokenizer.model_type, c.tokenizer.vocab_size = 'char', 400
  if case == 'sft':
    c.data.path, c.finetune.eval_path = f'{root}/qa.jsonl', f'{root}/qa_eval.jsonl'
  else:
    c.data.path, c.tokenizer.path = f'{root}/cls.jsonl', f'{root}/char.model'
    c.data.text_field, c.finetune.label_field, c.finetune.labels = 't', 'y', 'b, a'
    c.data.eval_fraction = 0.3
  return run_config.build(c, check_data=False)


def _file(path: str) -> str:
  with open(path) as f:
    return f.read()


def _as_written(plan_json: dict) -> str:
  return json.dumps(plan_json, indent=1, sort_keys=True) + '\n'  # store.write_json's bytes.


@pytest.mark.parametrize('case', ['text', 'jsonl'])
def test_a_token_store_writes_the_plan_json_stores_already_hold(inputs, tmp_path, case):
  run = _token_config(case, inputs)
  plan = corpus.make_plan(run, corpus.input_files(run))
  pinned = _pinned(case, inputs)
  assert plan.to_json() == pinned  # As read back from plan.json: lists, not tuples.
  assert json.dumps(plan.to_json()) == json.dumps(pinned)  # The keys in their order too.
  assert plan_lib.from_json(pinned) == plan_lib.TokenPlan.from_json(pinned) == plan

  out = str(tmp_path / 'store')
  prepare.prepare(run, out, workers=0, log=lambda _: None)
  assert _file(os.path.join(out, store.PLAN)) == _as_written(pinned)
  manifest = store.read_json(os.path.join(out, store.MANIFEST))
  sha = hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()
  assert manifest['plan_sha256'] == sha


@pytest.mark.parametrize('case', ['sft', 'classification'])
def test_an_example_store_writes_the_plan_json_stores_already_hold(inputs, tmp_path, case):
  run = _example_config(case, inputs)
  plan = examples.make_plan(run)
  pinned = _pinned(case, inputs)
  assert plan.to_json() == pinned
  assert json.dumps(plan.to_json()) == json.dumps(pinned)
  assert plan_lib.from_json(pinned) == plan_lib.ExamplePlan.from_json(pinned) == plan
  assert isinstance(plan.files[0], sources.InputFile) and isinstance(plan.fields.labels, tuple)

  out = str(tmp_path / 'store')
  examples.build(run, out, process_index=0, has_checkpoints=False, log=lambda _: None)
  assert _file(os.path.join(out, store.PLAN)) == _as_written(pinned)


def _with_eval_fraction(run: RunConfig, eval_fraction: float) -> RunConfig:
  return dataclasses.replace(run, data=dataclasses.replace(run.data, eval_fraction=eval_fraction))


def _built_example_store(run: RunConfig, out: str, **kw) -> list[str]:
  logs: list[str] = []
  examples.build(run, out, process_index=0, log=logs.append, **kw)
  return logs


def test_an_example_store_of_other_records_is_encoded_again_or_refused(inputs, tmp_path):
  out = str(tmp_path / 'store')
  _built_example_store(_example_config('sft', inputs), out, has_checkpoints=False)
  assert _built_example_store(_example_config('sft', inputs), out, has_checkpoints=True) == []
  other = _with_eval_fraction(_example_config('sft', inputs), 0.5)
  with pytest.raises(sources.DataError, match="other records or settings than the ones this run's"):
    _built_example_store(other, out, has_checkpoints=True)
  assert store.read_json(os.path.join(out, store.PLAN))['eval_fraction'] == 0.1  # Untouched.
  logs = _built_example_store(other, out, has_checkpoints=False)
  assert any('encoding them again' in line for line in logs), logs
  assert store.read_json(os.path.join(out, store.PLAN)) == examples.make_plan(other).to_json()
  assert os.path.exists(os.path.join(out, store.MANIFEST))


def test_a_workdir_token_store_of_other_inputs_is_prepared_again_or_refused(inputs, tmp_path):
  root = str(tmp_path / 'data')
  kw = dict(process_index=0, log=lambda _: None)
  dataset.build(_token_config('text', inputs), root, process_count=1, has_checkpoints=False, **kw)
  other = _with_eval_fraction(_token_config('text', inputs), 0.2)
  for count, checkpoints in [(1, True), (2, False)]:  # Trained on, or maybe read by another host.
    with pytest.raises(sources.DataError, match='other inputs or settings .*reading'):
      dataset.build(other, root, process_count=count, has_checkpoints=checkpoints, **kw)
  logs: list[str] = []
  dataset.build(
    other, root, process_index=0, process_count=1, has_checkpoints=False, log=logs.append
  )
  assert any('preparing it again' in line for line in logs), logs
  assert store.read_json(os.path.join(root, store.PLAN))['reading']['eval_fraction'] == 0.2


def test_processes_other_than_0_wait_for_the_manifest_and_never_build(tmp_path, monkeypatch):
  monkeypatch.setattr(handoff, 'WAIT_S', 0.01)
  out, plan = str(tmp_path / 'dir'), {'kind': 'x'}
  stale = handoff.Stale(discard=False, refusal=lambda _: 'refused', rebuilding='')
  built: list[int] = []

  def build(index: int) -> None:
    built.append(index)
    store.write_json(os.path.join(out, store.MANIFEST), {})

  waiter = threading.Thread(
    target=handoff.build_once,
    args=(out, plan),
    kwargs=dict(stale=stale, build=lambda: build(1), process_index=1, what='x', log=print),
  )
  waiter.start()
  waiter.join(0.2)
  assert waiter.is_alive() and not os.path.exists(out)  # Waiting, nothing written.
  handoff.build_once(
    out, plan, stale=stale, build=lambda: build(0), process_index=0, what='x', log=print
  )
  waiter.join(5)
  assert not waiter.is_alive() and built == [0]
  assert store.read_json(os.path.join(out, store.PLAN)) == plan
  with pytest.raises(sources.DataError, match='refused'):
    handoff.build_once(
      out, {'kind': 'y'}, stale=stale, build=lambda: build(0), process_index=0, what='x', log=print
    )
