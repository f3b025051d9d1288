"""Evaluation data: the formats training reads, turned into what each metric needs.

Records are read with the data pipeline (`data.sources`: .jsonl / .json / .parquet / .csv,
directories, hf:NAME), checked by `data.formats` and rendered by `data.encode` exactly as
training renders them (the model's chat template, its loss masks), so a model is evaluated
on the tokens it was trained on. Each source's format is detected from its first record
(or given), and every record of the source must then be of that format:

  record                                        kind       reference          perplexity on
  text      {"text"}                            text       the text           every token
                                                                              after the first
  chat      {"messages", "system"?}             generate   last assistant     the assistant
  instruction {"instruction", "input"?, "output"}          turn / output      turns (loss mask)
  prompt_completion {"prompt", "completion"}    generate   the completion     completion + eos
  prompt    {"prompt" | "messages", "answer"}   generate   the answer         -
  classification {... , "label"}               classify   the label          -

Generation prompts: chat-like records render the conversation up to the last user turn with
the generation prompt; prompt_completion prompts are raw text (no template).

Classification records carry a `label` and a prompt: `prompt` (a string or messages) or
`messages` ending with a user turn, rendered with the chat template, the label being the
assistant's answer; or a raw-text prompt in `text` (no template), continued by
`label_delimiter` + label. Each label is scored over its own tokens after the prompt;
with `label_end` also over the end token that follows it (the eos / end-of-turn token, as
training renders an answer), which separates labels that are prefixes of one another.
Without it (the default) the label tokens alone are scored, as lm-evaluation-harness
scores multiple-choice answers.

Too long: `truncation` as in training (data.length): error (default) | drop |
truncate_right | truncate_left; prompts always keep their end (where the generation prompt
is). Every dropped example is counted in `counts`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxtune.data import encode
from jaxtune.data import errors
from jaxtune.data import formats
from jaxtune.data import length
from jaxtune.data import sources
from jaxtune.data import tokenizer_lib

KINDS = ("text", "generate", "classify")


@dataclasses.dataclass(frozen=True)
class Settings:
  labels: tuple[str, ...] = ()  # () = the labels found in the data, sorted
  max_len: int = 2048  # tokens of a scored sequence (prompt + generation for prompts)
  max_new_tokens: int = 64
  truncation: str = "error"
  label_delimiter: str = " "  # between a raw-text prompt and its label
  label_end: bool = False
  max_examples: int = 0  # 0 = all
  format: str = "auto"
  text_field: str = "text"
  loss_policy: str = "auto"


@dataclasses.dataclass
class Example:
  """One evaluation example (see the module docstring for what each kind carries)."""
  index: int
  where: str
  kind: str
  reference: str
  prompt: str = ""  # the prompt as the model gets it (decoded, special tokens kept)
  scored: list[encode.Encoded] | None = None  # sequences whose train tokens perplexity
  # scores (one, or one per trained turn for templates rendered turn by turn)
  prompt_ids: np.ndarray | None = None  # [p] int32: generation prompt
  label_seqs: list[encode.Encoded] | None = None  # classify: one per label, label tokens train


@dataclasses.dataclass
class Data:
  examples: list[Example]
  labels: list[str]
  counts: dict[str, int]


def _records(spec: str, settings: Settings) -> list[tuple[str, str, dict]]:
  """(format, where, record) of every record, first `max_examples` only."""
  out = []
  for src in sources.parse(spec, setting="--data"):
    fmt = None
    for where, rec in sources.read(src):
      if isinstance(rec, errors.DataError):
        raise rec
      if fmt is None:
        fmt = ("classify" if "label" in rec else
               settings.format if settings.format != "auto" else
               formats.detect(rec, where, text_field=settings.text_field))
      out.append((fmt, where, rec))
      if settings.max_examples and len(out) >= settings.max_examples:
        return out
  if not out:
    raise errors.DataError(f"--data={spec}: no records")
  return out


def _label(rec: dict, where: str) -> str:
  value = rec.get("label")
  if value is None or isinstance(value, (dict, list)) or str(value).strip() == "":
    raise errors.bad_record(where, "label", f"is {value!r}; expected the class label (a "
                            "non-empty string or number)", "missing_field")
  return str(value).strip()


class Builder:
  """Turns records into Examples with one tokenizer (see the module docstring)."""

  def __init__(self, tok, settings: Settings):
    self.tok, self.s = tok, settings
    common = dict(check_template=True, text_field=settings.text_field)
    self.encoder = encode.Encoder(tok, loss_policy=settings.loss_policy, **common)
    self.answer = encode.Encoder(tok, loss_policy="last_assistant", **common)
    self.special = tokenizer_lib.special_ids(tok)
    self.counts = {"records": 0, "examples": 0, "truncated": 0, "dropped": 0}

  def _fit(self, seq: encode.Encoded, where: str, field: str, *, budget: int,
           prompt: bool) -> encode.Encoded | None:
    """`seq` within `budget` tokens under the truncation policy (None: dropped)."""
    if len(seq) > budget and self.s.truncation == "error":
      what = ("the prompt", "--max_len - --max_new_tokens (or the longest label)") if prompt \
          else ("the example", "--max_len")
      raise errors.bad_record(where, field, f"{what[0]} is {len(seq)} tokens, longer than "
                              f"{what[1]} = {budget}; expected at most {budget} tokens (or "
                              "--truncation=drop|truncate_right|truncate_left)", "too_long")
    result = encode.Result((seq,), field=field)
    kind = "prompt" if prompt else "sft"
    fitted, outcome = length.fit(result, max(1, budget), self.s.truncation, where, kind=kind)
    self.counts["truncated"] += outcome == "truncated"
    return None if fitted is None else fitted.seqs[0]

  def _prompt(self, ids, where: str, field: str, budget: int) -> np.ndarray | None:
    seq = self._fit(encode.Encoded(np.asarray(ids, np.int32), np.zeros(len(ids), bool)),
                    where, field, budget=budget, prompt=True)
    return None if seq is None else seq.ids

  def _encode(self, ex: formats.Example, encoder=None) -> list[encode.Result]:
    """The record's encodings: one, or one per trained turn for templates the data
    pipeline renders turn by turn (`Encoder.encode_all`, where the pipeline has it)."""
    encoder = encoder or self.encoder
    encode_all = getattr(encoder, "encode_all", None)
    return encode_all(ex) if encode_all is not None else [encoder.encode(ex)]

  def _scored(self, results: list[encode.Result], where: str) -> list[encode.Encoded] | None:
    out = []
    for r in results:
      seq = self._fit(r.seqs[0], where, r.field, budget=self.s.max_len, prompt=False)
      if seq is None:
        return None
      out.append(seq)
    return out

  def _generate(self, i: int, fmt: str, where: str, rec: dict) -> Example | None:
    s = self.s
    ex = formats.normalize(rec, fmt, where, text_field=s.text_field)
    budget = s.max_len - s.max_new_tokens
    if ex.format == "text":
      scored = self._scored(self._encode(ex), where)
      return None if scored is None else Example(i, where, "text", ex.text, scored=scored)
    if ex.format == "prompt":
      if ex.answer is None:
        raise errors.bad_record(where, "answer", "is missing; expected the reference answer "
                                "(evaluation compares the generation to it)", "missing_field")
      ids = self._prompt(self.encoder.encode(ex).seqs[0].ids, where, "prompt", budget)
      return None if ids is None else Example(i, where, "generate", ex.answer, prompt_ids=ids)
    results = self._encode(ex)
    scored = self._scored(results, where)
    if ex.format == "prompt_completion":
      full = results[0].seqs[0]
      prompt, reference = full.ids[:int(np.argmax(full.train))], ex.completion
    else:  # chat (instruction records arrive as chat)
      prompt = self.encoder.encode(formats.Example("prompt", where, messages=ex.messages[:-1]))
      prompt, reference = prompt.seqs[0].ids, ex.messages[-1]["content"]
    ids = self._prompt(prompt, where, results[0].field, budget)
    if scored is None or ids is None:
      return None
    return Example(i, where, "generate", reference, scored=scored, prompt_ids=ids)

  def _label_seq(self, prompt: formats.Example, label: str) -> encode.Encoded:
    """The prompt followed by `label` as the model's answer; train = the label's tokens."""
    if prompt.format == "text":
      ex = formats.Example("prompt_completion", prompt.where, prompt=prompt.text,
                           completion=self.s.label_delimiter + label)
      seq = self.encoder.encode(ex).seqs[0]
    else:
      ex = formats.Example("chat", prompt.where, offset=prompt.offset, messages=prompt.messages
                           + [{"role": "assistant", "content": label}])
      seq = self._encode(ex, self.answer)[-1].seqs[0]
    train = seq.train.copy()
    if not self.s.label_end:
      while train.any():
        last = len(train) - 1 - int(np.argmax(train[::-1]))
        if int(seq.ids[last]) not in self.special and int(seq.ids[last]) != self.tok.eos_token_id:
          break
        train[last] = False
    if not train.any():
      raise errors.bad_record(prompt.where, "label", f"{label!r} renders to no tokens after "
                              "the prompt; expected a label with text", "empty_field")
    return encode.Encoded(seq.ids, train)

  def _classify(self, i: int, where: str, rec: dict, labels: list[str]) -> Example | None:
    label = _label(rec, where)
    if label not in labels:
      raise errors.bad_record(where, "label", f"{label!r} is not one of the labels "
                              f"({', '.join(labels)}); expected one of them (--labels)",
                              "unknown_label")
    if self.s.text_field in rec:
      prompt = formats.normalize(rec, "text", where, text_field=self.s.text_field)
    else:
      if not self.tok.chat_template:
        raise errors.bad_record(where, "prompt", "a chat prompt needs a chat template and the "
                                "tokenizer has none; expected --chat_template=FILE, or the "
                                f"prompt as raw text in a {self.s.text_field!r} field",
                                "template_error")
      prompt = formats.normalize(rec, "prompt", where)
    seqs = [self._label_seq(prompt, lab) for lab in labels]
    starts = [int(np.argmax(s.train)) for s in seqs]
    tails = [(s.ids[p:], s.train[p:]) for s, p in zip(seqs, starts)]
    budget = self.s.max_len - max(len(t[0]) for t in tails)
    ids = self._prompt(seqs[0].ids[:starts[0]], where, "prompt", budget)
    if ids is None:
      return None
    fitted = [encode.Encoded(np.concatenate([ids, t]).astype(np.int32),
                             np.concatenate([np.zeros(len(ids), bool), m])) for t, m in tails]
    return Example(i, where, "classify", label, prompt_ids=ids, label_seqs=fitted)

  def build(self, records: list[tuple[str, str, dict]]) -> Data:
    labels = list(self.s.labels) or sorted({_label(r, w) for f, w, r in records
                                            if f == "classify"})
    out = []
    for fmt, where, rec in records:
      self.counts["records"] += 1
      if fmt == "preference":
        raise errors.bad_record(where, "chosen", "preference records cannot be evaluated; "
                                "expected text, chat, instruction, prompt_completion, prompt "
                                "(with 'answer') or classification ('label') records",
                                "unsupported_format")
      ex = (self._classify(len(out), where, rec, labels) if fmt == "classify" else
            self._generate(len(out), fmt, where, rec))
      if ex is None:
        self.counts["dropped"] += 1
        continue
      ex.prompt = "" if ex.prompt_ids is None else self.tok.decode(list(ex.prompt_ids))
      out.append(ex)
    self.counts["examples"] = len(out)
    if not out:
      raise errors.DataError(f"no example left to evaluate (counts: {self.counts})")
    return Data(out, labels, dict(self.counts))


def read(spec: str, tok, settings: Settings) -> Data:
  """Reads and encodes the evaluation data `spec` (comma-separated files/dirs/hf:)."""
  return Builder(tok, settings).build(_records(spec, settings))


def stop_ids(tok) -> set[int]:
  """Token ids that end an answer: eos and the chat template's end-of-turn token(s)."""
  out = set() if tok.eos_token_id is None else {int(tok.eos_token_id)}
  if not tok.chat_template:
    return out
  probe = formats.Example("chat", "probe", messages=[{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "ok"}])
  try:
    seq = encode.Encoder(tok, loss_policy="last_assistant").encode(probe).seqs[0]
  except errors.DataError:
    return out
  special = tokenizer_lib.special_ids(tok)
  return out | {int(t) for t, on in zip(seq.ids, seq.train) if on and int(t) in special}


def describe(data: Data) -> dict[str, Any]:
  kinds = {k: sum(e.kind == k for e in data.examples) for k in KINDS}
  return {**data.counts, **kinds, "labels": data.labels}
