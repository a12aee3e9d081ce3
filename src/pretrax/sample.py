"""Text generation from a model's parameters or from the latest checkpoint in a workdir.

Generation runs the model on a fixed window of the last `seq_len` tokens (left-padded, padding in
its own segment) so one compiled function serves every step; simple and exact, and fast enough
for samples on a CPU.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pretrax import config as config_lib
from pretrax import saved_run
from pretrax import tokenizer as tokenizer_lib
from pretrax.data import objectives as objectives_lib


@functools.partial(jax.jit, static_argnames=('model_def', 'top_k'))
def _next_token(
  params,
  window_L: jax.Array,
  count: jax.Array,
  rng: jax.Array,
  temperature: jax.Array,
  *,
  model_def: nnx.GraphDef,
  top_k: int,
) -> jax.Array:
  """Samples the token after the last `count` tokens of the right-aligned window."""
  L = window_L.shape[0]
  first = L - count
  index_L = jnp.arange(L)
  segment_ids_1L = (index_L >= first).astype(jnp.int32)[None]
  positions_1L = jnp.maximum(index_L - first, 0)[None]
  model = nnx.merge(model_def, params)
  logits_V = model(window_L[None], segment_ids_1L, positions_1L)[0, -1]
  if top_k:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
  greedy = jnp.argmax(logits_V)
  sampled = jax.random.categorical(rng, logits_V / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, greedy)


def generate(
  model_def: nnx.GraphDef,
  params,
  tok: tokenizer_lib.Tokenizer,
  prompt: str,
  *,
  length: int,
  seq_len: int,
  temperature: float = 0.8,
  top_k: int = 0,
  seed: int = 0,
) -> str:
  """The prompt followed by `length` generated tokens, decoded. Temperature 0 is greedy."""
  ids = tok.encode(prompt) if prompt else [tokenizer_lib.EOS_ID]  # EOS: "a document starts".
  window = np.zeros(seq_len, np.int32)
  generated: list[int] = []
  key = jax.random.key(seed)
  context = list(ids)
  for i in range(length):
    recent = context[-seq_len:]
    window[:] = tokenizer_lib.PAD_ID
    window[seq_len - len(recent) :] = recent
    token = int(
      _next_token(
        params,
        jnp.asarray(window),
        jnp.int32(len(recent)),
        jax.random.fold_in(key, i),
        jnp.float32(temperature),
        model_def=model_def,
        top_k=top_k,
      )
    )
    generated.append(token)
    context.append(token)
  return prompt + tok.decode(generated)


@functools.partial(jax.jit, static_argnames=('model_def',))
def _predict(params, ids_1L: jax.Array, *, model_def: nnx.GraphDef) -> jax.Array:
  L = ids_1L.shape[1]
  model = nnx.merge(model_def, params)
  logits = model(ids_1L, jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None])
  return jnp.argmax(logits[0], axis=-1)


def fill_in(
  model_def: nnx.GraphDef,
  params,
  tok: tokenizer_lib.Tokenizer,
  examples: list[objectives_lib.Example],
) -> str:
  """A masked LM's predictions on masked examples, three lines each: the text, what the encoder
  read (<mask> shown as _), and the text with its predictions at the chosen positions."""

  def show(ids) -> str:
    text = ''.join(tok.decode([i]) if i != tokenizer_lib.MASK_ID else '_' for i in ids)
    return text.replace('\n', '\u21b5')  # Each text on one line of its own.

  lines, right, total = [], 0, 0
  for e in examples:
    predicted = np.asarray(_predict(params, jnp.asarray(e.inputs)[None], model_def=model_def))
    chosen = e.weights > 0
    filled = np.where(chosen, predicted, e.targets)
    right += int(np.sum(predicted[chosen] == e.targets[chosen]))
    total += int(chosen.sum())
    lines += [
      f'text:      {show(e.targets)}',
      f'masked:    {show(e.inputs)}',
      f'predicted: {show(filled)}',
    ]
  return '\n'.join(lines + [f'{right} of {total} chosen tokens right'])


def from_workdir(
  workdir: str,
  prompt: str,
  *,
  length: int,
  temperature: float,
  top_k: int = 0,
  seed: int = 0,
  step: int | None = None,
) -> str:
  """Generates from the latest (or the given) checkpoint of a training run."""
  model = saved_run.load(workdir, step)
  if model.run.model_cfg.attention == 'bidirectional':
    raise config_lib.ConfigError(
      f'the run in {workdir} trained a {model.config.objective} '
      'encoder, which does not generate text: sample from a decoder '
      "objective's run."
    )
  return generate(
    model.run.model_def,
    model.params,
    model.tok,
    prompt,
    length=length,
    seq_len=model.config.data.seq_len,
    temperature=temperature,
    top_k=top_k,
    seed=seed,
  )
