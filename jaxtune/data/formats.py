"""Record formats: detect a record's format and turn it into one checked `Example`.

Formats (`data.format`, or detected from the first record of each source by its fields):

  text               {"text": "..."} (field name: data.text_field)       -> continued PT
  chat               {"system": "...", "messages": [{"role", "content"}, ...]}; the system
                     turn may also be messages[0]; user/assistant alternate, starting with
                     user and ending with assistant
  instruction        {"instruction", "input" (optional), "output"} -> a one-turn chat whose
                     user turn is instruction + "\\n\\n" + input
  prompt_completion  {"prompt": str, "completion": str} -> raw text, no chat template
  preference         {"prompt": str | messages, or "messages": [...], "chosen", "rejected"};
                     chosen/rejected are a string (one assistant turn) or assistant messages;
                     a list that repeats the prompt messages first (UltraFeedback style) is
                     accepted and the repeated prefix is removed
  prompt             {"prompt": str | messages, or "messages": [...], "answer" (optional)};
                     the conversation must end with a user turn; any other columns are kept
                     in `fields` (GRPO passes them to reward functions)

A message's content (and the "system" field) may also be a list of content blocks, as in
Amazon Bedrock's `bedrock-conversation-2024` schema (`"system": [{"text": ...}]`,
`"content": [{"text": ...}]`) or OpenAI's (`[{"type": "text", "text": ...}]`): the text
blocks are joined with "\n"; image, document, video and tool blocks are refused, naming the
block ('messages[0].content[1]'), since jaxtune trains text only.

Every check failure is a DataError naming the record, the field ('messages[2].role') and what
was expected. Messages keep only 'role' and 'content' (strings).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxtune.data import errors

FORMATS = ("text", "chat", "instruction", "prompt_completion", "preference", "prompt")
ROLES = ("system", "user", "assistant")
# What a prompt record's prompt is made of; its other columns pass to reward functions.
PROMPT_FIELDS = ("prompt", "messages", "system", "answer")
# Formats each pipeline kind accepts.
KIND_FORMATS = {
    "sft": ("text", "chat", "instruction", "prompt_completion"),
    "preference": ("preference",),
    "prompt": ("prompt", "chat"),
}


@dataclasses.dataclass
class Example:
  """One checked record. Which fields are set depends on `format` (see module docstring)."""
  format: str
  where: str
  text: str = ""  # text
  prompt: str = ""  # prompt_completion
  completion: str = ""  # prompt_completion
  messages: list[dict[str, str]] | None = None  # chat, instruction; the prompt otherwise
  chosen: list[dict[str, str]] | None = None  # preference: response messages
  rejected: list[dict[str, str]] | None = None
  answer: str | None = None  # prompt
  fields: dict[str, Any] | None = None  # prompt: the record's other columns (reward functions)
  offset: int = 0  # messages[i] is record field messages[i - offset] (system from 'system')


def detect(record: dict, where: str, *, text_field: str = "text") -> str:
  """The format of `record` from its fields (see module docstring)."""
  keys = set(record)
  if "chosen" in keys or "rejected" in keys:
    return "preference"
  if "messages" in keys:
    return "chat"
  if "instruction" in keys:
    return "instruction"
  if "prompt" in keys and "completion" in keys:
    return "prompt_completion"
  if "prompt" in keys:
    return "prompt"
  if text_field in keys:
    return "text"
  raise errors.bad_record(
      where, "<record>", f"cannot detect the record format from its fields {sorted(keys)}; "
      f"expected 'messages' (chat), 'instruction'+'output', 'prompt'+'completion', "
      f"'chosen'+'rejected' (preference), 'prompt' (prompt-only) or {text_field!r} (text), or "
      "set data.format", "unknown_format")


def normalize(record: dict, fmt: str, where: str, *, text_field: str = "text") -> Example:
  """Checks `record` against `fmt` and returns it as an Example."""
  if fmt == "text":
    return Example(fmt, where, text=_string(record, text_field, where))
  if fmt == "prompt_completion":
    return Example(fmt, where, prompt=_string(record, "prompt", where),
                   completion=_string(record, "completion", where))
  if fmt == "instruction":
    user = _string(record, "instruction", where)
    extra = record.get("input")
    if extra not in (None, ""):
      user += "\n\n" + _string(record, "input", where)
    messages = _system(record, where) + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _string(record, "output", where)}]
    return Example("chat", where, messages=messages)
  if fmt == "chat":
    system = _system(record, where)
    messages = system + _messages(record, "messages", where)
    _check_turns(messages, where, "messages", last="assistant", offset=len(system))
    return Example(fmt, where, messages=messages, offset=len(system))
  if fmt == "preference":
    prompt = _prompt_messages(record, where)
    chosen = _response(record, "chosen", prompt, where)
    rejected = _response(record, "rejected", prompt, where)
    return Example(fmt, where, messages=prompt, chosen=chosen, rejected=rejected)
  if fmt == "prompt":
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
      answer = json.dumps(answer) if not isinstance(answer, (int, float)) else str(answer)
    fields = {k: v for k, v in record.items() if k not in PROMPT_FIELDS}
    return Example(fmt, where, messages=_prompt_messages(record, where), answer=answer,
                   fields=fields or None)
  raise errors.DataError(f"unknown data.format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _string(record: dict, field: str, where: str, *, name: str = "") -> str:
  """record[field] as a non-empty string; errors name the field as `name` (default field)."""
  name = name or field
  if field not in record or record[field] is None:
    raise errors.bad_record(where, name, "is missing; expected a non-empty string",
                            "missing_field")
  value = record[field]
  if not isinstance(value, str):
    raise errors.bad_record(where, name, f"is a {type(value).__name__}; expected a non-empty "
                            "string", "wrong_type")
  if not value.strip():
    raise errors.bad_record(where, name, "is empty; expected a non-empty string",
                            "empty_field")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:  # JSON allows "\ud800"; no tokenizer does
    raise errors.bad_record(where, name, f"holds an unpaired surrogate {value[e.start]!r} at "
                            f"character {e.start}; expected valid Unicode text",
                            "bad_encoding") from None
  return value


def _system(record: dict, where: str) -> list[dict[str, str]]:
  """The optional top-level "system" field as a message list ([] when absent or empty)."""
  value = record.get("system")
  if value is None or (isinstance(value, (str, list)) and not value):
    return []
  if isinstance(value, list):  # Bedrock: [{"text": ...}, ...]
    return [{"role": "system", "content": _blocks(value, where, "system")}]
  return [{"role": "system", "content": _string(record, "system", where)}]


def _blocks(blocks: list, where: str, field: str) -> str:
  """Text content blocks ([{"text": ...}] or [{"type": "text", "text": ...}]) joined by
  newlines; any other block (image, document, video, tool use) is a DataError naming it."""
  if not blocks:
    raise errors.bad_record(where, field, "is an empty list; expected content blocks "
                            "[{'text': ...}]", "empty_field")
  texts = []
  for j, block in enumerate(blocks):
    name = f"{field}[{j}]"
    if not isinstance(block, dict):
      raise errors.bad_record(where, name, f"is a {type(block).__name__}; expected a content "
                              "block {'text': ...}", "wrong_type")
    kind = block.get("type") if isinstance(block.get("type"), str) else None
    kind = kind or ("text" if "text" in block else next(iter(block), "<empty>"))
    if kind != "text" or "text" not in block:
      raise errors.bad_record(where, name, f"is {kind!r} content; jaxtune trains on text only: "
                              "expected {'text': ...} blocks (drop or describe the "
                              f"{kind} content)", "unsupported_content")
    texts.append(_string(block, "text", where, name=name + ".text"))
  return "\n".join(texts)


def _json_list(value: Any) -> Any:
  """A list of message dicts stored as JSON text (CSV cells) -> the list; else `value`."""
  if isinstance(value, str) and value.lstrip().startswith("[{"):
    try:
      parsed = json.loads(value)
    except json.JSONDecodeError:
      return value
    if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed):
      return parsed
  return value


def _messages(record: dict, field: str, where: str, value: Any = None) -> list[dict[str, str]]:
  """Checks a message list (roles known, contents non-empty strings)."""
  if value is None:
    if field not in record or record[field] is None:
      raise errors.bad_record(where, field, "is missing; expected a list of messages "
                              "{'role', 'content'}", "missing_field")
    value = record[field]
  value = _json_list(value)
  if not isinstance(value, list):
    raise errors.bad_record(where, field, f"is a {type(value).__name__}; expected a list of "
                            "messages {'role', 'content'}", "wrong_type")
  if not value:
    raise errors.bad_record(where, field, "is empty; expected at least one message",
                            "empty_field")
  out = []
  for i, m in enumerate(value):
    name = f"{field}[{i}]"
    if not isinstance(m, dict):
      raise errors.bad_record(where, name, f"is a {type(m).__name__}; expected a message "
                              "object {'role', 'content'}", "wrong_type")
    role = m.get("role")
    if role is None:
      raise errors.bad_record(where, name + ".role", f"is missing; expected one of "
                              f"{', '.join(map(repr, ROLES))}", "missing_field")
    if role not in ROLES:
      raise errors.bad_record(where, name + ".role", f"unknown role {role!r}; expected one of "
                              f"{', '.join(map(repr, ROLES))}", "unknown_role")
    if isinstance(m.get("content"), list):  # content blocks (Bedrock, OpenAI)
      content = _blocks(m["content"], where, name + ".content")
    else:
      content = _string(m, "content", where, name=name + ".content")
    out.append({"role": role, "content": content})
  return out


def _check_turns(messages: list[dict[str, str]], where: str, field: str, *, last: str,
                 offset: int = 0) -> None:
  """System only first; then user/assistant alternate from user; the last turn is `last`.

  `messages[i]` is `field[i - offset]` in the record (the first `offset` messages came from
  elsewhere: the "system" field, or the prompt of a preference response).
  """
  def name(i: int) -> str:
    return f"{field}[{i - offset}].role"

  start = 1 if messages and messages[0]["role"] == "system" else 0
  for i in range(start, len(messages)):
    expected = "user" if (i - start) % 2 == 0 else "assistant"
    role = messages[i]["role"]
    if role == "system":
      raise errors.bad_record(where, name(i), f"a system message after the first turn (or the "
                              f"system prompt given twice, as 'system' and in '{field}'); "
                              f"expected {expected!r}", "not_alternating")
    if role != expected:
      raise errors.bad_record(where, name(i), f"turns do not alternate: got {role!r}; expected "
                              f"{expected!r} (system first, then user, assistant, user, ...)",
                              "not_alternating")
  if len(messages) == start:
    raise errors.bad_record(where, field, f"has no user turn; expected a conversation ending "
                            f"with {last!r}", "empty_field")
  if messages[-1]["role"] != last:
    raise errors.bad_record(where, name(len(messages) - 1), f"the conversation ends with "
                            f"{messages[-1]['role']!r}; expected it to end with {last!r}",
                            "not_alternating")


def _prompt_messages(record: dict, where: str) -> list[dict[str, str]]:
  """The prompt of a preference or prompt-only record, as messages ending with user."""
  system = _system(record, where)
  if "prompt" in record and record["prompt"] is not None:
    value = _json_list(record["prompt"])
    field = "prompt"
    if isinstance(value, str):
      messages = [{"role": "user", "content": _string(record, "prompt", where)}]
    else:
      messages = _messages(record, "prompt", where, value=value)
  elif "messages" in record:
    field = "messages"
    messages = _messages(record, "messages", where)
  else:
    raise errors.bad_record(where, "prompt", "is missing; expected a string or a list of "
                            "messages (or a 'messages' field)", "missing_field")
  messages = system + messages
  _check_turns(messages, where, field, last="user", offset=len(system))
  return messages


def _response(record: dict, field: str, prompt: list[dict[str, str]],
              where: str) -> list[dict[str, str]]:
  """chosen / rejected as assistant messages that continue `prompt`."""
  value = _json_list(record.get(field))
  if value is None or isinstance(value, str):
    return [{"role": "assistant", "content": _string(record, field, where)}]
  messages = _messages(record, field, where, value=value)
  body = [m for m in prompt if m["role"] != "system"]
  if len(messages) > len(body) and messages[:len(body)] == body:
    messages = messages[len(body):]  # the response repeats the prompt turns
  elif (prompt[0]["role"] == "system" and len(messages) > len(prompt)
        and messages[:len(prompt)] == prompt):
    messages = messages[len(prompt):]
  if not messages:
    raise errors.bad_record(where, field, "has no response turns after the prompt; expected "
                            "an assistant message", "empty_field")
  if messages[0]["role"] != "assistant":
    raise errors.bad_record(where, f"{field}[0].role", f"got {messages[0]['role']!r}; expected "
                            "'assistant' (the response to the prompt)", "not_alternating")
  _check_turns(prompt + messages, where, field, last="assistant", offset=len(prompt))
  return messages
