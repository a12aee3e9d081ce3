"""Fine-tuning: records -> example store -> packed batches; init_from; sft and classification."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, built_once, load_config, require, run_cli
from pretrax import checkpoint, run_config, saved_run
from pretrax import config as config_lib
from pretrax import sample as sample_lib
from pretrax import state as state_lib
from pretrax import step as step_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import RunConfig
from pretrax.data import examples, sources
from pretrax.data import records as records_lib
from pretrax.data.batch import Batch

CITIES = ['rome', 'oslo', 'lima', 'kiev', 'bern', 'doha']


def _write_jsonl(path, records) -> str:
  with open(path, 'w') as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + '\n')
  return str(path)


@pytest.fixture(scope='session')
def records(tmp_path_factory) -> dict[str, str]:
  """Copy-the-city sft records, city-word classification records, a char tokenizer for both."""

  def build(out):
    rng = np.random.default_rng(0)
    cities = rng.choice(CITIES, 600)
    _write_jsonl(
      out / 'qa.jsonl',
      [{'prompt': f'{i} lives in {c}. city?\n', 'response': str(c)} for i, c in enumerate(cities)],
    )
    verbs = rng.choice(['love', 'like', 'miss'], 600)
    _write_jsonl(
      out / 'cls.jsonl',
      [
        {'text': f'we {v} {c} ({i})', 'label': str(c)}
        for i, (c, v) in enumerate(zip(cities, verbs, strict=True))
      ],
    )
    text = ' '.join(CITIES) + ' 0123456789 lives in city? we love like miss ().\n' * 20
    proto = tokenizer_lib.train([text], model_type='char', vocab_size=400)
    (out / 'char.model').write_bytes(proto)

  root = built_once(tmp_path_factory, 'finetune_records', build)
  return {
    name: os.path.join(root, f)
    for name, f in [('qa', 'qa.jsonl'), ('cls', 'cls.jsonl'), ('tokenizer', 'char.model')]
  }


def _config(objective: str, path: str, tokenizer: str, **finetune) -> ml_collections.ConfigDict:
  c = load_config('tiny')
  c.objective = objective
  c.data.path, c.data.fallback = path, ''
  c.tokenizer.path = tokenizer
  for k, v in finetune.items():
    c.finetune[k] = v
  return c


def _built(c: ml_collections.ConfigDict) -> RunConfig:
  return run_config.build(c, check_data=False)


def _store(c, tmp_path) -> tuple[tokenizer_lib.Tokenizer, dict, str]:
  out = str(tmp_path / 'store')
  tok = examples.build(_built(c), out, process_index=0, has_checkpoints=False, log=lambda _: None)
  with open(os.path.join(out, 'manifest.json')) as f:
    return tok, json.load(f), out


# ---- Records, the store, the batches -----------------------------------------------------------


def test_sft_loss_is_on_the_response_and_its_eos_only(tmp_path, records):
  path = _write_jsonl(tmp_path / 'r.jsonl', [{'prompt': 'Q: 12?\nA:', 'response': ' 12'}])
  c = _config('sft', path, records['tokenizer'])
  c.data.eval_fraction = 0.5
  tok, manifest, out = _store(c, tmp_path)
  split = 'train' if manifest['splits']['train']['examples'] else 'eval'
  s = examples.ExampleSplit(out, split, manifest, 'sft')
  ids, weights = s.ids(0), s.loss_weights(0)
  assert tok.decode(ids[:-1]) == 'Q: 12?\nA: 12' and ids[-1] == tokenizer_lib.EOS_ID
  assert tok.decode(ids[weights > 0]) == ' 12'  # The decode drops the trailing EOS.
  assert weights[-1] == 1 and weights[: len(tok.encode('Q: 12?\nA:'))].sum() == 0

  rows = examples.build_rows(s, [[0, 0]], seq_len=32)  # The example twice, packed in one row.
  n = len(ids) - 1
  assert rows.labels is None and rows.weights is not None
  np.testing.assert_array_equal(rows.inputs[0, :n], ids[:-1])
  np.testing.assert_array_equal(rows.targets[0, :n], ids[1:])
  np.testing.assert_array_equal(rows.weights[0, :n], weights[1:])
  np.testing.assert_array_equal(rows.segment_ids[0, : 2 * n], [1] * n + [2] * n)
  np.testing.assert_array_equal(rows.positions[0, n : 2 * n], np.arange(n))
  assert rows.weights[0, 2 * n :].sum() == 0


def test_chat_records_train_on_the_assistant_turns(tmp_path, records):
  chat = {
    'messages': [
      {'role': 'system', 'content': 'be brief'},
      {'role': 'user', 'content': 'hi'},
      {'role': 'assistant', 'content': 'yo'},
      {'role': 'user', 'content': 'bye'},
      {'role': 'assistant', 'content': 'ok'},
    ]
  }
  c = _config('sft', _write_jsonl(tmp_path / 'chat.jsonl', [chat]), records['tokenizer'])
  tok = tokenizer_lib.Tokenizer.load(records['tokenizer'])
  parts = records_lib.sft_parts(chat, records_lib.Fields.from_config(_built(c)))
  ids, weights = records_lib.encode_sft(parts, tok)
  assert tok.decode(ids) == (
    'system: be brief\nuser: hi\nassistant: yo\nuser: bye\nassistant: ok\n'
  )
  assert tok.decode(ids[weights > 0]) == 'yo\nok\n' and weights[-1] == 1  # And the final EOS.


@pytest.mark.parametrize(
  'objective,line,reason',
  [
    ('sft', {'prompt': 'a'}, "no 'response' field"),
    ('sft', {'prompt': 'a', 'response': ''}, "empty 'response'"),
    ('sft', '{"prompt": "a", "response": ', 'malformed JSON'),
    ('sft', {'messages': [{'role': 'user', 'content': 'hi'}]}, 'no assistant message'),
    ('classification', {'text': 'a', 'label': 'maybe'}, "label 'maybe' is not in"),
    ('classification', {'label': 'yes'}, "no 'text' field"),
  ],
  ids=['no_response', 'empty_response', 'bad_json', 'no_assistant', 'unknown_label', 'no_text'],
)
def test_a_bad_record_is_named_or_skipped_and_counted(tmp_path, records, objective, line, reason):
  good = {'prompt': 'x', 'response': 'y'} if objective == 'sft' else {'text': 'x', 'label': 'yes'}
  path = _write_jsonl(tmp_path / 'r.jsonl', [good, good, line, good])
  c = _config(objective, path, records['tokenizer'], labels='yes,no')
  with pytest.raises(sources.DataError, match=f'{path}:3: {reason}'):
    _store(c, tmp_path)
  c.data.skip_bad_records = True
  _, manifest, _ = _store(c, tmp_path / 'skipping')
  assert manifest['skipped'] == 1
  assert sum(s['examples'] for s in manifest['splits'].values()) == 3


def test_training_rows_pack_whole_examples_and_depend_on_seed_and_step_only(tmp_path, records):
  c = _config('sft', records['qa'], records['tokenizer'])
  _, manifest, out = _store(c, tmp_path)
  split = examples.ExampleSplit(out, 'train', manifest, 'sft')
  rows = examples.packing(split, 32, seed=0)
  seen = np.sort(np.concatenate([rows.row(r) for r in range(len(rows))]))
  np.testing.assert_array_equal(seen, np.arange(len(split)))  # Each example once.
  for r in range(len(rows)):
    assert sum(int(examples.packed_length('sft', len(split.ids(i)), 32)) for i in rows.row(r)) <= 32

  def batches(start):
    it = examples.train_batches(
      split,
      examples.packing(split, 32, seed=0),
      seq_len=32,
      global_batch=8,
      seed=0,
      start_step=start,
    )
    return [next(it) for _ in range(2)]

  again = batches(3)  # Built from scratch twice: the step alone makes the batch.
  for field, v, w in zip(Batch._fields, batches(3)[0], again[0], strict=True):
    np.testing.assert_array_equal(v, w, err_msg=field)
  assert not np.array_equal(batches(0)[0].inputs, again[0].inputs)


def test_exact_match_counts_segments_whose_every_target_is_the_argmax():
  # Two rows over a 3-token vocabulary; the logits' argmax is the token id given per position.
  argmax = np.array([[1, 2, 0, 1], [2, 2, 2, 0]])
  targets = np.array([[1, 2, 0, 2], [2, 1, 2, 0]])
  segment_ids = jnp.asarray([[1, 1, 2, 3], [1, 1, 2, 0]])
  batch = Batch(
    inputs=jnp.zeros_like(segment_ids),
    segment_ids=segment_ids,
    positions=jnp.zeros_like(segment_ids),
    targets=jnp.asarray(targets),
    weights=jnp.asarray([[1, 1, 0, 1], [1, 1, 1, 0]], jnp.float32),
  )
  logits = jax.nn.one_hot(argmax, 3) * 5.0
  sums = jax.device_get(step_lib._exact_sums(logits, batch))
  # Row 0: segment 1 right, segment 2 has no weight, segment 3 wrong. Row 1: segment 1 wrong
  # (its second token), segment 2 right; the padding is not an answer.
  assert (int(sums['answer_sum']), int(sums['exact_sum'])) == (4, 2)


# ---- init_from ---------------------------------------------------------------------------------


def _saved_run(c, tok, workdir: str, seed: int = 3):
  """A step-5 checkpoint of `c`'s model with random parameters (as `train` leaves it; a masked
  LM's output bias random too, where training would have moved it from zeros)."""
  c = _built(c)
  run = state_lib.build(c, tok.vocab_size)
  state = run.init(seed)
  if 'mlm_bias' in state['params']:
    bias = state['params']['mlm_bias']
    state['params']['mlm_bias'] = jax.random.normal(jax.random.key(seed), bias.shape, bias.dtype)
  state['step'] = jnp.asarray(5, state['step'].dtype)
  mngr = checkpoint.manager(workdir, async_save=False)
  checkpoint.save(mngr, 5, state, run_config.to_dict(c))
  checkpoint.wait(mngr)
  mngr.close()
  tok.save(os.path.join(workdir, 'tokenizer.model'))
  return state['params']


def _flat(params) -> dict[str, np.ndarray]:
  return {
    state_lib.param_path(k): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def test_init_from_takes_the_parameters_adds_a_fresh_head_and_names_mismatches(tmp_path, records):
  tok = tokenizer_lib.Tokenizer.load(records['tokenizer'])
  base = _config('masked_lm', records['cls'], '')
  source = _flat(_saved_run(base, tok, str(tmp_path / 'mlm')))

  c = _config('classification', records['cls'], '')
  c.init_from = str(tmp_path / 'mlm') + ':4'
  run = state_lib.build(_built(c), tok.vocab_size, num_classes=6)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint at step 4 .* it has steps \[5\]'):
    saved_run.initial_params(_built(c), run, print)
  c.init_from = str(tmp_path / 'mlm') + ':5'
  said = []
  params = _flat(saved_run.initial_params(_built(c), run, said.append))
  # The masked LM's head stays (its transform is the classifier's pooler); the classifier is new.
  for name in set(params) - {'classifier', 'classifier_bias'}:
    np.testing.assert_array_equal(params[name], source[name], err_msg=name)
  assert 'pooler' not in params and 'mlm_dense' in params
  assert said[-1].endswith('new (random) parameters: classifier, classifier_bias')
  # Label words: the classifier starts as the masked LM's output rows and bias of the pieces.
  pieces = [7, 11, 13, 5, 9, 20]
  params = _flat(saved_run.initial_params(_built(c), run, said.append, pieces))
  rows = source['head'][:, pieces] if 'head' in source else source['embed/embedding'][pieces].T
  np.testing.assert_array_equal(params['classifier'], rows)
  np.testing.assert_array_equal(params['classifier_bias'], source['mlm_bias'][pieces])
  assert 'output rows' in said[-2] and 'new (random)' not in said[-1]
  # BERT's pooler instead: new (dense + tanh), with a random classifier and the MLM head left out.
  c.finetune.head = 'tanh'
  tanh = state_lib.build(_built(c), tok.vocab_size, num_classes=6)
  params = _flat(saved_run.initial_params(_built(c), tanh, said.append, pieces))
  assert {'pooler', 'pooler_bias'} <= set(params) and 'mlm_dense' not in params
  assert 'starts random' in said[-2] and 'left out: mlm_bias, mlm_dense' in said[-1]
  c.finetune.head = 'mlm'

  c.model.embed_dim = 32
  wider = state_lib.build(_built(c), tok.vocab_size, num_classes=6)
  with pytest.raises(
    config_lib.ConfigError,
    match=r'22 parameters differ: blocks/0/attn/k is '
    r'\(32, 2, 16\) here and \(64, 2, 32\) there',
  ):
    saved_run.initial_params(_built(c), wider, said.append)
  # A Mixture-of-Experts model from a dense one: the message names the field, not only shapes.
  c.model.embed_dim = 64
  c.model.moe.num_experts = 4
  experts = state_lib.build(_built(c), tok.vocab_size, num_classes=6)
  with pytest.raises(config_lib.ConfigError, match=r'model.moe.num_experts differs'):
    saved_run.initial_params(_built(c), experts, said.append)


def test_init_from_a_hugging_face_directory(tmp_path, records):
  from pretrax.interop import hf_export

  tok = tokenizer_lib.Tokenizer.load(records['tokenizer'])
  c = _config('causal_lm', records['qa'], '')
  source = _flat(_saved_run(c, tok, str(tmp_path / 'run')))
  hf_export.export(str(tmp_path / 'run'), str(tmp_path / 'hf'), log=lambda _: None)
  c.objective, c.init_from = 'sft', str(tmp_path / 'hf')
  assert saved_run.source_tokenizer(c.init_from) == str(tmp_path / 'hf' / 'tokenizer.model')
  said = []
  run = state_lib.build(_built(c), tok.vocab_size)
  params = _flat(saved_run.initial_params(_built(c), run, said.append))
  assert set(params) == set(source) and 'Hugging Face' in said[0]
  for name, value in source.items():
    np.testing.assert_array_equal(params[name], value, err_msg=name)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    saved_run.source_tokenizer(str(tmp_path / 'nowhere'))


# ---- End to end, as a user runs it -------------------------------------------------------------


def test_sft_from_a_checkpoint_learns_the_answers_resumes_and_exports(tmp_path, records):
  tok = tokenizer_lib.Tokenizer.load(records['tokenizer'])
  base = str(tmp_path / 'base')
  source = _flat(_saved_run(_config('causal_lm', records['qa'], ''), tok, base))
  workdir = str(tmp_path / 'sft')
  args = [
    'train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    '--config.objective=sft',
    f'--config.data.path={records["qa"]}',
    f'--config.init_from={base}',
    '--config.eval_every=150',
    '--config.checkpoint.every=150',
    PEAK_FLOPS_ARG,
  ]
  done = run_cli(*args, '--config.steps=150')
  assert done.returncode == 0, done.stderr[-2000:]
  assert f'initialised from {base} at step 5' in done.stdout
  evals = [
    json.loads(line)
    for line in open(os.path.join(workdir, 'metrics.jsonl'))
    if 'eval_exact_match' in line
  ]
  assert evals[-1]['eval_exact_match'] > 0.9, evals

  # Greedy generation agrees with the exact-match metric: it answers held-out prompts right.
  model = saved_run.load(workdir)
  right = 0
  for line in open(records['qa']).readlines()[:10]:
    record = json.loads(line)
    text = sample_lib.generate(
      model.run.model_def,
      model.params,
      model.tok,
      record['prompt'],
      length=len(record['response']),
      seq_len=32,
      temperature=0.0,
    )
    right += text == record['prompt'] + record['response']
  assert right >= 8, right

  # Fine-tuning moved the parameters; resuming continues the fine-tune, not the base.
  moved = _flat(model.params)
  assert not np.allclose(moved['embed/embedding'], source['embed/embedding'])
  more = run_cli(*args, '--config.steps=160')
  assert more.returncode == 0 and 'resumed from' in more.stdout and 'initialised' not in more.stdout

  # A fine-tuned decoder exports like any causal LM.
  transformers = require('transformers')
  torch = require('torch')
  out = str(tmp_path / 'hf')
  exported = run_cli('export', f'--workdir={workdir}', f'--out={out}')
  assert exported.returncode == 0, exported.stderr[-2000:]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids = tok.encode('7 lives in oslo. city?\n')
  with torch.no_grad():
    theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
  model = saved_run.load(workdir)
  from flax import nnx

  ours = np.asarray(
    nnx.merge(model.run.model_def, model.params)(
      jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32), jnp.arange(len(ids))[None]
    )
  )[0]
  assert np.abs(ours - theirs).max() < 1e-4


def test_classification_on_an_encoder_reaches_high_held_out_accuracy(tmp_path, records):
  tok = tokenizer_lib.Tokenizer.load(records['tokenizer'])
  base = str(tmp_path / 'mlm')
  _saved_run(_config('masked_lm', records['cls'], ''), tok, base)
  workdir = str(tmp_path / 'cls')
  done = run_cli(
    'train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    '--config.objective=classification',
    f'--config.data.path={records["cls"]}',
    f'--config.init_from={base}',
    '--config.steps=200',
    '--config.eval_every=200',
    '--config.optim.lr=3e-3',
    PEAK_FLOPS_ARG,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  assert "labels ['bern', 'doha', 'kiev', 'lima', 'oslo', 'rome']" in done.stdout
  final = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))][-1]
  assert final['eval_accuracy'] > 0.9 and final['eval_baseline_accuracy'] < 0.3, final
  assert saved_run.load(workdir).run.model_cfg.num_classes == 6

  bad = run_cli(
    'train',
    '--config=configs/tiny.py',
    f'--workdir={tmp_path / "bad"}',
    '--config.objective=classification',
    f'--config.data.path={records["cls"]}',
    '--config.finetune.labels=rome,oslo',
    f'--config.tokenizer.path={records["tokenizer"]}',
  )
  assert bad.returncode == 2
  assert f'{records["cls"]}:1: label' in bad.stderr and 'is not in finetune.labels' in bad.stderr
