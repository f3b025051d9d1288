"""The tokenized cache: a source's encoded examples, kept for later runs, resumes and hosts.

Each train or eval source of a streamed build (`data.streaming=true` or `data.cache_dir`
set) becomes one cache entry, a directory named by a key over everything its examples
depend on:

    sha256 of {the source's content digest (provenance.py: sha256 of every file's bytes,
               or of a datasets source's records), the tokenizer and chat-template digests,
               the pipeline kind, data.format / text_field / loss_policy / seq_len /
               truncation / stride / chat_render / check_template / on_bad_record, the
               held-out split (data.eval_fraction, or none when data.eval_files is set),
               and VERSION (bumped when encoding changes what it produces)}

so a changed byte in one input file, another tokenizer or template, or another length
setting gives another entry (that source is encoded again; the others are reused), while
the same files under other paths or on another host hit. The packing plan is not cached:
it depends on the epoch's shuffled order and is recomputed from the example lengths (one
pass over [N] int64, no tokenizer). The seed, batch size, mixture weights and packing
switch therefore reuse an entry.

    DIR/<key>/source.json                 name, format, records, key parts
    DIR/<key>/train/shard-00000-of-00001  store.py shards (train examples of the source)
    DIR/<key>/eval/shard-00000-of-00001   the held-out examples

DIR is data.cache_dir, else $JAXTUNE_CACHE_DIR, else ~/.cache/jaxtune/tokenized. Entries
are never modified once complete; delete the directory to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from jaxtune import storage
from jaxtune.data import errors
from jaxtune.data import provenance
from jaxtune.data import sources
from jaxtune.data import store
from jaxtune.data import stream

VERSION = 1
ENCODE_KEYS = ("format", "text_field", "loss_policy", "seq_len", "truncation", "stride",
               "chat_render", "check_template", "on_bad_record")


def directory(data_cfg) -> str:
  """data.cache_dir, else $JAXTUNE_CACHE_DIR, else ~/.cache/jaxtune/tokenized (a local or
  shared-filesystem path: examples are read back with pread, so not a bucket URL)."""
  path = (data_cfg.cache_dir or os.environ.get("JAXTUNE_CACHE_DIR")
          or os.path.join(os.path.expanduser("~"), ".cache", "jaxtune", "tokenized"))
  if storage.is_remote(path):
    raise errors.DataError(f"data.cache_dir={path!r}: the tokenized cache must be a local or "
                           "shared-filesystem directory (its examples are read back by "
                           "offset); expected a path, e.g. a bucket mount")
  return os.path.expanduser(path)


def source_digest(src: sources.Source) -> str:
  if src.files:
    return provenance.source_digest(src.files)
  return provenance.records_digest(r for _, r in sources.read(src))


def key(digest: str, data_cfg, kind: str, split: str, tokenizer_parts: dict) -> str:
  parts = {"version": VERSION, "store": store.VERSION, "source": digest, "kind": kind,
           "split": split, **tokenizer_parts,
           **{k: getattr(data_cfg, k) for k in ENCODE_KEYS if hasattr(data_cfg, k)}}
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_meta(entry: str) -> dict | None:
  try:
    with open(os.path.join(entry, "source.json"), encoding="utf-8") as f:
      return json.load(f)
  except OSError:
    return None


def _write_meta(entry: str, meta: dict) -> None:
  tmp = os.path.join(entry, f"source.json.tmp-{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(meta, f)
  os.replace(tmp, os.path.join(entry, "source.json"))


def source_stores(src: sources.Source, *, entry: str, split: str, detect: Callable,
                  encode_records: Callable, k: int, process_index: int, process_count: int,
                  workers: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
  """(source meta, shard paths) of one source's entry: reused when complete, else built.

  detect(first_records) -> format; encode_records(raw, tally) -> examples (pipeline's).
  split: "fraction:F" (hold out F of the records for eval), "none" (train only) or "all"
  (an eval source).
  """
  meta = _read_meta(entry)
  shards = stream.complete_layout(entry) if meta else None
  if shards is not None:
    return {**meta, "hit": True}, shards
  n, marks = stream.count(src)
  if not n:
    return {"name": src.name, "records": 0, "format": "", "hit": False}, []
  fmt = detect(stream.first_records(src))
  if split == "all":  # an eval source
    held = np.ones(n, bool)
  else:
    held = stream.held_out(n, float(split.split(":")[1]) if split != "none" else 0.0)
  os.makedirs(entry, exist_ok=True)
  meta = {"name": src.name, "records": n, "format": fmt, "split": split}
  _write_meta(entry, meta)
  make = lambda: stream.EncodePiece(src, marks, fmt, encode_records)  # noqa: E731
  shards = stream.build_shares(make, n, held, entry, k, process_index, process_count,
                               workers)
  return {**meta, "hit": False}, shards
