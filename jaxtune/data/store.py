"""The tokenized example store: encoded examples on disk, read back one at a time.

A streamed build (`data.streaming=true`, or any `data.cache_dir`) never holds a corpus in
memory: records are encoded shard by shard into a store on disk, and the Loader reads the
examples of each batch back from it. A store is one directory per (source, split):

    DIR/shard-00000-of-00002/   ids.bin     int32, every sequence's token ids, concatenated
                                train.bin   uint8, the matching train flags
                                seqs.npy    int64 [S, 2]: (start, length) of each sequence
                                extra.json  per example: answer, fields (prompt kind)
                                tally.json  what stats.Tally counted while writing
                                prefit.npy  example lengths before fitting (stats)
    DIR/shard-00001-of-00002/   ...

Example i of a shard is sequences [i*k, (i+1)*k) (k = 1, or 2 for preference pairs). A
shard directory appears only when it is complete (written under a temporary name and
renamed), so a killed writer never leaves a shard that looks finished. Shards concatenate
in order: shard p of P holds the examples of records [p*n/P, (p+1)*n/P), so the store's
example order is the records' order whatever the number of writers.

    w = store.Writer(path, seqs_per_example=1)    # -> a temporary dir
    w.add(result)                                 # an encode.Result
    w.close(tally_state)                          # -> renamed to `path`
    s = store.Store([path0, path1])
    len(s), s.lengths, s[i]                       # examples, [N] int64 lengths, Result
"""

from __future__ import annotations

import array
import json
import os
import shutil
import uuid

import numpy as np

from jaxtune.data import encode

VERSION = 1


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}"


class Writer:
  """Appends encoded examples to a new shard; `close` makes it visible at `path`."""

  def __init__(self, path: str, *, seqs_per_example: int):
    self.path = path
    self.tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(self.tmp)
    self._ids = open(os.path.join(self.tmp, "ids.bin"), "wb")
    self._train = open(os.path.join(self.tmp, "train.bin"), "wb")
    self._k = seqs_per_example
    self._seqs = array.array("q")  # (start, length) per sequence, flat
    self._answers: list = []
    self._fields: list = []
    self._at = 0

  def add(self, result: encode.Result) -> None:
    if len(result.seqs) != self._k:
      raise ValueError(f"store: example has {len(result.seqs)} sequences; expected {self._k}")
    for seq in result.seqs:
      self._ids.write(np.ascontiguousarray(seq.ids, np.int32).tobytes())
      self._train.write(np.ascontiguousarray(seq.train, np.uint8).tobytes())
      self._seqs.extend((self._at, len(seq)))
      self._at += len(seq)
    self._answers.append(result.answer)
    self._fields.append(result.fields)

  def close(self, tally) -> str:
    """Finishes the shard with its stats.Tally; returns `path` (a finished copy by another
    writer wins a race: both are the same bytes)."""
    self._ids.close()
    self._train.close()
    np.save(os.path.join(self.tmp, "seqs.npy"), np.asarray(self._seqs, np.int64).reshape(-1, 2))
    extra = {"version": VERSION, "seqs_per_example": self._k}
    for key, values in (("answers", self._answers), ("fields", self._fields)):
      if any(v is not None for v in values):
        extra[key] = values
    _write_json(os.path.join(self.tmp, "extra.json"), extra)
    np.save(os.path.join(self.tmp, "prefit.npy"), tally.lengths()[0])
    _write_json(os.path.join(self.tmp, "tally.json"), tally.state())
    try:
      os.rename(self.tmp, self.path)
    except OSError:
      if not is_complete(self.path):
        raise
      shutil.rmtree(self.tmp, ignore_errors=True)
    return self.path

  def abort(self) -> None:
    for f in (self._ids, self._train):
      f.close()
    shutil.rmtree(self.tmp, ignore_errors=True)


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, default=str)


def is_complete(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "tally.json"))


def read_tally(path: str) -> tuple[dict, list[np.ndarray]]:
  """(Tally.state(), Tally.lengths()) of a finished shard (for Tally.merge)."""
  with open(os.path.join(path, "tally.json"), encoding="utf-8") as f:
    state = json.load(f)
  return state, [np.load(os.path.join(path, "prefit.npy"))]


class Store:
  """Read-only examples of shards `paths` (in order), by index; lengths in memory only."""

  def __init__(self, paths: list[str]):
    self.paths = list(paths)
    self._fds: list[tuple[int, int]] = []
    seqs, answers, fields, k = [], [], [], None
    for p in self.paths:
      with open(os.path.join(p, "extra.json"), encoding="utf-8") as f:
        extra = json.load(f)
      if extra.get("version") != VERSION:
        raise ValueError(f"{p}: store version {extra.get('version')}; expected {VERSION}")
      if k not in (None, extra["seqs_per_example"]):
        raise ValueError(f"{p}: {extra['seqs_per_example']} sequences per example; expected {k}")
      k = extra["seqs_per_example"]
      s = np.load(os.path.join(p, "seqs.npy"))
      seqs.append(s)
      answers += extra.get("answers") or [None] * (len(s) // k)
      fields += extra.get("fields") or [None] * (len(s) // k)
    self.k = k or 1
    self._shard_ends = np.cumsum([len(s) for s in seqs], dtype=np.int64)  # [shards]
    self._seqs = np.concatenate(seqs) if seqs else np.zeros((0, 2), np.int64)
    self._answers = answers if any(a is not None for a in answers) else None
    self._fields = fields if any(f is not None for f in fields) else None
    self.lengths = self._seqs[::self.k, 1].copy()  # [N] the first sequence's length

  def __len__(self) -> int:
    return len(self._seqs) // self.k

  def _fd(self, shard: int) -> tuple[int, int]:
    while len(self._fds) <= shard:
      p = self.paths[len(self._fds)]
      self._fds.append((os.open(os.path.join(p, "ids.bin"), os.O_RDONLY),
                        os.open(os.path.join(p, "train.bin"), os.O_RDONLY)))
    return self._fds[shard]

  def _seq(self, j: int) -> encode.Encoded:
    start, n = (int(x) for x in self._seqs[j])
    ids_fd, train_fd = self._fd(int(np.searchsorted(self._shard_ends, j, side="right")))
    ids = np.frombuffer(os.pread(ids_fd, 4 * n, 4 * start), np.int32)
    train = np.frombuffer(os.pread(train_fd, n, start), np.uint8).astype(bool)
    return encode.Encoded(ids, train)

  def __getitem__(self, i: int) -> encode.Result:
    if not 0 <= i < len(self):
      raise IndexError(f"example {i} of {len(self)}")
    seqs = tuple(self._seq(i * self.k + c) for c in range(self.k))
    return encode.Result(seqs, answer=self._answers[i] if self._answers else None,
                         fields=self._fields[i] if self._fields else None)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getstate__(self):  # file descriptors are per process
    return {**self.__dict__, "_fds": []}

  def close(self) -> None:
    for a, b in self._fds:
      os.close(a)
      os.close(b)
    self._fds = []
