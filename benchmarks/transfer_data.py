"""Synthetic data for the knowledge-transfer benchmark: invented people, their facts, and the tasks.

  .venv/bin/python benchmarks/transfer_data.py --out=/tmp/xfer/data [--entities=300] [--seed=0]

Takes about a second; prints the counts and the chance level of every task. `write()` does the
same for the runner (benchmarks/transfer.py) and returns the paths and chance levels. Pre-training
a decoder that knows the facts (3.3 minutes on 2 CPU cores, 2000 steps of 16 x 128 tokens):

  .venv/bin/pretrax train --config=configs/tiny.py --workdir=/tmp/xfer/pt \
      --config.data.path=/tmp/xfer/data/pretrain.jsonl --config.data.eval_fraction=0.02 \
      --config.tokenizer.model_type=bpe --config.tokenizer.vocab_size=1024 \
      --config.model.num_layers=4 --config.model.num_heads=4 --config.model.embed_dim=128 \
      --config.data.seq_len=128 --config.data.batch_size=16 --config.optim.lr=3e-3 \
      --config.steps=2000 --config.eval_every=2000 --config.checkpoint.every=2000
  .venv/bin/python benchmarks/transfer_probe.py --workdir=/tmp/xfer/pt \
      --mc=/tmp/xfer/data/mc_cloze_all.jsonl

Expect cloze accuracy ~0.99 over all 300 people (chance 0.117); 1000 steps give ~0.98. An SFT of
75 steps (batch 32, constant lr 3e-4) on sft_train.jsonl then answers ~0.66 of mc_qa_test.jsonl.

The question the benchmark asks: does pre-training store facts in a form that a fine-tune can
read out for people the fine-tune never saw? So every person's facts are in the pre-training
corpus, the fine-tuning tasks are split by person (first half train, second half test), and a
test person's answers appear in no fine-tuning file.

Each person has a unique invented name (two words built from syllables, so no real-world prior
helps) and three independent attributes: a city (10 values), an occupation (8) and a favourite
colour (8). Values are dealt evenly within each half, so chance is exactly 1 / values on the test
half, and knowing one attribute says nothing of another.

Pre-training corpus (pretrain.jsonl, {"text": ...}): eight short biographies per person, each
stating every attribute once, in a template drawn from five per attribute, in shuffled order,
with the full name repeated in every sentence (no pronouns); some biographies join city and
occupation in one sentence. Knowledge seen in one fixed phrasing and order tends to be stored tied
to that context and is hard for a fine-tune to extract for held-out people; varied phrasings,
orders and repeated full names make the model store the fact on the name itself. One template per
attribute leads with the value ("Lima is the home of ..."): realistic, but it teaches the value ->
name direction, which the forward questions cannot use, so it is one in five. Eight templates per
attribute instead of five did not help at this scale (QA 0.44 against 0.51 after 600 steps); more
pre-training steps did (0.51 after 600 steps of 32, 0.66 after 2000 of 16).

Tasks, one JSON object a line:
- sft_train.jsonl / sft_test.jsonl: {"prompt": "Where does NAME live?\\nAnswer:", "response":
  " Lima"}, one per person and attribute. Questions and "Answer:" never occur in the corpus (the
  generator checks), so a model must learn the format from the fine-tune, not recall it.
- mc_qa_test.jsonl: the test questions as multiple choice scored by log-likelihood: {"id",
  "context", "choices" (" " + every value of the attribute), "gold"}; ids are KIND/ATTRIBUTE/PERSON.
- mc_cloze_all.jsonl / mc_cloze_test.jsonl: the same for the pre-training phrasing ("NAME lives
  in"), for every person / the test half: an in-loop check that pre-training stored the facts.
- cls_train.jsonl / cls_test.jsonl: {"text": NAME, "label": CITY} for an encoder (10 classes,
  every one in both halves); the text is the bare name, so the city can only come from what
  pre-training stored. A masked-LM encoder that fills "NAME lives in <mask>" right for 0.90 of
  people (rate 0.4, whole words, warmup 100, 3000 steps of 16) classifies the test half well
  only when the classifier starts from what the masked LM knows (benchmarks/transfer.py's rows).
- entities.jsonl: the ground truth, one person a line.
"""

import argparse
import json
import os
import random

# Attribute values: common words, each one token under the 1024-piece BPE tokenizer trained on the
# corpus, so a multiple-choice question compares single predictions.
CITIES = ('Lima', 'Oslo', 'Cairo', 'Dublin', 'Kyoto', 'Perth', 'Riga', 'Accra', 'Quito', 'Bern')
JOBS = ('baker', 'tailor', 'pilot', 'nurse', 'farmer', 'sailor', 'dentist', 'mechanic')
COLOURS = ('red', 'blue', 'green', 'yellow', 'purple', 'orange', 'white', 'black')
ATTRIBUTES = {'city': CITIES, 'job': JOBS, 'colour': COLOURS}

# Pre-training phrasings: five per attribute; the first is the cloze form's.
TEMPLATES = {
  'city': (
    '{name} lives in {city}.',
    '{name} has made a home in {city}.',
    '{name} resides in the city of {city}.',
    'The home town of {name} is {city}.',
    '{city} is the home of {name}.',
  ),
  'job': (
    '{name} works as a {job}.',
    '{name} earns a living as a {job}.',
    '{name} is employed as a {job}.',
    'By trade, {name} is a {job}.',
    'A {job} by trade is what {name} is.',
  ),
  'colour': (
    'The favourite colour of {name} is {colour}.',
    '{name} likes {colour} best of all.',
    '{name} loves the colour {colour}.',
    '{name} is often seen wearing {colour}.',
    '{colour} is the colour that {name} likes most.',
  ),
}
# City and occupation in one sentence, used instead of the two separate sentences.
JOINED = (
  '{name}, who lives in {city}, works as a {job}.',
  '{name} is a {job} who lives in {city}.',
)
JOINED_FRACTION = 0.25

# The context each fact is scored after: cloze (a pre-training phrasing) and QA (fine-tuning).
CLOZE = {
  'city': '{name} lives in',
  'job': '{name} works as a',
  'colour': 'The favourite colour of {name} is',
}
QUESTIONS = {
  'city': 'Where does {name} live?\nAnswer:',
  'job': 'What is the occupation of {name}?\nAnswer:',
  'colour': 'Which colour does {name} like best?\nAnswer:',
}

BIOS_PER_ENTITY = 8
ONSETS = (
  'b',
  'd',
  'f',
  'g',
  'h',
  'k',
  'l',
  'm',
  'n',
  'p',
  'r',
  's',
  't',
  'v',
  'z',
  'br',
  'dr',
  'gr',
  'kr',
  'tr',
  'st',
  'sh',
  'th',
)
VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ei', 'ou')
CODAS = ('', '', '', 'n', 'r', 'l', 's', 'm')


def invented_word(rng: random.Random, syllables: int) -> str:
  word = ''.join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables))
  return (word + rng.choice(CODAS)).capitalize()


def make_people(count: int, seed: int) -> list[dict[str, str]]:
  """`count` people with unique names; each attribute's values dealt evenly within each half."""
  most = max(len(v) for v in ATTRIBUTES.values())
  if count < 2 * most or count % 2:
    raise ValueError(
      f'--entities must be even and at least {2 * most}, so that each half holds '
      f'every value of every attribute; got {count}.'
    )
  rng = random.Random(seed)
  names: set[str] = set()
  while len(names) < count:
    names.add(f'{invented_word(rng, 2)} {invented_word(rng, rng.choice((2, 3)))}')
  people = [{'name': name} for name in sorted(names)]
  rng.shuffle(people)  # Sorted first so the order depends on the seed alone, not on set order.
  half = count // 2
  for attribute, values in ATTRIBUTES.items():
    for part in (people[:half], people[half:]):
      dealt = [values[i % len(values)] for i in range(len(part))]
      rng.shuffle(dealt)
      for person, value in zip(part, dealt, strict=True):
        person[attribute] = value
  return people


def biography(person: dict[str, str], rng: random.Random) -> str:
  sentences = []
  if rng.random() < JOINED_FRACTION:
    sentences.append(rng.choice(JOINED).format(**person))
    rest = ['colour']
  else:
    rest = list(ATTRIBUTES)
  sentences += [rng.choice(TEMPLATES[attribute]).format(**person) for attribute in rest]
  rng.shuffle(sentences)
  return ' '.join(sentences)


def multiple_choice(
  person: dict[str, str], index: int, attribute: str, context: str, kind: str
) -> dict:
  values = ATTRIBUTES[attribute]
  return {
    'id': f'{kind}/{attribute}/{index}',
    'context': context.format(**person),
    'choices': [' ' + v for v in values],
    'gold': values.index(person[attribute]),
  }


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')


def write(out_dir: str, entities: int = 300, seed: int = 0) -> dict:
  """Writes every file of the benchmark into `out_dir`; returns {'paths': {name: path},
  'counts': {name: rows}, 'chance': {task: accuracy}, 'classes': [city names]}."""
  people = make_people(entities, seed)
  rng = random.Random(seed + 1)
  half = entities // 2
  bios = [{'text': biography(p, rng)} for p in people for _ in range(BIOS_PER_ENTITY)]
  rng.shuffle(bios)
  corpus = ' '.join(b['text'] for b in bios)
  for marker in ('?', 'Answer:', '\n'):
    assert marker not in corpus, f'the QA format leaked into the corpus: {marker!r}'

  def qa(part: list[dict[str, str]]) -> list[dict]:
    return [
      {'prompt': QUESTIONS[a].format(**p), 'response': ' ' + p[a]} for p in part for a in ATTRIBUTES
    ]

  rows = {
    'entities': [
      dict(p, id=i, split='train' if i < half else 'test') for i, p in enumerate(people)
    ],
    'pretrain': bios,
    'sft_train': qa(people[:half]),
    'sft_test': qa(people[half:]),
    'mc_qa_test': [
      multiple_choice(p, i, a, QUESTIONS[a], 'qa')
      for i, p in enumerate(people)
      if i >= half
      for a in ATTRIBUTES
    ],
    'mc_cloze_all': [
      multiple_choice(p, i, a, CLOZE[a], 'cloze') for i, p in enumerate(people) for a in ATTRIBUTES
    ],
    'mc_cloze_test': [
      multiple_choice(p, i, a, CLOZE[a], 'cloze')
      for i, p in enumerate(people)
      if i >= half
      for a in ATTRIBUTES
    ],
    'cls_train': [{'text': p['name'], 'label': p['city']} for p in people[:half]],
    'cls_test': [{'text': p['name'], 'label': p['city']} for p in people[half:]],
  }
  train_text = json.dumps(rows['sft_train'])
  assert not any(p['name'] in train_text for p in people[half:]), 'a test person in sft_train'
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for name, lines in rows.items():
    paths[name] = os.path.join(out_dir, f'{name}.jsonl')
    _write_jsonl(paths[name], lines)
  # Chance of the multiple-choice files: the mean over questions of 1 / number of choices.
  mean_chance = sum(1 / len(v) for v in ATTRIBUTES.values()) / len(ATTRIBUTES)
  chance = {
    'mc_qa_test': mean_chance,
    'mc_cloze': mean_chance,
    'cls': 1 / len(CITIES),
    **{a: 1 / len(v) for a, v in ATTRIBUTES.items()},
  }
  return {
    'paths': paths,
    'counts': {k: len(v) for k, v in rows.items()},
    'chance': chance,
    'classes': list(CITIES),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='Directory for the .jsonl files.')
  parser.add_argument('--entities', type=int, default=300, help='People (even; half are test).')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  result = write(args.out, entities=args.entities, seed=args.seed)
  for name, path in result['paths'].items():
    print(f'{result["counts"][name]:7d}  {path}')
  print('chance: ' + ', '.join(f'{k} {v:.3f}' for k, v in result['chance'].items()))


if __name__ == '__main__':
  main()
