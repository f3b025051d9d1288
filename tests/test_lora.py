"""LoRA: init equals base, merge equals unmerged, PEFT parity both ways, training, sharding.

Every comparison is against something computed independently: the base model without
adapters, the merged dense model, `peft.PeftModel` on the `transformers` base, and the same
step on one device.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
from jaxtune.peft import base as peft_base
from jaxtune.peft import lora
from tests import hf_models
from tests import numerics

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CFG = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=16)


def _tokens(seed, b=2, t=19, v=101):
  return hf_models.tokens(seed, b, t, v)


def _randomize(adapters, seed, std=0.1):
  """Same adapters with every leaf (B included) drawn from normal(0, std)."""
  leaves, treedef = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
      treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _ce(logits, tokens, mask):
  """Masked next-token cross-entropy: logits [B, T, V], tokens/mask [B, T]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  m = mask[:, 1:].astype(jnp.float32)
  return (nll * m).sum() / m.sum()


@pytest.fixture(scope="module")
def base():
  return decoder.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module", params=["llama2", "qwen2", "qwen3"])
def hf_dir(request, tmp_path_factory):
  return request.param, hf_models.saved(request.param, tmp_path_factory)


_hf_model = hf_models.load


def test_init_output_equals_base_and_init_statistics(base):
  ad = lora.init(CFG, base, rank=8, alpha=16, key=jax.random.key(1))
  assert ad.scale == 2.0 and ad.rank == 8 and not ad.rslora
  assert lora.init(CFG, base, rank=8, alpha=16, rslora=True, key=jax.random.key(1)).scale == (
      16 / 8 ** 0.5)
  shapes = jax.tree.map(lambda x: x.shape, ad.params)
  assert shapes["layers"]["self_attn"]["k_proj"] == {"a": (2, 64, 8), "b": (2, 8, 32)}
  assert shapes["layers"]["mlp"]["down_proj"] == {"a": (2, 176, 8), "b": (2, 8, 64)}
  assert sorted(tree.flatten(ad.params)) == sorted(
      f"layers/{'mlp' if n.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}"
      f"/{n}/{ab}" for n in ALL7 for ab in "ab")
  for module in ("self_attn/q_proj", "mlp/down_proj"):
    a = np.asarray(ad.params["layers"][module.split("/")[0]][module.split("/")[1]]["a"])
    bound = 1 / a.shape[1] ** 0.5  # PEFT's kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in))
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / 3 ** 0.5) < 0.1 * bound
  for path, x in tree.flatten(ad.params).items():
    assert np.any(np.asarray(x)) != path.endswith("/b"), path  # A random, B zero
  tokens = _tokens(0, v=CFG.vocab_size)
  np.testing.assert_array_equal(decoder.forward(CFG, base, tokens, lora=ad),
                                decoder.forward(CFG, base, tokens))
  g = lora.init(CFG, base, rank=4, key=jax.random.key(2), a_init="gaussian")
  a = np.asarray(g.params["layers"]["mlp"]["up_proj"]["a"])
  assert abs(a.std() - 1 / 4) < 0.02  # PEFT's init_lora_weights='gaussian': N(0, 1/r)


def test_registry_names_bad_methods_and_apply_wraps_exactly_the_targets(base):
  with pytest.raises(config_lib.ConfigError) as e:
    jaxtune.peft.get("nope")
  assert str(e.value) == ("bad value for peft.method: 'nope' (expected one of none, lora, "
                          "qlora, dora, qdora, ia3, prompt_tuning, prefix_tuning, "
                          "llama_adapter)")
  assert jaxtune.peft.names() == ("lora", "qlora", "dora", "qdora", "ia3", "prompt_tuning",
                                  "prefix_tuning", "llama_adapter")
  assert jaxtune.peft.get("none") is None
  for name in jaxtune.peft.names():
    method = jaxtune.peft.get(name)
    assert isinstance(method, peft_base.PeftMethod) and method.name == name
  assert jaxtune.peft.get("qlora").quantized_base and not jaxtune.peft.get("lora").quantized_base

  pc = config_lib.PeftConfig(method="lora", rank=4, targets=r"layers/(self_attn/(q|v)|mlp/down)"
                             r"_proj/kernel")
  method = jaxtune.peft.get("lora")
  ad = _randomize(method.init(CFG, base, pc, jax.random.key(0)), 1)
  for params in (base, quant.quantize(base, method="nf4", group_size=16)):
    applied = method.apply(params, ad)
    wrapped = {p: x for p, x in tree.flatten(applied).items() if isinstance(x, lora.LoraKernel)}
    assert sorted(wrapped) == sorted(lora.select(params, pc.targets)) == [
        "layers/mlp/down_proj/kernel", "layers/self_attn/q_proj/kernel",
        "layers/self_attn/v_proj/kernel"]
    for p, leaf in wrapped.items():  # the base kernel itself, untouched, inside the leaf
      assert leaf.w is tree.flatten(params)[p] and leaf.key is None and leaf.scale == ad.scale
    others = {p: x for p, x in tree.flatten(applied).items() if p not in wrapped}
    assert all(x is tree.flatten(params)[p] for p, x in others.items())
    assert not any(isinstance(x, lora.LoraKernel) for x in tree.flatten(params).values())
    # jit and lax.scan see the wrapped tree: jitted forward == eager forward == forward(lora=)
    tokens = _tokens(2, v=CFG.vocab_size)
    eager = np.asarray(decoder.forward(CFG, applied, tokens))
    jitted = np.asarray(jax.jit(lambda p, t: decoder.forward(CFG, p, t))(applied, tokens))
    np.testing.assert_allclose(jitted, eager, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(eager, np.asarray(decoder.forward(CFG, params, tokens,
                                                                    lora=ad)))
    assert np.abs(eager - np.asarray(decoder.forward(CFG, params, tokens))).max() > 0.1
  with pytest.raises(ValueError, match=r"unexpected top-level key 'score'"):
    dataclasses.replace(ad, params=dict(ad.params, score={"kernel": jnp.zeros(3)})).apply(base)
  with pytest.raises(ValueError, match=r"mlp/down_proj/kernel is already adapter-wrapped"):
    ad.apply(ad.apply(base))
  with pytest.raises(TypeError, match=r"dataclasses.replace\(adapters, params=tree\)"):
    decoder.forward(CFG, base, _tokens(2, v=CFG.vocab_size), lora=(ad.params, ad.scale))


def test_targets_regex_selects_and_names_the_regex(base):
  ad = lora.init(CFG, base, targets=r"layers/self_attn/(q|v)_proj/kernel", key=jax.random.key(0))
  assert sorted(tree.flatten(ad.params)) == ["layers/self_attn/q_proj/a",
                                             "layers/self_attn/q_proj/b",
                                             "layers/self_attn/v_proj/a",
                                             "layers/self_attn/v_proj/b"]
  everything = lora.init(CFG, base, targets=r".*", key=jax.random.key(0))
  assert len(tree.flatten(everything.params)) == 14  # norms, embeddings are not LoRA-able
  with pytest.raises(ValueError, match=r"'layers/attn/q_proj/kernel' select no projection"):
    lora.init(CFG, base, targets=r"layers/attn/q_proj/kernel", key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"matches only unsupported params \['norm/scale'\]"):
    lora.init(CFG, base, targets=r"norm/scale", key=jax.random.key(0))
  pc = config_lib.PeftConfig(method="lora", rank=4, alpha=32.0, rslora=True,
                             targets=r"layers/mlp/.*/kernel")
  ad = lora.init_from_config(CFG, base, pc, key=jax.random.key(0))
  assert (ad.rank, ad.alpha, ad.scale, ad.targets) == (4, 32.0, 16.0, pc.targets)
  assert sorted(ad.params["layers"]) == ["mlp"]
  assert lora.init_from_config(CFG, base, dataclasses.replace(pc, dropout=0.1),
                               key=jax.random.key(0)).dropout == 0.1
  with pytest.raises(ValueError, match=r"peft.dropout=1.0: expected 0 <= dropout < 1"):
    lora.init_from_config(CFG, base, dataclasses.replace(pc, dropout=1.0), key=jax.random.key(0))


def test_merged_equals_unmerged_and_axes(base):
  ad = _randomize(lora.init(CFG, base, rank=8, alpha=16, rslora=True, key=jax.random.key(3)), 4)
  before = jax.tree.map(np.asarray, base)
  merged = lora.merge(CFG, base, ad)
  tokens = _tokens(1, v=CFG.vocab_size)
  unmerged = np.asarray(decoder.forward(CFG, base, tokens, lora=ad))
  plain = np.asarray(decoder.forward(CFG, base, tokens))
  diff = np.abs(np.asarray(decoder.forward(CFG, merged, tokens)) - unmerged).max()
  print(f"merged vs unmerged max abs diff {diff:.2e}")
  assert diff < 1e-5 and np.abs(unmerged - plain).max() > 0.1
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, base))
  k = "layers/self_attn/o_proj/kernel"
  a = ad.params["layers"]["self_attn"]["o_proj"]["a"]
  b = ad.params["layers"]["self_attn"]["o_proj"]["b"]
  want = np.asarray(base["layers"]["self_attn"]["o_proj"]["kernel"]) + ad.scale * np.einsum(
      "lir,lro->lio", np.asarray(a, np.float64), np.asarray(b, np.float64))
  np.testing.assert_allclose(tree.flatten(merged)[k], want, atol=1e-6)
  ax = lora.axes(CFG, ad).params["layers"]
  assert ax["self_attn"]["q_proj"] == {"a": ("layers", "embed", "rank"),
                                      "b": ("layers", "rank", "q_heads")}
  assert ax["mlp"]["down_proj"] == {"a": ("layers", "mlp", "rank"),
                                    "b": ("layers", "rank", "embed")}


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_jaxtune_adapter_with_same_logits(hf_dir, rslora, tmp_path):
  family, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  ad = lora.init(cfg, params, rank=8, alpha=16, rslora=rslora, key=jax.random.key(5))
  ad = _randomize(ad, 6)
  out = str(tmp_path / "adapter")
  lora.save_peft(cfg, ad, out, base_model_name_or_path=d)
  with open(os.path.join(out, "adapter_config.json")) as f:
    pc = json.load(f)
  assert (pc["peft_type"], pc["task_type"], pc["r"], pc["lora_alpha"], pc["use_rslora"],
          pc["bias"], pc["base_model_name_or_path"]) == ("LORA", "CAUSAL_LM", 8, 16, rslora,
                                                         "none", d)
  assert sorted(pc["target_modules"]) == sorted(ALL7)
  saved = safetensors.numpy.load_file(os.path.join(out, "adapter_model.safetensors"))
  assert len(saved) == 2 * 7 * cfg.num_layers
  q = "base_model.model.model.layers.1.self_attn.q_proj"
  assert saved[q + ".lora_A.weight"].shape == (8, cfg.hidden_size)
  assert saved[q + ".lora_B.weight"].shape == (cfg.q_size, 8)
  np.testing.assert_array_equal(saved[q + ".lora_B.weight"],
                                np.asarray(ad.params["layers"]["self_attn"]["q_proj"]["b"][1]).T)

  model = peft.PeftModel.from_pretrained(_hf_model(d), out).eval()
  assert model.peft_config["default"].use_rslora == rslora
  tokens = _tokens(7)
  ref = hf_models.logits(model, tokens)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - ref).max()
  print(f"{family} rslora={rslora}: jaxtune vs peft max abs diff {diff:.2e}")
  assert diff < 1e-4
  assert np.abs(ours - np.asarray(decoder.forward(cfg, params, tokens))).max() > 0.1


@pytest.mark.parametrize("targets,rslora", [(ALL7, True), (["q_proj", "v_proj"], False)])
def test_adapter_made_by_peft_loads_with_same_logits(hf_dir, targets, rslora, tmp_path):
  family, d = hf_dir
  model = peft.get_peft_model(_hf_model(d), peft.LoraConfig(
      r=8, lora_alpha=24, use_rslora=rslora, target_modules=targets, task_type="CAUSAL_LM"))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.normal_(0.0, 0.1)  # B non-zero, so the adapter changes the logits
  model.save_pretrained(tmp_path / "p")
  cfg, params = jaxtune.load_hf(d)
  ad = lora.load_peft(cfg, str(tmp_path / "p"))
  assert ad.rank == 8 and ad.alpha == 24 and ad.rslora == rslora
  assert ad.scale == pytest.approx(model.base_model.model.model.layers[0].self_attn.q_proj
                                   .scaling["default"])
  assert sorted(tree.flatten(ad.params)) == sorted(
      f"layers/{'self_attn' if t[0] in 'qkvo' else 'mlp'}/{t}/{ab}" for t in targets
      for ab in "ab")
  tokens = _tokens(8)
  ref = hf_models.logits(model.eval(), tokens)
  diff = np.abs(np.asarray(decoder.forward(cfg, params, tokens, lora=ad)) - ref).max()
  print(f"{family} peft-made targets={len(targets)} rslora={rslora}: max abs diff {diff:.2e}")
  assert diff < 1e-4
  # Our export of the imported adapter is the same file content as peft's.
  lora.save_peft(cfg, ad, str(tmp_path / "j"))
  theirs = safetensors.numpy.load_file(tmp_path / "p" / "adapter_model.safetensors")
  ours = safetensors.numpy.load_file(tmp_path / "j" / "adapter_model.safetensors")
  assert sorted(theirs) == sorted(ours)
  for k in theirs:
    np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)
  # ... and re-imports to the same adapters (targets regex included).
  again = lora.load_peft(cfg, str(tmp_path / "j"))
  assert again.targets == ad.targets and again.scale == ad.scale
  jax.tree.map(np.testing.assert_array_equal, again.params, ad.params)


def test_load_peft_names_what_it_refuses(tmp_path):
  cfg = dataclasses.replace(CFG, family="llama")
  params = decoder.init(cfg, jax.random.key(0))
  good = str(tmp_path / "good")
  lora.save_peft(cfg, lora.init(cfg, params, key=jax.random.key(1)), good)
  tensors = safetensors.numpy.load_file(os.path.join(good, "adapter_model.safetensors"))
  with open(os.path.join(good, "adapter_config.json")) as f:
    pc = json.load(f)

  def write(name, t=tensors, c=pc):
    d = tmp_path / name
    d.mkdir()
    safetensors.numpy.save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(c))
    return str(d)

  q0 = "base_model.model.model.layers.0.self_attn.q_proj"
  extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((8, 64),
                                                                               np.float32)})
  with pytest.raises(ValueError, match=r"not understood.*lm_head\.lora_A\.weight \[8, 64\]"):
    lora.load_peft(cfg, write("extra", t=extra))
  deeper = dict(tensors, **{"base_model.model.model.layers.2.mlp.up_proj.lora_A.weight":
                            np.zeros((8, 64), np.float32)})
  with pytest.raises(ValueError, match=r"layers\.2\.mlp\.up_proj\.lora_A\.weight"):
    lora.load_peft(cfg, write("deeper", t=deeper))
  missing = {k: v for k, v in tensors.items() if k != q0 + ".lora_B.weight"}
  with pytest.raises(ValueError, match=r"missing.*layers\.0\.self_attn\.q_proj\.lora_B\.weight"
                                       r" \(expected \[64, 8\]\)"):
    lora.load_peft(cfg, write("missing", t=missing))
  bad = dict(tensors, **{q0 + ".lora_A.weight": np.zeros((8, 63), np.float32)})
  with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \[8, 63\], expected "
                                       r"\[8, 64\]"):
    lora.load_peft(cfg, write("shape", t=bad))
  with pytest.raises(ValueError, match=r"use_dora=True"):
    lora.load_peft(cfg, write("dora", c=dict(pc, use_dora=True)))
  with pytest.raises(ValueError, match=r"rank_pattern=\{'q_proj': 4\}"):
    lora.load_peft(cfg, write("pattern", c=dict(pc, rank_pattern={"q_proj": 4})))
  with pytest.raises(ValueError, match=r"target module\(s\) \['lm_head'\] are not supported"):
    lora.load_peft(cfg, write("lm_head", c=dict(pc, target_modules=["q_proj", "lm_head"])))
  with pytest.raises(ValueError, match=r"peft_type 'IA3'"):
    lora.load_peft(cfg, write("ia3", c=dict(pc, peft_type="IA3")))
  # The method-agnostic entry points pick LoRA by type / peft_type, and name what they refuse.
  with pytest.raises(ValueError, match=r"peft_type 'LOHA' is not supported \(supported: "
                                       r"ADAPTION_PROMPT, IA3, LORA, PREFIX_TUNING, "
                                       r"PROMPT_TUNING\)"):
    jaxtune.peft.load_peft(cfg, write("loha", c=dict(pc, peft_type="LOHA")))
  ad = jaxtune.peft.load_peft(cfg, good)
  again = jaxtune.peft.save_peft(cfg, ad, str(tmp_path / "again"))
  theirs = safetensors.numpy.load_file(os.path.join(again, "adapter_model.safetensors"))
  assert sorted(theirs) == sorted(tensors)
  for k in tensors:
    np.testing.assert_array_equal(theirs[k], tensors[k], err_msg=k)
  with pytest.raises(TypeError, match=r"dict is not an adapters object.*expected one of Adapters"):
    jaxtune.peft.save_peft(cfg, ad.params, str(tmp_path / "bad"))


def _train(cfg, base, ad, tokens, mask, steps, lr):
  """A small optax adamw loop over adapter params only; returns (adapters, losses, opt)."""
  opt = optax.adamw(lr, weight_decay=0.0)
  state = opt.init(ad.params)

  @jax.jit
  def step(ad_params, state, base):
    def loss_fn(p):
      return _ce(decoder.forward(cfg, base, tokens, lora=dataclasses.replace(ad, params=p)),
                 tokens, mask)
    loss, grads = jax.value_and_grad(loss_fn)(ad_params)
    updates, state = opt.update(grads, state, ad_params)
    return optax.apply_updates(ad_params, updates), state, loss

  p, losses = ad.params, []
  for _ in range(steps):
    p, state, loss = step(p, state, base)
    losses.append(float(loss))
  return dataclasses.replace(ad, params=p), losses, state


def test_training_changes_only_adapters(base):
  ad = lora.init(CFG, base, rank=4, alpha=8, key=jax.random.key(9))
  tokens = jnp.asarray(_tokens(10, b=4, t=24, v=CFG.vocab_size))
  mask = jnp.ones_like(tokens).at[:, :5].set(0)
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), base)
  trained, losses, state = _train(CFG, base, ad, tokens, mask, steps=5, lr=1e-2)
  print(f"LoRA losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.05
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, base))
  for path, x in tree.flatten(trained.params).items():
    assert not np.array_equal(np.asarray(x), np.asarray(tree.flatten(ad.params)[path])), path
  # The optimizer state holds the adapter leaves only (mu and nu) plus a step count.
  shapes = sorted(x.shape for x in jax.tree.leaves(ad.params))
  state_shapes = sorted(x.shape for x in jax.tree.leaves(state) if x.ndim > 0)
  assert state_shapes == sorted(shapes * 2)
  ins, outs = 6 * 64 + 176, 64 + 32 + 32 + 64 + 176 + 176 + 64
  assert lora.num_params(ad) == 2 * 4 * (ins + outs)  # L * r * (in + out)


def test_sharded_loss_and_grads_match_one_device(base):
  ad = _randomize(lora.init(CFG, base, rank=8, alpha=16, key=jax.random.key(11)), 12)
  tokens = jnp.asarray(_tokens(13, b=8, t=16, v=CFG.vocab_size))
  mask = jnp.ones_like(tokens).at[:, :3].set(0)

  def loss_fn(ad_params, base, tokens, mask, constrain=None):
    logits = decoder.forward(CFG, base, tokens, lora=dataclasses.replace(ad, params=ad_params),
                             constrain=constrain)
    return _ce(logits, tokens, mask)

  loss1, grads1 = jax.jit(jax.value_and_grad(loss_fn))(ad.params, base, tokens, mask)

  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  base_sh = sharding.tree_shardings(mesh, decoder.axes(CFG), base)
  ad_sh = sharding.tree_shardings(mesh, lora.axes(CFG, ad), ad)
  batch_sh = sharding.batch_sharding(mesh)
  sbase = jax.device_put(base, base_sh)
  sad = jax.device_put(ad, ad_sh)
  stokens, smask = jax.device_put(tokens, batch_sh), jax.device_put(mask, batch_sh)
  constrain = sharding.constrainer(mesh)
  fn = jax.jit(jax.value_and_grad(lambda p, b, t, m: loss_fn(p, b, t, m, constrain)),
               in_shardings=(ad_sh.params, base_sh, batch_sh, batch_sh),
               out_shardings=(sharding.replicated(mesh), ad_sh.params))
  loss8, grads8 = fn(sad.params, sbase, stokens, smask)
  gdiff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), grads1, grads8)))
  print(f"8-device vs 1-device: loss diff {abs(float(loss8) - float(loss1)):.2e}, "
        f"max grad diff {gdiff:.2e}")
  assert abs(float(loss8) - float(loss1)) < 1e-5 and gdiff < 1e-5
  assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads1)) > 1e-3

  P = jax.sharding.PartitionSpec
  tf = ("tensor", "fsdp")  # heads / MLP width: tensor, then fsdp where 'embed' did not take it
  want = {"self_attn/q_proj": (P(None, "fsdp", None), P(None, None, tf)),
          "self_attn/k_proj": (P(None, "fsdp", None), P(None, None, tf)),
          "self_attn/o_proj": (P(None, tf, None), P(None, None, "fsdp")),
          "mlp/up_proj": (P(None, "fsdp", None), P(None, None, tf)),
          "mlp/down_proj": (P(None, tf, None), P(None, None, "fsdp"))}
  for module, (pa, pb) in want.items():
    parent, name = module.split("/")
    a, b = sad.params["layers"][parent][name]["a"], sad.params["layers"][parent][name]["b"]
    assert (a.sharding.spec, b.sharding.spec) == (pa, pb), module
    for x in (a, b):  # each device holds a slice, not a replica
      assert x.addressable_shards[0].data.size < x.size, module


def _dot_shapes(fn, *args):
  """Output shapes of every dot_general in fn's jaxpr, nested jaxprs included."""
  return [e.outvars[0].aval.shape for e in numerics.jaxpr_eqns(jax.make_jaxpr(fn)(*args))
          if e.primitive.name == "dot_general"]


def _primitives(fn, *args) -> set:
  """Names of the primitives in fn's jaxpr, nested jaxprs (custom VJPs, scans) included."""
  return {e.primitive.name for e in numerics.jaxpr_eqns(jax.make_jaxpr(fn)(*args))}


@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8), (8, 8)])
def test_lora_kernel_joined_matmul_equals_two_products(d_in, d_out):
  """The adapted projection (the forward joined as [x, s*x@a] @ [w; b] for outputs wider
  than the input, dx joined as [dy, s*dy@b^T] @ [w, a]^T for inputs wider than the output,
  two products and an add otherwise) against x @ w + s * (x @ a) @ b: values and gradients
  w.r.t. x, a, b, and w when it is differentiated; a frozen w gets no [in, out]
  weight-gradient product."""
  from jaxtune.peft import lora_kernel
  rng = np.random.default_rng(0)
  x, w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
                for s in ((2, 5, d_in), (d_in, d_out), (d_in, 3), (3, d_out)))
  cot = jnp.asarray(rng.normal(size=(2, 5, d_out)), jnp.float32)
  plain = lambda x, w, a, b: jnp.einsum("btd,df->btf", x, w) + 2.0 * (x @ a) @ b
  leaf = lambda x, w, a, b: lora_kernel.LoraKernel(w=w, a=a, b=b, scale=2.0).linear(x)
  np.testing.assert_allclose(leaf(x, w, a, b), plain(x, w, a, b), rtol=1e-5, atol=1e-5)
  for argnums in ((0, 2, 3), (0, 1, 2, 3)):
    grads = [jax.grad(lambda *p, f=f: jnp.sum(cot * f(*p)), argnums=argnums)(x, w, a, b)
             for f in (leaf, plain)]
    for got, want in zip(*grads):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  frozen = jax.grad(lambda x, a, b: jnp.sum(cot * leaf(x, w, a, b)), argnums=(0, 1, 2))
  assert (d_in, d_out) not in _dot_shapes(frozen, x, a, b)
  assert ("concatenate" in _primitives(lambda x: leaf(x, w, a, b), x)) == (d_out > d_in)
  dx_only = jax.grad(lambda x: jnp.sum(cot * leaf(x, w, a, b)))
  assert ("concatenate" in _primitives(dx_only, x)) == (d_out != d_in)
  one_row = x[:1, :1]  # a decode step: copying w would cost more than the add it saves
  assert "concatenate" not in _primitives(jax.grad(lambda x: jnp.sum(leaf(x, w, a, b))),
                                          one_row)
  np.testing.assert_allclose(leaf(one_row, w, a, b), plain(one_row, w, a, b), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("d_in,d_out", [(8, 24), (24, 8)])
def test_lora_kernel_joined_matmul_with_dropout(d_in, d_out):
  """With LoRA dropout the adapter reads dropout(x), not x: the joined projection's values
  and gradients (x through both the base and the masked adapter input, a, b) against the
  two-product form with the same mask."""
  from jaxtune.peft import lora_kernel
  rng = np.random.default_rng(1)
  x, w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32)
                for s in ((2, 5, d_in), (d_in, d_out), (d_in, 3), (3, d_out)))
  cot = jnp.asarray(rng.normal(size=(2, 5, d_out)), jnp.float32)
  key, rate = jax.random.PRNGKey(3), 0.25
  mask = jax.random.bernoulli(key, 1 - rate, x.shape)
  assert 0 < int(mask.sum()) < mask.size
  plain = lambda x, a, b: (jnp.einsum("btd,df->btf", x, w)
                           + 2.0 * (jnp.where(mask, x / (1 - rate), 0.0) @ a) @ b)
  leaf = lambda x, a, b: lora_kernel.LoraKernel(w=w, a=a, b=b, key=key, scale=2.0,
                                                dropout=rate).linear(x)
  np.testing.assert_allclose(leaf(x, a, b), plain(x, a, b), rtol=1e-5, atol=1e-5)
  grads = [jax.grad(lambda *p, f=f: jnp.sum(cot * f(*p)), argnums=(0, 1, 2))(x, a, b)
           for f in (leaf, plain)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert ("concatenate" in _primitives(lambda x: leaf(x, a, b), x)) == (d_out > d_in)
