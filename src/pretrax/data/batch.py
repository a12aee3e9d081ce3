"""The batch every step reads: one frozen record of arrays, a field per kind of value.

A `Batch` is a NamedTuple, so it is a JAX pytree as it is: `jax.jit` takes it,
`jax.make_array_from_process_local_data` and `jax.tree.map` map over its arrays. The fields a kind
of batch lacks are None, an empty subtree that every tree function passes over. The same record
holds host arrays (`Batch[np.ndarray]`, from data/pipeline.py and data/examples.py), global
arrays on the mesh (`Batch[jax.Array]`, what the steps read), or shapes (`jax.ShapeDtypeStruct`).
"""

from typing import Generic, NamedTuple, TypeVar

A = TypeVar('A')  # The array type: np.ndarray on the host, jax.Array on the mesh.


class Batch(NamedTuple, Generic[A]):
  """B rows of L positions, each row one or more examples packed one after another.

  Every batch:
    inputs         int32 (B, L)    the token ids the model reads; 0 in padding.
    segment_ids    int32 (B, L)    the packed example (document piece) each position belongs to,
                                   from 1 in each row; 0 is padding. Attention stays in a segment.
    positions      int32 (B, L)    each position's index in its segment, from 0.
  Language-model batches (pre-training objectives and sft; None in classification batches):
    targets        int32 (B, L)    the token each position must predict; 0 in padding.
    weights        float32 (B, L)  1 where that prediction counts in the loss, else 0 (padding,
                                   document ends, prompts, unmasked tokens).
    prefix         int32 (B, L)    1 where attention is bidirectional (the prefix), 0 where causal.
    objective      int32 (B, L)    the index in config.OBJECTIVES of the objective that built each
                                   position's example, for per-objective losses.
  Classification batches (None in language-model batches), S = min(examples.MAX_SEGMENTS, L):
    labels         int32 (B, S)    the label index of the row's s-th example (segment s + 1).
    label_weights  float32 (B, S)  1 where the row has an s-th example, 0 in empty slots.
  """

  inputs: A
  segment_ids: A
  positions: A
  targets: A | None = None
  weights: A | None = None
  prefix: A | None = None
  objective: A | None = None
  labels: A | None = None
  label_weights: A | None = None
