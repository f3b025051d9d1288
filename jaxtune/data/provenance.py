"""Provenance: a fingerprint of the data files, the tokenizer and the chat template.

A checkpoint or an exported model should say what it was trained on. `fingerprint(parts)`
is the sha256 of a canonical JSON of named digests:

    {"train": {"data/a.jsonl": "<sha256 of the file bytes>", "hf:org/ds:train": "<sha256 of
     its records as canonical JSON>"}, "eval": {...}, "tokenizer": "<sha256 of tokenizer.json
     and the special tokens>", "chat_template": "<sha256 of the template text>"}

The parts dict is kept too (Datasets.provenance), so a difference can be traced to its
file. The fingerprint depends on content only: the same files under other paths (another
checkout, another host) give the same fingerprint; the order of the sources counts.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from jaxtune.data import files

def file_digest(path: str) -> str:
  with files.open(path) as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def records_digest(records: Iterable[Any]) -> str:
  """Digest of records (dicts) as canonical JSON, for sources without files (datasets)."""
  h = hashlib.sha256()
  for r in records:
    h.update(json.dumps(r, sort_keys=True, default=str).encode("utf-8"))
    h.update(b"\n")
  return h.hexdigest()


def source_digest(files: Iterable[str]) -> str:
  """Digest of a source's files: per-file digests in order, so renames within keep it."""
  return hashlib.sha256("".join(file_digest(p) for p in files).encode()).hexdigest()


def tokenizer_digest(tok) -> str:
  """The tokenizer's full serialization (vocab, merges, normalizer, ...) and special tokens."""
  backend = getattr(tok, "backend_tokenizer", None)
  body = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
  specials = json.dumps({k: str(v) for k, v in tok.special_tokens_map.items()}, sort_keys=True)
  return hashlib.sha256((body + "\n" + specials).encode("utf-8")).hexdigest()


def template_digest(tok) -> str:
  template = tok.chat_template or ""
  if isinstance(template, dict):  # named templates
    template = json.dumps(template, sort_keys=True)
  return hashlib.sha256(template.encode("utf-8")).hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
  """sha256 of the digests in `parts`; source names (paths) are left out, order is kept."""
  canonical = {k: list(v.values()) if isinstance(v, dict) else v for k, v in parts.items()}
  return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode("utf-8")).hexdigest()
