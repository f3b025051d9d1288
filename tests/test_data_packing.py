"""Packing and batch layout: segments, positions, targets that never cross a boundary.

The per-example loss of packed rows must equal that of the same examples unpacked. The
model-level test lives with the model (tests/test_packing_model.py); here a small numpy
causal attention model that honours `segment_ids` and `positions` checks that the layout
alone carries everything needed for that equality.
"""

import dataclasses
import json

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import encode
from jaxtune.data import length
from jaxtune.data import packing
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def _cfg(**kw):
  kw.setdefault("eval_fraction", 0.0)
  return config.DataConfig(**kw)


def _segments(batch, b):
  """[(tokens, targets, loss_mask, positions, source)] of each segment of row b."""
  out = []
  seg = batch["segment_ids"][b]
  for s in range(1, seg.max() + 1):
    sel = seg == s
    out.append(tuple(batch[k][b][sel] for k in ("tokens", "targets", "loss_mask",
                                                  "positions", "source_ids")))
  return out


def check_row_invariants(batch, pad_id):
  for b in range(batch["tokens"].shape[0]):
    seg, pos = batch["segment_ids"][b], batch["positions"][b]
    tokens, targets, mask = batch["tokens"][b], batch["targets"][b], batch["loss_mask"][b]
    n = int((seg > 0).sum())
    # Segments are 1, 2, ... contiguous from the start of the row; padding at the end.
    assert (seg[n:] == 0).all() and (seg[:n] > 0).all()
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    if n:
      assert seg[0] == 1
    # Padding carries nothing.
    assert (tokens[n:] == pad_id).all() and (targets[n:] == 0).all()
    assert (mask[n:] == 0).all() and (batch["source_ids"][b][n:] == -1).all()
    for s in range(1, seg.max() + 1):
      idx = np.nonzero(seg == s)[0]
      assert (pos[idx] == np.arange(len(idx))).all()  # positions restart per segment
      assert (targets[idx[:-1]] == tokens[idx[1:]]).all()  # next token within the segment
      assert targets[idx[-1]] == 0 and mask[idx[-1]] == 0  # never across the boundary
      assert len(set(batch["source_ids"][b][idx].tolist())) == 1


def test_packed_rows_keep_every_segment_to_itself(tok):
  ds = pipeline.build(_cfg(batch_size=16, seq_len=128), tok)
  for _ in range(5):
    batch = next(ds.train)
    assert {k: v.dtype.name for k, v in batch.items()} == {
        "tokens": "int32", "targets": "int32", "loss_mask": "float32", "segment_ids": "int32",
        "positions": "int32", "source_ids": "int32"}
    check_row_invariants(batch, tok.pad_token_id)
    assert batch["segment_ids"].max() > 1  # it does pack
  # The eos (<|im_end|>) of an assistant turn is trained: it is the target before it.
  mask = batch["loss_mask"] > 0
  assert (batch["targets"][mask] == tok.convert_tokens_to_ids("<|im_end|>")).sum() > 0
  fill = ds.stats["train"]["tokens"] / (ds.stats["rows_per_epoch"] * 128)
  assert fill > 0.8


def test_unpacked_rows_hold_one_padded_example(tok):
  ds = pipeline.build(_cfg(batch_size=8, pack=False), tok)
  batch = next(ds.train)
  check_row_invariants(batch, tok.pad_token_id)
  assert (batch["segment_ids"].max(axis=1) == 1).all()
  assert ds.stats["rows_per_epoch"] == ds.stats["train"]["examples"]


def test_plan_places_every_example_once_within_capacity():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 60, size=500)
  rows = packing.plan(lengths, 64, window=8)
  assert sorted(j for r in rows for j in r) == list(range(500))
  assert all(sum(lengths[j] for j in r) <= 64 for r in rows)
  assert len(rows) < 0.8 * 500
  assert packing.plan(lengths, 64, pack=False) == [[j] for j in range(500)]


def _numpy_lm_loss(batch, params, *, attend_segments=True):
  """Per-example summed NLL of a 1-layer causal attention LM over a batch.

  With attend_segments=False the model ignores segment boundaries (a leaky model).
  """
  emb, pos_emb, wq, wk, wv, wo = params
  x = emb[batch["tokens"]] + pos_emb[batch["positions"]]  # [B, T, D]
  q, k, v = x @ wq, x @ wk, x @ wv
  scores = np.einsum("btd,bsd->bts", q, k) / np.sqrt(q.shape[-1])  # [B, T, T]
  seg = batch["segment_ids"]
  att_seg = seg if attend_segments else (seg > 0).astype(np.int32)
  t = np.arange(seg.shape[1])
  allowed = (att_seg[:, :, None] == att_seg[:, None, :]) & (t[:, None] >= t[None, :])[None]
  scores = np.where(allowed, scores, -1e30)
  attn = np.exp(scores - scores.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  logits = (x + np.einsum("bts,bsd->btd", attn, v)) @ wo  # [B, T, V]
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]  # [B, T]
  losses = {}
  for b in range(seg.shape[0]):
    for s in range(1, seg[b].max() + 1):
      sel = seg[b] == s
      losses[batch["tokens"][b][sel].tobytes()] = float(
          (nll[b][sel] * batch["loss_mask"][b][sel]).sum())
  return losses


def _epoch_losses(ds, params, **kw):
  losses = {}
  for _ in range(-(-ds.stats["rows_per_epoch"] // ds.train.batch_size)):
    losses.update(_numpy_lm_loss(next(ds.train), params, **kw))
  return losses


def test_packed_and_unpacked_per_example_losses_agree(tmp_path, tok):
  lines = open(tokenizer_lib.sample_path("chat")).readlines()[:120]
  (tmp_path / "chat.jsonl").write_text("".join(lines))
  cfg = _cfg(train_files=str(tmp_path / "chat.jsonl"), batch_size=8)
  rng = np.random.default_rng(0)
  d, vocab = 16, len(tok)
  params = (rng.normal(size=(vocab, d)), rng.normal(size=(128, d)),
            *(rng.normal(size=(d, d)) * 0.3 for _ in range(3)), rng.normal(size=(d, vocab)))
  packed = _epoch_losses(pipeline.build(cfg, tok), params)
  unpacked = _epoch_losses(pipeline.build(dataclasses.replace(cfg, pack=False), tok), params)
  assert set(packed) == set(unpacked) and len(packed) > 100  # the same examples
  scale = max(abs(v) for v in unpacked.values())
  assert max(abs(packed[k] - unpacked[k]) for k in packed) < 1e-5 * scale
  # The check is sensitive: a model that attends across segments does not agree.
  leaky = _epoch_losses(pipeline.build(cfg, tok), params, attend_segments=False)
  assert max(abs(leaky[k] - unpacked[k]) for k in leaky) > 1e-2 * scale


def test_truncation_policies_keep_the_right_end_and_count(tmp_path, tok):
  path = tmp_path / "text.jsonl"
  long_text = " ".join(f"word{i}" for i in range(200))
  path.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short"}) + "\n")
  full = tok(long_text)["input_ids"] + [tok.eos_token_id]
  for policy, kept in [("truncate_right", full[:32]), ("truncate_left", full[-32:])]:
    ds = pipeline.build(_cfg(train_files=str(path), seq_len=32, truncation=policy,
                             pack=False, batch_size=2), tok)
    assert ds.stats["train"]["truncated"] == 1 and ds.stats["train"]["examples"] == 2
    batch = next(ds.train)
    rows = [batch["tokens"][b][batch["segment_ids"][b] > 0].tolist() for b in range(2)]
    assert kept in rows
  ds = pipeline.build(_cfg(train_files=str(path), seq_len=32, truncation="drop"), tok)
  assert ds.stats["train"]["dropped"] == {"too_long": 1}
  assert ds.stats["train"]["examples"] == 1 and ds.stats["train"]["records"] == 2


def test_prompt_longer_than_window_is_dropped_for_no_loss_tokens(tok):
  seq = encode.Encoded(np.arange(10, dtype=np.int32), np.r_[[False] * 8, [True] * 2])
  result, outcome = length.fit(encode.Result((seq,)), 6, "truncate_right", "x:1")
  assert result is None and outcome == "no_loss_tokens"
  result, outcome = length.fit(encode.Result((seq,)), 6, "truncate_left", "x:1")
  assert outcome == "truncated" and result.seqs[0].ids.tolist() == [4, 5, 6, 7, 8, 9]


def test_preference_batches_pair_chosen_and_rejected(tok):
  ds = pipeline.build(_cfg(batch_size=4, seq_len=128), tok, kind="preference")
  batch = next(ds.train)
  assert all(v.shape == (4, 2, 128) for v in batch.values())
  for b in range(4):
    seg = batch["segment_ids"][b]
    assert set(np.unique(seg).tolist()) <= {0, 1}
    n_c, n_r = int(seg[0].sum()), int(seg[1].sum())
    first_c = int(np.argmax(batch["loss_mask"][b, 0] > 0))
    first_r = int(np.argmax(batch["loss_mask"][b, 1] > 0))
    # The prompt (everything before the first trained target) is shared and untrained.
    assert first_c == first_r
    assert (batch["tokens"][b, 0, :first_c + 1] == batch["tokens"][b, 1, :first_r + 1]).all()
    assert batch["loss_mask"][b, 0, n_c - 1] == 0 and batch["loss_mask"][b, 1, n_r - 1] == 0
  chosen = tok.decode(batch["targets"][0, 0][batch["loss_mask"][0, 0] > 0])
  assert chosen.endswith("<|im_end|>")


def test_prompt_batches_are_left_padded_with_answers(tok):
  ds = pipeline.build(_cfg(batch_size=4, seq_len=64), tok, kind="prompt")
  batch = next(ds.train)
  assert batch["prompt_tokens"].shape == (4, 64) and batch["prompt_mask"].dtype == np.int32
  for b in range(4):
    m = batch["prompt_mask"][b]
    n = int(m.sum())
    assert (m[-n:] == 1).all() and (m[:-n] == 0).all()
    text = tok.decode(batch["prompt_tokens"][b][-n:])
    assert text.startswith("<|im_start|>user\nWhat is") and text.endswith(
        "<|im_start|>assistant\n")
  assert len(batch["answers"]) == 4 and all(a.isdigit() for a in batch["answers"])


def test_eval_batches_hold_every_eval_example_once_and_pad(tok):
  ds = pipeline.build(config.DataConfig(eval_fraction=0.1, batch_size=8), tok)
  n_eval = ds.stats["eval"]["examples"]
  assert n_eval == 40
  segments = [s for batch in ds.eval for b in range(8) for s in _segments(batch, b)]
  assert len(segments) == n_eval
  last = ds.eval[-1]
  check_row_invariants(last, tok.pad_token_id)
  assert (last["segment_ids"][-1] == 0).all()  # padding rows fill the last batch
