"""Gemma3ForConditionalGeneration checkpoints (Gemma 3 4B/12B/27B): the language model loads
for text training from either tensor naming, its text logits match transformers', the
export is the same wrapper with the vision tensors copied bit for bit, and PEFT adapters
are named as `peft` names them in the wrapper."""

import dataclasses
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtune
from jaxtune import convert
from jaxtune import tree
from jaxtune.hf import config as hf_config
from jaxtune.hf import io as hf_io
from jaxtune.hf import multimodal_export
from jaxtune.peft import lora

T = 23  # > the sliding window (5)
TEXT = dict(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=4,
            num_attention_heads=3, num_key_value_heads=1, head_dim=24, query_pre_attn_scalar=24,
            sliding_window=5, sliding_window_pattern=3, max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                "rope_theta": 50000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
              image_size=28, patch_size=7)
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.")


def _make(tied: bool):
  cfg = transformers.Gemma3Config(
      text_config={**TEXT, "tie_word_embeddings": tied}, vision_config=VISION,
      mm_tokens_per_image=4, boi_token_index=98, eoi_token_index=99, image_token_index=100,
      tie_word_embeddings=tied)
  torch.manual_seed(0)
  model = transformers.Gemma3ForConditionalGeneration(cfg).to(torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(0.1 * torch.randn_like(p))
  return model.eval()


def _load(model, d):
  cfg, params = jaxtune.load_hf(d)
  return model, d, cfg, params


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
  """Tied, as save_pretrained writes it: language_model.model.*, vision_tower.*, ..."""
  model, d = _make(tied=True), str(tmp_path_factory.mktemp("legacy"))
  model.save_pretrained(d)
  return _load(model, d)


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory):
  """Untied, in transformers 5's module names: model.language_model.*, lm_head.weight, ..."""
  model, d = _make(tied=False), str(tmp_path_factory.mktemp("in_memory"))
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  safetensors.numpy.save_file(sd, os.path.join(d, "model.safetensors"), {"format": "pt"})
  model.config.save_pretrained(d)
  return _load(model, d)


@pytest.fixture(params=["legacy", "in_memory"])
def wrapped(request):
  return request.getfixturevalue(request.param)


def _tokens(seed, b=2):
  return np.random.RandomState(seed).randint(0, 98, (b, T)).astype(np.int32)  # no image ids


def _logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _tensors(d):
  out = {}
  for f in os.listdir(d):
    if f.endswith(".safetensors"):
      out.update(safetensors.numpy.load_file(os.path.join(d, f)))
  return out


def test_text_config_from_the_wrapper(wrapped):
  model, d, cfg, _ = wrapped
  assert cfg.family == "gemma3" and cfg.hf_path == os.path.abspath(d)
  assert cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention",
                             "sliding_attention")
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling.kind,
          cfg.rope_scaling.factor) == (50000.0, 100.0, "linear", 2.0)
  assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
  assert cfg.num_layers == 4 and cfg.vocab_size == 101 and cfg.sliding_window == 5


def test_text_logits_match_transformers(wrapped):
  model, _, cfg, params = wrapped
  tokens = _tokens(1)
  got = np.asarray(jaxtune.forward(cfg, params, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, _logits(model, tokens), atol=1e-4, rtol=0)


def _tuned(params, seed=3):
  """The params after some 'training': every text tensor moved."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def test_export_is_the_wrapper_with_vision_copied(wrapped, tmp_path):
  model, d, cfg, params = wrapped
  src = _tensors(d)
  # Untouched params: the whole checkpoint comes back bit for bit, names included.
  hf_io.save_hf(cfg, params, str(tmp_path / "same"))
  same = _tensors(tmp_path / "same")
  assert set(same) == set(src)
  for k in src:
    assert same[k].dtype == src[k].dtype and np.array_equal(same[k], src[k]), k
  # Tuned text params (sharded output, so the vision tensors stream shard by shard).
  tuned = _tuned(params)
  out = str(tmp_path / "tuned")
  hf_io.save_hf(cfg, tuned, out, max_shard_bytes=64 * 1024, metadata={"jaxtune_method": "sft"})
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  got = _tensors(out)
  assert set(got) == set(src)
  vision = [k for k in src if k.startswith(VISION_PREFIXES)]
  assert vision and all(np.array_equal(got[k], src[k]) for k in vision)
  assert not any(np.array_equal(got[k], src[k]) for k in src if k not in vision)
  with open(os.path.join(d, "config.json")) as f:
    want = json.load(f)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written.pop("jaxtune") == {"jaxtune_method": "sft"}
  assert written["dtype"] == written["torch_dtype"] == "float32"  # the export's dtype
  dtypes = ("dtype", "torch_dtype")
  assert ({k: v for k, v in written.items() if k not in dtypes}
          == {k: v for k, v in want.items() if k not in dtypes})  # else the source's config
  reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(
      out, dtype=torch.float32).eval()
  tokens = _tokens(2)
  ours = np.asarray(jaxtune.forward(cfg, tuned, jnp.asarray(tokens)))
  np.testing.assert_allclose(_logits(reloaded, tokens), ours, atol=1e-4, rtol=0)
  theirs, orig = reloaded.state_dict(), model.state_dict()
  vision_params = [k for k in orig if k.startswith(VISION_PREFIXES)]
  assert vision_params and all(torch.equal(theirs[k], orig[k]) for k in vision_params)


def test_text_only_export_when_asked_or_when_the_source_differs(legacy, tmp_path, caplog):
  model, d, cfg, params = legacy
  hf_io.save_hf(cfg, params, str(tmp_path / "text"), source="")  # no source: the text model
  with open(tmp_path / "text" / "config.json") as f:
    assert json.load(f)["architectures"] == ["Gemma3ForCausalLM"]
  text = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "text"),
                                                           dtype=torch.float32).eval()
  tokens = _tokens(4)
  np.testing.assert_allclose(_logits(text, tokens), _logits(model, tokens), atol=1e-5, rtol=0)
  other = dataclasses.replace(cfg, rope_local_theta=200.0)  # not this source's text config
  with caplog.at_level(logging.WARNING, logger="jaxtune"):
    hf_io.save_hf(other, params, str(tmp_path / "other"))
  assert "rope_local_theta" in caplog.text and "Gemma3ForCausalLM" in caplog.text
  with open(tmp_path / "other" / "config.json") as f:
    assert json.load(f)["architectures"] == ["Gemma3ForCausalLM"]


def test_export_falls_back_to_the_text_model_when_the_source_is_unusable(legacy, tmp_path,
                                                                         caplog):
  """The source's weights gone (config.json kept): the export is the text model, with a
  warning, and nothing of the failed wrapper attempt left in the directory. A source path
  that no longer exists is not looked up on the hub under its name."""
  _, d, cfg, params = legacy
  src = tmp_path / "src"
  shutil.copytree(d, src)
  for name in os.listdir(src):
    if name.endswith(".safetensors"):
      os.remove(src / name)
  with caplog.at_level(logging.WARNING, logger="jaxtune"):
    out = hf_io.save_hf(cfg, params, str(tmp_path / "out"), source=str(src))
  assert "exporting the text model alone" in caplog.text
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["Gemma3ForCausalLM"]
  assert not any("vision" in k for k in _tensors(out))
  assert hf_io.source_config(str(tmp_path / "gone")) == (str(tmp_path / "gone"), {})


def test_export_into_its_own_source_is_refused_and_leaves_it_whole(legacy, tmp_path):
  """Exporting over the wrapper it came from would lose the vision tensors it copies (and a
  text-model fallback would overwrite the source's files): an error, the source unchanged."""
  _, d, cfg, params = legacy
  src = tmp_path / "src"
  shutil.copytree(d, src)
  before = {name: (src / name).read_bytes() for name in os.listdir(src)}
  with pytest.raises(multimodal_export.SourceOverwrite, match="export to another directory"):
    hf_io.save_hf(cfg, params, str(src), source=str(src))
  assert {name: (src / name).read_bytes() for name in os.listdir(src)} == before


def test_imported_checkpoint_exports_the_wrapper(legacy, tmp_path):
  """HF -> jaxtune checkpoint (`convert`) -> HF: the checkpoint remembers its source."""
  _, d, _, _ = legacy
  ckpt = convert.hf_to_checkpoint(d, str(tmp_path / "ckpt"))
  out = convert.checkpoint_to_hf(ckpt, str(tmp_path / "hf"))
  src, got = _tensors(d), _tensors(out)
  assert set(got) == set(src) and all(np.array_equal(got[k], src[k]) for k in src)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["architectures"] == ["Gemma3ForConditionalGeneration"]


def test_hub_style_sparse_text_config_gets_transformers_defaults():
  """gemma-3-4b-it's config.json (4.x spelling): text_config lists a few keys only."""
  d = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
       "eos_token_id": [1, 106], "mm_tokens_per_image": 256, "torch_dtype": "bfloat16",
       "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                       "model_type": "gemma3_text", "num_hidden_layers": 34,
                       "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                       "sliding_window": 1024},
       "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                         "model_type": "siglip_vision_model", "num_attention_heads": 16,
                         "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}
  cfg = hf_config.from_hf(d)
  assert (cfg.family, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      "gemma3", 262208, 8, 4, 256)
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling.factor) == (1e6, 1e4, 8.0)
  assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
  assert cfg.tie_word_embeddings and cfg.eos_token_id == (1, 106) and cfg.sliding_window == 1024


def test_malformed_wrapper_checkpoints_are_named(legacy, tmp_path):
  model, d, _, _ = legacy
  sd = safetensors.numpy.load_file(os.path.join(d, "model.safetensors"))
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  model.config.save_pretrained(bad)
  safetensors.numpy.save_file({**sd, "audio_tower.w": np.zeros(3, np.float32)},
                              os.path.join(bad, "model.safetensors"))
  with pytest.raises(ValueError, match=r"bad/model.safetensors: tensor audio_tower.w \[3\] is "
                                       r"not part of a Gemma3ForConditionalGeneration"):
    jaxtune.load_hf(bad)
  safetensors.numpy.save_file({k: v for k, v in sd.items() if "language_model" not in k},
                              os.path.join(bad, "model.safetensors"))
  with pytest.raises(ValueError, match="language model's tensors under exactly one of"):
    jaxtune.load_hf(bad)


def _random_lora(cfg, params):
  ad = lora.init(cfg, params, rank=4, alpha=8, key=jax.random.key(5))
  leaves, treedef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.key(6), len(leaves))
  return jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def test_lora_adapter_is_named_for_the_wrapper(legacy, tmp_path):
  model, d, cfg, params = legacy
  ad = _random_lora(cfg, params)
  lora.save_peft(cfg, ad, str(tmp_path / "ours"), base_model_name_or_path=d)
  ours = safetensors.numpy.load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
  with open(tmp_path / "ours" / "adapter_config.json") as f:
    target = json.load(f)["target_modules"]
  # peft's own adapter on the wrapper, on the same modules, has the same tensor names.
  base = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
  theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=target))
  theirs.save_pretrained(str(tmp_path / "theirs"))
  names = safetensors.numpy.load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
  assert set(ours) == set(names)
  assert all(k.startswith("base_model.model.model.language_model.layers.") for k in ours)
  # PeftModel runs our adapter (no vision module adapted) with our logits, and it reads back.
  base = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
  pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
  assert not any("lora_A" in n for n, _ in pm.named_parameters() if "vision_tower" in n)
  tokens = _tokens(5)
  want = np.asarray(jaxtune.forward(cfg, params, jnp.asarray(tokens), lora=ad))
  np.testing.assert_allclose(_logits(pm, tokens), want, atol=1e-4, rtol=0)
  back = lora.load_peft(cfg, str(tmp_path / "ours"))
  for k, v in tree.flatten(ad.params).items():
    np.testing.assert_array_equal(np.asarray(tree.flatten(back.params)[k]), np.asarray(v))


def test_peft_adapter_of_the_whole_wrapper_loads(legacy, tmp_path, caplog):
  """peft's LoRA with plain target_modules also adapts the vision tower's q_proj: jaxtune
  skips those (they do not touch text logits) and matches PeftModel on text."""
  _, d, cfg, params = legacy
  base = transformers.Gemma3ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
  pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=6,
                                                 target_modules=["q_proj", "down_proj"]))
  torch.manual_seed(1)
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.normal_(0.0, 0.1)
  pm.save_pretrained(str(tmp_path / "theirs"))
  with caplog.at_level(logging.WARNING, logger="jaxtune"):
    ad = lora.load_peft(cfg, str(tmp_path / "theirs"))
  assert "vision tower" in caplog.text
  tokens = _tokens(6)
  got = np.asarray(jaxtune.forward(cfg, params, jnp.asarray(tokens), lora=ad))
  np.testing.assert_allclose(got, _logits(pm.eval(), tokens), atol=1e-4, rtol=0)
