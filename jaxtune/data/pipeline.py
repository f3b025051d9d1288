"""build(): from a DataConfig and a tokenizer to the train Loader, eval batches and stats.

Everything that can be wrong with the data is found here, before training: every record of
every source is read, checked, rendered and tokenized up front (so that packing and resume
are exact, and every process sees the same global plan), and the first bad record stops the
run with a DataError naming file, line, field and what was expected, unless
data.on_bad_record=skip, which skips, counts and reports it in `stats`.

    tok = tokenizer_lib.from_config(cfg)
    ds = pipeline.build(cfg.data, tok, kind="sft",
                        process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(ds.train)            # this process's rows of the global batch
    ds.eval                           # list of batches (all eval examples once)
    ds.stats, ds.fingerprint          # counts; provenance for checkpoints and HF export

Long examples follow data.truncation (length.py): raw-text documents are split into windows
so every token trains; anything else cut by more than a few percent of a source's tokens,
and assistant turns without an end-of-turn token, are logged as warnings (stats["warnings"])
with the setting that fixes them.

Train sources come from data.train_files ("" = the bundled sample for the kind: chat.jsonl,
preference.jsonl or prompts.jsonl). Eval comes from data.eval_files or, when that is empty,
from a held-out data.eval_fraction of each train source's records, chosen with a fixed seed
(independent of data.seed, so runs with different seeds evaluate on the same records).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

from jaxtune.data import cache as cache_lib
from jaxtune.data import encode
from jaxtune.data import errors
from jaxtune.data import formats
from jaxtune.data import length
from jaxtune.data import loader as loader_lib
from jaxtune.data import mixture
from jaxtune.data import provenance
from jaxtune.data import sources
from jaxtune.data import stats as stats_lib
from jaxtune.data import stream
from jaxtune.data import tokenizer_lib

EVAL_SPLIT_SEED = stream.EVAL_SPLIT_SEED
DEFAULT_SAMPLE = {"sft": "chat", "preference": "preference", "prompt": "prompts"}
_log = logging.getLogger("jaxtune.data")


@dataclasses.dataclass(frozen=True)
class Datasets:
  """What build() returns. source_ids in batches index source_names / eval_source_names."""
  train: loader_lib.Loader
  eval: list[dict[str, Any]]
  stats: dict[str, Any]
  fingerprint: str
  source_names: tuple[str, ...] = ()
  eval_source_names: tuple[str, ...] = ()
  provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


def _detect(raw: list[tuple[str, Any]], data_cfg) -> str:
  """A source's format: data.format, else the most common among its first records."""
  if data_cfg.format != "auto":
    return data_cfg.format
  votes = collections.Counter()
  first_error = None
  for where, rec in raw:
    if isinstance(rec, errors.DataError):
      continue
    try:
      votes[formats.detect(rec, where, text_field=data_cfg.text_field)] += 1
    except errors.DataError as e:
      first_error = first_error or e
    if sum(votes.values()) >= 16:
      break
  if not votes:
    if first_error is not None:
      raise first_error
    return "text"
  return votes.most_common(1)[0][0]


def _encode_source(raw: list[tuple[str, Any]], fmt: str, source: int, tally: stats_lib.Tally,
                   encoder: encode.Encoder, data_cfg, kind: str,
                   name: str = "") -> list[encode.Result]:
  policy = length.effective(data_cfg.truncation, fmt, kind, name)
  out = []
  for where, rec in raw:
    tally.record(source)
    try:
      if isinstance(rec, errors.DataError):
        raise rec
      ex = formats.normalize(rec, fmt, where, text_field=data_cfg.text_field)
      results = encoder.encode_all(ex)
      fitted = [_fit(r, policy, data_cfg, where, kind) for r in results]
    except errors.DataError as e:
      if not e.skippable or data_cfg.on_bad_record != "skip":
        raise
      tally.skipped(source, e)
      continue
    tally.encoded(source, results)
    for pieces, outcome, lost in fitted:
      if not pieces:
        tally.dropped(source, outcome, lost)
        continue
      if outcome == "split":
        tally.split(source, len(pieces))
      for piece in pieces:
        tally.kept(source, piece, outcome, lost)
        lost = 0
        out.append(piece)
  return out


def _fit(result: encode.Result, policy: str, data_cfg, where: str,
         kind: str) -> tuple[list[encode.Result], str, int]:
  """(examples, outcome, tokens lost) of one encoded example under the length policy."""
  longest = max(len(s) for s in result.seqs)
  if policy == "split" and longest > data_cfg.seq_len:
    pieces = length.windows(result, data_cfg.seq_len, data_cfg.stride)
    return pieces, "split" if pieces else "no_loss_tokens", 0
  fitted, outcome = length.fit(result, data_cfg.seq_len, policy, where, kind=kind)
  lost = 0
  if longest > data_cfg.seq_len:
    lost = sum(len(s) for s in result.seqs) - (
        sum(len(s) for s in fitted.seqs) if fitted is not None else 0)
  return ([] if fitted is None else [fitted]), outcome, lost


def _split(raw: list, fraction: float) -> tuple[list, list]:
  """(train, held-out eval) records of one source; fixed seed, eval keeps file order."""
  held = stream.held_out(len(raw), fraction)
  return ([r for r, h in zip(raw, held) if not h], [r for r, h in zip(raw, held) if h])


def _digest(src: sources.Source, raw: list) -> str:
  if src.files:
    return provenance.source_digest(src.files)
  return provenance.records_digest(r for _, r in raw)


def _source_format(fmt: str, kind: str, name: str) -> str:
  if fmt not in formats.FORMATS:
    raise errors.DataError(f"bad data.format {fmt!r}; expected auto or one of "
                           f"{', '.join(formats.FORMATS)}")
  if fmt not in formats.KIND_FORMATS[kind]:
    raise errors.DataError(f"{name}: records are {fmt!r} but kind={kind!r} needs one of "
                           f"{', '.join(formats.KIND_FORMATS[kind])} (set data.format, or use "
                           "other files)")
  return "prompt" if kind == "prompt" else fmt


def _memory_sets(train_sources, eval_sources, encoder, data_cfg, kind: str, parts: dict, *,
                 process_index: int, process_count: int):
  """Every record read and encoded into memory: (train sets, eval sets, tallies, None)."""
  del process_index, process_count  # every process encodes everything
  train_tally, eval_tally = stats_lib.Tally(), stats_lib.Tally()
  train_sets, eval_sets = [], []
  for src in train_sources:
    raw = list(sources.read(src))
    if not raw:
      raise errors.DataError(f"data.train_files: {src.name} has no records")
    parts["train"][src.name] = _digest(src, raw)
    fmt = _source_format(_detect(raw, data_cfg), kind, src.name)
    train_raw, eval_raw = raw, []
    if not eval_sources:
      train_raw, eval_raw = _split(raw, data_cfg.eval_fraction)
    i = train_tally.add_source(src.name, fmt)
    train_sets.append(_encode_source(train_raw, fmt, i, train_tally, encoder, data_cfg, kind,
                                     src.name))
    if not train_sets[-1]:
      raise errors.DataError(f"data.train_files: no usable examples in {src.name} (see the "
                             f"counts: {train_tally.as_dict()['sources'][i]})")
    if not eval_sources:
      eval_tally.add_source(src.name, fmt)
      eval_sets.append(_encode_source(eval_raw, fmt, i, eval_tally, encoder, data_cfg, kind,
                                      src.name))
  for src in eval_sources:
    raw = list(sources.read(src))
    parts["eval"][src.name] = _digest(src, raw)
    fmt = _source_format(_detect(raw, data_cfg), kind, src.name)
    i = eval_tally.add_source(src.name, fmt)
    eval_sets.append(_encode_source(raw, fmt, i, eval_tally, encoder, data_cfg, kind, src.name))
  return train_sets, eval_sets, train_tally, eval_tally, None


def _streamed_sets(train_sources, eval_sources, encoder, data_cfg, kind: str, parts: dict, *,
                   process_index: int, process_count: int):
  """Sources encoded share by share into the tokenized cache (cache.py), read back lazily:
  (train stores, eval stores, tallies, cache info)."""
  train_tally, eval_tally = stats_lib.Tally(), stats_lib.Tally()
  train_sets, eval_sets, info = [], [], []
  tok_parts = {"tokenizer": parts["tokenizer"], "chat_template": parts["chat_template"]}
  k = 2 if kind == "preference" else 1
  split = "none" if eval_sources else f"fraction:{data_cfg.eval_fraction}"
  for part, srcs in (("train", train_sources), ("eval", eval_sources)):
    for src in srcs:
      digest = cache_lib.source_digest(src)
      parts[part][src.name] = digest
      entry = os.path.join(cache_lib.directory(data_cfg), cache_lib.key(
          digest, data_cfg, kind, split if part == "train" else "all", tok_parts))
      detect = lambda raw, name=src.name: _source_format(_detect(raw, data_cfg), kind, name)
      encode_records = functools.partial(_encode_records, fmt=None, encoder=encoder,
                                         data_cfg=data_cfg, kind=kind, name=src.name)
      meta, shards = cache_lib.source_stores(
          src, entry=entry, split=split if part == "train" else "all", detect=detect,
          encode_records=encode_records, k=k, process_index=process_index,
          process_count=process_count, workers=getattr(data_cfg, "workers", 0))
      info.append({"source": src.name, "entry": entry, "hit": meta["hit"]})
      if part == "train" and not meta["records"]:
        raise errors.DataError(f"data.train_files: {src.name} has no records")
      if not shards:  # an empty eval source: no batches, but it keeps its source id
        eval_tally.add_source(src.name, meta["format"])
        eval_sets.append([])
        continue
      at_train = train_tally.add_source(src.name, meta["format"]) if part == "train" else None
      at_eval = (eval_tally.add_source(src.name, meta["format"])
                 if part == "eval" or not eval_sources else None)
      train_store, eval_store = stream.open_stores(shards, (train_tally, eval_tally),
                                                   (at_train, at_eval))
      if part == "train":
        if not len(train_store):
          raise errors.DataError(f"data.train_files: no usable examples in {src.name} (see "
                                 f"the counts: {train_tally.as_dict()['sources'][at_train]})")
        train_sets.append(train_store)
      if at_eval is not None:
        eval_sets.append(eval_store)
  return train_sets, eval_sets, train_tally, eval_tally, info


def _encode_records(raw, tally, *, fmt, encoder, data_cfg, kind: str, name: str):
  """One piece of a streamed source (tally: that piece's one-source Tally)."""
  return _encode_source(raw, fmt or tally.sources[0]["format"], 0, tally, encoder, data_cfg,
                        kind, name)


def build(data_cfg, tokenizer, *, kind: str = "sft", process_index: int = 0,
          process_count: int = 1) -> Datasets:
  """Reads, checks and encodes all data of `data_cfg` (a config.DataConfig); see module doc."""
  if kind not in loader_lib.KINDS:
    raise errors.DataError(f"unknown kind {kind!r}; expected one of "
                           f"{', '.join(loader_lib.KINDS)}")
  if data_cfg.on_bad_record not in ("error", "skip"):
    raise errors.DataError(f"bad data.on_bad_record {data_cfg.on_bad_record!r}; expected "
                           "error or skip")
  encoder = encode.Encoder(tokenizer, loss_policy=data_cfg.loss_policy,
                           check_template=data_cfg.check_template,
                           text_field=data_cfg.text_field,
                           chat_render=getattr(data_cfg, "chat_render", "auto"))
  train_spec = data_cfg.train_files or tokenizer_lib.sample_path(DEFAULT_SAMPLE[kind])
  train_sources = sources.parse(train_spec, setting="data.train_files")
  eval_sources = sources.parse(data_cfg.eval_files, setting="data.eval_files")
  weights = mixture.parse_weights(data_cfg.weights, len(train_sources))

  parts = {"train": {}, "eval": {}, "tokenizer": provenance.tokenizer_digest(tokenizer),
           "chat_template": provenance.template_digest(tokenizer)}
  streamed = getattr(data_cfg, "streaming", False) or bool(getattr(data_cfg, "cache_dir", ""))
  sets = (_streamed_sets if streamed else _memory_sets)(
      train_sources, eval_sources, encoder, data_cfg, kind, parts,
      process_index=process_index, process_count=process_count)
  train_sets, eval_sets, train_tally, eval_tally, cache_info = sets

  fingerprint = provenance.fingerprint(parts)
  settings = {k: getattr(data_cfg, k) for k in (
      "format", "text_field", "weights", "loss_policy", "seq_len", "pack", "truncation",
      "stride", "chat_render", "on_bad_record", "check_template", "seed", "eval_fraction")
      if hasattr(data_cfg, k)}
  plan_id = hashlib.sha256(json.dumps([fingerprint, kind, settings], sort_keys=True)
                           .encode()).hexdigest()[:16]
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
  common = dict(kind=kind, seq_len=data_cfg.seq_len, batch_size=data_cfg.batch_size,
                pack=data_cfg.pack, process_index=process_index,
                process_count=process_count, pad_id=pad_id)
  train = loader_lib.Loader(train_sets, weights=weights, seed=data_cfg.seed, plan_id=plan_id,
                            **common)
  eval_batches = loader_lib.fixed_batches(eval_sets, lazy=streamed, **common)

  stats = {"kind": kind, "fingerprint": fingerprint, "plan": plan_id,
           "tokenizer": tokenizer_lib.describe(tokenizer),
           "train": train_tally.as_dict(), "eval": eval_tally.as_dict(),
           "rows_per_epoch": train.rows_in_epoch(), "eval_batches": len(eval_batches)}
  if cache_info is not None:
    stats["cache"] = cache_info
  for i, e in enumerate(stats["train"]["sources"]):
    e["weight"] = float(weights[i]) if weights is not None else (
        len(train_sets[i]) / sum(map(len, train_sets)))
  stats["warnings"] = stats_lib.length_warnings(stats["train"], data_cfg.seq_len,
                                                str(tokenizer.eos_token))
  _log.info("%s", stats_lib.summary({**stats, "warnings": []}))
  for w in stats["warnings"]:
    _log.warning("%s", w)
  return Datasets(train=train, eval=eval_batches, stats=stats, fingerprint=fingerprint,
                  source_names=tuple(s.name for s in train_sources),
                  eval_source_names=tuple(s.name for s in (eval_sources or train_sources)),
                  provenance=parts)
