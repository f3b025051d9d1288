"""Examples -> token ids plus which tokens are trained, rendered exactly as at inference.

Chat is rendered with the tokenizer's own `apply_chat_template`. The tokens an assistant
turn k trains are found by rendering prefixes, the way inference sees them:

    prompt_k = render(messages[:k], add_generation_prompt=True)   # what the model is given
    upto_k   = render(messages[:k+1])                             # ... plus its answer
    full     = render(messages)                                   # the training sequence

`prompt_k` must be a token prefix of `upto_k`, and `upto_k` of `full`; the assistant turn is
then `upto_k[len(prompt_k):]`, cut after its last special token (the end-of-turn token:
<|im_end|>, <|eot_id|>, </s>), so template glue the model never generates (ChatML's "\\n")
carries no loss. Any disagreement means the model would be trained on a rendering it never
sees at inference: a DataError names the record, the turn, the token position and both
texts. With data.check_template=false, a turn that renders differently once later turns
follow it (templates that rewrite past turns) is left untrained instead, and counted; the
last turn always agrees, since its rendering is `full` itself.

Loss policies (data.loss_policy; the token a position predicts carries its flag):

  format             auto            assistant / last_assistant / completion       all
  text               all             all                                            all
  chat, instruction  assistant       every / the last assistant turn (completion =  all
                                     last_assistant)
  prompt_completion  completion      the completion and the eos                     all
  preference         the response turns after the prompt, always

Raw text is tokenized with the tokenizer's special tokens (its BOS, if it adds one) and
ends with eos; prompt_completion is raw text too: tokens(prompt) + tokens(completion) + eos.
A doubled BOS at the start is reduced to one.

Templates that cannot be checked by prefix (data.chat_render=auto falls back per record;
=turns always; =full never): Mistral v3 writes the system prompt into the LAST user turn
only, so no rendering of a whole conversation ending with an assistant turn holds it, and
no generation prompt is a prefix of it. Such a record is rendered turn by turn, as
inference sees each turn: one example per trained assistant turn k,

    render(messages[:k], add_generation_prompt=True) + answer_k      (answer_k trained)

where answer_k is the template's own rendering of turn k in the fullest context in which
its generation prompt is a prefix (the conversation, the conversation without its system
prompt, or the user turn alone), up to its end-of-turn token. A reasoning template whose
generation prompt ends with text the past-turn rendering never has (DeepSeek-R1-distill:
'<｜Assistant｜><think>\n', past turns with their thinking removed) trains
answer_k = tokens(content after that text) + the template's end-of-turn token, and needs
contents that start with it ('<think>\n...</think>\n\nanswer'); otherwise the error says so.

A trained assistant turn that ends without a special token (a template whose end of turn
is plain text) teaches the model no way to stop: such turns are counted
(`Result.turns_without_eos`) and the pipeline warns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxtune.data import errors
from jaxtune.data import formats
from jaxtune.data import tokenizer_lib

POLICIES = ("auto", "assistant", "last_assistant", "all", "completion")
RENDERS = ("auto", "full", "turns")


@dataclasses.dataclass
class Encoded:
  """Token ids [n] int32 and train [n] bool: token i is a loss target (predicted at i-1)."""
  ids: np.ndarray
  train: np.ndarray

  def __len__(self) -> int:
    return len(self.ids)


@dataclasses.dataclass
class Result:
  """What one example encodes to: `seqs` is one Encoded (sft, prompt) or (chosen, rejected)."""
  seqs: tuple[Encoded, ...]
  answer: str | None = None
  field: str = ""  # the record field to name in length errors
  untrained_turns: int = 0  # turns left untrained on a template mismatch (check off)
  turns_without_eos: int = 0  # trained assistant turns ending without a special token
  by_turns: bool = False  # rendered turn by turn (see the module docstring)
  fields: dict | None = None  # prompt: the record's other columns (formats.Example.fields)


def policy_for(policy: str, fmt: str) -> str:
  """The effective policy of `policy` for examples of format `fmt` (see module docstring)."""
  if policy not in POLICIES:
    raise errors.DataError(f"bad data.loss_policy {policy!r}; expected one of "
                           f"{', '.join(POLICIES)}")
  if fmt == "text" or policy == "all":
    return "all"
  if fmt == "prompt_completion":
    return "completion"
  if fmt == "preference":
    return "response"
  if policy in ("auto", "assistant"):
    return "assistant"
  return "last_assistant"


class Encoder:
  """Encodes formats.Example records with one tokenizer and loss policy."""

  def __init__(self, tok, *, loss_policy: str = "auto", check_template: bool = True,
               text_field: str = "text", chat_render: str = "auto"):
    if chat_render not in RENDERS:
      raise errors.DataError(f"bad data.chat_render {chat_render!r}; expected one of "
                             f"{', '.join(RENDERS)}")
    self.tok = tok
    self.text_field = text_field
    self.loss_policy = loss_policy
    self.check_template = check_template
    self.chat_render = chat_render
    self.special = tokenizer_lib.special_ids(tok)
    self.bos = tok.bos_token_id
    self.eos = tok.eos_token_id
    policy_for(loss_policy, "chat")  # validates

  def encode_all(self, ex: formats.Example) -> list[Result]:
    """The examples of one record: one, or one per trained turn when rendered by turns."""
    by_turns = ex.format in ("chat", "preference") and self.chat_render != "full"
    if by_turns and self.chat_render == "turns":
      return self._by_turns(ex)
    try:
      return [self.encode(ex)]
    except errors.DataError as e:
      if not by_turns or e.reason != "generation_prompt_mismatch":
        raise
      return self._by_turns(ex)

  def encode(self, ex: formats.Example) -> Result:
    """The one example of a record, rendered whole (see encode_all)."""
    if ex.format == "text":
      ids = self._text_ids(ex.text, add_special=True)
      if self.eos is not None and (not ids or ids[-1] != self.eos):
        ids.append(self.eos)
      return Result((self._finish(ids, np.ones(len(ids), bool)),), field=self.text_field)
    if ex.format == "prompt_completion":
      prompt = self._text_ids(ex.prompt, add_special=True)
      completion = self._text_ids(ex.completion, add_special=False)
      if self.eos is not None:
        completion.append(self.eos)
      train = np.array([False] * len(prompt) + [True] * len(completion))
      if policy_for(self.loss_policy, ex.format) == "all":
        train[:] = True
      return Result((self._finish(prompt + completion, train),), field="completion")
    if ex.format == "chat":
      seq, untrained, no_eos = self._chat(ex.messages, ex.where,
                                          policy_for(self.loss_policy, "chat"), "messages",
                                          offset=ex.offset)
      return Result((seq,), field="messages", untrained_turns=untrained,
                    turns_without_eos=no_eos)
    if ex.format == "preference":
      n = len(ex.messages)
      chosen, c_untrained, c_no_eos = self._chat(ex.messages + ex.chosen, ex.where, "response",
                                                 "chosen", offset=n)
      rejected, r_untrained, r_no_eos = self._chat(ex.messages + ex.rejected, ex.where,
                                                   "response", "rejected", offset=n)
      return Result((chosen, rejected), field="chosen",
                    untrained_turns=c_untrained + r_untrained,
                    turns_without_eos=c_no_eos + r_no_eos)
    if ex.format == "prompt":
      ids = self._render(ex.messages, ex.where, "prompt", generation=True)
      return Result((self._finish(ids, np.zeros(len(ids), bool)),), answer=ex.answer,
                    field="prompt", fields=ex.fields)
    raise errors.DataError(f"cannot encode format {ex.format!r}")

  def _text_ids(self, text: str, *, add_special: bool) -> list[int]:
    return list(self.tok(text, add_special_tokens=add_special)["input_ids"])

  def _finish(self, ids: list[int], train: np.ndarray) -> Encoded:
    if self.bos is not None and len(ids) > 1 and ids[0] == ids[1] == self.bos:
      ids, train = ids[1:], train[1:]  # no doubled BOS
    return Encoded(np.asarray(ids, np.int32), np.asarray(train, bool))

  def _render(self, messages, where: str, field: str, *, generation: bool) -> list[int]:
    if not self.tok.chat_template:
      raise errors.DataError(f"tokenizer {self.tok.name_or_path!r} has no chat template and "
                             "the data has chat records; set data.chat_template=PATH to a "
                             "jinja template")
    try:
      ids = self.tok.apply_chat_template(messages, add_generation_prompt=generation,
                                         tokenize=True, return_dict=False)
    except Exception as e:  # pylint: disable=broad-except  (jinja raise_exception, ...)
      raise errors.bad_record(where, field, f"the chat template rejected the conversation "
                              f"({type(e).__name__}: {e}); expected a conversation the "
                              "template supports", "template_error") from e
    return [int(i) for i in ids]

  def _chat(self, messages, where: str, policy: str, field: str, *,
            offset: int) -> tuple[Encoded, int, int]:
    """Renders `messages`; returns the sequence, the number of turns left untrained and the
    number of trained turns that end without a special token.

    `messages[k]` is `field[k - offset]` in the record (for error messages; for preference
    records `offset` is the prompt length and only turns from it on are trained).
    """
    full = self._render(messages, where, field, generation=False)
    train = np.zeros(len(full), bool)
    if policy == "all":
      train[:] = True
      return self._finish(full, train), 0, 0
    turns = [k for k, m in enumerate(messages)
             if m["role"] == "assistant" and (policy != "response" or k >= offset)]
    if policy == "last_assistant":
      turns = turns[-1:]
    untrained = no_eos = 0
    for k in turns:
      name = f"{field}[{k - offset}]"
      prompt = self._render(messages[:k], where, name, generation=True)
      upto = full if k == len(messages) - 1 else self._render(messages[:k + 1], where, name,
                                                               generation=False)
      at = _first_difference(prompt, upto)
      if at is not None:
        raise self._mismatch(where, name, at, prompt, upto,
                             "the generation prompt is not a prefix of the rendered turn",
                             reason="generation_prompt_mismatch")
      if upto is not full:
        at = _first_difference(upto, full)
        if at is not None:
          if not self.check_template:
            untrained += 1
            continue
          raise self._mismatch(where, name, at, upto, full, "the turn renders differently "
                               "once later turns follow it")
      start, end = len(prompt), len(upto)
      ends = [j for j in range(start, end) if upto[j] in self.special]
      if ends:
        end = ends[-1] + 1
      no_eos += not ends
      if start >= end:
        raise errors.bad_record(where, name, "the assistant turn renders to no tokens; "
                                "expected a template that renders assistant content",
                                "template_error")
      train[start:end] = True
    return self._finish(full, train), untrained, no_eos

  def _mismatch(self, where: str, name: str, at: int, infer: list[int], train: list[int],
                what: str, reason: str = "template_mismatch") -> errors.DataError:
    def show(ids):
      return repr(self.tok.decode(ids[at:at + 8])) if at < len(ids) else "<end>"
    context = repr(self.tok.decode(infer[max(0, at - 8):at]))
    fix = ("set data.chat_render=auto or turns to render such conversations turn by turn, "
           "or fix data.chat_template" if reason == "generation_prompt_mismatch" else
           "fix data.chat_template, or set data.check_template=false to leave such turns "
           "untrained")
    return errors.bad_record(
        where, name, f"the training rendering differs from the inference rendering at token "
        f"{at} ({what}): after {context}, inference has {show(infer)} but training has "
        f"{show(train)}; expected apply_chat_template(messages[:k], add_generation_prompt="
        f"True) + the assistant turn to equal the full rendering ({fix})", reason)

  # -- rendering by turns (see the module docstring) ------------------------------------

  def _by_turns(self, ex: formats.Example) -> list[Result]:
    """One example per trained assistant turn: its inference prompt + its answer."""
    if ex.format == "preference":
      return [self._pair_by_turns(ex)]
    policy = policy_for(self.loss_policy, "chat")
    turns = [k for k, m in enumerate(ex.messages) if m["role"] == "assistant"]
    if policy == "last_assistant":
      turns = turns[-1:]
    out = []
    for k in turns:
      name = f"messages[{k - ex.offset}]"
      seq, no_eos = self._turn(ex.messages, k, ex.where, name, all_tokens=policy == "all")
      out.append(Result((seq,), field="messages", turns_without_eos=no_eos, by_turns=True))
    return out

  def _pair_by_turns(self, ex: formats.Example) -> Result:
    seqs, no_eos = [], 0
    for field, response in (("chosen", ex.chosen), ("rejected", ex.rejected)):
      if len(response) != 1:
        raise errors.bad_record(ex.where, field, f"has {len(response)} turns, and this chat "
                                "template is rendered turn by turn; expected one assistant "
                                "turn", "generation_prompt_mismatch")
      messages = ex.messages + response
      seq, n = self._turn(messages, len(messages) - 1, ex.where, field, all_tokens=False)
      seqs.append(seq)
      no_eos += n
    return Result(tuple(seqs), field="chosen", turns_without_eos=no_eos, by_turns=True)

  def _turn(self, messages, k: int, where: str, name: str, *,
            all_tokens: bool) -> tuple[Encoded, int]:
    """render(messages[:k], generation prompt) + answer_k; (sequence, turn lacks eos)."""
    prompt = self._render(messages[:k], where, name, generation=True)
    answer = self._answer(messages, k, where, name)
    train = np.r_[np.full(len(prompt), all_tokens), np.ones(len(answer), bool)]
    return self._finish(prompt + answer, train), int(not set(answer) & self.special)

  def _answer(self, messages, k: int, where: str, name: str) -> list[int]:
    """The tokens the model generates for assistant turn k after its generation prompt."""
    system_free = [m for m in messages[:k] if m["role"] != "system"]
    contexts = [messages[:k]] + ([system_free] if len(system_free) < k else [])
    if contexts[-1] != [messages[k - 1]]:
      contexts.append([messages[k - 1]])  # the user turn alone
    for context in contexts:
      prompt = self._render(context, where, name, generation=True)
      upto = self._render(context + [messages[k]], where, name, generation=False)
      if _first_difference(prompt, upto) is None:
        body = upto[len(prompt):]
        ends = [j for j, t in enumerate(body) if t in self.special]
        return body[:ends[-1] + 1] if ends else body
    at = _first_difference(prompt, upto)
    tail, content = self.tok.decode(prompt[at:]), messages[k]["content"]
    ends = _last_special_run(upto[at:], self.special)
    if tail.strip() and content.startswith(tail) and ends:
      return self._text_ids(content[len(tail):], add_special=False) + ends
    hint = (f"expected assistant content that starts with {tail!r} (reasoning data: "
            f"{tail!r} + thinking + closing tag + answer), since the generation prompt ends "
            "with it and past turns are rendered without it" if tail.strip() else
            "fix data.chat_template so that its generation prompt is a prefix of its "
            "assistant turns")
    raise errors.bad_record(
        where, name, f"the generation prompt is not a prefix of the rendered turn in any "
        f"context: the template's generation prompt ends with {tail!r} but it renders the "
        f"turn as {self.tok.decode(upto[at:at + 8])!r}; {hint}", "generation_prompt_mismatch")


def _last_special_run(ids: list[int], special: frozenset[int]) -> list[int]:
  """The run of special tokens that ends at the last special token of `ids` ([] if none)."""
  last = [j for j, t in enumerate(ids) if t in special]
  if not last:
    return []
  j = last[-1]
  while j > 0 and ids[j - 1] in special:
    j -= 1
  return list(ids[j:last[-1] + 1])


def _first_difference(prefix: list[int], seq: list[int]) -> int | None:
  """None if `prefix` is a prefix of `seq`, else the first index where they differ."""
  n = min(len(prefix), len(seq))
  for i in range(n):
    if prefix[i] != seq[i]:
      return i
  return None if len(prefix) <= len(seq) else n
