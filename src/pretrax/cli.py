"""`pretrax COMMAND --flags`: train | plan | prepare | sample | eval | tokenizer | export | import |
sweep.

Thin: parse flags, call, report. The commands themselves are declared in commands.py.

Every expected failure (a bad config key or value, a missing file) ends with one line on stderr
naming the problem and the fix, and exit status 2.
"""

import ast
import difflib
import glob
import os
import shlex
import sys

from absl import flags

from pretrax import errors
from pretrax.commands import COMMANDS, Command, UsageError

FLAGS = flags.FLAGS


def _usage(commands: dict[str, Command]) -> str:
  """The top-level usage: each command's usage lines, its name in a column of its own."""
  lines = ['usage: pretrax COMMAND [--flags]', '', 'commands:']
  for c in commands.values():
    lines.append(f'  {c.name:<10} {c.usage[0]}')
    lines += [f'{"":13}{line}' for line in c.usage[1:]]
  return '\n'.join(lines) + '\n'


USAGE = _usage(COMMANDS)


def _unknown_key_message(argv: list[str], spec: str | None, error: Exception) -> str:
  """The first --config override that names no field of the config, with the nearest fields."""
  from pretrax import config as config_lib
  from pretrax import config_fields

  try:
    path, _, arg = (spec or '').partition(':')
    c = config_lib.load(path, arg or None) if path else config_lib.base_config()
  except Exception:  # The error being reported is the override; the file was checked before.
    c = config_lib.base_config()
  fields = set(config_fields.field_names(c))
  for override in argv:
    key = override.split('=', 1)[0].removeprefix('--config.')
    if override.startswith('--config.') and key not in fields:
      near = config_fields.nearest_fields(c, key)
      fix = f'did you mean {" or ".join(near)}?' if near else 'see --print_config for every field.'
      return f'--config.{key} names no config field; {fix}'
  detail = ' '.join(str(error).split())
  return (
    f'a --config override names no config field ({detail}): see --print_config for every field.'
  )


def _fail(command: str, message: str) -> None:
  print(f'pretrax {command}: error: {message}', file=sys.stderr, flush=True)
  # The line above is the whole report: background writers that die with the interpreter (Orbax's
  # asyncio tasks after a failed save) would otherwise print pages of tracebacks after it.
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
  sys.exit(2)


def _quiet_closed_loops() -> None:
  """Drops one harmless traceback: TensorStore completing a write for an Orbax event loop that
  already closed (after a save failed, or at exit) prints 'RuntimeError: Event loop is closed',
  possibly many times, burying the one line that says what happened."""
  default = sys.unraisablehook

  def hook(unraisable) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      default(unraisable)

  sys.unraisablehook = hook


HELP_FLAGS = ('--help', '-h', '--helpfull', '-help', '--help=true')


def _command_help(command: Command, names: list[str]) -> str:
  """Usage, every flag of `command` with its help and default, and its examples."""
  lines = [f'usage: pretrax {command.name} {" ".join(command.usage)}', '', 'flags:']
  for name in names:
    flag = FLAGS[name]
    default = '' if flag.default is None else f' (default: {flag.default!r})'
    if name == 'config':
      default = ' (required)'
    lines.append(f'  --{name}: {flag.help}{default}')
    if name == 'config':
      lines.append(
        '  --config.KEY=VALUE: override any field of the config, type-checked; '
        '--print_config lists them all with their meaning'
      )
  lines += ['', 'example:', *(f'  {e}' for e in command.examples)]
  return '\n'.join(lines)


def _config_spec(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(spec: str) -> None:
  """A --config file that is missing, does not parse, or has no get_config, in one line."""
  path = spec.split(':', 1)[0]
  if not os.path.isfile(path):
    known = [
      os.path.relpath(p) for p in glob.glob(os.path.join(os.path.dirname(path) or '.', '*.py'))
    ]
    near = difflib.get_close_matches(path, known, n=1)
    hint = f'; did you mean {near[0]}?' if near else ': give a file such as configs/tiny.py.'
    raise UsageError(f'--config={spec}: {path} does not exist{hint}')
  with open(path, encoding='utf-8') as f:
    source = f.read()
  try:
    tree = ast.parse(source, path)
  except SyntaxError as e:
    raise UsageError(
      f'--config={spec}: {e.filename}:{e.lineno}: {e.msg}: fix the config file.'
    ) from None
  if not any(isinstance(n, ast.FunctionDef) and n.name == 'get_config' for n in tree.body):
    raise UsageError(
      f'--config={spec}: {path} defines no get_config(arg): a config file returns '
      'its ConfigDict from get_config, as configs/tiny.py does.'
    )


def _check_flags(argv: list[str]) -> None:
  """An unknown --flag, named with the nearest known one (before absl, whose message would have
  to be parsed for it)."""
  for arg in argv:
    if arg == '--':
      return
    if not arg.startswith('--') or arg.startswith('--config.'):
      continue
    name = arg[2:].split('=', 1)[0]
    negated = name.removeprefix('no')  # absl's --noFLAG for a boolean --FLAG.
    if name in FLAGS or (negated in FLAGS and isinstance(FLAGS[negated], flags.BooleanFlag)):
      continue
    near = difflib.get_close_matches(name, list(FLAGS), n=1)
    hint = f'; did you mean --{near[0]}?' if near else '; see --help for the flags.'
    raise UsageError(f'unknown flag --{name}{hint}')


def _flag_error_message(text: str, spec: str | None) -> str:
  if 'Traceback (most recent call last)' in text:  # get_config raised while the flag parsed.
    return f'--config={spec}: get_config failed: {text.strip().splitlines()[-1].strip()}'
  return ' '.join(text.split())


def _parse(command: str, argv: list[str]) -> None:
  """Parses the command's flags; a bad one ends the process with one line."""
  spec = _config_spec(argv)
  try:
    _check_flags(argv[2:])
    if spec is not None and 'config' in FLAGS:
      _check_config_file(spec)
    FLAGS(argv[:1] + argv[2:])
  except UsageError as e:
    _fail(command, str(e))
  except flags.Error as e:
    _fail(command, _flag_error_message(str(e), spec))
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no config field.
    _fail(command, _unknown_key_message(argv, spec, e))
  except Exception as e:  # get_config itself failed (a bad variant argument, say).
    _fail(
      command, f'--config={spec}: get_config failed: {type(e).__name__}: {" ".join(str(e).split())}'
    )


def _top_level(argv: list[str]) -> None:
  """`pretrax`, `pretrax --help`, or a command that does not exist."""
  if len(argv) >= 2 and argv[1] in HELP_FLAGS + ('help',):
    print(USAGE)
    sys.exit(0)
  if len(argv) >= 2:
    near = difflib.get_close_matches(argv[1], list(COMMANDS), n=1)
    hint = f'; did you mean {near[0]!r}?' if near else '.'
    print(f'pretrax: error: {argv[1]!r} is not a command{hint}\n', file=sys.stderr)
  print(USAGE, file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  _quiet_closed_loops()
  if len(argv) < 2 or argv[1] not in COMMANDS:
    _top_level(argv)
  command = argv[1]
  before = set(FLAGS)
  COMMANDS[command].define()
  if any(a in HELP_FLAGS for a in argv[2:]):
    print(_command_help(COMMANDS[command], [n for n in FLAGS if n not in before and len(n) > 1]))
    sys.exit(0)
  _parse(command, argv)
  from pretrax import faults

  if 'print_config' in FLAGS and FLAGS.print_config:
    from pretrax import config_fields

    try:
      print(config_fields.describe(FLAGS.config), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    COMMANDS[command].run()
  except faults.Stopped as e:
    again = ' '.join(shlex.quote(a) for a in ['pretrax'] + argv[1:])
    print(f'pretrax {command}: {e}. Resume with the same command: {again}', file=sys.stderr)
    sys.exit(faults.STOPPED_EXIT_CODE)
  except (errors.PretraxError, FileNotFoundError) as e:
    _fail(command, ' '.join(str(e).split()))
  except KeyboardInterrupt:
    _fail(command, 'interrupted')


if __name__ == '__main__':
  main()
