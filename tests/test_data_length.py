"""Long examples: documents split into windows (every corpus token trained), truncation of
chats warned with the share lost and the seq_len that would fit, and the policy choices.

Expected counts come from the tokenizer directly (`tok(doc)` + eos), not from the pipeline.
"""

import json
import logging

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import encode
from jaxtune.data import errors
from jaxtune.data import length
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega").split()


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def _corpus(tmp_path, n_docs=20, words=500, seed=0):
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(WORDS, words)) + "." for _ in range(n_docs)]
  path = tmp_path / "corpus.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return path, docs


def _epoch_segments(ds, batch_size):
  """(tokens, trained targets) of every packed segment of exactly one epoch."""
  rows = ds.stats["rows_per_epoch"]
  out = []
  for i in range(-(-rows // batch_size)):
    batch = next(ds.train)
    for b in range(min(batch_size, rows - batch_size * i)):
      seg = batch["segment_ids"][b]
      for s in range(1, seg.max() + 1):
        sel = seg == s
        out.append((batch["tokens"][b][sel], batch["targets"][b][sel][batch["loss_mask"][b][sel]
                                                                      > 0]))
  return out


@pytest.mark.parametrize("stride", [0, 100])
def test_pretraining_trains_every_corpus_token_once(tmp_path, tok, stride):
  path, docs = _corpus(tmp_path)
  ids = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]
  corpus = sum(len(x) for x in ids)
  assert min(len(x) for x in ids) > 4 * 256  # every document is several windows long
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=256, batch_size=4,
                          stride=stride)
  ds = pipeline.build(cfg, tok)
  segments = _epoch_segments(ds, 4)
  trained = sum(len(t) for _, t in segments)
  assert trained >= 0.99 * corpus  # before: one window per document, ~11%
  assert trained == corpus - len(docs)  # exactly once: all but each document's first token
  # Every segment is a contiguous piece of one document (none spans two: eos ends each
  # document and occurs nowhere else), and together they train each token exactly once.
  strings = [" " + " ".join(map(str, x)) + " " for x in ids]
  for tokens, _ in segments:
    assert len(tokens) <= 256
    assert any(" " + " ".join(map(str, tokens)) + " " in s for s in strings)
  got = sorted(np.concatenate([t for _, t in segments]).tolist())
  assert got == sorted(t for x in ids for t in x[1:])
  train = ds.stats["train"]
  assert train["split_documents"] == len(docs) and train["truncated"] == 0
  assert train["lost_tokens"] == 0 and train["input_tokens"] == corpus


def test_windows_by_hand():
  """ids 0..9, seq_len 4: stride 3 (default) shares one token; stride 2 keeps 2 as context."""
  seq = encode.Encoded(np.arange(10, dtype=np.int32), np.ones(10, bool))
  out = length.windows(encode.Result((seq,)), 4)
  assert [w.seqs[0].ids.tolist() for w in out] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
  assert [w.seqs[0].train[1:].tolist() for w in out] == [[True] * 3] * 3
  out = length.windows(encode.Result((seq,)), 4, stride=2)
  assert [w.seqs[0].ids.tolist() for w in out] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7],
                                                   [6, 7, 8, 9]]
  assert [w.seqs[0].ids[w.seqs[0].train].tolist() for w in out] == [[1, 2, 3], [4, 5],
                                                                    [6, 7], [8, 9]]


def _chats(tmp_path, n=30, seed=1):
  """Short questions (never cut), answers of 20..150 words (~4 tokens each)."""
  rng = np.random.default_rng(seed)
  records = []
  for _ in range(n):
    records.append({"messages": [
        {"role": "user", "content": " ".join(rng.choice(WORDS, rng.integers(5, 15)))},
        {"role": "assistant", "content": " ".join(rng.choice(WORDS, rng.integers(20, 150)))}]})
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path, records


def test_chat_truncation_warns_with_the_share_lost_and_a_seq_len_that_fits(tmp_path, tok,
                                                                           caplog):
  path, records = _chats(tmp_path)
  lengths = np.array([len(tok.apply_chat_template(r["messages"], tokenize=True,
                                                  return_dict=False)) for r in records])
  seq_len = 256
  lost = np.maximum(lengths - seq_len, 0).sum()
  assert lost / lengths.sum() > 0.05
  p95 = int(np.percentile(lengths, 95, method="higher"))
  suggestion = -(-p95 // 64) * 64
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=seq_len,
                          batch_size=2)
  with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
    ds = pipeline.build(cfg, tok)
  train = ds.stats["train"]
  assert train["lost_tokens"] == lost and train["input_tokens"] == lengths.sum()
  (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert f"losing {lost / lengths.sum():.1%} of their tokens" in warning
  assert f"--set=data.seq_len={suggestion}" in warning
  assert f"cut or dropped {(lengths > seq_len).sum()} of {len(records)} examples" in warning
  # With room for every example: no loss, no warning.
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxtune.data"):
    ds = pipeline.build(config.DataConfig(train_files=str(path), eval_fraction=0,
                                          seq_len=int(lengths.max()), batch_size=2), tok)
  assert ds.stats["warnings"] == [] and not caplog.records


def test_split_applies_to_text_records_only(tmp_path, tok):
  path, _ = _chats(tmp_path, n=3)
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, truncation="split")
  with pytest.raises(errors.DataError, match=r"chat.jsonl: data.truncation=split applies to "
                     "text records"):
    pipeline.build(cfg, tok)


def test_truncate_right_keeps_the_old_behaviour_for_text(tmp_path, tok):
  path, docs = _corpus(tmp_path, n_docs=3, words=200)
  cfg = config.DataConfig(train_files=str(path), eval_fraction=0, seq_len=64, batch_size=1,
                          truncation="truncate_right")
  train = pipeline.build(cfg, tok).stats["train"]
  assert train["truncated"] == 3 and train["examples"] == 3 and train["loss_tokens"] == 3 * 63
