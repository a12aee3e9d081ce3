"""Fine-tuning records: JSON lines -> token ids, loss weights and labels.

  sft             {"prompt": P, "response": R}: the model reads P then R then EOS, and the loss is
                  on R and the EOS (so it learns to stop). Or a chat:
                  {"messages": [{"role": "system" | "user" | "assistant", "content": C}, ...]},
                  laid out by this template, one line per message:
                      ROLE: CONTENT\n            (e.g. "user: Hi\nassistant: Hello!\n")
                  then EOS; the loss is on each assistant CONTENT with its newline, and on the EOS
                  when the chat ends with the assistant.
  classification  {"text": T, "label": L}: an encoder reads T and EOS; a pooled head predicts L.
                  With a second text (finetune.text_pair_field), T EOS P EOS. With a template
                  (finetune.template, '{text} lives in <mask>.'), the template's text with T
                  (and P) in place and the mask token for each '<mask>', then EOS.

The field names are settings (finetune.prompt_field, ..., data.text_field). A record without its
fields, with an empty response, or with a label outside `finetune.labels` raises BadRecord, which
the store (examples.py) turns into one line naming the file and line, or skips and counts.
"""

import dataclasses
import json

import numpy as np

from pretrax import tokenizer as tokenizer_lib
from pretrax.config_types import RunConfig

ROLES = ('system', 'user', 'assistant')


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where an objective finds its parts in a record."""

  objective: str  # sft | classification
  prompt: str = 'prompt'
  response: str = 'response'
  messages: str = 'messages'
  text: str = 'text'
  label: str = 'label'
  labels: tuple[str, ...] = ()  # The label set; () = the training records' distinct labels.
  text_pair: str = ''  # The second text's field; '': one text per record.
  template: str = ''  # The layout, '{text}' and '{text_pair}' in place; '': the text(s) alone.

  @classmethod
  def from_config(cls, c: RunConfig) -> 'Fields':
    f = c.finetune
    labels = tuple(x.strip() for x in f.labels.split(',') if x.strip())
    return cls(
      objective=c.objective,
      prompt=f.prompt_field,
      response=f.response_field,
      messages=f.messages_field,
      text=c.data.text_field,
      label=f.label_field,
      labels=labels,
      text_pair=f.text_pair_field,
      template=f.template,
    )


class BadRecord(Exception):
  """A record this objective cannot use; the message says why."""


def _string(record: dict, field: str, what: str) -> str:
  if field not in record:
    raise BadRecord(
      f'no {field!r} field ({what}; set finetune.*_field or data.text_field to the '
      'field that holds it)'
    )
  value = record[field]
  if not isinstance(value, str):
    raise BadRecord(f'{field!r} is {type(value).__name__}, not a string')
  return value


def texts_of(record: dict, f: Fields) -> list[str]:
  """A classification record's text, and its second text when the records have pairs."""
  texts = [_string(record, f.text, 'the text')]
  if f.text_pair:
    texts.append(_string(record, f.text_pair, 'the second text of a pair'))
  return texts


def encode_texts(texts: list[str], f: Fields, tok: tokenizer_lib.Tokenizer) -> list[int]:
  """A classification example's ids: the text(s), each ending in EOS, or the template's layout."""
  eos = tokenizer_lib.EOS_ID
  if not f.template:
    return [i for text in texts for i in tok.encode(text) + [eos]]
  laid_out = f.template.replace('{text}', texts[0])
  if f.text_pair:
    laid_out = laid_out.replace('{text_pair}', texts[1])
  # The mask token is no text the tokenizer reads: the parts between masks are encoded alone.
  parts = [tok.encode(part) if part else [] for part in laid_out.split('<mask>')]
  ids = parts[0]
  for part in parts[1:]:
    ids = ids + [tokenizer_lib.MASK_ID] + part
  return ids + [eos]


def chat_parts(messages, where_field: str) -> list[tuple[str, bool]]:
  """(text, trained on) pieces of a chat by the template in the module docstring."""
  if not isinstance(messages, list) or not messages:
    raise BadRecord(f'{where_field!r} is not a non-empty list of messages')
  parts = []
  for i, m in enumerate(messages):
    content = m.get('content') if isinstance(m, dict) else None
    if not isinstance(content, str) or m.get('role') not in ROLES:
      raise BadRecord(
        f'message {i} is not {{"role": one of {", ".join(ROLES)}, "content": a string}}'
      )
    assistant = m['role'] == 'assistant'
    parts += [(f'{m["role"]}: ', False), (m['content'] + '\n', assistant)]
  if not any(trained and text.strip() for text, trained in parts):
    raise BadRecord('no assistant message with content: nothing to learn')
  return parts


def sft_parts(record: dict, f: Fields) -> list[tuple[str, bool]]:
  """(text, trained on) pieces of an sft record, in order; EOS follows them."""
  if f.messages in record and f.prompt not in record:
    return chat_parts(record[f.messages], f.messages)
  prompt = _string(record, f.prompt, 'the prompt')
  response = _string(record, f.response, 'the response')
  if not response:
    raise BadRecord(f'empty {f.response!r}: nothing to learn')
  return [(prompt, False), (response, True)]


def encode_sft(
  parts: list[tuple[str, bool]], tok: tokenizer_lib.Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
  """(ids, weights): each part encoded on its own, then EOS, weighted as its part (the EOS as the
  last part). Encoding parts apart keeps the prompt's ids the same whatever the response is."""
  ids, weights = [], []
  for text, trained in parts:
    encoded = tok.encode(text)  # A few short strings: a thread pool per record would cost more.
    ids += encoded
    weights += [trained] * len(encoded)
  ids.append(tokenizer_lib.EOS_ID)
  weights.append(parts[-1][1])
  return np.asarray(ids), np.asarray(weights, np.uint8)


def parse(line: bytes) -> dict:
  try:
    record = json.loads(line)
  except UnicodeDecodeError as e:
    raise BadRecord(f'not UTF-8 ({e.reason})') from None
  except ValueError as e:
    raise BadRecord(f'malformed JSON ({e})') from None
  if not isinstance(record, dict):
    raise BadRecord(f'a JSON {type(record).__name__}, not an object')
  return record


def label_of(record: dict, f: Fields) -> str:
  """The record's label as a string (JSON numbers and booleans too: 1 and "1" are one label)."""
  if f.label not in record:
    raise BadRecord(
      f'no {f.label!r} field (set finetune.label_field to the field that holds the label)'
    )
  value = record[f.label]
  if isinstance(value, bool):
    value = str(value).lower()
  whole = isinstance(value, (str, int)) or isinstance(value, float) and value.is_integer()
  if not whole:
    raise BadRecord(f'{f.label!r} is {value!r}: a label is a string or an integer')
  label = str(int(value)) if isinstance(value, float) else str(value)
  if f.labels and label not in f.labels:
    raise BadRecord(f'label {label!r} is not in finetune.labels ({",".join(f.labels)})')
  return label


def encode_record(line: bytes, f: Fields, tok: tokenizer_lib.Tokenizer):
  """(ids, loss weights or None, label or None) of one record's line; BadRecord if unusable."""
  record = parse(line)
  if f.objective == 'sft':
    ids, weights = encode_sft(sft_parts(record, f), tok)
    return ids, weights, None
  texts = texts_of(record, f)
  label = label_of(record, f)
  return np.asarray(encode_texts(texts, f, tok)), None, label
