"""model.scan_layers: identical blocks kept as one block whose parameters have a leading `layers`
axis, run by one `jax.lax.scan` body, so the step compiles one block instead of num_layers; and
the conversions between that layout and the unrolled one ('blocks/3/attn/q' is 'stack/attn/q'
[3 - first]).

Layout. Unrolled, the params hold `blocks/{i}/...` for every layer. Scanned, `stack/...` holds
layers first..num_layers-1 stacked (each parameter's logical axes gain a leading 'layers'), and
`blocks/{i}/...` only the first `first` layers that the stack cannot hold: a Mixture-of-Experts
model's leading dense ones (moe.first_dense), whose MLP differs from the experts' layers.

The stack is built from the Blocks the unrolled model builds (same order, same random draws), so a
scanned model starts from exactly the unrolled one's parameters, stacked. The scan slices the
stacked State one layer per iteration and merges it with the block's graph definition: a plain
lax.scan over plain arrays, inside which the block runs as it does unrolled (remat included).

Why not nnx.vmap / nnx.scan: they would draw each layer's parameters from split keys, not the
unrolled model's; and a plain lax.scan shows what is carried, sliced and stacked.

Imports JAX, Flax and model/layers.py (constrain) only: the transformer, the MoE update, the
optimizer's decay mask and Muon, and the checkpoint conversions (saved_run, interop) read the
names below.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pretrax.model import layers

STACK = 'stack'  # The params entry of the stacked blocks.
BLOCKS = 'blocks'  # The params entry of the unrolled blocks (each a dict under its layer index).
LAYERS = 'layers'  # The logical name of the stacking axis (sharding.py maps it to no mesh axis).


def first_scanned(num_layers: int, scan_layers: bool, num_experts: int, first_dense: int) -> int:
  """The first layer of the stack: 0 (all of them), a Mixture-of-Experts model's first_dense
  (its dense layers stay unrolled), or num_layers when nothing is scanned."""
  if not scan_layers:
    return num_layers
  return first_dense if num_experts else 0


def alike(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> list[Any]:
  """The parameter values ({name: array} trees, nnx.to_pure_dict's) of n blocks that `make` builds
  from `rngs` one after another: the random draws of n calls, compiled once.

  Unrolled, building n blocks compiles n copies of their initialisers (the random draws of every
  parameter), which grows start-up with depth as the unrolled step's compile does. Here the first
  block is built as usual, which tells how many keys one block draws; the others are built inside
  one jax.lax.map over their index, each from a stream set to the count the unrolled build would
  have reached (fold_in(key, count) is a function of the count alone), so every value is the
  unrolled one bit for bit. `rngs` ends where n calls would have left it.
  """
  stream = rngs.params
  key, count0 = stream.key[...], stream.count[...]
  first = nnx.to_pure_dict(nnx.state(make(rngs)))
  if n == 1:
    return [first]
  per_block = stream.count[...] - count0

  def build(i: jax.Array) -> Any:
    layer_rngs = nnx.Rngs(params=key)
    layer_rngs.params.count[...] = count0 + i * per_block
    return nnx.to_pure_dict(nnx.state(make(layer_rngs)))

  rest = jax.lax.map(build, jnp.arange(1, n, dtype=count0.dtype))
  stream.count[...] = count0 + n * per_block
  return [first, *unstacked(rest, n - 1)]


def blocks_from(make: Callable[[nnx.Rngs], nnx.Module], values: Sequence[Any]) -> list[nnx.Module]:
  """Blocks as `make` builds them, holding `values` (alike's), one each."""
  out = []
  for v in values:
    block = nnx.eval_shape(lambda: make(nnx.Rngs(params=0)))  # The structure; no draws.
    nnx.replace_by_pure_dict(state := nnx.state(block), v)
    nnx.update(block, state)
    out.append(block)
  return out


def stacked(make: Callable[[nnx.Rngs], nnx.Module], values: Sequence[Any]) -> nnx.Module:
  """One block as `make` builds it, holding all of `values` (alike's) stacked on a leading
  'layers' axis (so the params read 'stack/attn/q', not 'stack/0/attn/q')."""
  (block,) = blocks_from(make, [jax.tree.map(lambda *xs: jnp.stack(xs), *values)])
  for _, v in nnx.iter_graph(block):
    if isinstance(v, nnx.Variable) and v.has_metadata('out_sharding'):
      v.set_metadata('out_sharding', (LAYERS, *v.get_metadata()['out_sharding']))
  return block


def depth(block: nnx.Module) -> int:
  """How many layers a `stacked` block holds."""
  return int(jax.tree.leaves(nnx.state(block))[0].shape[0])


def scan(
  block: nnx.Module, body: Callable[[Any, Any, Any], tuple[Any, Any]], carry, xs
) -> tuple[Any, Any]:
  """jax.lax.scan of `body(layer, carry, x) -> (carry, y)` over a `stacked` block's layers, layer
  and x each one layer's slice; returns the final carry and the ys stacked."""
  graphdef, state = nnx.split(block)

  def one_layer(v: nnx.Variable) -> nnx.Variable:
    names = v.get_metadata().get('out_sharding')
    if not names:
      return v
    # Pinned to its own sharding: otherwise the partitioner may gather a stacked parameter whole
    # for the loop (and keep its gradient's stack unsharded), where unrolled each layer's is
    # gathered when used. The transpose pins the layer's gradient the same way.
    return v.replace(layers.constrain(v[...], names[1:]), out_sharding=names[1:])

  def step(carry, inputs):
    layer_state, x = inputs
    layer_state = jax.tree.map(
      one_layer, layer_state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )
    return body(nnx.merge(graphdef, layer_state), carry, x)

  return jax.lax.scan(step, carry, (state, xs))


def unstacked(ys: Any, n: int) -> tuple:
  """The scan's stacked outputs as a tuple of n per-layer pytrees (() when ys is None)."""
  if ys is None:
    return ()
  return tuple(jax.tree.map(lambda y, i=i: y[i], ys) for i in range(n))


# ---- Conversions of a flat {path: array} dict between the two layouts ---------------------------


def to_unrolled(values: Mapping[str, Any], first: int) -> dict[str, Any]:
  """Params by path ('blocks/0/attn/q') with every stacked `stack/...` entry split into its layers
  `blocks/{first + j}/...`; unrolled values pass through unchanged."""
  out = {}
  for path, x in values.items():
    head, _, rest = path.partition('/')
    if head != STACK:
      out[path] = x
      continue
    for j in range(x.shape[0]):
      out[f'{BLOCKS}/{first + j}/{rest}'] = x[j]
  return out


def to_stacked(values: Mapping[str, Any], first: int, num_layers: int) -> dict[str, Any]:
  """Params by path in the scanned layout: the `blocks/{i}/...` entries of layers first..
  num_layers-1 stacked into `stack/...` (only where every one of those layers has the entry);
  stacked values and the leading unrolled layers pass through unchanged. first == num_layers
  (nothing scanned) changes nothing."""
  if first >= num_layers:
    return dict(values)
  out: dict[str, Any] = {}
  parts: dict[str, dict[int, Any]] = {}
  for path, x in values.items():
    head, _, rest = path.partition('/')
    index, _, name = rest.partition('/')
    if head == BLOCKS and index.isdigit() and int(index) >= first:
      parts.setdefault(name, {})[int(index)] = x
    else:
      out[path] = x
  for name, by_layer in parts.items():
    if set(by_layer) != set(range(first, num_layers)):  # Incomplete: left unrolled, to be named.
      out.update({f'{BLOCKS}/{i}/{name}': x for i, x in by_layer.items()})
      continue
    xs = [by_layer[i] for i in range(first, num_layers)]
    # Host arrays (a Hugging Face import) stay on the host; device arrays stay on their devices.
    host = all(isinstance(x, np.ndarray) for x in xs)
    out[f'{STACK}/{name}'] = np.stack(xs) if host else jnp.stack(xs)
  return out


def to_layout(values: Mapping[str, Any], first: int, num_layers: int) -> dict[str, Any]:
  """Params by path in either layout, converted to the layout whose stack starts at `first`
  (num_layers: unrolled)."""
  return to_stacked(to_unrolled(values, first_of(values, num_layers)), first, num_layers)


def first_of(values: Mapping[str, Any], num_layers: int) -> int:
  """Where the stack of `values` starts: after its unrolled layers (a stack holds the rest)."""
  unrolled = {int(p.split('/')[1]) for p in values if p.startswith(BLOCKS + '/')}
  if not any(p.startswith(STACK + '/') for p in values):
    return num_layers
  return max(unrolled) + 1 if unrolled else 0
