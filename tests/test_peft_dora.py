"""DoRA / QDoRA: the norm identity, PEFT parity both ways (logits and gradients), merge,
training touches only the adapters, sharding, the 4-bit base.

References nobody here wrote: `peft`'s DoRA on the `transformers` base (forward and
torch autograd), float64 numpy norms, the dequantized dense base for QDoRA.
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
from jaxtune import quant
from jaxtune import sharding
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.peft import dora
from tests import hf_models
from tests import peft_utils

CFG = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=16)
PC = config_lib.PeftConfig(method="dora", rank=4, alpha=8.0)


_tokens = hf_models.tokens


def _randomize(adapters, seed, std=0.1):
  """a, b ~ N(0, std); m = its init value times U(0.5, 1.5), so every leaf is non-trivial."""
  flat = tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  out = {}
  for k, (p, x) in zip(keys, sorted(flat.items())):
    if p.endswith("/m"):
      out[p] = x * jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5)
    else:
      out[p] = std * jax.random.normal(k, x.shape, x.dtype)
  return dataclasses.replace(adapters, params=tree.unflatten(out))


@pytest.fixture(scope="module")
def base():
  return decoder.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module", params=["llama2", "qwen2"])
def hf_dir(request, tmp_path_factory):
  return request.param, hf_models.saved(request.param, tmp_path_factory)


_hf_model = hf_models.load


def test_column_norms_identity_no_gradient_and_4bit():
  rs = np.random.RandomState(0)
  w = rs.randn(3, 40, 24).astype(np.float32)
  a = rs.randn(3, 40, 5).astype(np.float32)
  b = rs.randn(3, 5, 24).astype(np.float32)
  want = np.linalg.norm(w.astype(np.float64) + 0.7 * np.einsum(
      "lir,lro->lio", a.astype(np.float64), b.astype(np.float64)), axis=1)  # [L, out]
  got = np.asarray(dora.column_norms(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), 0.7))
  np.testing.assert_allclose(got, want, rtol=2e-6)
  grads = jax.grad(lambda a, b: dora.column_norms(w, a, b, 0.7).sum(), argnums=(0, 1))(a, b)
  assert all(not np.any(np.asarray(g)) for g in grads)  # detached, as PEFT's
  # A bfloat16 base is read in 16 bits (a split in two 16-bit halves): still ~float32-exact.
  wb = jnp.asarray(w, jnp.bfloat16)
  want_b = np.linalg.norm(np.asarray(wb, np.float64) + 0.7 * np.einsum(
      "lir,lro->lio", a.astype(np.float64), b.astype(np.float64)), axis=1)
  np.testing.assert_allclose(np.asarray(dora.column_norms(wb, a, b, 0.7)), want_b, rtol=1e-5)
  q = quant.quantize_array(w, "nf4", 8)
  wq = np.asarray(quant.dequantize(q), np.float64)
  want_q = np.linalg.norm(wq + 0.7 * np.einsum("lir,lro->lio", a, b), axis=1)
  np.testing.assert_allclose(np.asarray(dora.column_norms(q, a, b, 0.7)), want_q, rtol=2e-6)


def test_init_equals_base_registry_and_axes(base):
  method = jaxtune.peft.get("dora")
  assert method.name == "dora" and not method.quantized_base
  assert jaxtune.peft.get("qdora").quantized_base
  ad = method.init(CFG, base, PC, jax.random.key(1))
  assert isinstance(ad, dora.DoraAdapters) and ad.scale == 2.0
  m = np.asarray(ad.params["layers"]["mlp"]["down_proj"]["m"])  # [L, D]
  w = np.asarray(base["layers"]["mlp"]["down_proj"]["kernel"], np.float64)
  np.testing.assert_allclose(m, np.linalg.norm(w, axis=1), rtol=1e-6)  # PEFT: m = ||W||_col
  tokens = _tokens(0, v=CFG.vocab_size)
  diff = np.abs(np.asarray(decoder.forward(CFG, base, tokens, lora=ad))
                - np.asarray(decoder.forward(CFG, base, tokens))).max()
  assert diff < 1e-5  # m / ||W|| = 1 up to rounding
  ax = method.axes(CFG, ad).params["layers"]
  assert ax["self_attn"]["k_proj"] == {"a": ("layers", "embed", "rank"),
                                      "b": ("layers", "rank", "kv_heads"),
                                      "m": ("layers", "kv_heads")}
  assert ax["mlp"]["down_proj"]["m"] == ("layers", "embed")
  applied = method.apply(base, ad)
  leaf = applied["layers"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(leaf, dora.DoraKernel) and leaf.w is base["layers"]["self_attn"]["q_proj"][
      "kernel"]
  with pytest.raises(ValueError, match=r"dora.apply: layers/\w+/\w+_proj/kernel is already "
                                       r"adapter-wrapped"):
    method.apply(applied, ad)
  with pytest.raises(ValueError, match=r"q_proj must hold exactly 'a', 'b' and 'm', got \['a', "
                                       r"'b'\]"):
    bad = tree.unflatten({p: x for p, x in tree.flatten(ad.params).items()
                          if p != "layers/self_attn/q_proj/m"})
    method.apply(base, dataclasses.replace(ad, params=bad))


def test_merged_equals_unmerged(base):
  ad = _randomize(dora.init(CFG, base, dataclasses.replace(PC, rslora=True),
                            key=jax.random.key(3)), 4)
  before = jax.tree.map(np.asarray, base)
  merged = dora.merge(CFG, base, ad)
  tokens = _tokens(1, v=CFG.vocab_size)
  unmerged = np.asarray(decoder.forward(CFG, base, tokens, lora=ad))
  diff = np.abs(np.asarray(decoder.forward(CFG, merged, tokens)) - unmerged).max()
  print(f"DoRA merged vs unmerged max abs diff {diff:.2e}")
  assert diff < 1e-5
  assert np.abs(unmerged - np.asarray(decoder.forward(CFG, base, tokens))).max() > 0.1
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))
  # By hand: W' = m / ||V|| * V, V = W + s A B, for one kernel, float64.
  p = ad.params["layers"]["self_attn"]["o_proj"]
  v = np.asarray(base["layers"]["self_attn"]["o_proj"]["kernel"], np.float64) + ad.scale * (
      np.einsum("lir,lro->lio", np.asarray(p["a"], np.float64), np.asarray(p["b"], np.float64)))
  want = np.asarray(p["m"], np.float64)[:, None, :] / np.linalg.norm(v, axis=1,
                                                                      keepdims=True) * v
  np.testing.assert_allclose(merged["layers"]["self_attn"]["o_proj"]["kernel"], want, atol=1e-6)


def _peft_dora(d, targets, seed=0):
  """A peft DoRA model with every adapter tensor non-default (B != 0, m != ||W||)."""
  model = peft.get_peft_model(_hf_model(d), peft.LoraConfig(
      r=4, lora_alpha=12, use_dora=True, target_modules=targets, task_type="CAUSAL_LM"))
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(0.5 + torch.rand_like(p))
      elif "lora_" in name:
        p.normal_(0.0, 0.1)
  return model


def test_peft_made_dora_loads_with_same_logits_and_files(hf_dir, tmp_path):
  family, d = hf_dir
  targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
  model = _peft_dora(d, targets)
  model.save_pretrained(tmp_path / "p")
  theirs = safetensors.numpy.load_file(tmp_path / "p" / "adapter_model.safetensors")
  mag = "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"
  assert theirs[mag].shape == (48,)  # PEFT's own naming: no ".weight" suffix
  cfg, params = jaxtune.load_hf(d)
  ad = jaxtune.peft.load_peft(cfg, str(tmp_path / "p"))
  assert isinstance(ad, dora.DoraAdapters) and (ad.rank, ad.alpha) == (4, 12.0)
  tokens = _tokens(8)
  ref = hf_models.logits(model.eval(), tokens)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - ref).max()
  print(f"{family} peft-made DoRA: max abs diff {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours - np.asarray(decoder.forward(cfg, params, tokens))).max() > .1
  dora.save_peft(cfg, ad, str(tmp_path / "j"))
  ours_t = safetensors.numpy.load_file(tmp_path / "j" / "adapter_model.safetensors")
  assert sorted(ours_t) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(theirs[k], ours_t[k], err_msg=k)
  # A DoRA directory is refused by plain LoRA, by name.
  with pytest.raises(ValueError, match=r"use_dora=True"):
    jaxtune.lora.load_peft(cfg, str(tmp_path / "p"))


def test_jaxtune_dora_loads_in_peft_with_same_logits_and_merged_export(hf_dir, tmp_path):
  family, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  ad = _randomize(dora.init(cfg, params, PC, key=jax.random.key(5)), 6)
  out = jaxtune.peft.save_peft(cfg, ad, str(tmp_path / "a"), base_model_name_or_path=d)
  with open(os.path.join(out, "adapter_config.json")) as f:
    pc = json.load(f)
  assert (pc["peft_type"], pc["use_dora"], pc["r"], pc["lora_alpha"]) == ("LORA", True, 4, 8)
  model = peft.PeftModel.from_pretrained(_hf_model(d), out).eval()
  tokens = _tokens(7)
  ref = hf_models.logits(model, tokens)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - ref).max()
  print(f"{family} jaxtune DoRA in peft: max abs diff {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours - np.asarray(decoder.forward(cfg, params, tokens))).max() > .1
  # Merged export: transformers alone gives the same logits.
  jaxtune.save_hf(cfg, dora.merge(cfg, params, ad), str(tmp_path / "merged"))
  merged = hf_models.logits(_hf_model(str(tmp_path / "merged")), tokens)
  mdiff = np.abs(merged - ref).max()
  print(f"{family} merged DoRA export in transformers: max abs diff {mdiff:.2e}")
  assert mdiff < 1e-4


def test_gradients_match_peft_autograd(tmp_path):
  """PEFT's gradient semantics (detached norm): d loss / d (A, B, m) equal torch's."""
  family, d = "llama2", str(tmp_path / "m")
  hf_models.make(family).save_pretrained(d, safe_serialization=True)
  targets = ["q_proj", "k_proj", "down_proj"]
  model = _peft_dora(d, targets, seed=1)
  model.train()  # lora_dropout=0: identical forward, autograd through peft's DoRA path
  tokens = _tokens(9)
  wts = np.random.RandomState(3).randn(2, 13, 101).astype(np.float32)
  loss = (model(input_ids=torch.as_tensor(tokens)).logits * torch.as_tensor(wts)).sum()
  loss.backward()
  theirs = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
  cfg, params = jaxtune.load_hf(d)
  model.save_pretrained(tmp_path / "p")
  ad = dora.load_peft(cfg, str(tmp_path / "p"))
  grads = jax.grad(lambda p: (decoder.forward(cfg, params, tokens, lora=dataclasses.replace(
      ad, params=p)) * wts).sum())(ad.params)
  assert len(theirs) == 3 * 2 * len(targets)
  worst = 0.0
  for name, g in theirs.items():
    i = int(name.split(".layers.")[1].split(".")[0])
    proj = next(part for part in name.split(".") if part.endswith("_proj"))
    parent = "mlp" if proj == "down_proj" else "self_attn"
    mine = grads["layers"][parent][proj]
    if "lora_A" in name:
      got = np.asarray(mine["a"][i]).T
    elif "lora_B" in name:
      got = np.asarray(mine["b"][i]).T
    else:
      got = np.asarray(mine["m"][i])
    scale = np.abs(g).max()
    assert scale > 0, name
    worst = max(worst, np.abs(got - g.reshape(got.shape)).max() / scale)
  print(f"{family} DoRA grads vs peft autograd: worst relative diff {worst:.2e}")
  assert worst < 1e-4


def _ce(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def test_training_changes_only_adapters_and_sharded_matches_one_device(base):
  ad = dora.init(CFG, base, PC, key=jax.random.key(9))
  tokens = jnp.asarray(_tokens(10, b=8, t=16, v=CFG.vocab_size))
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), base)

  def loss_fn(p, base, constrain=None):
    return _ce(decoder.forward(CFG, base, tokens, lora=dataclasses.replace(ad, params=p),
                               constrain=constrain), tokens)

  p, losses = peft_utils.adam_steps(loss_fn, ad.params, base, lr=1e-2, steps=5)
  print(f"DoRA losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.05
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, base))
  for path, x in tree.flatten(p).items():  # a, b and m all move
    assert not np.array_equal(np.asarray(x), np.asarray(tree.flatten(ad.params)[path])), path

  trained = dataclasses.replace(ad, params=p)
  loss1, g1 = jax.jit(jax.value_and_grad(loss_fn))(trained.params, base)
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  base_sh = sharding.tree_shardings(mesh, decoder.axes(CFG), base)
  ad_sh = sharding.tree_shardings(mesh, dora.axes(CFG, trained), trained)
  constrain = sharding.constrainer(mesh)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, constrain)),
               in_shardings=(ad_sh.params, base_sh),
               out_shardings=(sharding.replicated(mesh), ad_sh.params))
  sp = jax.device_put(trained.params, ad_sh.params)
  loss8, g8 = fn(sp, jax.device_put(base, base_sh))
  gdiff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), g1, g8)))
  print(f"DoRA 8-device vs 1: loss diff {abs(float(loss8) - float(loss1)):.2e}, grad {gdiff:.2e}")
  assert abs(float(loss8) - float(loss1)) < 1e-5 and gdiff < 1e-5
  m = sp["layers"]["self_attn"]["q_proj"]["m"]
  assert m.sharding.spec == jax.sharding.PartitionSpec(None, ("tensor", "fsdp"))


def test_qdora_equals_dora_over_the_dequantized_base(base):
  qbase = quant.quantize(base, method="nf4", group_size=16)
  dense = quant.dequantize_tree(qbase)
  method = jaxtune.peft.get("qdora")
  ad = _randomize(method.init(CFG, qbase, PC, jax.random.key(2)), 3)
  tokens = _tokens(4, v=CFG.vocab_size)
  got = np.asarray(decoder.forward(CFG, qbase, tokens, lora=ad))
  want = np.asarray(decoder.forward(CFG, dense, tokens, lora=ad))
  diff = np.abs(got - want).max()
  print(f"QDoRA vs DoRA on the dequantized base: {diff:.2e}")
  assert diff < 1e-5
  merged = method.merge(CFG, qbase, ad)
  assert not any(isinstance(x, quant.QArray) for x in tree.flatten(merged).values())
  assert np.abs(np.asarray(decoder.forward(CFG, merged, tokens)) - want).max() < 1e-5


def test_dropout_path_is_peft_formula(base):
  """With a dropout key, PEFT's form x W + (m/n - 1) x' W + (m/n) s x' A B; at keep ~ 1 it is
  the eval output, and with real dropout the adapter output changes while eval does not."""
  ad = _randomize(dora.init(CFG, base, dataclasses.replace(PC, dropout=1e-9),
                            key=jax.random.key(2)), 5)
  tokens = _tokens(6, v=CFG.vocab_size)
  ev = np.asarray(decoder.forward(CFG, base, tokens, lora=ad))
  tr = np.asarray(decoder.forward(CFG, ad.apply(base, jax.random.key(0)), tokens))
  assert np.abs(tr - ev).max() < 1e-5
  ad2 = dataclasses.replace(ad, dropout=0.5)
  tr2 = np.asarray(decoder.forward(CFG, ad2.apply(base, jax.random.key(0)), tokens))
  assert np.abs(tr2 - ev).max() > 1e-2
  leaf = ad2.apply(base, jax.random.key(0))["layers"]["mlp"]["up_proj"]["kernel"]
  assert leaf.key is not None and leaf.dropout == 0.5


def test_sampler_with_dora_equals_peft_generate(tmp_path):
  d = str(tmp_path / "m")
  hf_models.make("llama2").save_pretrained(d, safe_serialization=True)
  model = _peft_dora(d, ["q_proj", "v_proj", "down_proj"]).eval()
  model.save_pretrained(tmp_path / "p")
  cfg, params = jaxtune.load_hf(d)
  ad = jaxtune.peft.load_peft(cfg, str(tmp_path / "p"))
  prompt = _tokens(11, b=1, t=5)[0].tolist()
  gen = jaxtune.generate(cfg, params, [prompt], max_new_tokens=6, temperature=0.0, lora=ad)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(
        1, 5, dtype=torch.long), max_new_tokens=6, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
  assert gen.tokens[0] == theirs[0, 5:].tolist()
