"""Phi-3 / Phi-4-mini against transformers, beyond the shared parity tests.

tests/test_hf_parity.py and tests/test_sampling.py run the "phi3" fixture of
tests/hf_models.py (partial rotary 0.75, LongRoPE with an original context of 16 that the
sequences cross): logits, bit-identical round trip of the fused tensors and reload, packed
rows, greedy generation and log-probs. Here: the fused tensors split exactly, LongRoPE's
short / long switch per sequence and per packed segment, a Phi-3-mini-4k-style config
(plain rope, sliding window), both config spellings, the refusals, and LoRA exchanged with
peft on the fused modules (jaxtune/peft/fused_io.py).
"""

import dataclasses

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtune
from jaxtune import config as config_lib
from jaxtune.hf import config as hf_config
from jaxtune.models import layers
from jaxtune.peft import lora
from tests import hf_models


def _tokens(seed, b=2, t=37, v=101):
  return np.random.RandomState(seed).randint(0, v, size=(b, t)).astype(np.int32)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
  model = hf_models.make("phi3")
  d = tmp_path_factory.mktemp("phi3")
  model.save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  return model, cfg, params


def test_fused_tensors_split_into_the_separate_kernels(phi3):
  model, cfg, params = phi3
  q, kv, f = cfg.q_size, cfg.kv_size, cfg.intermediate_size
  for i, layer in enumerate(model.model.layers):
    qkv = layer.self_attn.qkv_proj.weight.detach().numpy()  # [Q + 2KV, D]
    gate_up = layer.mlp.gate_up_proj.weight.detach().numpy()  # [2F, D]
    attn, mlp = params["layers"]["self_attn"], params["layers"]["mlp"]
    np.testing.assert_array_equal(np.asarray(attn["q_proj"]["kernel"][i]), qkv[:q].T)
    np.testing.assert_array_equal(np.asarray(attn["k_proj"]["kernel"][i]), qkv[q:q + kv].T)
    np.testing.assert_array_equal(np.asarray(attn["v_proj"]["kernel"][i]), qkv[q + kv:].T)
    np.testing.assert_array_equal(np.asarray(mlp["gate_proj"]["kernel"][i]), gate_up[:f].T)
    np.testing.assert_array_equal(np.asarray(mlp["up_proj"]["kernel"][i]), gate_up[f:].T)


def test_longrope_short_and_long_match_transformers(phi3):
  """Sequences inside the original context (short factors) and beyond it (long factors),
  checked to differ in how transformers' own rope treats them."""
  model, cfg, params = phi3
  assert cfg.rope_scaling.kind == "longrope" and cfg.partial_rotary_factor == 0.75
  assert layers.rotary_dim(cfg) == 12
  np.testing.assert_allclose(cfg.rope_scaling.attention_factor,
                             np.sqrt(1 + np.log(256 / 16) / np.log(16)))
  for t in (11, 16, 17, 40):
    tokens = _tokens(t, t=t)
    np.testing.assert_allclose(np.asarray(jaxtune.forward(cfg, params, tokens)),
                               hf_models.logits(model, tokens), atol=1e-4, rtol=0,
                               err_msg=f"T={t}")
  # The first 16 tokens of a 17-token sequence change when the 17th crosses the original
  # context (long factors for the whole call): the switch is real.
  tokens = _tokens(3, t=17)
  short, long = hf_models.logits(model, tokens[:, :16]), hf_models.logits(model, tokens)
  assert np.abs(short - long[:, :16]).max() > 1e-3


def test_longrope_per_packed_segment(phi3):
  """A row packing a short (11) and a long (20) sequence: each segment = itself alone, so
  the short one keeps its short factors."""
  model, cfg, params = phi3
  a, b = _tokens(5, 1, 11)[0], _tokens(6, 1, 20)[0]
  row = np.concatenate([a, b, np.zeros(3, np.int32)])[None]
  seg = np.array([[1] * 11 + [2] * 20 + [0] * 3], np.int32)
  pos = np.array([list(range(11)) + list(range(20)) + [0] * 3], np.int32)
  packed = np.asarray(jaxtune.forward(cfg, params, row, positions=pos, segment_ids=seg))
  np.testing.assert_allclose(packed[0, :11], hf_models.logits(model, a[None])[0], atol=1e-4)
  np.testing.assert_allclose(packed[0, 11:31], hf_models.logits(model, b[None])[0], atol=1e-4)


def test_phi3_mini_4k_style_plain_rope_and_window(tmp_path):
  """No rope scaling, full rotary, a sliding window shorter than the sequence."""
  model = hf_models.make("phi3", rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                         sliding_window=7, attn_implementation="eager")
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(tmp_path))
  assert (cfg.rope_scaling.kind, cfg.partial_rotary_factor, cfg.sliding_window) == (
      "none", 1.0, 7)
  tokens = _tokens(9, t=19)
  np.testing.assert_allclose(np.asarray(jaxtune.forward(cfg, params, tokens)),
                             hf_models.logits(model, tokens), atol=1e-4, rtol=0)


PHI4_MINI_4X = {  # Phi-4-mini's config.json shape as transformers 4.x wrote it (tiny sizes)
    "model_type": "phi3", "vocab_size": 101, "hidden_size": 48, "intermediate_size": 72,
    "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
    "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "max_position_embeddings": 256,
    "original_max_position_embeddings": 16, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "sliding_window": 262143,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 6,
                     "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0]},
}


def test_config_spellings_agree_with_transformers():
  cfg = hf_config.from_hf(PHI4_MINI_4X)
  rs = cfg.rope_scaling
  assert (rs.kind, rs.original_max_position_embeddings, rs.factor) == ("longrope", 16, 16.0)
  assert rs.long_factor == (1.0, 1.5, 2.0, 3.0, 4.0, 6.0) and cfg.partial_rotary_factor == 0.75
  hf5 = transformers.Phi3Config(**PHI4_MINI_4X)  # transformers 5: rope_parameters
  assert hf5.rope_parameters["rope_type"] == "longrope"
  assert hf_config.from_hf(hf5.to_dict()) == cfg
  ours = hf_config.to_hf(cfg)
  assert hf_config.from_hf(ours) == cfg
  again = transformers.AutoConfig.for_model(**ours)
  assert hf_config.from_hf(again.to_dict()) == cfg
  # transformers computes the same attention factor from our export.
  inv, factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](again, "cpu")
  assert factor == pytest.approx(rs.attention_factor)
  short = np.asarray(layers.rope_inv_freq(cfg, np.zeros((1, 3), np.int32)))[0, 0]
  np.testing.assert_allclose(short, inv.numpy(), rtol=1e-6)
  # transformers 4.x takes exactly type / short_factor / long_factor in rope_scaling; an
  # attention factor other than the derived one is written too, and survives transformers.
  assert sorted(hf_config.to_hf(cfg)["rope_scaling"]) == ["long_factor", "short_factor", "type"]
  odd = dataclasses.replace(cfg, rope_scaling=dataclasses.replace(rs, attention_factor=1.7))
  assert hf_config.from_hf(transformers.AutoConfig.for_model(
      **hf_config.to_hf(odd)).to_dict()) == odd


def test_refusals_name_the_field():
  d = dict(PHI4_MINI_4X)
  with pytest.raises(ValueError, match=r"^src: rope scaling type 'dynamic' is not supported "
                                       r"for phi3 \(expected default or longrope\)$"):
    hf_config.from_hf({**d, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, source="src")
  bad = {**d["rope_scaling"], "long_factor": [1.0] * 5}
  with pytest.raises(ValueError, match=r"^src: longrope long_factor has 5 entries, expected 6 "
                                       r"\(rotary dims / 2\)$"):
    hf_config.from_hf({**d, "rope_scaling": bad}, source="src")
  with pytest.raises(ValueError, match=r"^src: hidden_act='gelu' is not supported"):
    hf_config.from_hf({**d, "hidden_act": "gelu"}, source="src")
  cfg = hf_config.from_hf(d)
  with pytest.raises(ValueError, match=r"^phi3 export: rope scaling 'linear' cannot be written"):
    hf_config.to_hf(dataclasses.replace(cfg, rope_scaling=dataclasses.replace(
        cfg.rope_scaling, kind="linear")))


def _hf(d):
  return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("targets", ["all", "q_v_up"])
def test_lora_exports_to_peft_on_the_fused_modules(tmp_path, targets):
  """jaxtune's LoRA on the split q/k/v, gate/up kernels = one PEFT LoRA of rank n*r on
  qkv_proj / gate_up_proj (rank_pattern, alpha_pattern): PeftModel's logits equal ours,
  also when only some parts are adapted (zero blocks)."""
  d = str(tmp_path / "base")
  hf_models.make("phi3").save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(d)
  regex = None if targets == "all" else r".*(q_proj|v_proj|up_proj)/kernel"
  ad = lora.init(cfg, params, rank=3, alpha=5, rslora=targets == "all", key=jax.random.key(1),
                 **({} if regex is None else {"targets": regex}))
  leaves, treedef = jax.tree.flatten(ad)
  ks = jax.random.split(jax.random.key(2), len(leaves))
  ad = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape, x.dtype)
                                    for k, x in zip(ks, leaves)])
  out = str(tmp_path / "adapter")
  lora.save_peft(cfg, ad, out, base_model_name_or_path=d)
  saved = safetensors.numpy.load_file(out + "/adapter_model.safetensors")
  qkv = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"
  assert saved[qkv].shape == ((9 if targets == "all" else 6), cfg.hidden_size)
  pm = peft.PeftModel.from_pretrained(_hf(d), out).eval()
  tokens = _tokens(11, t=21)
  ours = np.asarray(jaxtune.forward(cfg, params, tokens, lora=ad))
  assert np.abs(ours - np.asarray(jaxtune.forward(cfg, params, tokens))).max() > 0.05
  np.testing.assert_allclose(ours, hf_models.logits(pm, tokens), atol=1e-4, rtol=0)


def test_peft_lora_on_fused_modules_loads_split(tmp_path):
  """A PEFT LoRA on qkv_proj / gate_up_proj / o_proj / down_proj (rank r everywhere) loads
  as per-part LoRAs sharing A, with PeftModel's logits."""
  d = str(tmp_path / "base")
  hf_models.make("phi3").save_pretrained(d, safe_serialization=True)
  pm = peft.get_peft_model(_hf(d), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
      task_type="CAUSAL_LM"))
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.normal_(0.0, 0.2)
  pm.save_pretrained(tmp_path / "p")
  cfg, params = jaxtune.load_hf(d)
  ad = lora.load_peft(cfg, str(tmp_path / "p"))
  attn = ad.params["layers"]["self_attn"]
  assert sorted(attn) == ["k_proj", "o_proj", "q_proj", "v_proj"]
  np.testing.assert_array_equal(np.asarray(attn["q_proj"]["a"]), np.asarray(attn["v_proj"]["a"]))
  tokens = _tokens(12, t=21)
  np.testing.assert_allclose(np.asarray(jaxtune.forward(cfg, params, tokens, lora=ad)),
                             hf_models.logits(pm.eval(), tokens), atol=1e-4, rtol=0)


def test_other_peft_file_types_name_the_fused_module(phi3, tmp_path):
  _, cfg, params = phi3
  ia3 = jaxtune.peft.get("ia3")
  ad = ia3.init(cfg, params, config_lib.PeftConfig(method="ia3"), jax.random.key(0))
  with pytest.raises(ValueError, match=r"^layers/self_attn/k_proj is part of the fused "
                                       r"qkv_proj of a phi3 checkpoint; only LoRA / QLoRA"):
    ia3.save(cfg, ad, str(tmp_path))
