"""The tokenized cache (data.cache_dir): a second run encodes nothing and gets the same
batches; a changed input invalidates only its source's entry; a torn shard is never used;
grain worker processes write the same store. Reference: the in-memory pipeline."""

import dataclasses
import json
import os

import pytest

from jaxtune import config
from jaxtune.data import global_batch
from jaxtune.data import pipeline
from jaxtune.data import store
from jaxtune.data import stream
from jaxtune.data import tokenizer_lib

CHAT = tokenizer_lib.sample_path("chat")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


class _Calls:
  """Counts (or forbids) every call that tokenizes or renders with the tokenizer class."""

  def __init__(self, monkeypatch, tok, forbid=False):
    self.count = 0  # outermost calls only (__call__ calls _encode_plus, ...)
    self.depth = 0
    cls = type(tok)
    for name in ("__call__", "apply_chat_template", "encode", "encode_plus",
                 "batch_encode_plus", "_encode_plus", "tokenize"):
      original = getattr(cls, name, None)
      if original is None:
        continue

      def wrapped(*a, _original=original, _name=name, **k):
        if forbid:
          raise AssertionError(f"tokenizer.{_name} called on a cache hit")
        self.count += self.depth == 0
        self.depth += 1
        try:
          return _original(*a, **k)
        finally:
          self.depth -= 1
      monkeypatch.setattr(cls, name, wrapped)


def _texts(path, n, tag=""):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"text": f"document {i}{tag} " + "word " * (i % 11)}) + "\n")
  return str(path)


def _digests(ds, n):
  return [global_batch.digest(next(ds.train)) for _ in range(n)]


def _stats(ds):
  s = dict(ds.stats)
  s.pop("cache")
  return s


def test_second_run_hits_the_cache_without_a_tokenizer_call(tmp_path, tok, monkeypatch):
  text = _texts(tmp_path / "t.jsonl", 40)
  cfg = config.DataConfig(train_files=f"{CHAT},{text}", weights="3,1", batch_size=4,
                          seq_len=96, cache_dir=str(tmp_path / "cache"))
  first = pipeline.build(cfg, tok)
  expected = _digests(first, 30)
  eval_expected = [global_batch.digest(b) for b in first.eval]
  calls = _Calls(monkeypatch, tok, forbid=True)
  second = pipeline.build(cfg, tok)
  assert [c["hit"] for c in second.stats["cache"]] == [True, True]
  assert _digests(second, 30) == expected
  assert [global_batch.digest(b) for b in second.eval] == eval_expected
  assert _stats(second) == _stats(first)  # counts, lengths, warnings come from the cache
  assert calls.count == 0
  # A resumed loader over the cache continues exactly too.
  third = pipeline.build(cfg, tok)
  _digests(third, 11)
  state = third.train.state()
  fourth = pipeline.build(cfg, tok)
  fourth.train.restore(state)
  assert _digests(fourth, 19) == expected[11:]


def test_a_changed_input_file_invalidates_only_its_entry(tmp_path, tok, monkeypatch):
  a, b = _texts(tmp_path / "a.jsonl", 30), _texts(tmp_path / "b.jsonl", 25, tag="b")
  cfg = config.DataConfig(train_files=f"{a},{b}", batch_size=4, seq_len=64,
                          cache_dir=str(tmp_path / "cache"), eval_fraction=0.0)
  pipeline.build(cfg, tok)
  os.utime(b, (1, 1))  # a touch that changes no byte: the key is the content, still a hit
  calls = _Calls(monkeypatch, tok)
  assert [c["hit"] for c in pipeline.build(cfg, tok).stats["cache"]] == [True, True]
  assert calls.count == 0
  _texts(tmp_path / "b.jsonl", 25, tag="B")  # one character changed in every record
  ds = pipeline.build(cfg, tok)
  assert [c["hit"] for c in ds.stats["cache"]] == [True, False]
  assert calls.count == 25  # b's records were tokenized again, a's were not
  monkeypatch.undo()
  memory = pipeline.build(dataclasses.replace(cfg, cache_dir=""), tok)
  assert _digests(ds, 20) == _digests(memory, 20)


def test_the_key_holds_encoding_settings_but_not_loader_settings(tmp_path, tok):
  cfg = config.DataConfig(train_files=CHAT, batch_size=4, seq_len=96,
                          cache_dir=str(tmp_path / "cache"))
  entry = pipeline.build(cfg, tok).stats["cache"][0]["entry"]
  for change in ({"seq_len": 128}, {"loss_policy": "all"}, {"eval_fraction": 0.2}):
    ds = pipeline.build(dataclasses.replace(cfg, **change), tok)
    assert not ds.stats["cache"][0]["hit"] and ds.stats["cache"][0]["entry"] != entry, change
  for change in ({"seed": 5}, {"batch_size": 2}, {"pack": False}, {"weights": "1"}):
    new = dataclasses.replace(cfg, **change)
    ds = pipeline.build(new, tok)
    assert ds.stats["cache"][0]["entry"] == entry and ds.stats["cache"][0]["hit"], change
    memory = pipeline.build(dataclasses.replace(new, cache_dir=""), tok)
    assert _digests(ds, 12) == _digests(memory, 12), change


def test_a_torn_shard_is_never_used(tmp_path, tok, monkeypatch):
  path = _texts(tmp_path / "t.jsonl", 50)
  cfg = config.DataConfig(train_files=path, batch_size=4, seq_len=64,
                          cache_dir=str(tmp_path / "cache"))
  monkeypatch.setattr(stream, "PIECE", 8)
  boom = stream.EncodePiece.__call__
  seen = []

  def dies_late(self, piece):  # a writer killed after a few pieces
    seen.append(piece.start)
    if len(seen) == 4:
      raise KeyboardInterrupt
    return boom(self, piece)
  monkeypatch.setattr(stream.EncodePiece, "__call__", dies_late)
  with pytest.raises(KeyboardInterrupt):
    pipeline.build(cfg, tok)
  entries = os.listdir(tmp_path / "cache")
  assert len(entries) == 1 and stream.complete_layout(tmp_path / "cache" / entries[0]) is None
  # A half-written shard directory (no tally.json) is not complete either.
  w = store.Writer(str(tmp_path / "half"), seqs_per_example=1)
  assert not store.is_complete(w.tmp) and not os.path.exists(tmp_path / "half")
  monkeypatch.undo()
  ds = pipeline.build(cfg, tok)
  assert ds.stats["cache"][0]["hit"] is False
  memory = pipeline.build(dataclasses.replace(cfg, cache_dir=""), tok)
  assert _digests(ds, 15) == _digests(memory, 15)


@pytest.mark.slow
def test_grain_worker_processes_write_the_same_store(tmp_path, tok, monkeypatch):
  monkeypatch.setattr(stream, "PIECE", 16)  # several pieces for the workers to share
  path = _texts(tmp_path / "t.jsonl", 120)
  cfg = config.DataConfig(train_files=f"{CHAT},{path}", batch_size=4, seq_len=64)
  memory = pipeline.build(cfg, tok)
  workers = pipeline.build(dataclasses.replace(cfg, cache_dir=str(tmp_path / "c"), workers=2),
                           tok)
  assert _digests(workers, 25) == _digests(memory, 25)
  assert _stats(workers) == memory.stats


def test_a_bucket_cache_dir_is_refused_naming_the_setting(tok):
  with pytest.raises(ValueError, match=r"data.cache_dir='s3://b/c': the tokenized cache must"):
    pipeline.build(config.DataConfig(train_files=CHAT, cache_dir="s3://b/c"), tok)
