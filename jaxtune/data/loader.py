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

from collections.abc import Sequence
from typing import Any, NamedTuple

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


class _Epoch(NamedTuple):
  """One epoch's plan: draw d takes example idx[d] of source src[d]; row r holds the draws
  order[starts[r]:starts[r+1]] (packing.plan_arrays)."""
  src: np.ndarray
  idx: np.ndarray
  order: np.ndarray
  starts: np.ndarray

  def __len__(self) -> int:
    return len(self.starts) - 1

  def row(self, r: int) -> list[tuple[int, int]]:
    draws = self.order[self.starts[r]:self.starts[r + 1]]
    return list(zip(self.src[draws].tolist(), self.idx[draws].tolist()))


class Loader:
  """Endless, deterministic, resumable iterator of this process's share of global batches."""

  def __init__(self, examples: Sequence[Sequence[encode.Result]], *, kind: str, seq_len: int,
               batch_size: int, pack: bool = True, weights: np.ndarray | None = None,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               pad_id: int = 0, plan_id: str = ""):
    if kind not in KINDS:
      raise errors.DataError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    # A source is a list of examples, or a store.Store read lazily (lengths in memory).
    self._examples = [src if hasattr(src, "lengths") else list(src) for src in examples]
    self._lengths = [np.asarray(src.lengths, np.int64) if hasattr(src, "lengths") else
                     np.array([len(r.seqs[0]) for r in src], np.int64)
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
    self._rows: _Epoch | None = None
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

  def _plan(self, epoch: int, offsets) -> tuple[_Epoch, list[int]]:
    """(the rows of `epoch`, per-source offsets after it); a few int64 per example."""
    src, idx, next_offsets = self._schedule.epoch(epoch, offsets)
    lengths = np.zeros(len(src), np.int64)
    for s, lens in enumerate(self._lengths):
      at = src == s
      lengths[at] = lens[idx[at]]
    order, starts = packing.plan_arrays(lengths, self.seq_len, pack=self.pack)
    return _Epoch(src, idx, order, starts), next_offsets

  def steps_for_epochs(self, epochs: float) -> int:
    """Optimizer steps (global batches) that cover `epochs` passes from the start:
    ceil((rows of epochs 0..E-1, plus the fraction of epoch E's rows) / batch_size).
    Each epoch is planned as iteration will plan it (mixture draws and packing differ per
    epoch), so the count is exact; the position is left unchanged."""
    if epochs <= 0:
      raise errors.DataError(f"train.epochs={epochs}; expected > 0")
    rows, offsets, e = 0.0, [0] * len(self._examples), 0
    while e < epochs:
      plan, offsets = self._plan(e, offsets)
      rows += len(plan) * min(1.0, epochs - e)
      e += 1
    return max(1, int(np.ceil(rows / self.batch_size - 1e-9)))

  # -- iteration ------------------------------------------------------------------------

  def _load_epoch(self) -> None:
    if self._rows is not None:
      return
    self._rows, self._next_offsets = self._plan(self._epoch, self._offsets)
    if self._index > len(self._rows):
      raise errors.DataError(f"loader state index {self._index} is past the {len(self._rows)} "
                             f"rows of epoch {self._epoch}")

  def _take_rows(self, count: int) -> list[list[tuple[int, int]]]:
    out = []
    while len(out) < count:
      self._load_epoch()
      take = min(count - len(out), len(self._rows) - self._index)
      out += [self._rows.row(r) for r in range(self._index, self._index + take)]
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


class FixedBatches(Sequence):
  """fixed_batches(lazy=True): the same batches, each assembled when it is read."""

  def __init__(self, examples, rows: list, *, kind: str, seq_len: int, batch_size: int,
               local: int, process_index: int, pad_id: int):
    self._examples, self._rows = examples, rows
    self._kind, self._seq_len, self._pad_id = kind, seq_len, pad_id
    self._batch_size, self._local, self._process_index = batch_size, local, process_index

  def __len__(self) -> int:
    return len(self._rows) // self._batch_size

  def __getitem__(self, b):
    if isinstance(b, slice):
      return [self[i] for i in range(*b.indices(len(self)))]
    if b < 0:
      b += len(self)
    if not 0 <= b < len(self):
      raise IndexError(f"eval batch {b} of {len(self)}")
    start = b * self._batch_size + self._process_index * self._local
    mine = self._rows[start:start + self._local]
    return _assemble(self._kind, [[(self._examples[s][i], s) for s, i in row] for row in mine],
                     self._seq_len, self._pad_id)


def fixed_batches(examples: Sequence[Sequence[encode.Result]], *, kind: str, seq_len: int,
                  batch_size: int, pack: bool = True, process_index: int = 0,
                  process_count: int = 1, pad_id: int = 0,
                  lazy: bool = False) -> list[dict[str, Any]] | FixedBatches:
  """All `examples` once, in order (source by source), as this process's share of batches.

  For evaluation: the last batch is filled up with padding rows (loss_mask 0, source -1).
  lazy=True returns a sequence that assembles each batch when read (streamed data).
  """
  local = _check_shares(batch_size, process_index, process_count)
  index = [(s, i) for s, src in enumerate(examples) for i in range(len(src))]
  lengths = np.concatenate([np.asarray(src.lengths) if hasattr(src, "lengths") else
                            np.array([len(r.seqs[0]) for r in src], np.int64)
                            for src in examples] or [np.zeros(0, np.int64)])
  plan = packing.plan(lengths.tolist(), seq_len, pack=pack and kind == "sft")
  rows = [[index[j] for j in row] for row in plan]
  rows += [[] for _ in range(-len(rows) % batch_size)]
  batches = FixedBatches(examples, rows, kind=kind, seq_len=seq_len, batch_size=batch_size,
                         local=local, process_index=process_index, pad_id=pad_id)
  return batches if lazy else list(batches)
