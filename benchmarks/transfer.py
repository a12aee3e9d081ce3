"""What pre-training buys a fine-tune, measured on our own runs.

  .venv/bin/python benchmarks/transfer.py [--out=/tmp/pretrax-transfer] [--entities=300]

A pre-training corpus states facts about invented people (benchmarks/transfer_data.py: a city,
an occupation and a favourite colour each, in several phrasings). A small model pre-trains on it,
then fine-tunes on questions about the first half of the people; the test asks about the other
half, whose answers appear nowhere in the fine-tuning data. The same fine-tune from random
initialisation (same steps, data and tokenizer) is the control: it can learn the question format
but cannot know a test person's city. The encoder path does the same with a masked LM and a
classifier of a person's city from the bare name (objective=classification at its defaults, and
with the classifier started random), and prompt-style, with the name in the corpus's phrasing.

Every run is the `pretrax` command a user would type (printed as it goes); the table reads
their metrics.jsonl and `pretrax eval`'s results.json. Prints:
  - the downstream score curve during pre-training (in-loop eval.tasks: cloze questions about the
    test half, scored by log-likelihood),
  - test accuracy of the pre-trained and the random-init fine-tunes against chance.
About 20 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transfer_data  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAX = [sys.executable, '-m', 'pretrax.cli']

# One model shape for every run: init_from needs the fine-tunes to match the pre-trained model.
MODEL = [
  '--config=configs/tiny.py',
  '--config.model.num_layers=4',
  '--config.model.num_heads=4',
  '--config.model.embed_dim=128',
  '--config.data.seq_len=128',
  '--config.peak_flops=1e11',
  '--config.sample.length=0',
]
# 2000 steps of 16 x 128 tokens: every fact seen ~40 times. Longer pre-training is what raises the
# transfer (measured: QA accuracy 0.51 after 600 steps of 32, 0.66 after 2000 of 16).
PRETRAIN = [
  '--config.steps=2000',
  '--config.data.batch_size=16',
  '--config.optim.lr=3e-3',
  '--config.tokenizer.model_type=bpe',
  '--config.tokenizer.vocab_size=1024',
  '--config.data.eval_fraction=0.02',
  '--config.eval_every=250',
  '--config.checkpoint.every=2000',
  '--config.log_every=250',
]
# The masked LM learns facts only with heavier, whole-word masking and a longer warmup (at the
# defaults, 15% of pieces and 5 warmup steps, its loss plateaus with the facts at chance).
ENCODER = [
  '--config.objective=masked_lm',
  '--config.masked_lm.rate=0.4',
  '--config.masked_lm.whole_word=true',
  '--config.optim.warmup_steps=100',
  '--config.steps=3000',
]
# The decoder's fine-tune, short and gentle: it overfits the training questions within ~50
# steps, and at a learning rate of 1e-3 it erases stored facts (test-people cloze 0.97 -> 0.47).
FINETUNE = [
  '--config.data.batch_size=32',
  '--config.optim.lr=3e-4',
  '--config.optim.min_lr=3e-4',
  '--config.optim.schedule=constant',
  '--config.optim.warmup_steps=5',
  '--config.eval_every=25',
  '--config.log_every=25',
]
SFT_STEPS, CLS_STEPS = 75, 100
# (name, steps in units of the fine-tune's, starts from the pre-trained model): the control is
# the same fine-tune from random initialisation, and the same with 4 times the steps, so that a
# random init that has not yet learned the format cannot pass for one that lacks the facts.
RUNS = (('pretrained', 1, True), ('random', 1, False), ('random_4x', 4, False))


def pretrax(*args: str, log: str) -> float:
  """Runs `pretrax ARGS` (its output to `log`); returns its wall time in seconds."""
  print('$ pretrax ' + ' '.join(args), flush=True)
  started = time.perf_counter()
  with open(log, 'w') as f:
    done = subprocess.run(PRETRAX + list(args), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  seconds = time.perf_counter() - started
  if done.returncode:
    with open(log) as f:
      raise SystemExit(f'pretrax {args[0]} failed ({log}):\n' + f.read()[-3000:])
  return seconds


def records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def last(workdir: str, key: str) -> float:
  return [r for r in records(workdir) if key in r][-1][key]


def mc_accuracy(workdir: str, task: str, out: str) -> float:
  """`pretrax eval`'s accuracy of a run's last checkpoint on a multiple-choice file."""
  pretrax('eval', f'--workdir={workdir}', f'--tasks={task}', f'--output={out}', log=out + '.log')
  with open(os.path.join(out, 'results.json')) as f:
    return json.load(f)['results'][os.path.splitext(os.path.basename(task))[0]]['acc']


def finetunes(
  base: str,
  args: list[str],
  steps: int,
  prefix: str,
  seconds: dict[str, float],
  runs: tuple[tuple[str, int, bool], ...] = RUNS,
  model: tuple[str, ...] = tuple(MODEL),
) -> list[tuple[str, str]]:
  """The fine-tunes `runs` (from `base`, or random inits with its tokenizer) of the `model` that
  `base` is, each `args` for its multiple of `steps`; (name, workdir) of each, their wall times
  added to `seconds`."""
  done = []
  for name, multiple, pretrained in runs:
    workdir = f'{prefix}_{name}'
    start = (
      f'--config.init_from={base}'
      if pretrained
      else f'--config.tokenizer.path={base}/tokenizer.model'
    )
    seconds[f'fine-tune {os.path.basename(workdir)}'] = pretrax(
      'train',
      *model,
      *args,
      f'--config.steps={steps * multiple}',
      f'--config.checkpoint.every={steps * multiple}',
      f'--workdir={workdir}',
      start,
      log=workdir + '.log',
    )
    done.append((name, workdir))
  return done


def decoder(data: dict, out: str) -> dict:
  """Pre-train a decoder with the cloze test in the loop; fine-tune it and random inits."""
  p = data['paths']
  base = os.path.join(out, 'decoder')
  seconds = {
    'pretrain': pretrax(
      'train',
      *MODEL,
      *PRETRAIN,
      f'--workdir={base}',
      f'--config.data.path={p["pretrain"]}',
      f'--config.eval.tasks={p["mc_cloze_test"]}',
      '--config.eval.limit=0',
      log=base + '.log',
    )
  }
  sft = [
    '--config.objective=sft',
    f'--config.data.path={p["sft_train"]}',
    f'--config.finetune.eval_path={p["sft_test"]}',
    *FINETUNE,
  ]
  result = {
    'seconds': seconds,
    'curve': [
      (r['step'], r['task_mc_cloze_test_acc'])
      for r in records(base)
      if 'task_mc_cloze_test_acc' in r
    ],
  }
  for name, workdir in finetunes(base, sft, SFT_STEPS, os.path.join(out, 'sft'), seconds):
    result[name] = {
      'exact': last(workdir, 'eval_exact_match'),
      'mc': mc_accuracy(workdir, p['mc_qa_test'], workdir + '_eval'),
    }
  return result


# BERT's recipe, scaled to 150 training examples: a small learning rate for the pre-trained body,
# a warmup, then constant; ~20 epochs (a batch holds every example). Measured over 100 steps with
# the default head: lr 3e-5 0.59, 5e-5 0.60, 1e-4 0.69, 3e-4 0.66 held-out accuracy.
CLASSIFY = [
  '--config.objective=classification',
  '--config.data.batch_size=32',
  '--config.optim.lr=1e-4',
  '--config.optim.min_lr=1e-4',
  '--config.optim.schedule=constant',
  '--config.optim.warmup_steps=10',
  '--config.eval_every=25',
  '--config.log_every=25',
]
# (row, settings, runs of RUNS made for it): the classifier head with pretrax's defaults (the
# masked LM's transform as the pooler, the mean of the name's states, the classifier started from
# the label words' output rows); the same head started random (its random-init controls are the
# first row's: without init_from there is nothing to start the head from); and prompt-style, the
# name in the corpus's phrasing with the head reading the <mask>.
ENCODER_ROWS = (
  ('classifier head on the bare name (defaults)', [], ('pretrained', 'random', 'random_4x')),
  (
    'the same, classifier started random (head_init=random)',
    ['--config.finetune.head_init=random'],
    ('pretrained',),
  ),
  (
    'prompt-style: "NAME lives in <mask>." read at the mask',
    ['--config.finetune.template={text} lives in <mask>.', '--config.finetune.pooling=mask'],
    ('pretrained', 'random', 'random_4x'),
  ),
)


def encoder(
  data: dict,
  out: str,
  model: tuple[str, ...] = tuple(MODEL),
  pretrain: tuple[str, ...] = (*PRETRAIN, *ENCODER),
  rows: tuple = ENCODER_ROWS,
) -> dict:
  """Pre-train a masked LM (`model` settings, then `pretrain`'s); classify test people's cities
  from it and from random inits, a row for each of `rows`."""
  p = data['paths']
  base = os.path.join(out, 'encoder')
  seconds = {
    'pretrain': pretrax(
      'train',
      *model,
      *pretrain,
      f'--workdir={base}',
      f'--config.data.path={p["pretrain"]}',
      log=base + '.log',
    )
  }
  result = {'seconds': seconds, 'fill_in': fill_in_accuracy(base, p['cls_test']), 'rows': []}
  for i, (row, settings, names) in enumerate(rows):
    cls = [
      *CLASSIFY,
      f'--config.data.path={p["cls_train"]}',
      f'--config.finetune.eval_path={p["cls_test"]}',
      *settings,
    ]
    runs = tuple(r for r in RUNS if r[0] in names)
    done = finetunes(base, cls, CLS_STEPS, os.path.join(out, f'cls{i}'), seconds, runs, model)
    result['rows'].append((row, {name: last(workdir, 'eval_accuracy') for name, workdir in done}))
  # A row without its own random inits compares with the first row's.
  for _, accs in result['rows'][1:]:
    for name in ('random', 'random_4x'):
      accs.setdefault(name, result['rows'][0][1][name])
  return result


def fill_in_accuracy(workdir: str, records: str) -> float:
  """The masked LM's own answer, without fine-tuning: the share of the test people whose city
  it puts in 'NAME lives in <mask>.' (the argmax over the cities' pieces)."""
  from flax import nnx
  import jax.numpy as jnp
  import numpy as np

  from pretrax import saved_run
  from pretrax import tokenizer as tokenizer_lib

  model = saved_run.load(workdir)
  encoder = nnx.merge(model.run.model_def, model.params)
  with open(records) as f:
    people = [json.loads(line) for line in f]
  cities = sorted({p['label'] for p in people})
  city_ids = [model.tok.encode(' ' + c)[0] for c in cities]  # One piece each (checked by the data).
  right = 0
  for person in people:
    ids = (
      model.tok.encode(person['text'] + ' lives in')
      + [tokenizer_lib.MASK_ID]
      + model.tok.encode('.')
      + [tokenizer_lib.EOS_ID]
    )
    L = len(ids)
    logits = encoder(jnp.asarray([ids]), jnp.ones((1, L), jnp.int32), jnp.arange(L)[None])
    at_mask = np.asarray(logits[0, ids.index(tokenizer_lib.MASK_ID)])
    right += cities[int(np.argmax(at_mask[city_ids]))] == person['label']
  return right / len(people)


def table(data: dict, dec: dict, enc: dict) -> str:
  chance = data['chance']
  rows = [
    (
      'decoder, QA about test people: exact match (greedy)',
      [dec[n]['exact'] for n, _, _ in RUNS],
      chance['mc_qa_test'],
    ),
    (
      'decoder, QA about test people: multiple choice',
      [dec[n]['mc'] for n, _, _ in RUNS],
      chance['mc_qa_test'],
    ),
  ] + [
    (f'encoder, city of a test person: {row}', [accs[n] for n, _, _ in RUNS], chance['cls'])
    for row, accs in enc['rows']
  ]
  lines = [
    '| fine-tuned, scored on the test half | pre-trained | random init | random init, 4x '
    'steps | chance | pre-trained / chance | pre-trained / random |',
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for name, (pre, rand, rand_long), luck in rows:
    lines.append(
      f'| {name} | {pre:.3f} | {rand:.3f} | {rand_long:.3f} | {luck:.3f} | '
      f'{pre / luck:.1f}x | {pre / max(rand, 1e-9):.1f}x |'
    )
  fill_in = enc['fill_in']
  lines.append(
    '| encoder, no fine-tune: its masked LM fills in "NAME lives in <mask>." | '
    f'{fill_in:.3f} | | | {chance["cls"]:.3f} | {fill_in / chance["cls"]:.1f}x | |'
  )
  lines += [
    '',
    'Cloze accuracy on the test people during decoder pre-training (in-loop '
    f'eval.tasks, chance {chance["mc_cloze"]:.3f}):',
    '',
    '| step | ' + ' | '.join(str(s) for s, _ in dec['curve']) + ' |',
    '| --- |' + ' ---: |' * len(dec['curve']),
    '| accuracy | ' + ' | '.join(f'{a:.3f}' for _, a in dec['curve']) + ' |',
    '',
  ]
  for name, part in (('decoder', dec), ('encoder', enc)):
    lines.append(
      f'{name} wall time: ' + ', '.join(f'{k} {v:.0f} s' for k, v in part['seconds'].items())
    )
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/pretrax-transfer', help='Runs and data go here.')
  parser.add_argument('--entities', type=int, default=300)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  shutil.rmtree(args.out, ignore_errors=True)
  os.makedirs(args.out)
  started = time.perf_counter()
  data = transfer_data.write(os.path.join(args.out, 'data'), entities=args.entities, seed=args.seed)
  dec = decoder(data, args.out)
  enc = encoder(data, args.out)
  print()
  print(table(data, dec, enc))
  print(f'\ntotal {(time.perf_counter() - started) / 60:.1f} minutes')


if __name__ == '__main__':
  main()
