"""What a training run evaluates: the held-out loss of every source, every eval_every steps, and
downstream multiple-choice tasks (eval.tasks) on the live parameters, every eval.tasks_every."""

from collections.abc import Callable, Iterable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pretrax import config as config_lib
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax.config_types import RunConfig
from pretrax.data import dataset
from pretrax.data.batch import Batch
from pretrax.downstream import scoring
from pretrax.downstream import tasks as tasks_lib


def held_out(
  c: RunConfig, run: state_lib.RunState, data: dataset.RunData
) -> Callable[[Any], dict[str, float]]:
  """params -> the held-out metrics of every source (at most c.eval_batches batches each)."""
  eval_step = step_lib.jit_eval_step(
    run.model_def,
    len(data.objectives.names),
    exact_match=c.objective == 'sft',
    activation_sharding=run.activation_sharding,
  )
  bytes_per_token = jnp.asarray(data.tok.bytes_per_token())
  baseline_id = jnp.int32(data.baseline_id)

  def sums_of(params: Any, batches: Iterable[Batch[np.ndarray]]) -> dict[str, Any]:
    sums = None
    for i, batch in enumerate(batches):
      if c.eval_batches and i >= c.eval_batches:
        break
      on_mesh = jax.make_array_from_process_local_data(run.batch_sharding, batch)
      out = jax.device_get(eval_step(params, on_mesh, bytes_per_token, baseline_id))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    if sums is None:  # dataset.load rejects an empty held-out split, so only eval_batches < 0.
      raise ValueError(f'eval_batches={c.eval_batches}: no held-out batch was evaluated')
    return sums

  def evaluate(params: Any) -> dict[str, float]:
    per_source = {name: sums_of(params, batches()) for name, batches in data.eval_sets.items()}
    return eval_record(c, data.objectives.names, per_source)

  return evaluate


def task_scorer(
  c: RunConfig,
  run: state_lib.RunState,
  data: dataset.RunData,
  log: Callable[[str], None],
) -> Callable[[Any], dict[str, float]] | None:
  """params -> the downstream tasks' metrics (eval.tasks), or None when there are none. The tasks
  are read once; the scoring function compiles once per batch shape."""
  if not c.eval.tasks:
    return None
  tasks = tasks_lib.load_all(
    [n.strip() for n in c.eval.tasks.split(',') if n.strip()], c.eval.limit or None
  )
  log(
    f'downstream tasks every {c.eval.tasks_every} steps: '
    + ', '.join(f'{t.name} ({len({r.doc_id for r in t.requests})} questions)' for t in tasks)
  )

  # Tokenised once: every scoring reads the same windows with new parameters.
  windows = scoring.windows_of(data.tok, [r for t in tasks for r in t.requests], c.data.seq_len)

  def score(params: Any) -> dict[str, float]:
    results = scoring.score_tasks(
      run.model_def,
      params,
      data.tok,
      tasks,
      seq_len=c.data.seq_len,
      batch_tokens=_TASK_BATCH_TOKENS,
      windows=windows,
    )
    return {
      f'task_{name.replace(":", "_")}_{k}': float(v)
      for name, metrics in results.items()
      for k, v in metrics.items()
      if k in ('acc', 'acc_norm', 'bpb', 'chance')
    }

  return score


_TASK_BATCH_TOKENS = 4096  # In-loop scoring: logits of this many tokens at once, beside the state.


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """What is evaluated at a step: the held-out loss every eval_every steps, the downstream tasks
  every eval.tasks_every (default eval_every), both at the last step."""

  c: RunConfig
  held_out: Callable[[Any], dict[str, float]]
  tasks: Callable[[Any], dict[str, float]] | None

  def _tasks_due(self, step: int) -> bool:
    every = self.c.eval.tasks_every
    return self.tasks is not None and (step % every == 0 or step == self.c.steps)

  def due(self, step: int) -> bool:
    return step % self.c.eval_every == 0 or step == self.c.steps or self._tasks_due(step)

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    record = {}
    if step % self.c.eval_every == 0 or step == self.c.steps:
      record.update(self.held_out(params))
    if self.tasks is not None and self._tasks_due(step):  # Due only when there are tasks.
      record.update(self.tasks(params))
    return record


def eval_record(
  c: RunConfig,
  objective_names: tuple[str, ...],
  per_source: dict[str, dict[str, Any]],
) -> dict[str, float]:
  """The eval metrics from the summed eval-step outputs of each source."""
  sums = jax.tree.map(lambda *x: sum(x), *per_source.values())
  weight = max(float(sums['weight_sum']), 1.0)
  loss = float(sums['loss_sum']) / weight
  result = {
    'eval_loss': loss,
    'eval_perplexity': float(np.exp(min(loss, 50.0))),
    'eval_accuracy': float(sums['correct_sum']) / weight,
    'eval_baseline_accuracy': float(sums['baseline_correct_sum']) / weight,
  }
  if c.objective in ('causal_lm', 'sft'):  # Bits per byte mean something for plain text only.
    result['eval_bits_per_byte'] = (
      float(sums['loss_sum']) / np.log(2) / max(float(sums['byte_sum']), 1.0)
    )
  if c.objective == 'sft':  # Responses that greedy decoding from their prompts gives exactly.
    result['eval_exact_match'] = float(sums['exact_sum']) / max(float(sums['answer_sum']), 1.0)
  for name in objective_names if len(objective_names) > 1 else ():
    k = config_lib.OBJECTIVES.index(name)
    result[f'eval_loss_{name}'] = float(sums['group_loss_sum'][k]) / max(
      float(sums['group_weight_sum'][k]), 1.0
    )
  for name, source_sums in per_source.items() if len(per_source) > 1 else ():
    result[f'eval_loss_{name}'] = float(source_sums['loss_sum']) / max(
      float(source_sums['weight_sum']), 1.0
    )
  return result


def eval_line(step: int, e: dict[str, float], guess: str = 'token') -> str:
  """The printed eval record; `guess` names what the baseline accuracy always guesses."""
  tasks = [
    f'{k[len("task_") : -len("_acc")]} accuracy {v:.3f} (chance '
    f'{e[k[: -len("acc")] + "chance"]:.3f})'
    for k, v in e.items()
    if k.startswith('task_') and k.endswith('_acc')
  ]
  if 'eval_loss' not in e:
    return f'downstream at step {step}: ' + ', '.join(tasks)
  parts = [f'loss {e["eval_loss"]:.4f}', f'perplexity {e["eval_perplexity"]:.2f}']
  if 'eval_bits_per_byte' in e:
    parts.append(f'{e["eval_bits_per_byte"]:.3f} bits/byte')
  if 'eval_exact_match' in e:
    parts.append(f'exact match {e["eval_exact_match"]:.3f}')
  parts.append(
    f'accuracy {e["eval_accuracy"]:.3f} (most frequent {guess}: {e["eval_baseline_accuracy"]:.3f})'
  )
  parts += [f'{k[len("eval_") :]} {v:.4f}' for k, v in e.items() if k.startswith('eval_loss_')]
  return f'eval at step {step}: ' + ', '.join(parts + tasks)
