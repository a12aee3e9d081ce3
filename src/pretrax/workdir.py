"""A run's workdir, the one place that knows its layout (local or on a bucket):

  WORKDIR/
    lock                    held while the run lives (faults.py)
    checkpoints/STEP/       Orbax checkpoints: state, config, fingerprint (checkpoint.py)
    damaged_checkpoints/    steps set aside by checkpoint.fallback, kept to study
    metrics.jsonl           one JSON line per logged step and eval (metrics.py); TensorBoard
                            events beside it
    tokenizer.model         the SentencePiece model the run trained with
    labels.json             a classifier's labels, in the order of its classes
    data/                   the run's token store(s), built or reused (data/dataset.py)
    eval/step_N/            `pretrax eval` results: results.json, samples_TASK.jsonl
    profile/                jax.profiler traces (profile_steps)

Imports only paths.py.
"""

from pretrax import paths

TOKENIZER_FILE = 'tokenizer.model'


def lock_file(workdir: str) -> str:
  return paths.join(workdir, 'lock')


def checkpoints(workdir: str) -> str:
  return paths.join(workdir, 'checkpoints')


def damaged_checkpoint(workdir: str, step: int) -> str:
  return paths.join(workdir, 'damaged_checkpoints', str(step))


def metrics_file(workdir: str) -> str:
  return paths.join(workdir, 'metrics.jsonl')


def tokenizer_file(workdir: str) -> str:
  return paths.join(workdir, TOKENIZER_FILE)


def labels_file(workdir: str) -> str:
  return paths.join(workdir, 'labels.json')


def data_dir(workdir: str) -> str:
  return paths.join(workdir, 'data')


def eval_dir(workdir: str, step: int) -> str:
  return paths.join(workdir, 'eval', f'step_{step}')


def profile_dir(workdir: str) -> str:
  return paths.join(workdir, 'profile')


def find_tokenizer(workdir: str, prepared: str = '', configured: str = '') -> str:
  """The tokenizer of a run: the one kept in its workdir, else its prepared store's, else the file
  its config named (tokenizer.path); FileNotFoundError naming every place looked at."""
  candidates = [tokenizer_file(workdir)]
  if prepared:  # A store keeps its tokenizer (a mixture's, in one of its sources).
    candidates.append(paths.join(prepared, TOKENIZER_FILE))
  if configured:
    candidates.append(configured)
  for path in candidates:
    if paths.path(path).exists():
      return path
  raise FileNotFoundError(
    f'no tokenizer for the run in {workdir} (looked for {", ".join(candidates)}): set '
    '--config.tokenizer.path to the one it trained with.'
  )
