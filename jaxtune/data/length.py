"""Length policy: what happens to an example longer than data.seq_len tokens.

  error           DataError naming the record (skipped and counted under on_bad_record=skip)
  truncate_right  keep the first seq_len tokens   (counted as 'truncated')
  truncate_left   keep the last seq_len tokens    (counted as 'truncated')
  drop            leave the example out           (counted as dropped 'too_long')

Preference pairs apply the policy to chosen and rejected separately. Prompts (GRPO) keep
their end, where the generation prompt is, under both truncate policies. An example left
with no trained token (a prompt that fills the whole window) is dropped as 'no_loss_tokens'.
Nothing is dropped without being counted.
"""

from __future__ import annotations

from jaxtune.data import encode
from jaxtune.data import errors

TRUNCATION = ("error", "truncate_right", "truncate_left", "drop")


def fit(result: encode.Result, seq_len: int, truncation: str, where: str, *,
        kind: str = "sft") -> tuple[encode.Result | None, str]:
  """Applies the policy; returns (result or None, outcome).

  outcome is 'ok', 'truncated', 'too_long' (dropped) or 'no_loss_tokens' (dropped).
  """
  if truncation not in TRUNCATION:
    raise errors.DataError(f"bad data.truncation {truncation!r}; expected one of "
                           f"{', '.join(TRUNCATION)}")
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
    result = encode.Result(tuple(seqs), result.answer, result.field, result.untrained_turns)
    outcome = "truncated"
  if kind != "prompt" and any(not s.train[1:].any() for s in result.seqs):
    return None, "no_loss_tokens"
  return result, outcome
