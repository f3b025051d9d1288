"""Streamed sources: records read lazily, encoded share by share into the tokenized store.

With `data.streaming=true` (or a `data.cache_dir`) no source is ever held in memory. For
each source:

  1. `count`: one pass over the bytes finds the number of records n and a seek mark every
     MARK records (JSON lines: byte offset and line number; other formats: the file start);
  2. the held-out eval records are chosen as in memory (`held_out` over n);
  3. the records are cut into P shares, share p = records [p*n/P, (p+1)*n/P); process p
     encodes its share (in pieces of PIECE records: rendered, checked, tokenized, fitted
     to seq_len exactly as in memory) into shard p of the source's train and eval stores
     (store.py), then uses the other processes' shards as they appear in the shared cache
     directory, encoding a share itself when its shard does not appear in time (a cache
     directory that is not shared then still works, with every process doing all shares);
  4. the share is read in one sequential pass and encoded piece by piece; with
     `data.workers=N > 0` and JSON-lines files, the pieces are instead read at their seek
     marks and encoded by N grain worker processes
     (`grain.MapDataset(...).map(...).to_iter_dataset().mp_prefetch(...)`, order kept).

Memory is bounded by a piece (PIECE records and their examples) plus per example a few
int64 (store offsets and lengths, the held-out mask): never by the corpus. The store's
example order is the records' order whatever P is, so the Loader's plan, and every batch,
is the one the in-memory path gives.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from jaxtune.data import errors
from jaxtune.data import files
from jaxtune.data import sources
from jaxtune.data import stats as stats_lib
from jaxtune.data import store

MARK = 4096  # records between seek marks (JSON lines)
PIECE = 64  # records per unit of encoding work (bounds the memory of a build)
EVAL_SPLIT_SEED = 20250601  # the held-out split's seed (independent of data.seed)
_log = logging.getLogger("jaxtune.data")


@dataclasses.dataclass(frozen=True)
class Mark:
  """Record `record` of a source starts at byte `offset` (line `line`) of its file `file`."""
  record: int
  file: int
  offset: int = 0
  line: int = 1


def _blank(raw: bytes) -> bool:
  """The JSON-lines reader's test for a line it skips (fast path for ordinary lines)."""
  b = raw.strip()
  if b and 0x21 <= b[0] < 0x80:
    return False
  try:
    return not raw.decode("utf-8").strip()
  except UnicodeDecodeError:
    return False  # a record (an error about that line)


def _count_jsonl(path: str, file: int, first: int, marks: list[Mark]) -> int:
  n, offset = 0, 0
  with files.open(path) as f:
    for lineno, raw in enumerate(f, start=1):
      if not _blank(raw):
        if n == 0 or (first + n) % MARK == 0:  # each file's first record, every MARK
          marks.append(Mark(first + n, file, offset, lineno))
        n += 1
      offset += len(raw)
  return n


def count(src: sources.Source) -> tuple[int, list[Mark]]:
  """(records, seek marks) of a source, without keeping any record."""
  if src.hf_name:
    return sum(1 for _ in sources.read(src)), [Mark(0, -1)]
  n, marks = 0, []
  for i, path in enumerate(src.files):
    if path.endswith(".jsonl"):
      n += _count_jsonl(path, i, n, marks)
    else:
      marks.append(Mark(n, i))
      n += sum(1 for _ in sources.read(sources.Source(name=path, files=(path,))))
  return n, marks


def read_range(src: sources.Source, marks: list[Mark], start: int,
               stop: int) -> Iterator[tuple[str, Any]]:
  """(where, record) of records [start, stop) of `src`, seeking to the nearest mark."""
  if start >= stop:
    return
  mark = max((m for m in marks if m.record <= start), key=lambda m: m.record)
  i = mark.record
  if src.hf_name:
    stream = sources.read(src)
  else:
    stream = itertools.chain(*(_file_records(src.files[f], mark if f == mark.file else None)
                               for f in range(mark.file, len(src.files))))
  for where, rec in stream:
    if i >= stop:
      return
    if i >= start:
      yield where, rec
    i += 1


def _file_records(path: str, mark: Mark | None) -> Iterator[tuple[str, Any]]:
  if path.endswith(".jsonl") and mark is not None:
    return sources._read_jsonl(path, (mark.offset, mark.line))  # pylint: disable=protected-access
  return sources.read(sources.Source(name=path, files=(path,)))


def held_out(n: int, fraction: float) -> np.ndarray:
  """[n] bool: the records of a source held out for eval (fixed seed, independent of
  data.seed); none when fraction <= 0 or n < 2, else round(n * fraction) in [1, n - 1]."""
  held = np.zeros(n, bool)
  if fraction <= 0 or n < 2:
    return held
  n_eval = min(n - 1, max(1, int(round(n * fraction))))
  held[np.random.default_rng(EVAL_SPLIT_SEED).permutation(n)[:n_eval]] = True
  return held


def first_records(src: sources.Source, limit: int = 64) -> list[tuple[str, Any]]:
  """The first `limit` records (format detection)."""
  return list(itertools.islice(sources.read(src), limit))


@dataclasses.dataclass(frozen=True)
class Piece:
  """Records [start, stop) of a source, with their held-out flags (and the records, when
  the caller read them in one sequential pass)."""
  start: int
  stop: int
  held: np.ndarray  # [stop - start] bool
  raw: list | None = None


class EncodePiece:
  """Picklable work unit for grain workers: records of a piece -> (train, eval) examples
  and their tallies. `encode_records(raw, tally) -> list[Result]` is pipeline's encoder."""

  def __init__(self, src, marks, fmt: str, encode_records: Callable):
    self.src, self.marks, self.fmt, self.encode_records = src, marks, fmt, encode_records

  def __call__(self, piece: Piece):
    raw = piece.raw
    if raw is None:
      raw = list(read_range(self.src, self.marks, piece.start, piece.stop))
    out = []
    for split in (False, True):
      tally = stats_lib.Tally()
      tally.add_source(self.src.name, self.fmt)
      part = [r for r, h in zip(raw, piece.held) if h == split]
      out.append((self.encode_records(part, tally), tally.state(), tally.lengths()))
    return out


def _pieces(start: int, stop: int, held: np.ndarray) -> list[Piece]:
  return [Piece(a, min(a + PIECE, stop), held[a:min(a + PIECE, stop)])
          for a in range(start, stop, PIECE)]


def seekable(src: sources.Source) -> bool:
  """True when a piece can be read on its own (JSON lines: seek marks)."""
  return bool(src.files) and all(p.endswith(".jsonl") for p in src.files)


def _encoded(fn: EncodePiece, start: int, stop: int, held: np.ndarray, workers: int):
  """fn over the pieces of records [start, stop), in order: in this process over one
  sequential read, or (JSON lines, workers > 0) in `workers` grain processes, each piece
  read at its seek mark."""
  if workers <= 0 or not seekable(fn.src) or stop - start <= PIECE:
    records = read_range(fn.src, fn.marks, start, stop)
    for a in range(start, stop, PIECE):
      b = min(a + PIECE, stop)
      yield fn(Piece(a, b, held[a:b], list(itertools.islice(records, b - a))))
    return
  pieces = _pieces(start, stop, held)
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.DataError(f"data.workers={workers} needs grain ({e}); pip install "
                           "'jaxtune[stream]', or set data.workers=0") from None

  if not flags.FLAGS.is_parsed():  # a library caller (not an absl main): grain reads flags
    flags.FLAGS.mark_as_parsed()
  ds = grain.MapDataset.source(pieces).map(fn).to_iter_dataset()
  it = iter(ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(num_workers=workers)))
  try:
    yield from it
  finally:
    it.close()  # stops and joins the worker processes


def write_share(fn: EncodePiece, paths: tuple[str, str], start: int, stop: int,
                held: np.ndarray, k: int, workers: int) -> None:
  """Encodes records [start, stop) into the (train, eval) shards `paths`."""
  writers = [store.Writer(p, seqs_per_example=k) for p in paths]
  tallies = [stats_lib.Tally() for _ in paths]
  for t in tallies:
    t.add_source(fn.src.name, fn.fmt)
  try:
    for out in _encoded(fn, start, stop, held, workers):
      for w, t, (results, state, lengths) in zip(writers, tallies, out):
        for r in results:
          w.add(r)
        t.merge(state, lengths)
  except BaseException:
    for w in writers:
      w.abort()
    raise
  for w, t in zip(writers, tallies):
    w.close(t)


def layout(entry: str, count_: int) -> list[tuple[str, str]]:
  """(train, eval) shard paths of a P-shard layout of a cache entry."""
  return [(os.path.join(entry, "train", store.shard_name(p, count_)),
           os.path.join(entry, "eval", store.shard_name(p, count_))) for p in range(count_)]


def complete_layout(entry: str) -> list[tuple[str, str]] | None:
  """The shard paths of a finished layout of `entry` (any shard count), or None."""
  try:
    names = os.listdir(os.path.join(entry, "train"))
  except OSError:
    return None
  counts = sorted({int(n.rsplit("-", 1)[1]) for n in names
                   if n.startswith("shard-") and "." not in n})
  for c in counts:
    shards = layout(entry, c)
    if all(store.is_complete(a) and store.is_complete(b) for a, b in shards):
      return shards
  return None


def build_shares(make_fn: Callable[[], EncodePiece], n: int, held: np.ndarray, entry: str,
                 k: int, process_index: int, process_count: int, workers: int,
                 wait_s: float | None = None) -> list[tuple[str, str]]:
  """Shard paths of every share: this process's written first, the others' awaited
  (up to `wait_s`, default 3x this process's own time + 30 s), else written here."""
  shards = layout(entry, process_count)
  bounds = [p * n // process_count for p in range(process_count + 1)]
  order = [process_index] + [p for p in range(process_count) if p != process_index]
  fn, began, deadline = None, time.monotonic(), None
  for p in order:
    if p != process_index:
      if deadline is None:
        deadline = time.monotonic() + (wait_s if wait_s is not None
                                       else 3 * (time.monotonic() - began) + 30)
      while time.monotonic() < deadline and not all(map(store.is_complete, shards[p])):
        time.sleep(0.2)
    if all(map(store.is_complete, shards[p])):
      continue
    if p != process_index:
      _log.info("data: share %d of %s did not appear; encoding it here", p, entry)
    fn = fn or make_fn()
    for path in shards[p]:
      os.makedirs(os.path.dirname(path), exist_ok=True)
    write_share(fn, shards[p], bounds[p], bounds[p + 1], held, k, workers)
  return shards


def open_stores(shards: list[tuple[str, str]], tally: tuple[stats_lib.Tally, ...],
                at: tuple[int | None, int | None]) -> tuple[store.Store, store.Store]:
  """(train, eval) stores over the shards; their tallies merged into `tally` at `at`."""
  for split in (0, 1):
    if at[split] is None:
      continue
    for pair in shards:
      tally[split].merge(*store.read_tally(pair[split]), at=at[split])
  return store.Store([a for a, _ in shards]), store.Store([b for _, b in shards])


def missing_error(src: sources.Source) -> errors.DataError:
  return errors.DataError(f"data.train_files: {src.name} has no records")
