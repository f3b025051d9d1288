"""Reward functions for method=grpo: built-ins, user functions named on the command line, and
the weighted sum GRPO trains on.

A reward function has TRL's signature:

    func(prompts: list[str], completions: list[str], **fields) -> list[float | None]

`fields` holds the prompt records' other columns repeated per completion (`answer` as a
string, every other column as in the record, None where a record lacks it; as TRL passes a
dataset's extra columns) plus `completion_ids` (token ids). None means "not applicable" to that completion: it is
left out of the weighted sum (the other functions' weights are not renormalised, as TRL
does). They are named in `grpo.reward_fns` as

    builtin:NAME                    exact_answer | math_answer | format | overlong
    path/to/file.py:func            a function in a Python file
    package.module:func             an importable function

with `grpo.reward_weights` (default 1 each). An exception inside a function is re-raised
naming the function and the first completion's index.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import re
from typing import Callable, Sequence

import numpy as np

from jaxtune import config as config_lib

RewardFn = Callable[..., list]

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def _normalise(text: str) -> str:
  return " ".join(str(text).strip().lower().rstrip(".").split())


def exact_answer(prompts, completions, answer=None, **_):
  """1.0 when the completion equals the record's `answer` after normalisation (case, outer
  whitespace, a final period), else 0.0; None where the record has no answer."""
  answers = answer or [None] * len(completions)
  return [None if a is None else float(_normalise(c) == _normalise(a))
          for c, a in zip(completions, answers)]


def _last_number(text: str) -> float | None:
  boxed = _BOXED.findall(text)
  candidates = _NUMBER.findall(boxed[-1] if boxed else text)
  if not candidates:
    return None
  s = candidates[-1].replace(",", "")
  if "/" in s:
    num, den = s.split("/")
    return float(num) / float(den) if float(den) else None
  return float(s)


def math_answer(prompts, completions, answer=None, **_):
  """1.0 when the completion's final answer (the last \\boxed{...}, else its last number;
  fractions a/b evaluated) equals the record's numeric `answer` within 1e-6 relative."""
  answers = answer or [None] * len(completions)
  out = []
  for c, a in zip(completions, answers):
    want = None if a is None else _last_number(str(a))
    if want is None:
      out.append(None)
      continue
    got = _last_number(c)
    out.append(float(got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)))
  return out


def make_format(pattern: str) -> RewardFn:
  """1.0 when the whole completion matches `pattern` (re.fullmatch, DOTALL), else 0.0."""
  rx = re.compile(pattern, re.DOTALL)

  def format_reward(prompts, completions, **_):
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]
  return format_reward


def make_overlong(max_len: int, buffer: int) -> RewardFn:
  """DAPO's soft overlong penalty (Yu et al. 2025, Eq. 13): 0 up to max_len - buffer
  tokens, then falling linearly to -1 at max_len (and -1 beyond)."""

  def overlong(prompts, completions, completion_ids=None, **_):
    out = []
    for ids in completion_ids:
      n = len(ids)
      if n <= max_len - buffer:
        out.append(0.0)
      elif n <= max_len:
        out.append(float((max_len - buffer - n) / buffer))
      else:
        out.append(-1.0)
    return out
  return overlong


def _load_user_fn(spec: str) -> RewardFn:
  target, _, name = spec.rpartition(":")
  if not target or not name:
    raise config_lib.ConfigError(f"bad value for grpo.reward_fns: {spec!r} (expected "
                                 "builtin:NAME, path/to/file.py:func or package.module:func)")
  if target.endswith(".py"):
    if not os.path.isfile(target):
      raise config_lib.ConfigError(f"grpo.reward_fns: no such file {target}")
    module_spec = importlib.util.spec_from_file_location(f"jaxtune_reward_{abs(hash(target))}",
                                                         target)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  else:
    try:
      module = importlib.import_module(target)
    except ImportError as e:
      raise config_lib.ConfigError(f"grpo.reward_fns: cannot import {target} ({e})") from e
  fn = getattr(module, name, None)
  if not callable(fn):
    raise config_lib.ConfigError(f"grpo.reward_fns: {target} has no function {name!r}")
  return fn


BUILTINS = ("exact_answer", "math_answer", "format", "overlong")


@dataclasses.dataclass(frozen=True)
class Rewards:
  """The run's reward functions, their names and weights."""
  names: tuple[str, ...]
  fns: tuple[RewardFn, ...]
  weights: tuple[float, ...]

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields):
    """(weighted sum [N] float32, {name: [N] float32 with NaN where None})."""
    n = len(completions)
    total = np.zeros(n, np.float64)
    each = {}
    for name, fn, w in zip(self.names, self.fns, self.weights):
      try:
        got = fn(list(prompts), list(completions), **fields)
      except Exception as e:  # name the function and the record, keep the cause
        raise RuntimeError(f"reward function {name} failed on the batch starting at "
                           f"completion 0 (prompt {prompts[0][:60]!r}): "
                           f"{type(e).__name__}: {e}") from e
      if len(got) != n:
        raise ValueError(f"reward function {name} returned {len(got)} values for {n} "
                         "completions")
      vals = np.array([np.nan if v is None else float(v) for v in got], np.float64)
      total += w * np.nan_to_num(vals, nan=0.0)
      each[name] = vals.astype(np.float32)
    return total.astype(np.float32), each


def build(grpo_cfg, max_new_tokens: int) -> Rewards:
  """The Rewards named by `grpo.reward_fns` / `grpo.reward_weights` (ConfigErrors name them)."""
  specs = [s.strip() for s in grpo_cfg.reward_fns.split(",") if s.strip()]
  if not specs and not grpo_cfg.reward_model:
    raise config_lib.ConfigError("method=grpo needs grpo.reward_fns (e.g. builtin:exact_answer)"
                                 " or grpo.reward_model")
  weights = [float(w) for w in grpo_cfg.reward_weights.split(",") if w.strip()]
  if weights and len(weights) != len(specs):
    raise config_lib.ConfigError(f"grpo.reward_weights has {len(weights)} values for "
                                 f"{len(specs)} grpo.reward_fns")
  fns, names = [], []
  for spec in specs:
    kind, _, name = spec.partition(":")
    if kind == "builtin":
      config_lib.check_choice("grpo.reward_fns builtin", name, BUILTINS)
      if name == "format":
        if not grpo_cfg.format_regex:
          raise config_lib.ConfigError("builtin:format needs grpo.format_regex")
        fn = make_format(grpo_cfg.format_regex)
      elif name == "overlong":
        fn = make_overlong(max_new_tokens, grpo_cfg.overlong_buffer)
      else:
        fn = {"exact_answer": exact_answer, "math_answer": math_answer}[name]
      fns.append(fn)
      names.append(name)
    else:
      fns.append(_load_user_fn(spec))
      names.append(spec.rpartition(":")[2])
  return Rewards(tuple(names), tuple(fns), tuple(weights or [1.0] * len(specs)))
