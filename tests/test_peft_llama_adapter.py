"""LLaMA-Adapter (PEFT's adaption prompts): PEFT parity both ways on the families PEFT
supports (Llama with GQA, Mistral with a sliding window), zero-init gates start at the base,
training reaches only the top layers' prompts and gates, greedy decoding equals PEFT's.

References: `peft`'s AdaptionPrompt model on the `transformers` base (forward and generate).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch

import jaxtune
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.models import decoder
from jaxtune.peft import llama_adapter
from tests import hf_models
from tests import peft_utils

PC = config_lib.PeftConfig(method="llama_adapter", adapter_len=4, adapter_layers=1)


_tokens = hf_models.tokens


@pytest.fixture(scope="module", params=["llama2", "mistral_window"])
def hf_dir(request, tmp_path_factory):
  return request.param, hf_models.saved(request.param, tmp_path_factory)


_hf_model = hf_models.load


def test_peft_made_adapter_loads_with_same_logits(hf_dir, tmp_path):
  family, d = hf_dir
  model = peft.get_peft_model(_hf_model(d), peft.AdaptionPromptConfig(
      task_type="CAUSAL_LM", adapter_len=4, adapter_layers=2))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "adaption_gate" in name:
        p.fill_(0.7)  # not the zero init, so the prompts matter
  model.save_pretrained(tmp_path / "p")
  cfg, params = jaxtune.load_hf(d)
  ad = jaxtune.peft.load_peft(cfg, str(tmp_path / "p"))
  assert isinstance(ad, llama_adapter.LlamaAdapterAdapters) and ad.params["gate"].shape == (2,)
  tokens = _tokens(1)
  ref = hf_models.logits(model.eval(), tokens)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - ref).max()
  print(f"{family} peft-made LLaMA-Adapter: max abs diff {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours - np.asarray(decoder.forward(cfg, params, tokens))).max() > .1
  llama_adapter.save_peft(cfg, ad, str(tmp_path / "j"))
  theirs = safetensors.numpy.load_file(tmp_path / "p" / "adapter_model.safetensors")
  again = safetensors.numpy.load_file(tmp_path / "j" / "adapter_model.safetensors")
  assert sorted(theirs) == sorted(again)
  for k in theirs:
    np.testing.assert_array_equal(theirs[k], again[k], err_msg=k)


def test_jaxtune_adapter_loads_in_peft_and_decodes_as_peft(hf_dir, tmp_path):
  family, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  ad = llama_adapter.init(cfg, PC, key=jax.random.key(0))
  tokens = _tokens(2)
  np.testing.assert_array_equal(decoder.forward(cfg, params, tokens, lora=ad),
                                decoder.forward(cfg, params, tokens))  # zero gates: the base
  ad = dataclasses.replace(ad, params=dict(ad.params, gate=jnp.array([0.9])))
  out = jaxtune.peft.save_peft(cfg, ad, str(tmp_path / "a"), base_model_name_or_path=d)
  with open(os.path.join(out, "adapter_config.json")) as f:
    pc = json.load(f)
  assert (pc["peft_type"], pc["adapter_len"], pc["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 1)
  model = peft.PeftModel.from_pretrained(_hf_model(d), out).eval()
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - hf_models.logits(model, tokens)).max()
  print(f"{family} jaxtune LLaMA-Adapter in peft: max abs diff {diff:.2e}")
  assert diff < 1e-4
  # The sampler runs it too (no cache needed): greedy tokens equal peft's generate.
  prompt = _tokens(3, b=1, t=6)[0].tolist()
  gen = jaxtune.generate(cfg, params, [prompt], max_new_tokens=6, temperature=0.0, lora=ad)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 6,
                            dtype=torch.long), max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
  assert gen.tokens[0] == theirs[0, 6:].tolist()


def test_training_reaches_only_the_top_layers_and_sharded_matches():
  cfg = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                               num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16)
  base = decoder.init(cfg, jax.random.key(0))
  method = jaxtune.peft.get("llama_adapter")
  ad = method.init(cfg, base, dataclasses.replace(PC, adapter_layers=2), jax.random.key(1))
  applied = method.apply(base, ad)["layers"]["self_attn"]
  assert applied["adaption_prompt"].shape == (3, 4, 64) and not np.any(
      np.asarray(applied["adaption_prompt"][0]))
  tokens = jnp.asarray(_tokens(3, b=8, t=16, v=512))
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), base)

  def loss_fn(p, base, constrain=None):
    logits = decoder.forward(cfg, base, tokens, lora=dataclasses.replace(ad, params=p),
                             constrain=constrain)
    lp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1).mean()

  g0 = jax.grad(loss_fn)(ad.params, base)
  assert not np.any(np.asarray(g0["prompt"])) and np.all(np.asarray(g0["gate"]) != 0)  # PEFT:
  # at gate 0 only the gates move first
  p, losses = peft_utils.adam_steps(loss_fn, ad.params, base, lr=1e-1, steps=6)
  print(f"LLaMA-Adapter losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.005
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, base))
  assert not np.array_equal(np.asarray(p["prompt"]), np.asarray(ad.params["prompt"]))
  loss1, g1 = jax.jit(jax.value_and_grad(loss_fn))(p, base)
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  base_sh = sharding.tree_shardings(mesh, decoder.axes(cfg), base)
  ad_sh = sharding.tree_shardings(mesh, method.axes(cfg, ad), ad)
  constrain = sharding.constrainer(mesh)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, constrain)),
               in_shardings=(ad_sh.params, base_sh),
               out_shardings=(sharding.replicated(mesh), ad_sh.params))
  loss8, g8 = fn(jax.device_put(p, ad_sh.params), jax.device_put(base, base_sh))
  gdiff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), g1, g8)))
  print(f"LLaMA-Adapter 8-device vs 1: loss {abs(float(loss8) - float(loss1)):.2e}, "
        f"grad {gdiff:.2e}")
  assert abs(float(loss8) - float(loss1)) < 1e-5 and gdiff < 1e-5


def test_refusals_are_named(tmp_path):
  cfg = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  with pytest.raises(config_lib.ConfigError, match=r"peft.adapter_layers: 3 \(expected 1..2"):
    llama_adapter.init(cfg, dataclasses.replace(PC, adapter_layers=3), key=jax.random.key(0))
  ad = llama_adapter.init(cfg, PC, key=jax.random.key(0))
  good = llama_adapter.save_peft(cfg, ad, str(tmp_path / "g"))
  with open(os.path.join(good, "adapter_config.json")) as f:
    pc = json.load(f)
  d = tmp_path / "two"
  d.mkdir()
  (d / "adapter_config.json").write_text(json.dumps(dict(pc, adapter_layers=2)))
  (d / "adapter_model.safetensors").write_bytes((tmp_path / "g" /
                                                 "adapter_model.safetensors").read_bytes())
  with pytest.raises(ValueError, match=r"missing \['base_model\.model\.model\.layers\.0\.self_"
                                       r"attn\.adaption_gate'"):
    llama_adapter.load_peft(cfg, str(d))
  with pytest.raises(ValueError, match=r"supports \('llama', 'mistral'\), not 'qwen2'"):
    llama_adapter.save_peft(dataclasses.replace(cfg, family="qwen2"), ad, str(tmp_path / "q"))
  with pytest.raises(ValueError, match=r"llama_adapter is not mergeable"):
    llama_adapter.METHOD.merge(cfg, decoder.init(cfg, jax.random.key(0)), ad)
