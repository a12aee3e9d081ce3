"""The config's small string languages, parsed: the objective mixture ('causal_lm:3,prefix_lm:1'),
`init_from` ('WORKDIR:STEP'), `data.mixture` ('NAME=PATH:WEIGHT,...') and `profile_steps`
('START:COUNT'); and what a field's value implies (`model.remat`'s policy, the objective's
attention). A malformed string raises ConfigError naming the field and the form to write.

Imports only config.py.
"""

from pretrax.config import FINETUNE_OBJECTIVES, OBJECTIVES, one_of, require


def objective_mixture(spec: str) -> tuple[tuple[str, float], ...]:
  """'prefix_lm' -> (('prefix_lm', 1.0),); 'causal_lm:3,prefix_lm:1' -> weights summing to 1."""
  if spec.strip() in FINETUNE_OBJECTIVES:
    return ((spec.strip(), 1.0),)
  parts = []
  for item in spec.split(','):
    name, _, weight = item.strip().partition(':')
    require(
      name not in FINETUNE_OBJECTIVES,
      f'objective={spec!r}: {name} fine-tunes on records of its own and cannot be mixed '
      'with other objectives; run it on its own.',
    )
    one_of('objective', name, OBJECTIVES + FINETUNE_OBJECTIVES)
    try:
      value = float(weight) if weight else 1.0
    except ValueError:
      value = -1.0
    require(
      value > 0,
      f'objective={spec!r}: the weight of {name} must be a positive number '
      '(write NAME:WEIGHT,NAME:WEIGHT).',
    )
    parts.append((name, value))
  names = [n for n, _ in parts]
  require(len(set(names)) == len(names), f'objective={spec!r} names an objective twice.')
  require(
    len(names) == 1 or 'masked_lm' not in names,
    f'objective={spec!r}: masked_lm trains a bidirectional encoder and cannot be mixed '
    'with the decoder objectives; run it on its own.',
  )
  total = sum(w for _, w in parts)
  return tuple((n, w / total) for n, w in parts)


def init_source(spec: str) -> tuple[str, int | None]:
  """`init_from` as (path, step): 'runs/base' -> ('runs/base', None), 'runs/base:500' ->
  ('runs/base', 500); '' -> ('', None)."""
  path, sep, step = spec.rpartition(':')
  if sep and step.isdigit() and path and not path.endswith(':/'):
    return path, int(step)
  require(
    not (sep and step and step.strip().lstrip('-').isdigit()),
    f'init_from={spec!r}: the step after ":" must be a non-negative integer.',
  )
  return spec, None


def mixture(spec: str) -> list[tuple[str, str, float]]:
  """(name, path, weight) of each source of a `data.mixture` ('NAME=PATH:WEIGHT,...'); '' is
  none. A path may hold colons (gs://...): the weight follows the last."""
  if not spec:
    return []
  items = [p.strip() for p in spec.split(',')]
  # Not skipped: a mixture of only empty items would pass validation and have no source to train.
  require(
    all(items),
    f'data.mixture={spec!r} has an empty item: separate its NAME=PATH:WEIGHT '
    'items by single commas.',
  )
  out = []
  for item in items:
    name, _, rest = item.partition('=')
    path, _, weight = rest.rpartition(':')
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    require(
      name.isidentifier() and bool(path) and 0 < value < float('inf'),
      f'data.mixture item {item!r} is not NAME=PATH:WEIGHT with a positive, finite weight, '
      'e.g. web=/data/web/*.parquet:0.7',
    )
    out.append((name, path, value))
  names = [n for n, _, _ in out]
  require(len(set(names)) == len(names), f'data.mixture names a source twice: {names}.')
  return out


def profile_steps(spec: str) -> tuple[int, int] | None:
  """'START:COUNT' -> (first, last) step to trace, both included; '' -> None."""
  if not spec:
    return None
  start, _, count = spec.partition(':')
  ok = start.strip().isdigit() and count.strip().isdigit() and int(start) >= 1 and int(count) >= 1
  require(
    ok,
    f'profile_steps={spec!r} must be START:COUNT with START >= 1 and COUNT >= 1, '
    'e.g. --config.profile_steps=10:3 traces steps 10 to 12.',
  )
  return int(start), int(start) + int(count) - 1


REMAT_POLICIES = ('none', 'dots', 'dots_attention', 'full', 'offload')


def remat_policy(value) -> str:
  """model.remat as a policy name; checkpoints of older versions saved a bool (True: full)."""
  if isinstance(value, bool):
    return 'full' if value else 'none'
  return value


def attention_kind(objective: str) -> str:
  """The attention the objective needs: masked_lm an encoder's, prefix objectives a prefix."""
  names = [n for n, _ in objective_mixture(objective)]
  if names in (['masked_lm'], ['classification']):
    return 'bidirectional'
  return 'prefix' if set(names) & {'span_corruption', 'prefix_lm'} else 'causal'
