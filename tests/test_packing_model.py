"""Packed rows from the data pipeline through the model: per-example losses equal the same
examples run alone, and no attention crosses a segment boundary."""

import dataclasses

import jax
import numpy as np

import jaxtune
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import losses

MODEL = config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8)


def _packed_batch():
  tok = data_lib.load_tokenizer("")
  cfg = dataclasses.replace(config_lib.DataConfig(), seq_len=96, batch_size=4, pack=True)
  ds = data_lib.build(cfg, tok, kind="sft")
  return next(ds.train)


def test_packed_losses_equal_unpacked_per_example():
  params = jaxtune.init(MODEL, jax.random.PRNGKey(0))
  b = _packed_batch()
  assert (b["segment_ids"].max(axis=1) >= 2).any(), "expected packed rows"
  logits = jaxtune.forward(MODEL, params, b["tokens"], positions=b["positions"],
                           segment_ids=b["segment_ids"])
  nll = -np.asarray(losses.token_logprobs(logits, b["targets"])) * b["loss_mask"]
  checked = 0
  for r in range(b["tokens"].shape[0]):
    for s in range(1, b["segment_ids"][r].max() + 1):
      sel = b["segment_ids"][r] == s
      tokens, targets, mask = b["tokens"][r, sel], b["targets"][r, sel], b["loss_mask"][r, sel]
      if mask.sum() == 0:
        continue
      assert np.array_equal(b["positions"][r, sel], np.arange(sel.sum()))
      alone = jaxtune.forward(MODEL, params, tokens[None])
      alone_nll = -np.asarray(losses.token_logprobs(alone, targets[None]))[0] * mask
      np.testing.assert_allclose(nll[r, sel].sum() / mask.sum(), alone_nll.sum() / mask.sum(),
                                 atol=1e-5)
      checked += 1
  assert checked >= 6


def test_perturbing_one_segment_leaves_the_others_unchanged():
  params = jaxtune.init(MODEL, jax.random.PRNGKey(1))
  b = _packed_batch()
  r = int(np.argmax(b["segment_ids"].max(axis=1)))
  seg = b["segment_ids"][r]
  kw = dict(positions=b["positions"][r:r + 1], segment_ids=seg[None])
  base = np.asarray(jaxtune.forward(MODEL, params, b["tokens"][r:r + 1], **kw))[0]
  for s in range(1, seg.max() + 1):
    tokens = b["tokens"][r].copy()
    rng = np.random.RandomState(s)
    tokens[seg == s] = rng.randint(3, MODEL.vocab_size, (seg == s).sum())
    out = np.asarray(jaxtune.forward(MODEL, params, tokens[None], **kw))[0]
    others = (seg != s) & (seg > 0)
    np.testing.assert_array_equal(out[others], base[others])
    assert np.abs(out[seg == s] - base[seg == s]).max() > 1e-3  # the perturbation did matter
