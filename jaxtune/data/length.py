"""Length policy: what happens to an example longer than data.seq_len tokens.

  auto            text documents: split; everything else: truncate_right (prompts keep their
                  end, where the generation prompt is)
  split           a text document becomes seq_len windows (below); only for text records
  error           DataError naming the record (skipped and counted under on_bad_record=skip)
  truncate_right  keep the first seq_len tokens   (counted as 'truncated')
  truncate_left   keep the last seq_len tokens    (counted as 'truncated')
  drop            leave the example out           (counted as dropped 'too_long')

Splitting (continued pre-training) trains every token of the corpus. Window k starts at
k * stride (data.stride; 0 = seq_len - 1) and holds up to seq_len tokens; a token is a
target in exactly one window (the first that holds it after its first position), so the
overlap of seq_len - stride tokens is context only. With the default stride the windows
share one token, the last input of window k being the first of window k+1:

    ids 0..9, seq_len 4, stride 3:  [0 1 2 3] [3 4 5 6] [6 7 8 9]
    targets (trained tokens)          1 2 3      4 5 6     7 8 9     -> all of 1..9, once

Each window is its own example (own segment when packed), so attention never crosses a
document boundary; a document's windows are independent rows of context.

Preference pairs apply the policy to chosen and rejected separately. An example left with
no trained token (a prompt that fills the whole window) is dropped as 'no_loss_tokens'.
Nothing is dropped without being counted.
"""

from __future__ import annotations

import numpy as np

from jaxtune.data import encode
from jaxtune.data import errors

TRUNCATION = ("auto", "split", "error", "truncate_right", "truncate_left", "drop")


def effective(truncation: str, fmt: str, kind: str, where: str = "") -> str:
  """The policy `truncation` means for records of format `fmt` in a pipeline of `kind`."""
  if truncation not in TRUNCATION:
    raise errors.DataError(f"bad data.truncation {truncation!r}; expected one of "
                           f"{', '.join(TRUNCATION)}")
  if truncation == "auto":
    if fmt == "text" and kind == "sft":
      return "split"
    return "truncate_left" if kind == "prompt" else "truncate_right"
  if truncation == "split" and (fmt != "text" or kind != "sft"):
    raise errors.DataError(f"{where or 'data'}: data.truncation=split applies to text records "
                           f"(continued pre-training) but these are {fmt!r}; expected auto, "
                           "error, truncate_right, truncate_left or drop")
  return truncation


def fit(result: encode.Result, seq_len: int, truncation: str, where: str, *,
        kind: str = "sft") -> tuple[encode.Result | None, str]:
  """Applies the policy to one example; returns (result or None, outcome).

  outcome is 'ok', 'truncated', 'too_long' (dropped) or 'no_loss_tokens' (dropped).
  'auto' and 'split' cut a single example at the right (prompts: at the left); splitting
  into windows is `windows`.
  """
  if truncation not in TRUNCATION:
    raise errors.DataError(f"bad data.truncation {truncation!r}; expected one of "
                           f"{', '.join(TRUNCATION)}")
  if truncation in ("auto", "split"):
    truncation = "truncate_right"
  longest = max(len(s) for s in result.seqs)
  outcome = "ok"
  if longest > seq_len:
    if truncation == "error":
      raise errors.bad_record(
          where, result.field, f"the example is {longest} tokens, longer than data.seq_len="
          f"{seq_len}; expected at most {seq_len} tokens (or set data.truncation="
          "truncate_right, truncate_left or drop)", "too_long")
    if truncation == "drop":
      return None, "too_long"
    left = truncation == "truncate_left" or kind == "prompt"
    seqs = []
    for s in result.seqs:
      if len(s) > seq_len:
        sl = slice(len(s) - seq_len, None) if left else slice(0, seq_len)
        s = encode.Encoded(s.ids[sl], s.train[sl])
      seqs.append(s)
    result = encode.Result(tuple(seqs), result.answer, result.field, result.untrained_turns,
                           result.turns_without_eos, fields=result.fields)
    outcome = "truncated"
  if kind != "prompt" and any(not s.train[1:].any() for s in result.seqs):
    return None, "no_loss_tokens"
  return result, outcome


def windows(result: encode.Result, seq_len: int, stride: int = 0) -> list[encode.Result]:
  """A one-sequence example as windows of at most seq_len tokens (see module docstring).

  Every token the example trains is trained in exactly one window; windows that would
  train nothing are left out.
  """
  (seq,) = result.seqs
  n = len(seq)
  if n <= seq_len:
    return [result]
  step = stride or max(seq_len - 1, 1)
  out, start, done = [], 0, 0  # tokens 1..done are targets of earlier windows
  while True:
    end = min(start + seq_len, n)
    train = seq.train[start:end] & (np.arange(start, end) > done)
    if train[1:].any():
      out.append(encode.Result((encode.Encoded(seq.ids[start:end], train),),
                               field=result.field))
    done = max(done, end - 1)
    if end == n:
      return out
    start += step
