"""The typed run config: its fields are config.py's, every derived default is resolved in one place,
a config saved by an older version comes back as the same run, and resume compares meanings."""

import dataclasses
import typing

import pytest

from pretrax import config as config_lib
from pretrax import config_fields, run_config
from pretrax.config_types import RunConfig


def _dataclass_fields(cls: type, prefix: str = '') -> list[str]:
  names = []
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    kind = hints[field.name]
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
      names += _dataclass_fields(kind, f'{prefix}{field.name}.')
    else:
      names.append(f'{prefix}{field.name}')
  return names


def test_the_dataclasses_hold_exactly_the_fields_print_config_lists():
  typed = _dataclass_fields(RunConfig)
  described = config_fields.describe(config_lib.base_config()).splitlines()
  printed = [line.split(' = ')[0] for line in described]
  # The same fields: one added to config.py (and so to --print_config) must be added here too.
  assert len(typed) == len(set(typed)) and sorted(typed) == sorted(printed)


def test_build_resolves_every_derived_default_once():
  c = config_lib.base_config()
  c.steps, c.data.seq_len, c.model.embed_dim, c.model.num_heads = 300, 48, 96, 6
  c.objective = 'span_corruption'
  run = run_config.build(c, check_data=False)
  assert (run.model.num_kv_heads, run.model.head_dim, run.model.mlp_dim) == (6, 16, 384)
  assert (run.model.max_len, run.data.window_stride) == (48, 48)
  assert run.optim.schedule_steps == 300
  assert run.eval.tasks_every == run.eval_every
  assert run.tokenizer.sentinels == 100
  assert run_config.resolve(run_config.to_dict(run)) == run  # Resolving twice changes nothing.
  # Values the user sets are kept.
  c.model.mlp_dim, c.optim.schedule_steps, c.tokenizer.sentinels = 100, 200, 3
  run = run_config.build(c, check_data=False)
  assert (run.model.mlp_dim, run.optim.schedule_steps, run.tokenizer.sentinels) == (100, 200, 3)


def test_build_validates_before_resolving():
  c = config_lib.base_config()
  c.model.embed_dim, c.model.num_heads = 100, 3  # head_dim 0 would hide this if resolved first.
  with pytest.raises(config_lib.ConfigError, match='does not divide model.embed_dim'):
    run_config.build(c, check_data=False)


def test_a_config_saved_by_an_older_version_comes_back_as_the_same_run():
  c = config_lib.base_config()
  c.model.remat = 'full'
  now = run_config.build(c, check_data=False)
  old = c.to_dict()
  old['model']['remat'] = True  # Older versions saved a bool.
  for missing in ('loss_chunk', 'max_segments'):
    del old['model'][missing]
  del old['mesh']['rules']
  old['model']['a_field_since_removed'] = 1
  assert run_config.from_saved(old) == now
  assert run_config.differences(now, run_config.from_saved(old)) == []


def test_differences_compare_meanings_and_files(tmp_path):
  c = config_lib.base_config()
  c.steps = 100
  written_out = config_lib.base_config()
  written_out.steps, written_out.optim.schedule_steps = 100, 100
  before = run_config.build(c, check_data=False)
  assert run_config.differences(run_config.build(written_out, check_data=False), before) == []
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'x.txt').write_text('text')
  (tmp_path / 'link').symlink_to(tmp_path / 'data')
  a, b = config_lib.base_config(), config_lib.base_config()
  a.data.path = str(tmp_path / 'data' / 'x.txt')
  b.data.path = str(tmp_path / 'link' / '..' / 'data' / 'x.txt')
  same = run_config.differences(
    run_config.build(a, check_data=False), run_config.build(b, check_data=False)
  )
  assert same == []
  c.steps, c.optim.lr = 200, 0.5
  changed = run_config.differences(run_config.build(c, check_data=False), before, ignore=('steps',))
  assert changed == ['optim.lr: 0.001 -> 0.5']  # The schedule follows steps (see below).


def test_sources_are_typed_records():
  c = config_lib.base_config()
  c.data.mixture = 'web=/d/web:0.7,code=/d/code:0.3'
  sources = run_config.build(c, check_data=False).data.sources
  assert [(s.name, s.path, s.weight) for s in sources] == [
    ('web', '/d/web', 0.7),
    ('code', '/d/code', 0.3),
  ]
  c.data.mixture, c.data.path = '', 'corpus.txt'
  assert run_config.build(c, check_data=False).data.sources[0].path == 'corpus.txt'


def test_raising_steps_resumes_a_schedule_that_follows_them_and_refuses_one_that_does_not():
  def resolved(steps: int, schedule_steps: int = 0) -> RunConfig:
    c = config_lib.base_config()
    c.steps, c.optim.schedule_steps = steps, schedule_steps
    return run_config.build(c, check_data=False)

  resumable = ('steps',)
  assert run_config.differences(resolved(20), resolved(10), ignore=resumable) == []
  assert run_config.differences(resolved(20, 15), resolved(10, 15), ignore=resumable) == []
  assert run_config.differences(resolved(20, 30), resolved(10, 15), ignore=resumable) == [
    'optim.schedule_steps: 15 -> 30'
  ]
  assert run_config.differences(resolved(20), resolved(10)) == [
    'optim.schedule_steps: 10 -> 20',
    'steps: 10 -> 20',
  ]
