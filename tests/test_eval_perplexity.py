"""Token scoring (`jaxtune.eval.perplexity`) against transformers on tiny in-process models.

The NLL sums, the greedy flags and the KL to a base are recomputed with torch from the
same HF export and the same token ids; chunked scoring, a sharded mesh and unmerged LoRA
adapters must not change them.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from jaxtune import config as config_lib
from jaxtune import lora
from jaxtune import sharding
from jaxtune import weights
from jaxtune.data import encode
from jaxtune.data import packing
from jaxtune.eval import perplexity
from tests import hf_models

LENGTHS = (3, 9, 17, 30, 5, 12, 2)


def _save(family: str, seed: int, path) -> tuple:
  model = hf_models.make(family, seed=seed)
  model.save_pretrained(path, safe_serialization=True)
  return model, str(path)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """Llama 2 layout (separate lm_head): what the tests below share."""
  return _save("llama2", 0, tmp_path_factory.mktemp("llama2"))


def _seqs(vocab: int, seed: int = 0) -> list[encode.Encoded]:
  rng = np.random.default_rng(seed)
  out = []
  for n in LENGTHS:
    train = rng.random(n) < 0.7
    train[0], train[-1] = False, True  # the first token is never a target
    out.append(encode.Encoded(rng.integers(0, vocab, n).astype(np.int32), train))
  return out


def _torch_logp(model, ids: np.ndarray) -> np.ndarray:
  """[n-1, V] float64 log-softmax predicting ids[1:]."""
  logits = hf_models.logits(model, ids[None].astype(np.int64))[0, :-1]
  return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()


def _reference(model, seqs):
  nll, greedy = [], []
  for s in seqs:
    lp = _torch_logp(model, s.ids)
    targets, on = s.ids[1:], s.train[1:]
    picked = lp[np.arange(len(targets)), targets]
    nll.append(-picked[on].sum())
    greedy.append(bool(np.all(lp.argmax(-1)[on] == targets[on])))
  return np.array(nll), np.array(greedy)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])  # separate / tied output weights
def test_scores_equal_transformers(family, tmp_path):
  model, path = _save(family, 0, tmp_path)
  w = weights.load(path)
  seqs = _seqs(w.model_cfg.vocab_size)
  want_nll, want_greedy = _reference(model, seqs)
  for chunk in (0, 5):  # whole rows at once, and 5 positions at a time
    cfg = dataclasses.replace(w.model_cfg, logits_chunk=chunk)
    got = perplexity.score(cfg, w.params, seqs, batch_size=3)
    np.testing.assert_allclose(got.nll, want_nll, rtol=1e-5)
    np.testing.assert_array_equal(got.tokens, [int(s.train[1:].sum()) for s in seqs])
    np.testing.assert_array_equal(got.greedy, want_greedy)
  ppl = perplexity.perplexity(got.nll, got.tokens)
  assert ppl == pytest.approx(np.exp(want_nll.sum() / got.tokens.sum()), rel=1e-5)


def test_greedy_flag_is_true_for_the_models_own_argmax(export):
  model, path = export
  w = weights.load(path)
  ids = [5]
  for _ in range(6):  # the model's own greedy continuation, from torch
    ids.append(int(_torch_logp(model, np.array(ids + [0]))[-1].argmax()))
  seq = encode.Encoded(np.array(ids, np.int32), np.array([False] + [True] * 6))
  other = encode.Encoded(seq.ids.copy(), seq.train)
  other.ids[-1] = (other.ids[-1] + 1) % w.model_cfg.vocab_size
  got = perplexity.score(w.model_cfg, w.params, [seq, other])
  assert got.greedy.tolist() == [True, False]


def test_sharded_mesh_and_lora_adapters_give_the_same_scores(export):
  _, path = export
  single = weights.load(path)
  seqs = [s for s in _seqs(single.model_cfg.vocab_size, seed=1) if len(s) <= 16]  # 1 batch
  ref = perplexity.score(single.model_cfg, single.params, seqs)
  mesh = sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  w = weights.load(path, mesh=mesh)
  got = perplexity.score(w.model_cfg, w.params, seqs, mesh=mesh)
  np.testing.assert_allclose(got.nll, ref.nll, rtol=1e-5)

  ad = lora.init(single.model_cfg, single.params, rank=4, alpha=8.0,
                 key=jax.random.PRNGKey(3))
  keys = iter(jax.random.split(jax.random.PRNGKey(4), 64))
  ad = dataclasses.replace(ad, params=jax.tree_util.tree_map(
      lambda x: 0.3 * jax.random.normal(next(keys), x.shape), ad.params))  # B != 0
  unmerged = perplexity.score(single.model_cfg, single.params, seqs, adapters=ad)
  merged = perplexity.score(single.model_cfg, lora.merge(single.model_cfg, single.params, ad),
                            seqs)
  np.testing.assert_allclose(unmerged.nll, merged.nll, rtol=1e-5)
  assert np.abs(unmerged.nll - ref.nll).max() > 1e-2  # the adapters do change the scores


def test_kl_to_base_equals_torch_and_is_zero_for_lora_at_init(export, tmp_path):
  model, path = export
  other, other_path = _save("llama2", 1, tmp_path)
  a, b = weights.load(path), weights.load(other_path)
  seqs = [s for s in _seqs(a.model_cfg.vocab_size, seed=2) if len(s) <= 16]
  kl, count = perplexity.kl_to_base(a.model_cfg, a.params, b.params, seqs)
  want = 0.0
  for seq in seqs:
    lp, lq = _torch_logp(model, seq.ids), _torch_logp(other, seq.ids)
    want += (np.exp(lp) * (lp - lq)).sum(-1)[seq.train[1:]].sum()
  assert count == sum(int(s.train[1:].sum()) for s in seqs)
  assert kl == pytest.approx(want, rel=1e-4)
  # LoRA at step 0 (B = 0) against its base, the same params with the adapters off.
  ad = lora.init(a.model_cfg, a.params, rank=4, alpha=8.0, key=jax.random.PRNGKey(0))
  kl, _ = perplexity.kl_to_base(a.model_cfg, a.params, a.params, seqs, adapters=ad)
  assert kl == 0.0
  # The pure function a training loop jits itself: the same sums on one packed batch.
  batch = {k: v for k, v in packing.assemble([[(seqs[0], 0), (seqs[1], 0)]], 16).items()
           if k != "source_ids"}
  one, n = jax.jit(perplexity.kl_sums, static_argnums=0)(a.model_cfg, a.params, b.params,
                                                           batch)
  two = perplexity.kl_to_base(a.model_cfg, a.params, b.params, seqs[:2])
  assert (float(one), int(n)) == pytest.approx(two, rel=1e-5)
