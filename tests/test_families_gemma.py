"""Gemma 2 and Gemma 3 (text) against transformers and peft, beyond the shared parity tests.

tests/test_hf_parity.py and tests/test_sampling.py already run the "gemma2" / "gemma3"
fixtures of tests/hf_models.py (logits, bit-identical round trip and reload, packed rows,
greedy generation and log-probs). Here: the options that make Gemma different, each
checked to bind (the reference changes without it) and to match transformers in the
scanned-in-groups, unrolled and remat decoders; gradients equal across them; the chunked
loss through the soft-capped head; peft LoRA both ways; both config.json spellings of
Gemma 3; clear refusals.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import jaxtune
from jaxtune import losses
from jaxtune.hf import config as hf_config
from jaxtune.models import decoder
from jaxtune.models import head
from jaxtune.models import layer_pattern
from jaxtune.peft import lora
from tests import hf_models

T = 23  # > the fixtures' window (hf_models.WINDOW = 5)


def _tokens(seed, b=2, t=T, v=101):
  return np.random.RandomState(seed).randint(0, v, size=(b, t)).astype(np.int32)


_LOADED = {}


def _load(name, tmp_path_factory):
  """(name, transformers model, cfg, params, HF dir) of a fixture, built once per module."""
  if name not in _LOADED:
    model = hf_models.make(name)
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d, safe_serialization=True)
    cfg, params = jaxtune.load_hf(str(d))
    _LOADED[name] = (name, model, cfg, params, str(d))
  return _LOADED[name]


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma(request, tmp_path_factory):
  return _load(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
  return _load("gemma2", tmp_path_factory)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
  return _load("gemma3", tmp_path_factory)


def test_layer_pattern_is_read_and_grouped(gemma):
  name, model, cfg, _, _ = gemma
  assert cfg.layer_types == tuple(model.config.layer_types)
  ks = layer_pattern.kinds(cfg)
  assert [k.window for k in ks] == [hf_models.WINDOW if t == "sliding_attention" else 0
                                    for t in model.config.layer_types]
  # gemma2: (s, f, s) = one period of 2 plus one; gemma3: (s, s, f, s) = 3 plus one.
  assert layer_pattern.period(ks) == {"gemma2": 2, "gemma3": 3}[name]
  assert [k.local for k in ks] == ([False] * 3 if name == "gemma2" else
                                   [True, True, False, True])


def test_decoder_variants_match_transformers(gemma):
  """Gemma 2 unrolled with remat, Gemma 3 grouped scan with remat = transformers (1e-4); the
  plain grouped scan is tests/test_hf_parity.py's."""
  name, model, cfg, params, _ = gemma
  cfg = dataclasses.replace(cfg, scan_layers=name == "gemma3", remat="full")
  tokens = _tokens(1)
  ours = np.asarray(jaxtune.forward(cfg, params, tokens))
  np.testing.assert_allclose(ours, hf_models.logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_gradients_equal_scanned_and_unrolled(gemma3):
  """Gemma 3 (period 3 + one layer): grouped scan with remat = unrolled, every leaf to
  1e-4 of its largest entry (float32 sums of 44 tokens' losses, summed in other orders)."""
  name, _, cfg, params, _ = gemma3
  tokens = _tokens(2)
  mask = np.ones_like(tokens)

  def loss(p, c):
    h = decoder.hidden_states(c, p, tokens[:, :-1])
    return head.nll_sum(c, p, h, tokens[:, 1:], mask[:, 1:])[0]

  g_scan = jax.grad(loss)(params, dataclasses.replace(cfg, scan_layers=True, remat="full"))
  g_loop = jax.grad(loss)(params, dataclasses.replace(cfg, scan_layers=False))
  flat_a, flat_b = jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)
  assert len(flat_a) == len(flat_b)
  for a, b in zip(flat_a, flat_b):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(b).max() > 0 and np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def _variant(name, **overrides):
  return hf_models.logits(hf_models.make(name, **overrides), _tokens(3))


def test_gemma_options_bind():
  """Each option changes transformers' own logits, so matching them tests it."""
  base = _variant("gemma2")
  for overrides in (dict(attn_logit_softcapping=None), dict(final_logit_softcapping=None),
                    dict(sliding_window=64), dict(query_pre_attn_scalar=24)):
    assert np.abs(_variant("gemma2", **overrides) - base).max() > 1e-2, overrides
  assert 2.5 < np.abs(base).max() <= 3.0  # near the final soft-cap 3
  g3 = _variant("gemma3")
  local = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
           "sliding_attention": {"rope_type": "default", "rope_theta": 50000.0}}
  assert np.abs(_variant("gemma3", rope_parameters=local) - g3).max() > 1e-2


def test_chunked_logprobs_and_loss_through_the_soft_cap(gemma2):
  """head.token_logprobs / nll_sum with logits_chunk (the training path) = log_softmax of
  transformers' soft-capped logits."""
  name, model, cfg, params, _ = gemma2
  tokens = _tokens(4)
  ref = torch.log_softmax(torch.as_tensor(hf_models.logits(model, tokens[:, :-1])), -1)
  want = torch.gather(ref, -1, torch.as_tensor(tokens[:, 1:, None]).long())[..., 0].numpy()
  chunked = dataclasses.replace(cfg, logits_chunk=8)
  h = decoder.hidden_states(chunked, params, tokens[:, :-1])
  lp = np.asarray(head.token_logprobs(chunked, params, h, tokens[:, 1:]))
  np.testing.assert_allclose(lp, want, atol=1e-4, rtol=0)
  total, _ = head.nll_sum(chunked, params, h, tokens[:, 1:], np.ones_like(tokens[:, 1:]))
  np.testing.assert_allclose(float(total), -want.sum(), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(losses.token_logprobs(
      head.logits(cfg, params, h), tokens[:, 1:])), want, atol=1e-4, rtol=0)


def test_unrolled_greedy_generation_equals_transformers(gemma3):
  """scan_layers=False: the per-layer cache tuple with each layer's own window / rope (the
  grouped scan's cache is tests/test_sampling.py's)."""
  name, model, cfg, params, _ = gemma3
  cfg = dataclasses.replace(cfg, scan_layers=False)
  prompts = [np.random.RandomState(5).randint(3, 101, n).tolist() for n in (4, 9)]
  gen = jaxtune.generate(cfg, params, prompts, max_new_tokens=10, temperature=0.0,
                         eos_ids=(2,))
  for p, ours in zip(prompts, gen.tokens):
    out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                         max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert ours == out[0, len(p):].tolist(), (name, p)


def test_peft_loads_jaxtune_lora_and_back(gemma3, tmp_path):
  """A jaxtune LoRA (every projection, non-zero B) saved in PEFT format: PeftModel's logits
  equal ours; and peft's own adapter loads into jaxtune with its logits. (Gemma 2's module
  names are Gemma 3's.)"""
  name, model, cfg, params, d = gemma3
  ad = lora.init(cfg, params, rank=4, alpha=8, key=jax.random.key(5))
  leaves, treedef = jax.tree.flatten(ad)
  keys = jax.random.split(jax.random.key(6), len(leaves))
  ad = jax.tree.unflatten(treedef, [0.1 * jax.random.normal(k, x.shape, x.dtype)
                                    for k, x in zip(keys, leaves)])
  lora.save_peft(cfg, ad, str(tmp_path / "ours"), base_model_name_or_path=d)
  tokens = _tokens(7)
  ours = np.asarray(jaxtune.forward(cfg, params, tokens, lora=ad))
  assert np.abs(ours - np.asarray(jaxtune.forward(cfg, params, tokens))).max() > 0.05
  base = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
  pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(ours, hf_models.logits(pm, tokens), atol=1e-4, rtol=0)

  theirs = peft.get_peft_model(
      transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32),
      peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                      task_type="CAUSAL_LM"))
  torch.manual_seed(0)
  with torch.no_grad():
    for n, p in theirs.named_parameters():
      if "lora_" in n:
        p.normal_(0.0, 0.1)
  theirs.save_pretrained(tmp_path / "theirs")
  loaded = lora.load_peft(cfg, str(tmp_path / "theirs"))
  np.testing.assert_allclose(np.asarray(jaxtune.forward(cfg, params, tokens, lora=loaded)),
                             hf_models.logits(theirs.eval(), tokens), atol=1e-4, rtol=0)


GEMMA3_4X = {  # a Gemma 3 4B-style config.json as transformers 4.x wrote it (tiny sizes)
    "model_type": "gemma3_text", "vocab_size": 101, "hidden_size": 48,
    "intermediate_size": 72, "num_hidden_layers": 8, "num_attention_heads": 3,
    "num_key_value_heads": 1, "head_dim": 24, "query_pre_attn_scalar": 24,
    "sliding_window": 5, "sliding_window_pattern": 6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 256,
}


def test_gemma3_config_spellings_agree_with_transformers():
  cfg = hf_config.from_hf(GEMMA3_4X)
  assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",) + (
      "sliding_attention",) * 2
  assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
  assert (cfg.rope_scaling.kind, cfg.rope_scaling.factor) == ("linear", 8.0)
  # transformers 5 reads the 4.x dict; its 5.x dict (nested rope_parameters, layer_types)
  # reads back to the same config, and so does our own export through transformers.
  hf5 = transformers.Gemma3TextConfig(**GEMMA3_4X).to_dict()
  assert "full_attention" in hf5["rope_parameters"]
  assert hf_config.from_hf(hf5) == cfg
  ours = hf_config.to_hf(cfg)
  assert hf_config.from_hf(ours) == cfg
  again = transformers.AutoConfig.for_model(**ours)
  assert list(again.layer_types) == list(cfg.layer_types)
  assert again.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
  assert again.rope_parameters["full_attention"]["factor"] == 8.0
  assert hf_config.from_hf(again.to_dict()) == cfg


def test_gemma2_default_alternation_and_refusals():
  d = hf_config.to_hf(hf_config.from_hf(
      transformers.Gemma2Config(**{**hf_models.COMMON, "num_hidden_layers": 4},
                                head_dim=24, sliding_window=5).to_dict()))
  no_types = {k: v for k, v in d.items() if k != "layer_types"}
  assert hf_config.from_hf(no_types).layer_types == ("sliding_attention", "full_attention") * 2
  with pytest.raises(ValueError, match=r"^src: hidden_activation='gelu' is not supported "
                                       r"\(expected gelu_pytorch_tanh\)$"):
    hf_config.from_hf({**d, "hidden_activation": "gelu"}, source="src")
  with pytest.raises(ValueError, match=r"^src: use_bidirectional_attention=true"):
    hf_config.from_hf({**d, "use_bidirectional_attention": True}, source="src")
  with pytest.raises(ValueError, match=r"^src: layer_types must list 4 entries of "
                                       r"sliding_attention or full_attention"):
    hf_config.from_hf({**d, "layer_types": ["sliding_attention"] * 3}, source="src")
  with pytest.raises(ValueError, match=r"^src: sliding_attention layers need an integer "
                                       r"sliding_window, got None$"):
    hf_config.from_hf({**d, "sliding_window": None}, source="src")
  with pytest.raises(ValueError, match=r"^src: gemma2 attention_bias=true is not supported$"):
    hf_config.from_hf({**d, "attention_bias": True}, source="src")
