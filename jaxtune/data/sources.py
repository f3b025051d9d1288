"""Where records come from: local files and directories, or `datasets` names.

A data spec is a comma-separated list (`data.train_files`, `data.eval_files`); each entry is
one *source* (one mixture component, one `source_id`):

  path/to/file.jsonl | .json | .parquet | .csv     one file
  path/to/dir                                      every such file below it, sorted
  hf:NAME[@CONFIG][:SPLIT]                         datasets.load_dataset(NAME, CONFIG,
                                                   split=SPLIT or 'train'): the hub when
                                                   online, the local cache otherwise

`read(source)` yields `(where, record)` pairs: `where` is 'file:line' for JSONL and CSV,
'file record i' for JSON, Parquet and datasets, and `record` is a dict, or a DataError for a
line that is not a JSON object (so that the caller can stop or skip and count it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from typing import Any, Iterator

from jaxtune.data import errors
from jaxtune.data import files

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


@dataclasses.dataclass(frozen=True)
class Source:
  """One entry of a data spec. `files` is empty for a `datasets` source."""
  name: str
  files: tuple[str, ...] = ()
  hf_name: str = ""
  hf_config: str = ""
  hf_split: str = ""


def parse(spec: str, *, setting: str = "data.train_files") -> list[Source]:
  """Parses a comma-separated data spec; missing paths are a DataError naming `setting`."""
  out = []
  for entry in (e.strip() for e in spec.split(",")):
    if not entry:
      continue
    if entry.startswith("hf:"):
      rest = entry[3:]
      name, _, split = rest.partition(":")
      name, _, config = name.partition("@")
      if not name:
        raise errors.DataError(f"{setting}: {entry!r} names no dataset; expected "
                               "hf:NAME[@CONFIG][:SPLIT]")
      out.append(Source(name=entry, hf_name=name, hf_config=config, hf_split=split or "train"))
      continue
    out.append(Source(name=entry, files=tuple(_expand(entry, setting))))
  return out


def _expand(path: str, setting: str) -> list[str]:
  if files.isdir(path):
    found = [p for p in files.find(path) if p.endswith(EXTENSIONS)]
    if not found:
      raise errors.DataError(f"{setting}: directory {path!r} has no {'/'.join(EXTENSIONS)} "
                             "files")
    return found
  matches = files.glob(path) if any(c in path for c in "*?[") else [path]
  for p in matches:
    if not files.isfile(p):
      raise errors.DataError(f"{setting}: no such file or directory: {p!r}")
    if not p.endswith(EXTENSIONS):
      raise errors.DataError(f"{setting}: {p!r} has an unsupported extension; expected one "
                             f"of {', '.join(EXTENSIONS)} (or a directory, or hf:NAME)")
  if not matches:
    raise errors.DataError(f"{setting}: pattern {path!r} matches no files")
  return matches


def read(source: Source) -> Iterator[tuple[str, Any]]:
  """Yields (where, dict-or-DataError) for every record of `source`, in order."""
  if source.hf_name:
    yield from _read_hf(source)
    return
  for path in source.files:
    if path.endswith(".jsonl"):
      yield from _read_jsonl(path)
    elif path.endswith(".json"):
      yield from _read_json(path)
    elif path.endswith(".parquet"):
      yield from _read_parquet(path)
    else:
      yield from _read_csv(path)


def _object_or_error(where: str, value: Any) -> Any:
  if isinstance(value, dict):
    return value
  return errors.bad_record(where, "<record>", f"is a JSON {type(value).__name__}; expected a "
                           "JSON object with the record's fields", "not_an_object")


def _read_jsonl(path: str, start: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, Any]]:
  """Records of a JSON-lines file; `start` = (byte offset, its line number) to begin at."""
  with files.open(path) as f:  # bytes: a bad line is an error about that line, not the file
    f.seek(start[0])
    for lineno, raw in enumerate(f, start=start[1]):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        yield where, errors.DataError(
            f"is not valid UTF-8 (byte {e.start}: {e.reason}); expected UTF-8 JSON lines",
            where=where, field="<line>", reason="bad_encoding")
        continue
      if not line.strip():
        continue
      try:
        value = json.loads(line.rstrip("\r\n"))
      except (json.JSONDecodeError, RecursionError) as e:
        what = (f"malformed JSON at column {e.colno} ({e.msg})" if isinstance(
            e, json.JSONDecodeError) else "JSON nested too deeply")
        yield where, errors.DataError(f"{what}; expected one JSON object per line",
                                      where=where, field="<line>", reason="malformed_json")
        continue
      yield where, _object_or_error(where, value)


def _read_text(path: str) -> str:
  with files.open(path) as f:
    data = f.read()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise errors.DataError(f"{path}:{line}: not valid UTF-8 ({e.reason}); expected a UTF-8 "
                           "text file") from None


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
  text = _read_text(path)
  try:
    value = json.loads(text)
  except RecursionError:
    raise errors.DataError(f"{path}: JSON nested too deeply; expected an array of "
                           "records") from None
  except json.JSONDecodeError as e:
    if e.msg == "Extra data":  # JSON lines saved as .json
      yield from _read_jsonl(path)
      return
    raise errors.DataError(f"{path}:{e.lineno}: malformed JSON at column {e.colno} ({e.msg}); "
                           "expected a JSON array of objects (or JSON lines)") from None
  if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())),
                                                                list):
    value = next(iter(value.values()))  # {"data": [...]}
  if not isinstance(value, list):
    raise errors.DataError(f"{path}: top-level JSON {type(value).__name__}; expected an array of "
                           "records")
  for i, item in enumerate(value):
    where = f"{path} record {i}"
    yield where, _object_or_error(where, item)


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  i = 0
  source = files.open(path) if files.is_url(path) else path
  for batch in pq.ParquetFile(source).iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      yield f"{path} record {i}", row
      i += 1


def _read_csv(path: str) -> Iterator[tuple[str, Any]]:
  reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
  while True:
    try:
      row = next(reader)
    except StopIteration:
      return
    except csv.Error as e:  # a field over csv's size limit, a NUL byte, ...
      raise errors.DataError(f"{path}:{reader.line_num}: malformed CSV ({e}); expected a "
                             "header row and one record per row") from None
    # line_num is the line where the row ends (rows may span lines inside quotes).
    where = f"{path}:{reader.line_num}"
    if None in row:  # more cells than header columns
      yield where, errors.bad_record(where, "<row>", f"has {len(row[None])} cells more than "
                                     "the header names; expected one cell per column",
                                     "malformed_csv")
      continue
    yield where, dict(row)


def _read_hf(source: Source) -> Iterator[tuple[str, Any]]:
  import datasets  # pylint: disable=g-import-not-at-top

  try:
    ds = datasets.load_dataset(source.hf_name, source.hf_config or None, split=source.hf_split)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.DataError(f"{source.name}: datasets.load_dataset({source.hf_name!r}, "
                           f"{source.hf_config or None!r}, split={source.hf_split!r}) failed "
                           f"({type(e).__name__}: {e}); offline, the dataset must be in the "
                           "local datasets cache") from e
  for i, row in enumerate(ds):
    yield f"{source.name} record {i}", dict(row)
