"""IA3: PEFT parity both ways (Llama with GQA, Qwen2 with k/v biases), merge and merged
export in transformers, training touches only the vectors, sharding, strict loading.

References: `peft`'s IA3Model on the `transformers` base, float64 numpy for the merge.
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
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.peft import ia3
from tests import hf_models
from tests import peft_utils

CFG = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True)
PC = config_lib.PeftConfig(method="ia3")


_tokens = hf_models.tokens


def _randomize(adapters, seed):
  """Every vector drawn from U(0.5, 1.5): not the identity, and each entry distinct."""
  flat = tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return dataclasses.replace(adapters, params=tree.unflatten({
      p: jax.random.uniform(k, x.shape, x.dtype, 0.5, 1.5)
      for k, (p, x) in zip(keys, sorted(flat.items()))}))


@pytest.fixture(scope="module")
def base():
  params = decoder.init(CFG, jax.random.key(0))
  flat = tree.flatten(params)  # non-zero biases, so that scaling them matters
  for p in list(flat):
    if p.endswith("/bias"):
      flat[p] = 0.5 * jax.random.normal(jax.random.key(len(p)), flat[p].shape)
  return tree.unflatten(flat)


@pytest.fixture(scope="module", params=["llama2", "qwen2"])
def hf_dir(request, tmp_path_factory):
  return request.param, hf_models.saved(request.param, tmp_path_factory)


_hf_model = hf_models.load


def test_init_is_identity_shapes_axes_and_registry(base):
  method = jaxtune.peft.get("ia3")
  ad = method.init(CFG, base, PC, jax.random.key(0))
  assert jax.tree.map(lambda x: x.shape, ad.params) == {"layers": {
      "self_attn": {"k_proj": {"l": (2, 32)}, "v_proj": {"l": (2, 32)}},
      "mlp": {"down_proj": {"l": (2, 176)}}}}  # PEFT: [out, 1] for k/v, [1, in] for down_proj
  tokens = _tokens(0, v=CFG.vocab_size)
  np.testing.assert_array_equal(decoder.forward(CFG, base, tokens, lora=ad),
                                decoder.forward(CFG, base, tokens))
  ax = method.axes(CFG, ad).params["layers"]
  assert ax == {"self_attn": {"k_proj": {"l": ("layers", "kv_heads")},
                              "v_proj": {"l": ("layers", "kv_heads")}},
                "mlp": {"down_proj": {"l": ("layers", "mlp")}}}
  with pytest.raises(ValueError, match=r"ia3_feedforward='layers/mlp/up_proj/kernel' selects "
                                       r"\['layers/mlp/up_proj/kernel'\] outside"):
    method.init(CFG, base, dataclasses.replace(PC, ia3_feedforward="layers/mlp/up_proj/kernel"),
                None)
  with pytest.raises(config_lib.ConfigError, match=r"peft.dropout: 0.1 \(IA3 has no dropout"):
    method.init(CFG, base, dataclasses.replace(PC, dropout=0.1), None)
  with pytest.raises(ValueError, match=r"ia3.apply: layers/self_attn/k_proj/kernel is already"):
    ad.apply(ad.apply(base))


def test_merged_equals_unmerged_biases_included(base):
  pc = dataclasses.replace(PC, ia3_targets=r"layers/(self_attn/(q|k|v)_proj|mlp/(up|down)_proj)"
                           r"/kernel")
  ad = _randomize(ia3.init(CFG, base, pc), 1)
  tokens = _tokens(1, v=CFG.vocab_size)
  unmerged = np.asarray(decoder.forward(CFG, base, tokens, lora=ad))
  merged = ia3.merge(CFG, base, ad)
  diff = np.abs(np.asarray(decoder.forward(CFG, merged, tokens)) - unmerged).max()
  print(f"IA3 merged vs unmerged {diff:.2e}")
  plain = np.asarray(decoder.forward(CFG, base, tokens))
  assert diff < 1e-5 and np.abs(unmerged - plain).max() > .1
  l = np.asarray(ad.params["layers"]["self_attn"]["k_proj"]["l"], np.float64)  # [L, out]
  kb = np.asarray(base["layers"]["self_attn"]["k_proj"]["bias"], np.float64)
  np.testing.assert_allclose(merged["layers"]["self_attn"]["k_proj"]["bias"], kb * l, rtol=1e-6)
  ld = np.asarray(ad.params["layers"]["mlp"]["down_proj"]["l"], np.float64)  # [L, F]
  wd = np.asarray(base["layers"]["mlp"]["down_proj"]["kernel"], np.float64)
  np.testing.assert_allclose(merged["layers"]["mlp"]["down_proj"]["kernel"], wd * ld[:, :, None],
                             rtol=1e-6)


def test_jaxtune_ia3_loads_in_peft_and_merged_export(hf_dir, tmp_path):
  family, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  ad = _randomize(ia3.init(cfg, params, PC), 2)
  out = jaxtune.peft.save_peft(cfg, ad, str(tmp_path / "a"), base_model_name_or_path=d)
  with open(os.path.join(out, "adapter_config.json")) as f:
    pc = json.load(f)
  assert (pc["peft_type"], pc["target_modules"], pc["feedforward_modules"]) == (
      "IA3", ["down_proj", "k_proj", "v_proj"], ["down_proj"])
  model = peft.PeftModel.from_pretrained(_hf_model(d), out).eval()
  tokens = _tokens(3)
  ref = hf_models.logits(model, tokens)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - ref).max()
  print(f"{family} jaxtune IA3 in peft: {diff:.2e}")
  plain = np.asarray(decoder.forward(cfg, params, tokens))
  assert diff < 1e-4 and np.abs(ours - plain).max() > .02
  jaxtune.save_hf(cfg, ia3.merge(cfg, params, ad), str(tmp_path / "merged"))
  mdiff = np.abs(hf_models.logits(_hf_model(str(tmp_path / "merged")), tokens) - ref).max()
  print(f"{family} merged IA3 export in transformers: {mdiff:.2e}")
  assert mdiff < 1e-4


@pytest.mark.parametrize("targets,ff", [(None, None),
                                        (["q_proj", "o_proj", "up_proj", "down_proj"],
                                         ["up_proj", "down_proj"])])
def test_peft_made_ia3_loads_with_same_logits_and_files(hf_dir, targets, ff, tmp_path):
  family, d = hf_dir
  kw = {} if targets is None else dict(target_modules=targets, feedforward_modules=ff)
  model = peft.get_peft_model(_hf_model(d), peft.IA3Config(task_type="CAUSAL_LM", **kw))
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "ia3_l" in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(tmp_path / "p")
  cfg, params = jaxtune.load_hf(d)
  ad = jaxtune.peft.load_peft(cfg, str(tmp_path / "p"))
  assert isinstance(ad, ia3.Ia3Adapters)
  tokens = _tokens(4)
  diff = np.abs(np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
                - hf_models.logits(model.eval(), tokens)).max()
  print(f"{family} peft-made IA3 {targets}: {diff:.2e}")
  assert diff < 1e-4
  ia3.save_peft(cfg, ad, str(tmp_path / "j"))
  theirs = safetensors.numpy.load_file(tmp_path / "p" / "adapter_model.safetensors")
  ours = safetensors.numpy.load_file(tmp_path / "j" / "adapter_model.safetensors")
  assert sorted(theirs) == sorted(ours)
  for k in theirs:
    np.testing.assert_array_equal(theirs[k], ours[k], err_msg=k)


def test_load_names_what_it_refuses(tmp_path):
  cfg = dataclasses.replace(CFG, family="llama", attention_bias=False)
  params = decoder.init(cfg, jax.random.key(0))
  good = ia3.save_peft(cfg, ia3.init(cfg, params, PC), str(tmp_path / "good"))
  tensors = safetensors.numpy.load_file(os.path.join(good, "adapter_model.safetensors"))
  with open(os.path.join(good, "adapter_config.json")) as f:
    pc = json.load(f)

  def write(name, t=tensors, c=pc):
    d = tmp_path / name
    d.mkdir()
    safetensors.numpy.save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(c))
    return str(d)

  k0 = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
  with pytest.raises(ValueError, match=r"k_proj\.ia3_l has shape \[1, 32\], expected \[32, 1\]"):
    ia3.load_peft(cfg, write("shape", t=dict(tensors, **{k0: np.ones((1, 32), np.float32)})))
  with pytest.raises(ValueError, match=r"missing.*layers\.0\.self_attn\.k_proj\.ia3_l"):
    ia3.load_peft(cfg, write("missing", t={k: v for k, v in tensors.items() if k != k0}))
  with pytest.raises(ValueError, match=r"fan_in_fan_out=True changes"):
    ia3.load_peft(cfg, write("fifo", c=dict(pc, fan_in_fan_out=True)))
  with pytest.raises(ValueError, match=r"not understood.*lm_head\.ia3_l"):
    ia3.load_peft(cfg, write("extra", t=dict(tensors, **{
        "base_model.model.lm_head.ia3_l": np.ones((512, 1), np.float32)})))
  with pytest.raises(ValueError, match=r"feedforward_modules=.* marks only some layers of "
                                       r"model\.layers\.\{i\}\.mlp\.down_proj"):
    ia3.load_peft(cfg, write("partial", c=dict(pc, feedforward_modules=r".*layers\.0\.mlp\."
                                                                         r"down_proj")))


def _ce(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def test_training_changes_only_vectors_and_sharded_matches_one_device(base):
  ad = ia3.init(CFG, base, PC)
  tokens = jnp.asarray(_tokens(10, b=8, t=16, v=CFG.vocab_size))
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), base)

  def loss_fn(p, base, constrain=None):
    return _ce(decoder.forward(CFG, base, tokens, lora=dataclasses.replace(ad, params=p),
                               constrain=constrain), tokens)

  p, losses = peft_utils.adam_steps(loss_fn, ad.params, base, lr=5e-2, steps=5)
  print(f"IA3 losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.02
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, base))
  for path, x in tree.flatten(p).items():
    assert not np.array_equal(np.asarray(x), np.asarray(tree.flatten(ad.params)[path])), path
  loss1, g1 = jax.jit(jax.value_and_grad(loss_fn))(p, base)
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  base_sh = sharding.tree_shardings(mesh, decoder.axes(CFG), base)
  ad_sh = sharding.tree_shardings(mesh, ia3.axes(CFG, ad), ad)
  constrain = sharding.constrainer(mesh)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, constrain)),
               in_shardings=(ad_sh.params, base_sh),
               out_shardings=(sharding.replicated(mesh), ad_sh.params))
  loss8, g8 = fn(jax.device_put(p, ad_sh.params), jax.device_put(base, base_sh))
  gdiff = max(jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), g1, g8)))
  print(f"IA3 8-device vs 1: loss {abs(float(loss8) - float(loss1)):.2e}, grad {gdiff:.2e}")
  assert abs(float(loss8) - float(loss1)) < 1e-5 and gdiff < 1e-5
  assert ad_sh.params["layers"]["mlp"]["down_proj"]["l"].spec == jax.sharding.PartitionSpec(
      None, ("tensor", "fsdp"))
