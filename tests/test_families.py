"""The model-family registry: explicit, complete, and each family's config mapping exact.

Every family's `to_hf` must give a config.json that transformers accepts as that family and
that `from_hf` reads back to the same ModelConfig; every key-table row must name a param the
decoder has; bad names are errors that list the allowed ones.
"""

import ast
import dataclasses
import os
import pkgutil

import pytest
import transformers

from jaxtune import config as config_lib
from jaxtune.hf import config as hf_config
from jaxtune.hf import expert_keys
from jaxtune.hf import keys
from jaxtune.hf import reward
from jaxtune.models import decoder
from jaxtune.models import families

NAMES = list(families.FAMILIES)
ALL = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral",
       "qwen3_moe")
# Families whose config.json carries a sliding window (Llama's export writes none).
WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
# Rope scalings a family's transformers config refuses (Phi-3: default or longrope only).
NO_VARIANT = {"phi3": ("llama3_rope", "linear_rope")}
# Compute options: from_hf must keep them from `base`, whatever config.json says.
BASE = config_lib.ModelConfig(dtype="bfloat16", param_dtype="bfloat16", remat="full",
                              attention="xla", scan_layers=False, logits_chunk=128)

VARIANTS = {
    "plain": dict(),
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling=config_lib.RopeScaling(
        kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear_rope": dict(rope_scaling=config_lib.RopeScaling(kind="linear", factor=2.0)),
    "untied_ids": dict(tie_word_embeddings=False, bos_token_id=1, eos_token_id=(2, 7),
                       pad_token_id=0),
    "window": dict(sliding_window=5),
}


# The MoE families' expert settings (a MoE config.json always has experts).
MOE = {"mixtral": dict(num_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.01),
       "qwen3_moe": dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=16,
                         norm_topk_prob=False, router_aux_loss_coef=0.0,
                         dense_layers=(1,))}  # layer 1 dense (mlp_only_layers)


def _cfg(name: str, variant: str) -> config_lib.ModelConfig:
  """A config of family `name` as from_hf would build it: the family's block flags set."""
  family = families.get(name)
  return dataclasses.replace(BASE, family=name, vocab_size=101, hidden_size=48,
                             intermediate_size=72, num_layers=2, num_heads=3, num_kv_heads=1,
                             head_dim=24, rms_norm_eps=1e-5, max_position_embeddings=256,
                             **family.block, **MOE.get(name, {}), **VARIANTS[variant])


def _cases():
  for name in NAMES:
    for variant in VARIANTS:
      if (variant != "window" or name in WINDOWED) and variant not in NO_VARIANT.get(name, ()):
        yield name, variant


def test_registry_is_explicit_and_complete():
  assert families.names() == tuple(families.FAMILIES) == ALL
  for name, family in families.FAMILIES.items():
    assert family.name == name and families.get(name) is family
    assert families.for_model_type(family.model_types[0], "x") is family
  # Every family module in the package is in the table (none forgotten, none implicit).
  modules = [m.name for m in pkgutil.iter_modules(families.__path__) if m.name != "base"]
  registered = [f.from_hf.__module__.rsplit(".", 1)[1] for f in families.FAMILIES.values()]
  assert sorted(modules) == sorted(registered)
  model_types = [t for f in families.FAMILIES.values() for t in f.model_types]
  assert len(model_types) == len(set(model_types))


def test_families_import_only_config():
  """No import cycle can form: families never import hf/, the decoder, peft/ or train/."""
  allowed = {"jaxtune.config", "jaxtune.models.families"}
  for path in os.listdir(families.__path__[0]):
    if not path.endswith(".py"):
      continue
    with open(os.path.join(families.__path__[0], path)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module.startswith("jaxtune"):
        mods = {f"{node.module}.{a.name}" for a in node.names}
      elif isinstance(node, ast.Import):
        mods = {a.name for a in node.names if a.name.startswith("jaxtune")}
      else:
        continue
      for mod in mods:
        assert any(mod == a or mod.startswith(a + ".") for a in allowed), (path, mod)


@pytest.mark.parametrize("name,variant", list(_cases()))
def test_to_hf_from_hf_round_trip(name, variant):
  cfg = _cfg(name, variant)
  d = hf_config.to_hf(cfg, dtype="bfloat16")
  assert d == families.get(name).to_hf(cfg, "bfloat16")
  assert d["torch_dtype"] == d["dtype"] == "bfloat16"
  assert hf_config.from_hf(d, BASE, "x") == cfg


@pytest.mark.parametrize("name,variant", list(_cases()))
def test_transformers_reads_the_export_as_the_family(name, variant):
  family = families.get(name)
  cfg = _cfg(name, variant)
  d = hf_config.to_hf(cfg)
  hf = transformers.AutoConfig.for_model(**d)
  assert hf.model_type == d["model_type"] == family.model_types[0]
  assert hf.architectures == [family.architecture]
  assert getattr(transformers, family.architecture).config_class is type(hf)
  assert getattr(transformers, family.seq_cls_architecture).config_class is type(hf)
  assert reward.architecture(name) == family.seq_cls_architecture
  # What transformers makes of the dict reads back to the same config.
  assert hf_config.from_hf(hf.to_dict(), BASE, "x") == cfg


def test_sliding_window_spellings():
  d = hf_config.to_hf(_cfg("mistral", "plain"))
  assert hf_config.from_hf({**d, "sliding_window": 9}).sliding_window == 9
  assert hf_config.from_hf({**d, "sliding_window": None}).sliding_window == 0
  for name in ("qwen2", "qwen3"):
    d = hf_config.to_hf(_cfg(name, "window"))
    assert d["use_sliding_window"] and d["sliding_window"] == 5 and d["max_window_layers"] == 2
    # Qwen configs carry a sliding_window that is off unless use_sliding_window is true.
    assert hf_config.from_hf({**d, "use_sliding_window": False}).sliding_window == 0
    off = hf_config.to_hf(_cfg(name, "plain"))
    assert not off["use_sliding_window"] and off["sliding_window"] is None


def test_block_flags_come_from_the_family():
  assert {n: dict(f.block) for n, f in families.FAMILIES.items()} == {
      "llama": {"attention_bias": False, "qk_norm": False},
      "mistral": {"attention_bias": False, "qk_norm": False},
      "qwen2": {"attention_bias": True, "qk_norm": False},
      "qwen3": {"attention_bias": False, "qk_norm": True},
      "gemma2": {"attention_bias": False, "qk_norm": False, "norm_one_plus": True,
                 "sandwich_norms": True, "embed_scale": True, "hidden_act": "gelu_pytorch_tanh"},
      "gemma3": {"attention_bias": False, "qk_norm": True, "norm_one_plus": True,
                 "sandwich_norms": True, "embed_scale": True, "hidden_act": "gelu_pytorch_tanh"},
      "phi3": {"attention_bias": False, "qk_norm": False},
      "mixtral": {"attention_bias": False, "qk_norm": False},
      "qwen3_moe": {"attention_bias": False, "qk_norm": True},
  }
  for name in NAMES:
    d = hf_config.to_hf(_cfg(name, "plain"))
    # from_hf sets the flags from the family even if the base config says otherwise.
    block = families.get(name).block
    flipped = dataclasses.replace(BASE, **{k: not v for k, v in block.items()
                                           if isinstance(v, bool)})
    got = hf_config.from_hf(d, flipped)
    assert {k: getattr(got, k) for k in block} == dict(block)


@pytest.mark.parametrize("name", NAMES)
def test_every_row_names_a_decoder_param(name):
  family = families.get(name)
  untied = _cfg(name, "untied_ids")
  assert keys.rows(untied) == list(family.rows)  # untied: every row applies
  experts = set(expert_keys.PATHS) if family.experts else set()  # hf/expert_keys.py
  assert set(p for _, ps, _ in family.rows for p in keys.parts(ps)) | experts == set(
      decoder.shapes(untied))
  assert len({t for t, _, _ in family.rows}) == len(family.rows)
  tied = _cfg(name, "plain")
  assert [p for _, p, _ in keys.rows(tied)] == [
      p for _, p, _ in family.rows if p != "lm_head/kernel"]


def test_unknown_model_type_names_the_source_and_the_supported_ones():
  with pytest.raises(ValueError, match=r"^dir/config\.json: model_type 'gpt2' is not supported "
                                       r"\(expected one of llama, mistral, qwen2, qwen3, "
                                       r"gemma2, gemma3_text, phi3, mixtral, qwen3_moe\)$"):
    hf_config.from_hf({"model_type": "gpt2"}, source="dir/config.json")
  with pytest.raises(ValueError, match=r"model_type None is not supported"):
    families.for_model_type(None, "config.json")


def test_unknown_family_names_model_family_and_the_allowed_ones():
  msg = (r"^bad value for model\.family: 'gemma9' "
         r"\(expected one of " + ", ".join(ALL) + r"\)$")
  with pytest.raises(config_lib.ConfigError, match=msg):
    families.get("gemma9")
  bad = config_lib.ModelConfig(family="gemma9")
  with pytest.raises(config_lib.ConfigError, match=msg):
    hf_config.to_hf(bad)
  with pytest.raises(config_lib.ConfigError, match=msg):
    keys.rows(bad)
  with pytest.raises(config_lib.ConfigError, match=msg):
    reward.architecture("gemma9")


@pytest.mark.parametrize("name", NAMES)
def test_unsupported_features_are_refused(name):
  d = hf_config.to_hf(_cfg(name, "plain"))
  with pytest.raises(ValueError, match=r"^src: mlp_bias=true is not supported$"):
    hf_config.from_hf({**d, "mlp_bias": True}, source="src")
  expected = ("default or longrope" if name == "phi3" else "default, linear or llama3")
  with pytest.raises(ValueError, match=r"^src: rope scaling type 'yarn' is not supported "
                                       r"(for phi3 )?\(expected " + expected + r"\)$"):
    hf_config.from_hf({**d, "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                       "rope_parameters": None}, source="src")
  if name == "llama":
    with pytest.raises(ValueError, match=r"^src: llama attention_bias=true \(o_proj bias\) is "
                                         r"not supported$"):
      hf_config.from_hf({**d, "attention_bias": True}, source="src")
