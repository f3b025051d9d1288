"""Typed `key=value` access to a tree of frozen dataclasses, and the docs of its fields.

`jaxtune.config` declares the run's settings as nested frozen dataclasses; this module is
the generic machinery over such a tree, kept apart so that the schema stays readable:

    set_path(cfg, "optim.lr", "1e-5")     -> cfg with optim.lr = 1e-05 (parsed as a float)
    get_path(cfg, "optim.lr")             -> 1e-05
    replace_path(cfg, "model.hf_path", "/abs/dir")
    from_dict(TrainConfig, {"optim": {"lr": 1e-5}})
    leaves(TrainConfig)                   -> [("method", str, "sft", "a name in ..."), ...]

A field's doc is the comment after it on its line, else the comment lines right above it:

    seq_len: int = 512  # tokens per row          -> doc "tokens per row"

so `--help_config` lists every `--set` key with its type, default and doc, read from the
same source a developer reads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from typing import Any


class ConfigError(ValueError):
  """A bad config key or value; the message names the key and what was expected."""


def type_name(typ: Any) -> str:
  """'int', 'str', 'tuple[int, ...]' for a field annotation."""
  if typing.get_origin(typ) is tuple:
    args = [a for a in typing.get_args(typ) if a is not Ellipsis]
    return f"tuple[{type_name(args[0])}, ...]"
  return getattr(typ, "__name__", str(typ))


def parse_value(key: str, text: str, typ: Any) -> Any:
  """Parses `text` as a value of type `typ` (from the dataclass annotation)."""
  origin = typing.get_origin(typ)
  try:
    if typ is bool:
      low = text.strip().lower()
      if low in ("1", "true", "yes", "on"):
        return True
      if low in ("0", "false", "no", "off"):
        return False
      raise ValueError("expected true/false")
    if typ is int:
      return int(text)
    if typ is float:
      return float(text)
    if typ is str:
      return text
    if origin is tuple:
      (elem,) = {a for a in typing.get_args(typ) if a is not Ellipsis}
      parts = [p for p in text.replace("[", "").replace("]", "").split(",") if p.strip()]
      return tuple(parse_value(key, p.strip(), elem) for p in parts)
  except ValueError as e:
    raise ConfigError(f"bad value for {key}: {text!r} is not a {type_name(typ)} ({e})") from None
  raise ConfigError(f"config key {key} has unsupported type {typ}")


def field_types(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def set_path(obj, key: str, text: str):
  """`obj` with the field at dotted `key` set to `text` parsed with the field's type."""
  return _set(obj, key, key.split("."), text)


def _set(obj, full_key: str, parts: list[str], text: str):
  if not dataclasses.is_dataclass(obj):
    raise ConfigError(f"unknown config key {full_key!r}")
  names = [f.name for f in dataclasses.fields(obj)]
  head = parts[0]
  if head not in names:
    raise ConfigError(f"unknown config key {full_key!r} ({type(obj).__name__} has: "
                      f"{', '.join(names)})")
  cur = getattr(obj, head)
  if len(parts) > 1:
    return dataclasses.replace(obj, **{head: _set(cur, full_key, parts[1:], text)})
  if dataclasses.is_dataclass(cur):
    raise ConfigError(f"config key {full_key!r} is a section; set one of its fields "
                      f"({', '.join(f.name for f in dataclasses.fields(cur))})")
  typ = field_types(type(obj))[head]
  return dataclasses.replace(obj, **{head: parse_value(full_key, text, typ)})


def get_path(obj, key: str):
  for part in key.split("."):
    obj = getattr(obj, part)
  return obj


def has_path(obj, key: str) -> bool:
  for part in key.split("."):
    if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
      return False
    obj = getattr(obj, part)
  return True


def replace_path(obj, key: str, value):
  """`obj` with the field at dotted `key` replaced by `value` (no parsing)."""
  head, _, rest = key.partition(".")
  if not rest:
    return dataclasses.replace(obj, **{head: value})
  return dataclasses.replace(obj, **{head: replace_path(getattr(obj, head), rest, value)})


def from_dict(cls, d: dict):
  """Inverse of dataclasses.asdict for nested frozen dataclasses (unknown keys are errors)."""
  hints = field_types(cls)
  kwargs = {}
  for k, v in d.items():
    if k not in hints:
      raise ConfigError(f"unknown config key {k!r} for {cls.__name__}")
    typ = hints[k]
    if dataclasses.is_dataclass(typ):
      v = from_dict(typ, v)
    elif typing.get_origin(typ) is tuple:
      v = tuple(v)
    kwargs[k] = v
  return cls(**kwargs)


@functools.cache
def field_docs(cls) -> dict[str, str]:
  """{field name: doc} from the source comments of dataclass `cls` (see module docstring)."""
  try:
    source = textwrap.dedent(inspect.getsource(cls))
  except (OSError, TypeError):  # no source (a frozen app): no docs
    return {}
  comments: dict[int, tuple[int, str]] = {}  # line -> (column, text)
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
  lines = source.splitlines()
  names = {f.name for f in dataclasses.fields(cls)}
  docs = {}
  for lineno, line in enumerate(lines, start=1):
    m = re.match(r"\s+(\w+)\s*:", line)
    if not m or m.group(1) not in names:
      continue
    col, text = comments.get(lineno, (0, ""))
    if not (col and text):  # no trailing comment: the comment block right above
      above, j = [], lineno - 1
      while j in comments and not lines[j - 1][:comments[j][0]].strip():
        above.insert(0, comments[j][1])
        j -= 1
      text = " ".join(above)
    docs[m.group(1)] = text
  return docs


def leaves(cls, prefix: str = "") -> list[tuple[str, str, Any, str]]:
  """(dotted key, type name, default, doc) of every settable field below dataclass `cls`."""
  out = []
  hints = field_types(cls)
  docs = field_docs(cls)
  defaults = cls()
  for f in dataclasses.fields(cls):
    key = prefix + f.name
    if dataclasses.is_dataclass(hints[f.name]):
      out += leaves(hints[f.name], key + ".")
    else:
      out.append((key, type_name(hints[f.name]), getattr(defaults, f.name), docs.get(f.name, "")))
  return out


def help_text(cls) -> str:
  """Every --set key of `cls` with its type, default and doc, one per line, by section."""
  rows = leaves(cls)
  width = max(len(k) for k, *_ in rows) + 2
  out, section = [], None
  for key, typ, default, doc in rows:
    head = key.split(".")[0] if "." in key else ""
    if head != section:
      section = head
      out.append(f"\n[{head or 'top level'}]")
    out.append(f"  {key:<{width}}{typ:<16}{default!r:<14} {doc}".rstrip())
  head = f"Set any key with --set=KEY=VALUE.\n{'KEY':<{width + 2}}{'TYPE':<16}{'DEFAULT':<14} DOC"
  return head + "\n" + "\n".join(out)
