"""The resumable batch iterator the train loop pulls from, and fixed eval batches.

A Loader turns the encoded examples of every train source into an endless stream of global
batches of `batch_size` rows: the mixture schedule (mixture.py) orders the examples of an
epoch, packing (packing.py) groups them into rows, and consecutive rows form batches; a batch
may span an epoch boundary. Each process assembles only its own rows, rows
[p * B/P, (p+1) * B/P) of every global batch, so the global batch is the same whatever the
number of processes.

Its position is (epoch, index of the next row in that epoch, per-source stream offsets at
the epoch's start): `state()` returns it as a JSON-serialisable dict, `restore(state)` jumps
back to it, recomputing the epoch's plan from the seed, so a resumed run gets exactly the
batches the interrupted one would have got (also on another number of processes, or with
another batch size, since the position counts rows):

    loader = datasets.train
    batch = next(loader)            # dict of numpy arrays, see packing.py
    saved = loader.state()          # {"epoch": 0, "index": 8, "offsets": [..], ...}
    ...
    loader.restore(saved)           # the same batches as after `saved` was taken

`state()["plan"]` identifies the data, tokenizer and settings; restoring a state from other
data is a DataError unless `strict=False`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from jaxtune.data import encode
from jaxtune.data import errors
from jaxtune.data import mixture
from jaxtune.data import packing

STATE_VERSION = 1
KINDS = ("sft", "preference", "prompt")


def _check_shares(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise errors.DataError(f"bad process_index={process_index} / process_count="
                           f"{process_count}")
  if batch_size % process_count:
    raise errors.DataError(f"data.batch_size={batch_size} is not divisible by the "
                           f"{process_count} processes; expected a multiple")
  return batch_size // process_count


def _assemble(kind: str, rows: list, seq_len: int, pad_id: int) -> dict[str, Any]:
  """rows: per row a list of (Result, source id) (empty list = padding row)."""
  if kind == "sft":
    return packing.assemble([[(r.seqs[0], s) for r, s in row] for row in rows], seq_len,
                            pad_id)
  if kind == "preference":
    return packing.assemble_pairs([(row[0][0].seqs, row[0][1]) if row else None
                                   for row in rows], seq_len, pad_id)
  return packing.assemble_prompts([(row[0][0].seqs[0], row[0][0].answer, row[0][0].fields)
                                   if row else None
                                   for row in rows], seq_len, pad_id)


class Loader:
  """Endless, deterministic, resumable iterator of this process's share of global batches."""

  def __init__(self, examples: Sequence[Sequence[encode.Result]], *, kind: str, seq_len: int,
               batch_size: int, pack: bool = True, weights: np.ndarray | None = None,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               pad_id: int = 0, plan_id: str = ""):
    if kind not in KINDS:
      raise errors.DataError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    self._examples = [list(src) for src in examples]
    self._lengths = [np.array([len(r.seqs[0]) for r in src], np.int64)
                     for src in self._examples]
    self._schedule = mixture.Schedule([len(src) for src in self._examples], weights, seed)
    self.kind = kind
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.local_batch_size = _check_shares(batch_size, process_index, process_count)
    self.process_index = process_index
    self.pack = pack and kind == "sft"
    self.pad_id = pad_id
    self.plan_id = plan_id
    self._epoch, self._index, self._batches = 0, 0, 0
    self._offsets = [0] * len(self._examples)
    self._rows: list[list[tuple[int, int]]] | None = None
    self._next_offsets: list[int] = []

  # -- position -------------------------------------------------------------------------

  @property
  def examples(self) -> list:
    """Every train example, source by source (read-only: to precompute per-example values)."""
    return self._examples

  def state(self) -> dict:
    """The position as a JSON-serialisable dict (store it in the checkpoint)."""
    return {"version": STATE_VERSION, "epoch": self._epoch, "index": self._index,
            "offsets": list(self._offsets), "batches": self._batches, "plan": self.plan_id}

  def restore(self, state: dict, *, strict: bool = True) -> None:
    """Continues from `state` (from `state()` of a loader over the same data)."""
    missing = [k for k in ("epoch", "index", "offsets") if k not in state]
    if missing or state.get("version", STATE_VERSION) != STATE_VERSION:
      raise errors.DataError(f"bad loader state {state!r}: expected version {STATE_VERSION} "
                             f"with epoch, index, offsets (missing {missing})")
    if strict and state.get("plan", self.plan_id) != self.plan_id:
      raise errors.DataError(f"loader state is for data plan {state.get('plan')!r} but this "
                             f"loader's is {self.plan_id!r}: the data files, tokenizer or data "
                             "settings changed since the checkpoint (restore(strict=False) to "
                             "continue anyway)")
    if len(state["offsets"]) != len(self._examples):
      raise errors.DataError(f"loader state has {len(state['offsets'])} source offsets; this "
                             f"loader has {len(self._examples)} train sources")
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._offsets = [int(o) for o in state["offsets"]]
    self._batches = int(state.get("batches", 0))
    self._rows = None

  @property
  def epoch(self) -> int:
    return self._epoch

  def rows_in_epoch(self) -> int:
    """Rows (packed or not) in the current epoch."""
    self._load_epoch()
    return len(self._rows)

  # -- iteration ------------------------------------------------------------------------

  def _load_epoch(self) -> None:
    if self._rows is not None:
      return
    src, idx, self._next_offsets = self._schedule.epoch(self._epoch, self._offsets)
    lengths = [self._lengths[s][i] for s, i in zip(src.tolist(), idx.tolist())]
    plan = packing.plan(lengths, self.seq_len, pack=self.pack)
    self._rows = [[(int(src[j]), int(idx[j])) for j in row] for row in plan]
    if self._index > len(self._rows):
      raise errors.DataError(f"loader state index {self._index} is past the {len(self._rows)} "
                             f"rows of epoch {self._epoch}")

  def _take_rows(self, count: int) -> list[list[tuple[int, int]]]:
    out = []
    while len(out) < count:
      self._load_epoch()
      take = min(count - len(out), len(self._rows) - self._index)
      out += self._rows[self._index:self._index + take]
      self._index += take
      if self._index == len(self._rows):
        self._epoch, self._index = self._epoch + 1, 0
        self._offsets, self._rows = self._next_offsets, None
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    rows = self._take_rows(self.batch_size)
    start = self.process_index * self.local_batch_size
    mine = rows[start:start + self.local_batch_size]
    self._batches += 1
    return _assemble(self.kind, [[(self._examples[s][i], s) for s, i in row] for row in mine],
                     self.seq_len, self.pad_id)


def fixed_batches(examples: Sequence[Sequence[encode.Result]], *, kind: str, seq_len: int,
                  batch_size: int, pack: bool = True, process_index: int = 0,
                  process_count: int = 1, pad_id: int = 0) -> list[dict[str, Any]]:
  """All `examples` once, in order (source by source), as this process's share of batches.

  For evaluation: the last batch is filled up with padding rows (loss_mask 0, source -1).
  """
  local = _check_shares(batch_size, process_index, process_count)
  stream = [(r, s) for s, src in enumerate(examples) for r in src]
  plan = packing.plan([len(r.seqs[0]) for r, _ in stream], seq_len,
                      pack=pack and kind == "sft")
  rows = [[stream[j] for j in row] for row in plan]
  rows += [[] for _ in range(-len(rows) % batch_size)]
  batches = []
  for b in range(0, len(rows), batch_size):
    start = b + process_index * local
    batches.append(_assemble(kind, rows[start:start + local], seq_len, pad_id))
  return batches
