"""Rows of a batch: packing examples into fixed-length rows and laying out the arrays.

Packing (`plan`) is greedy first-fit over a window of open rows, in stream order: each
example goes into the first open row with room for it; when none has room a new row opens,
and when `window` rows are open the oldest is closed first. It is deterministic and keeps
rows close to the stream order (resume and mixtures depend on both); with `pack=False` every
example gets its own row.

An example of n tokens x_0..x_{n-1} with train flags t_0..t_{n-1} occupies n positions o..o+n-1
of its row (`assemble`):

    tokens      x_0   x_1   ...  x_{n-2}  x_{n-1}
    targets     x_1   x_2   ...  x_{n-1}  0          next token, never across a boundary
    loss_mask   t_1   t_2   ...  t_{n-1}  0          the last position has no target
    segment_ids j     j     ...  j        j          1, 2, ... per example in the row; 0 = pad
    positions   0     1     ...  n-2      n-1        restart in every segment
    source_ids  s     s     ...  s        s          mixture source; -1 = pad

So the end-of-turn / eos token is trained as the target of the position before it, and the
loss of a packed example is exactly its loss unpacked, provided attention is restricted to
equal segment ids (the model's job, with `segment_ids` and `positions`).

Preference pairs (`assemble_pairs`) give the same keys with shape [B, 2, T] (0 = chosen,
1 = rejected), one pair per row. Prompts (`assemble_prompts`) are left-padded:
prompt_tokens [B, T] and prompt_mask [B, T] (1 = real token).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxtune.data import encode


def plan(lengths: Sequence[int], seq_len: int, *, pack: bool = True,
         window: int = 16) -> list[list[int]]:
  """Groups stream positions 0..len(lengths)-1 into rows of at most seq_len tokens.

  >>> plan([3, 3, 2, 4], 6, window=2)
  [[0, 1], [2, 3]]
  """
  order, starts = plan_arrays(lengths, seq_len, pack=pack, window=window)
  return [order[a:b].tolist() for a, b in zip(starts[:-1], starts[1:])]


def plan_arrays(lengths: Sequence[int], seq_len: int, *, pack: bool = True,
                window: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """`plan` in two arrays, a few bytes per example: row r is order[starts[r]:starts[r+1]].

  >>> order, starts = plan_arrays([3, 3, 2, 4], 6, window=2)
  >>> order.tolist(), starts.tolist()
  ([0, 1, 2, 3], [0, 2, 4])
  """
  n = len(lengths)
  if not pack:
    return np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64)
  row_of = np.empty(n, np.int64)
  rows = 0
  open_rows: list[list] = []  # [free, [positions]]

  def close(r) -> None:
    nonlocal rows
    row_of[r[1]] = rows
    rows += 1

  lengths = np.asarray(lengths, np.int64)
  for j, n_j in ((j, int(x)) for a in range(0, n, 1 << 14)
                 for j, x in enumerate(lengths[a:a + (1 << 14)].tolist(), start=a)):
    if n_j > seq_len:
      raise ValueError(f"example {j} has {n_j} tokens > seq_len {seq_len} (not truncated?)")
    for r in open_rows:
      if r[0] >= n_j:
        r[0] -= n_j
        r[1].append(j)
        break
    else:
      if len(open_rows) == window:
        close(open_rows.pop(0))
      open_rows.append([seq_len - n_j, [j]])
    if open_rows and open_rows[0][0] == 0:  # full: close it now
      close(open_rows.pop(0))
  for r in open_rows:
    close(r)
  order = np.argsort(row_of, kind="stable")
  starts = np.zeros(rows + 1, np.int64)
  np.cumsum(np.bincount(row_of, minlength=rows), out=starts[1:])
  return order, starts


def _empty(shape: tuple[int, ...], pad_id: int) -> dict[str, np.ndarray]:
  return {
      "tokens": np.full(shape, pad_id, np.int32),
      "targets": np.zeros(shape, np.int32),
      "loss_mask": np.zeros(shape, np.float32),
      "segment_ids": np.zeros(shape, np.int32),
      "positions": np.zeros(shape, np.int32),
      "source_ids": np.full(shape, -1, np.int32),
  }


def _put(out: dict[str, np.ndarray], index: tuple, o: int, seq: encode.Encoded, segment: int,
         source: int) -> None:
  n = len(seq)
  out["tokens"][index + (slice(o, o + n),)] = seq.ids
  out["targets"][index + (slice(o, o + n - 1),)] = seq.ids[1:]
  out["loss_mask"][index + (slice(o, o + n - 1),)] = seq.train[1:]
  out["segment_ids"][index + (slice(o, o + n),)] = segment
  out["positions"][index + (slice(o, o + n),)] = np.arange(n, dtype=np.int32)
  out["source_ids"][index + (slice(o, o + n),)] = source


def assemble(rows: Sequence[Sequence[tuple[encode.Encoded, int]]], seq_len: int,
             pad_id: int = 0) -> dict[str, np.ndarray]:
  """Rows of (sequence, source id) -> SFT batch arrays [B, T]; an empty row is all padding."""
  out = _empty((len(rows), seq_len), pad_id)
  for b, row in enumerate(rows):
    o = 0
    for j, (seq, source) in enumerate(row):
      if o + len(seq) > seq_len:
        raise ValueError(f"row {b} overflows seq_len {seq_len}")
      _put(out, (b,), o, seq, j + 1, source)
      o += len(seq)
  return out


def assemble_pairs(rows: Sequence[tuple[tuple[encode.Encoded, encode.Encoded], int] | None],
                   seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """(chosen, rejected), source id per row -> preference batch arrays [B, 2, T]."""
  out = _empty((len(rows), 2, seq_len), pad_id)
  for b, row in enumerate(rows):
    if row is None:
      continue
    pair, source = row
    for c in range(2):
      _put(out, (b, c), 0, pair[c], 1, source)
  return out


def assemble_prompts(rows: Sequence[tuple | None], seq_len: int, pad_id: int = 0) -> dict:
  """(prompt, answer[, fields]) per row -> prompt_tokens / prompt_mask [B, T] left-padded,
  answers, and `fields` (per row the record's other columns, a dict or None) when any row
  has some."""
  tokens = np.full((len(rows), seq_len), pad_id, np.int32)
  mask = np.zeros((len(rows), seq_len), np.int32)
  answers, fields = [], []
  for b, row in enumerate(rows):
    if row is None:
      answers.append(None)
      fields.append(None)
      continue
    seq, answer = row[:2]
    fields.append(row[2] if len(row) > 2 else None)
    n = len(seq)
    tokens[b, seq_len - n:] = seq.ids
    mask[b, seq_len - n:] = 1
    answers.append(answer)
  out = {"prompt_tokens": tokens, "prompt_mask": mask,
         "answers": answers if any(a is not None for a in answers) else None}
  if any(fields):
    out["fields"] = fields
  return out
