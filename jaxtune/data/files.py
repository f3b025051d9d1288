"""The one place data files are opened and listed: local paths, or any fsspec URL.

Every data file the pipeline reads goes through `open` / `isdir` / `isfile` / `find` /
`glob`, so `s3://bucket/data.jsonl`, `gs://...` (and anything else `fsspec` reads, with its
credentials from the standard environment: jaxtune/storage.py) work wherever a local path
does. Local paths
take Python's own file functions (no fsspec overhead on the hot path).

    with files.open("s3://bucket/train.jsonl") as f:   # binary, seekable
      for line in f: ...
    files.find("gs://bucket/corpus/")                   # every file below, sorted
"""

from __future__ import annotations

import builtins
import glob as glob_lib
import os

from jaxtune import storage


def is_url(path: str) -> bool:
  return storage.is_remote(path)


def _local(path: str) -> str:
  return path[len("file://"):] if path.startswith("file://") else path


def _fs(path: str):
  """The fsspec filesystem of a URL (a missing backend names its extra: storage.py)."""
  return storage.filesystem(path)[0]


def _url(fs, path: str) -> str:
  """A path fsspec returns (without its protocol) as a URL again."""
  protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
  return path if "://" in path else f"{protocol}://{path}"


def open(path: str, mode: str = "rb"):  # pylint: disable=redefined-builtin
  """A file object for `path` (binary unless `mode` says otherwise)."""
  if is_url(path):
    return _fs(path).open(path, mode)
  return builtins.open(_local(path), mode)


def isdir(path: str) -> bool:
  return _fs(path).isdir(path) if is_url(path) else os.path.isdir(_local(path))


def isfile(path: str) -> bool:
  return _fs(path).isfile(path) if is_url(path) else os.path.isfile(_local(path))


def find(directory: str) -> list[str]:
  """Every file below `directory` (recursively), sorted."""
  if is_url(directory):
    fs = _fs(directory)
    return sorted(_url(fs, p) for p in fs.find(directory))
  root = _local(directory)
  return sorted(p for p in glob_lib.glob(os.path.join(root, "**", "*"), recursive=True)
                if os.path.isfile(p))


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern, sorted."""
  if is_url(pattern):
    fs = _fs(pattern)
    return sorted(_url(fs, p) for p in fs.glob(pattern))
  return sorted(glob_lib.glob(_local(pattern)))
