"""`pretrax plan`: per-device bytes equal to a really sharded state's, XLA's temporaries, warnings
about replicated tensors, the CLI, and golden partition specs for every config.

Regenerate the golden specs after an intended change to the rules or the model's logical axes:

  PRETRAX_UPDATE_GOLDEN=1 python -m pytest tests/test_plan.py -k golden
"""

import json
import os

from conftest import REPO, run_cli, run_python

GOLDEN = os.path.join(REPO, 'tests', 'golden', 'partition_specs.json')
CONFIGS = (
  'tiny',
  'tiny:llama',
  'shakespeare_char',
  'shakespeare_mlm',
  'bert_base',
  'gpt2_small',
  'llama_1b',
  'moe_tiny',
  'moe_8x_1b',
  'moe_64e',
)


def _on_8_devices(script: str) -> str:
  return run_python(script, devices=8, timeout=300)


def test_plan_bytes_equal_the_shards_of_a_real_state_on_8_devices():
  out = json.loads(
    _on_8_devices("""
      import json
      import jax
      from conftest import load_config
      from pretrax import plan as plan_lib
      from pretrax import run_config
      from pretrax import state as state_lib

      def shard_bytes(tree):
        return {jax.tree_util.keystr(path, simple=True, separator='.'):
                x.addressable_shards[0].data.nbytes
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

      out = {}
      for data, fsdp, tensor in [(2, 2, 2), (1, 8, 1)]:
        c = load_config('tiny')
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
        run = run_config.build(c, num_devices=8, check_data=False)
        p = plan_lib.plan(run, 64)
        state = state_lib.build(run, 64).init(0)
        out[f'{data},{fsdp},{tensor}'] = {
            'plan': {q.path: q.bytes_per_device for q in p.params},
            'real': shard_bytes(state['params']),
            'plan_opt': p.opt_state_bytes,
            'real_opt': sum(shard_bytes(state['opt_state']).values()),
            'param_bytes': p.param_bytes, 'temp': p.temp_bytes, 'peak': p.peak_bytes,
            'warnings': p.warnings,
        }
      c.mesh.rules = 'embed='  # On (1, 8, 1): no state to compare, only the warnings.
      run = run_config.build(c, num_devices=8, check_data=False)
      out['replicated_warnings'] = plan_lib.plan(run, 64).warnings
      print(json.dumps(out))
  """).splitlines()[-1]
  )
  warned = out.pop('replicated_warnings')
  for mesh, got in out.items():
    assert got['plan'] == got['real'], mesh
    assert got['param_bytes'] == sum(got['real'].values()), mesh
    assert got['plan_opt'] == got['real_opt'], mesh
    assert got['temp'] > 0, mesh
    assert got['peak'] > got['param_bytes'] + got['plan_opt'], mesh
  # Sharding really divides: fsdp=8 holds an eighth of a matrix, (2, 2, 2) a quarter.
  assert out['1,8,1']['plan']['blocks.0.mlp.wi'] == 64 * 256 * 4 // 8
  assert out['2,2,2']['plan']['blocks.0.mlp.wi'] == 64 * 256 * 4 // 4
  assert out['2,2,2']['warnings'] == [] and out['1,8,1']['warnings'] == []
  # `embed=` leaves the MLP matrices and the tables with no mesh axis of size > 1.
  for path in ('blocks.0.mlp.wi', 'embed.embedding', 'pos_embed'):
    assert any(w.startswith(f'{path} ') and 'replicated on all 8 devices' in w for w in warned), (
      path,
      warned,
    )
  assert not any(w.startswith('blocks.0.attn_norm.scale ') for w in warned)  # Too small to matter.


def test_plan_command_prints_the_table_and_a_verdict():
  result = run_cli(
    'plan', '--config=configs/tiny.py', '--devices=8', '--mesh=1,-1,1', '--device_memory_gib=16'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'mesh data=1 fsdp=8 expert=1 tensor=1 (8 cpu devices)' in out, out
  assert 'blocks.0.attn.q' in out and 'embed, heads, head_dim' in out and 'fsdp, tensor, -' in out
  for line in ('parameters', 'optimizer state', 'activations + temporaries (XLA)', 'peak estimate'):
    assert f'\n  {line} ' in out, out
  assert 'fits: ' in out and 'warnings:' not in out, out


def test_plan_counts_attention_as_a_fused_kernel_and_the_chunked_loss_without_its_logits():
  """The stand-in keeps attention's inputs, output and log-sum-exp, so planning it drops the
  T x T scores XLA:CPU's attention keeps (4 heads x 512^2 float32 x 8 rows = 32 MiB a layer);
  a chunked loss drops the whole logits (8 x 512 x 8192 float32 = 128 MiB, and their gradient)."""
  out = json.loads(
    _on_8_devices("""
      import json
      from conftest import load_config
      from pretrax import plan as plan_lib
      from pretrax import run_config

      def temp(memory, loss_chunk=0):
        c = load_config('tiny')
        c.data.seq_len, c.data.batch_size, c.model.vocab_size = 512, 64, 8192
        c.model.loss_chunk = loss_chunk
        run = run_config.build(c, num_devices=8, check_data=False)
        return plan_lib.plan(run, 8192, attention_memory=memory).temp_bytes

      print(json.dumps({'compiled': temp('compiled'), 'fused': temp('fused'),
                        'fused_chunked': temp('fused', loss_chunk=64)}))
  """).splitlines()[-1]
  )
  MiB = 2**20
  assert out['compiled'] - out['fused'] >= 16 * MiB, out  # Measured: 34 MiB.
  assert out['fused'] - out['fused_chunked'] >= 128 * MiB, out  # Measured: 347 MiB.


def test_plan_counts_all_and_active_expert_parameters_and_plans_dropless_experts_as_grouped():
  """A Mixture-of-Experts model: all its parameters, those a token goes through (the router and
  top_k of the experts), the FLOPs of the active ones; dropless experts planned as a grouped-matmul
  kernel holds them (near what the capacity path holds), not as XLA:CPU's every expert on every
  token copy (measured: 149 MiB grouped, 166 MiB capacity 1.0, 456 MiB as XLA:CPU compiles it)."""
  out = json.loads(
    run_python(
      """
      import json
      import jax
      from conftest import load_config
      from pretrax import metrics
      from pretrax import plan as plan_lib
      from pretrax import run_config
      from pretrax import state as state_lib

      def tiny(experts=8, capacity_factor=0.0):
        c = load_config('tiny')
        c.data.seq_len, c.data.batch_size = 256, 32
        c.model.moe.num_experts, c.model.moe.top_k, c.model.moe.expert_dim = experts, 2, 256
        c.model.moe.first_dense = 1  # Block 0 dense, block 1 experts.
        c.model.moe.capacity_factor = capacity_factor
        return run_config.build(c, num_devices=1, check_data=False)

      run = tiny()
      real = state_lib.build(run, 64).abstract['params']
      grouped = plan_lib.plan(run, 64)
      dense = plan_lib.plan(tiny(experts=0), 64)
      print(json.dumps({
        'params': grouped.num_params,
        'real_params': sum(x.size for x in jax.tree.leaves(real)),
        'active': grouped.active_params,
        'flops': grouped.flops_per_token,
        'want_flops': metrics.flops_per_token(run_config.model_config(run, 64), 256),
        'dense': [dense.num_params, dense.active_params],
        'grouped': grouped.temp_bytes,
        'compiled': plan_lib.plan(run, 64, expert_memory='compiled').temp_bytes,
        'capacity': plan_lib.plan(tiny(capacity_factor=1.0), 64).temp_bytes,
        'text': plan_lib.format_plan(grouped),
      }))
      """,
      devices=1,
    ).splitlines()[-1]
  )
  assert out['params'] == out['real_params'], out
  # Block 1's experts (wi 8x64x256, wo 8x256x64): 6 of 8 idle for each token.
  assert out['active'] == out['params'] - 6 * 2 * 64 * 256, out
  assert out['flops'] == out['want_flops'], out
  assert out['dense'][0] == out['dense'][1], out
  assert out['compiled'] >= 2 * out['grouped'], out
  assert out['grouped'] <= 1.1 * out['capacity'], out
  header = f'{out["params"]:,} parameters ({out["active"]:,} active: 2 of 8 experts a token)'
  assert header in out['text'] and '1.21 MFLOPs per token' in out['text'], out['text'][:300]
  assert 'dropless experts as a grouped-matmul kernel' in out['text'], out['text'][-800:]


def test_plan_command_rejects_an_impossible_mesh_in_one_line():
  result = run_cli(
    'plan',
    '--config=configs/tiny.py',
    '--devices=8',
    '--config.mesh.data=1',
    '--config.mesh.fsdp=3',
  )
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith('pretrax ')]
  assert len(lines) == 1 and 'needs 3 devices but there are 8' in lines[0], result.stderr[-2000:]


def _dump(golden: dict) -> str:
  """One line per parameter, so a changed spec shows as a one-line diff."""
  blocks = []
  for name, entry in golden.items():
    rows = ',\n'.join(
      f'      {json.dumps(path)}: {json.dumps(spec)}' for path, spec in entry['params'].items()
    )
    blocks.append(
      f'  {json.dumps(name)}: {{\n    "mesh": {json.dumps(entry["mesh"])},\n'
      f'    "params": {{\n{rows}\n    }}\n  }}'
    )
  return '{\n' + ',\n'.join(blocks) + '\n}\n'


def test_partition_specs_of_every_config_match_the_golden_file():
  """Each parameter's (logical axes, PartitionSpec) on each config's default mesh of 8 devices."""
  got = json.loads(
    _on_8_devices(f"""
      import json
      import jax
      from conftest import load_config
      from pretrax import plan as plan_lib
      from pretrax import run_config
      from pretrax import state as state_lib

      def as_list(spec):
        return [list(a) if isinstance(a, tuple) else a for a in spec]

      out = {{}}
      for name in {CONFIGS!r}:
        c = run_config.resolve(load_config(*name.split(':')).to_dict())  # As configured.
        run = state_lib.build(c, plan_lib.vocab_size(c))
        leaves, treedef = jax.tree_util.tree_flatten_with_path(run.shardings['params'])
        out[name] = {{'mesh': dict(run.mesh.shape), 'params': {{
            jax.tree_util.keystr(path, simple=True, separator='.'): [list(axes), as_list(s.spec)]
            for (path, s), axes in zip(leaves, treedef.flatten_up_to(run.logical_axes))}}}}
      print(json.dumps(out))
  """).splitlines()[-1]
  )
  if os.environ.get('PRETRAX_UPDATE_GOLDEN'):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, 'w', encoding='utf-8') as f:
      f.write(_dump(got))
  with open(GOLDEN, encoding='utf-8') as f:
    want = json.load(f)
  assert list(got) == list(want), 'configs differ from the golden file'
  for name in want:
    assert got[name]['mesh'] == want[name]['mesh'], name
    changed = {
      path: (want[name]['params'].get(path), spec)
      for path, spec in got[name]['params'].items()
      if want[name]['params'].get(path) != spec
    }
    missing = set(want[name]['params']) - set(got[name]['params'])
    assert not changed and not missing, (
      f'{name}: (golden, now) {changed}, gone {sorted(missing)}; if intended, regenerate: '
      'PRETRAX_UPDATE_GOLDEN=1 python -m pytest tests/test_plan.py -k golden'
    )
