"""`pretrax eval`: a checkpoint scored on multiple-choice tasks, by log-likelihood.

  pretrax eval --workdir=runs/shakespeare --tasks=arc_easy,piqa --limit=200

Prints a table of each task's accuracy, length-normalised accuracy and bits per byte of the gold
answers (see `scoring.task_metrics`), and writes OUT/results.json and, per task,
OUT/samples_TASK.jsonl with one line per request (OUT defaults to WORKDIR/eval/step_N). The task
names and the JSON-lines format of your own tasks are in `downstream/tasks.py`.
"""

from collections.abc import Callable, Sequence
import json

from pretrax import config as config_lib
from pretrax import paths, saved_run
from pretrax import workdir as workdir_lib
from pretrax.downstream import scoring
from pretrax.downstream import tasks as tasks_lib

TABLE_KEYS = ('docs', 'chance', 'acc', 'acc_norm', 'bpb', 'gold_greedy')


def default_output(workdir: str, step: int) -> str:
  return workdir_lib.eval_dir(workdir, step)


def samples_file(task_name: str) -> str:
  return f'samples_{task_name.replace(":", "_")}.jsonl'


def markdown_table(results: dict[str, dict[str, float]]) -> str:
  lines = ['| task | ' + ' | '.join(TABLE_KEYS) + ' |', '| --- |' + ' ---: |' * len(TABLE_KEYS)]
  for name, m in results.items():
    cells = [str(m['docs']), *(f'{m[k]:.4f}' for k in TABLE_KEYS[1:])]
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _sample_lines(task: tasks_lib.Task, scores: Sequence[scoring.Score]) -> str:
  return ''.join(
    json.dumps(
      {
        'doc_id': r.doc_id,
        'choice': r.choice,
        'context': r.context,
        'continuation': r.continuation,
        'loglik': s.loglik,
        'num_tokens': s.num_tokens,
        'is_greedy': s.is_greedy,
        'gold': r.gold,
      },
      ensure_ascii=False,
    )
    + '\n'
    for r, s in zip(task.requests, scores, strict=True)
  )


def evaluate(
  workdir: str,
  task_names: Sequence[str],
  *,
  step: int | None = None,
  limit: int | None = None,
  output: str | None = None,
  batch_tokens: int = scoring.DEFAULT_BATCH_TOKENS,
  log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
  """Scores the checkpoint at `step` (default: the latest) on the tasks; returns task name ->
  metrics, having written results.json and the samples files to `output`."""
  tasks = tasks_lib.load_all(task_names, limit)  # A misspelt task fails before the restore.
  model = saved_run.load(workdir, step)
  if model.run.model_cfg.attention == 'bidirectional':
    raise config_lib.ConfigError(
      f'the run in {workdir} trained a {model.config.objective} '
      'encoder, which gives no next-token log-likelihoods: evaluate a '
      "decoder objective's run."
    )
  seq_len = model.config.data.seq_len
  log(
    f'scoring step {model.step} of {workdir} on {", ".join(t.name for t in tasks)}: '
    f'{sum(len(t.requests) for t in tasks)} requests, windows of {seq_len} tokens'
  )
  per_task = scoring.score_by_task(
    model.run.model_def, model.params, model.tok, tasks, seq_len=seq_len, batch_tokens=batch_tokens
  )
  out = paths.path(output or default_output(workdir, model.step))
  out.mkdir(parents=True, exist_ok=True)
  results = {}
  for t, task_scores in zip(tasks, per_task, strict=True):
    results[t.name] = scoring.task_metrics(t.requests, task_scores)
    (out / samples_file(t.name)).write_text(_sample_lines(t, task_scores), encoding='utf-8')
  summary = {
    'workdir': workdir,
    'step': model.step,
    'limit': limit,
    'seq_len': seq_len,
    'sources': {t.name: t.source for t in tasks},
    'results': results,
  }
  (out / 'results.json').write_text(json.dumps(summary, indent=2) + '\n', encoding='utf-8')
  log(markdown_table(results))
  log(f'wrote {out}: results.json and {", ".join(samples_file(t.name) for t in tasks)}')
  return results
