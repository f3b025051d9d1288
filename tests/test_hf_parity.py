"""Logits parity with `transformers` for every family, and exact HF round trips."""

import dataclasses
import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtune
from jaxtune.hf import keys
from tests import hf_models

FAMILIES = list(hf_models.FAMILIES)


def _tokens(seed, b=2, t=37, v=101):
  return np.random.RandomState(seed).randint(0, v, size=(b, t)).astype(np.int32)


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory):
  model = hf_models.make(request.param)
  d = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(d, safe_serialization=True)
  return request.param, model, str(d)


def test_logits_match_transformers(hf_dir):
  family, model, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  tokens = _tokens(0)
  ours = np.asarray(jaxtune.forward(cfg, params, tokens))
  ref = hf_models.logits(model, tokens)
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_round_trip_is_bit_identical_and_reloads(hf_dir, tmp_path):
  family, model, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  jaxtune.save_hf(cfg, params, str(tmp_path))
  original = safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
  exported = safetensors.numpy.load_file(os.path.join(tmp_path, "model.safetensors"))
  if cfg.tie_word_embeddings:
    original.pop("lm_head.weight", None)
  assert sorted(original) == sorted(exported)
  for k in original:
    assert original[k].dtype == exported[k].dtype, k
    np.testing.assert_array_equal(original[k], exported[k], err_msg=k)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = _tokens(1)
  np.testing.assert_allclose(hf_models.logits(reloaded, tokens), hf_models.logits(model, tokens),
                             atol=1e-5, rtol=0)


def test_packed_segments_equal_separate_sequences(hf_dir):
  """Two sequences packed in one row (segment ids, restarting positions) = each alone."""
  family, model, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  a, b = _tokens(2, 1, 11)[0], _tokens(3, 1, 17)[0]
  row = np.concatenate([a, b, np.zeros(4, np.int32)])[None]
  seg = np.array([[1] * 11 + [2] * 17 + [0] * 4], np.int32)
  pos = np.array([list(range(11)) + list(range(17)) + [0] * 4], np.int32)
  packed = np.asarray(jaxtune.forward(cfg, params, row, positions=pos, segment_ids=seg))
  np.testing.assert_allclose(packed[0, :11], hf_models.logits(model, a[None])[0], atol=1e-4)
  np.testing.assert_allclose(packed[0, 11:28], hf_models.logits(model, b[None])[0], atol=1e-4)


def test_sliding_window_applies_and_matches_transformers(tmp_path):
  """Window 5 on 16 tokens: equal to full attention for t < 5, different after, and = HF."""
  windowed = hf_models.make("mistral_window")
  full = hf_models.make("mistral_window", sliding_window=None)
  tokens = _tokens(5, t=16)
  ref, ref_full = hf_models.logits(windowed, tokens), hf_models.logits(full, tokens)
  w = hf_models.WINDOW
  np.testing.assert_allclose(ref[:, :w], ref_full[:, :w], atol=1e-5, rtol=0)
  assert np.abs(ref[:, w:] - ref_full[:, w:]).max(axis=-1).min() > 1e-2  # every later token

  windowed.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(tmp_path))
  assert cfg.family == "mistral" and cfg.sliding_window == w
  ours = np.asarray(jaxtune.forward(cfg, params, tokens))
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  ours_full = np.asarray(jaxtune.forward(dataclasses.replace(cfg, sliding_window=0), params,
                                         tokens))
  np.testing.assert_allclose(ours_full, ref_full, atol=1e-4, rtol=0)


def test_sharded_checkpoint_with_index(tmp_path):
  model = hf_models.make("llama2")
  model.save_pretrained(tmp_path / "src", safe_serialization=True, max_shard_size="20KB")
  assert os.path.exists(tmp_path / "src" / "model.safetensors.index.json")
  cfg, params = jaxtune.load_hf(str(tmp_path / "src"))
  jaxtune.save_hf(cfg, params, str(tmp_path / "out"), max_shard_bytes=20_000)
  with open(tmp_path / "out" / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert len(set(index["weight_map"].values())) > 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  tokens = _tokens(4)
  np.testing.assert_allclose(hf_models.logits(reloaded, tokens), hf_models.logits(model, tokens),
                             atol=1e-5)


def test_config_spellings_old_and_new(tmp_path):
  """rope_theta/rope_scaling/torch_dtype (4.x) and rope_parameters/dtype (5.x) read alike."""
  from jaxtune.hf import config as hf_config
  old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
         "torch_dtype": "bfloat16",
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
  new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
  new["dtype"] = "bfloat16"
  new["rope_parameters"] = {**old["rope_scaling"], "rope_theta": 500000.0}
  a, b = hf_config.from_hf(old), hf_config.from_hf(new)
  assert a == b
  assert a.rope_theta == 500000.0 and a.rope_scaling.kind == "llama3"
  assert a.rope_scaling.factor == 8.0 and a.num_kv_heads == 2 and a.head_dim == 4


def test_unknown_missing_and_misshaped_keys_are_named(tmp_path):
  model = hf_models.make("llama2")
  model.save_pretrained(tmp_path, safe_serialization=True)
  path = os.path.join(tmp_path, "model.safetensors")
  good = safetensors.numpy.load_file(path)
  cfg, _ = jaxtune.load_hf(str(tmp_path))

  bad = dict(good, **{"model.layers.0.mlp.extra.weight": np.zeros((3, 5), np.float32)})
  with pytest.raises(ValueError, match=r"unknown.*model\.layers\.0\.mlp\.extra\.weight \[3, 5\]"):
    keys.check_keys(cfg, {k: v.shape for k, v in bad.items()}, "x")
  bad = {k: v for k, v in good.items() if k != "model.layers.1.self_attn.k_proj.weight"}
  with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.k_proj\.weight "
                                       r"\(expected \[16, 48\]\)"):
    keys.check_keys(cfg, {k: v.shape for k, v in bad.items()}, "x")
  bad = dict(good, **{"model.norm.weight": np.zeros((7,), np.float32)})
  safetensors.numpy.save_file(bad, path)
  with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \[7\], expected \[48\]"):
    jaxtune.load_hf(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path):
  model = hf_models.make("llama2")
  model.save_pretrained(tmp_path)
  os.remove(tmp_path / "model.safetensors")
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="pickled weights are never loaded"):
    jaxtune.load_hf(str(tmp_path))
