"""The config's fields described: the comment on each field read back from config.py's source, every
field printed with its value and meaning (`--print_config`), and the nearest fields to a mistyped
override.

Imports only config.py.
"""

import difflib
import inspect
import io
import re
import tokenize

import ml_collections

from pretrax.config import SECTIONS


def field_comments() -> dict[str, str]:
  """What each field of base_config() means: the comment on its line, or the comment lines just
  above it, from the source of config.py's section functions (SECTIONS)."""
  lines = [line for fn in SECTIONS for line in inspect.getsource(fn).splitlines()]
  comments, above = {}, []
  for line in lines:
    text = line.strip()
    if text.startswith('#'):
      above.append(text.lstrip('# ').strip())
      continue
    match = re.match(r'c\.([\w.]+) = (.*)$', text)
    if not match:
      above = []
      continue
    code = match.group(2)
    # The comment starts at a '#' outside the value's quotes.
    tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    inline = next((t.string.lstrip('# ') for t in tokens if t.type == tokenize.COMMENT), '')
    comments[match.group(1)] = ' '.join(above + ([inline] if inline else []))
    above = []
  return comments


def field_names(c: ml_collections.ConfigDict) -> list[str]:
  """Every field of `c` as `--config.` names it ('optim.lr'), its sections too ('optim')."""
  names = []
  for key in c.keys():
    names.append(key)
    if isinstance(c[key], ml_collections.ConfigDict):
      names += [f'{key}.{name}' for name in field_names(c[key])]
  return names


def nearest_fields(c: ml_collections.ConfigDict, name: str, count: int = 3) -> list[str]:
  """The fields of `c` most like `name`: the fix for a mistyped override. First those of `name`'s
  section with a last part like its own ('optim.lrr' -> 'optim.lr'), then whole names alike
  ('eval.every' -> 'eval_every'), then like last parts in other sections ('optim.sed' -> 'seed')."""
  fields = field_names(c)
  section, _, last = name.rpartition('.')
  lasts = [f.rpartition('.')[2] for f in fields]
  near_lasts = difflib.get_close_matches(last, lasts, n=count, cutoff=0.75)
  by_last = sorted(
    (f for f, f_last in zip(fields, lasts, strict=True) if f_last in near_lasts),
    key=lambda f: near_lasts.index(f.rpartition('.')[2]),
  )
  same_section = [f for f in by_last if f.rpartition('.')[0] == section]
  by_whole = difflib.get_close_matches(name, fields, n=count, cutoff=0.8)
  return list(dict.fromkeys(same_section + by_whole + by_last))[:count]


def describe(c: ml_collections.ConfigDict) -> str:
  """Every field of a resolved config, `key = value  # what it means`, one per line."""
  comments = field_comments()
  out = []

  def walk(node: ml_collections.ConfigDict, prefix: str) -> None:
    for key in node.keys():
      value, name = node[key], f'{prefix}{key}'
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, name + '.')
        continue
      comment = comments.get(name, '')
      out.append(f'{name} = {value!r}' + (f'  # {comment}' if comment else ''))

  walk(c, '')
  return '\n'.join(out)
