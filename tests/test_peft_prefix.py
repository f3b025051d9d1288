"""Prefix tuning: PEFT parity both ways on GQA models (PEFT's num_key_value_heads layout),
the reparameterisation saved as its output, packed rows equal each example alone, training
moves only the prefix, sharding.

References: `peft`'s PrefixTuning model on the `transformers` base (the prefix as its
past_key_values), each example run on its own.
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

import jaxtune
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.models import decoder
from jaxtune.peft import prefix
from tests import hf_models
from tests import peft_utils

P = 3
PC = config_lib.PeftConfig(method="prefix_tuning", num_virtual_tokens=P)


_tokens = hf_models.tokens


@pytest.fixture(scope="module", params=["llama2", "qwen3", "mistral_window"])
def hf_dir(request, tmp_path_factory):
  return request.param, hf_models.saved(request.param, tmp_path_factory)


_hf_model = hf_models.load


def test_peft_made_prefix_loads_with_same_logits(hf_dir, tmp_path):
  family, d = hf_dir
  model = peft.get_peft_model(_hf_model(d), peft.PrefixTuningConfig(
      task_type="CAUSAL_LM", num_virtual_tokens=P)).eval()
  model.save_pretrained(tmp_path / "p")
  with open(tmp_path / "p" / "adapter_config.json") as f:
    pc = json.load(f)
  cfg, params = jaxtune.load_hf(d)
  assert (pc["token_dim"], pc["num_attention_heads"]) == (cfg.kv_size, cfg.num_kv_heads)  # GQA
  ad = jaxtune.peft.load_peft(cfg, str(tmp_path / "p"))
  assert isinstance(ad, prefix.PrefixAdapters)
  tokens = _tokens(1)
  ref = hf_models.logits(model, tokens)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - ref).max()
  print(f"{family} peft-made prefix tuning: max abs diff {diff:.2e}")
  assert diff < 1e-4 and np.abs(ours - np.asarray(decoder.forward(cfg, params, tokens))).max() > .1
  prefix.save_peft(cfg, ad, str(tmp_path / "j"))
  theirs = safetensors.numpy.load_file(tmp_path / "p" / "adapter_model.safetensors")
  again = safetensors.numpy.load_file(tmp_path / "j" / "adapter_model.safetensors")
  np.testing.assert_array_equal(theirs["prompt_embeddings"], again["prompt_embeddings"])


def test_jaxtune_prefix_with_projection_loads_in_peft(hf_dir, tmp_path):
  """Trained through the reparameterisation MLP, saved as its output, as PEFT saves it."""
  family, d = hf_dir
  cfg, params = jaxtune.load_hf(d)
  ad = prefix.init(cfg, dataclasses.replace(PC, prefix_projection=True, prefix_hidden=8),
                   key=jax.random.key(0))
  assert ad.params["w2"].shape == (8, cfg.num_layers * 2 * cfg.kv_size)
  out = jaxtune.peft.save_peft(cfg, ad, str(tmp_path / "a"), base_model_name_or_path=d)
  with open(os.path.join(out, "adapter_config.json")) as f:
    pc = json.load(f)
  assert (pc["prefix_projection"], pc["encoder_hidden_size"]) == (True, 8)
  model = peft.PeftModel.from_pretrained(_hf_model(d), out).eval()
  tokens = _tokens(2)
  ours = np.asarray(decoder.forward(cfg, params, tokens, lora=ad))
  diff = np.abs(ours - hf_models.logits(model, tokens)).max()
  print(f"{family} jaxtune prefix (projected) in peft: max abs diff {diff:.2e}")
  assert diff < 1e-4
  back = prefix.load_peft(cfg, out)  # the plain matrix: the same function
  assert np.abs(np.asarray(decoder.forward(cfg, params, tokens, lora=back)) - ours).max() < 1e-5


@pytest.mark.parametrize("family", ["llama2", "mistral_window"])
def test_packed_rows_equal_each_example_alone(family, tmp_path):
  d = tmp_path / family
  hf_models.make(family).save_pretrained(d, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(d))
  ad = prefix.init(cfg, PC, key=jax.random.key(5))
  e1, e2 = _tokens(6, b=1, t=7)[0], _tokens(7, b=1, t=9)[0]
  row = np.concatenate([e1, e2, [0, 0]])[None]
  seg = np.array([[1] * 7 + [2] * 9 + [0, 0]], np.int32)
  pos = np.array([list(range(7)) + list(range(9)) + [0, 1]], np.int32)
  packed = np.asarray(decoder.forward(cfg, params, row, positions=pos, segment_ids=seg, lora=ad))
  alone1 = np.asarray(decoder.forward(cfg, params, e1[None], lora=ad))
  alone2 = np.asarray(decoder.forward(cfg, params, e2[None], lora=ad))
  diff = max(np.abs(packed[0, :7] - alone1[0]).max(), np.abs(packed[0, 7:16] - alone2[0]).max())
  print(f"{family} prefix packed vs alone: {diff:.2e}")
  assert diff < 1e-5
  assert np.abs(packed[0, 7:16] - np.asarray(decoder.forward(cfg, params, e2[None]))[0]).max() > .1


def test_training_moves_only_the_prefix_and_sharded_matches():
  cfg = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  base = decoder.init(cfg, jax.random.key(0))
  method = jaxtune.peft.get("prefix_tuning")
  ad = method.init(cfg, base, dataclasses.replace(PC, prefix_projection=True), jax.random.key(1))
  tokens = jnp.asarray(_tokens(3, b=8, t=16, v=512))
  seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 8 + [0] * 2], 8, 0).astype(np.int32))
  pos = jnp.asarray(np.repeat([list(range(6)) + list(range(8)) + [0, 1]], 8, 0).astype(np.int32))
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), base)

  def loss_fn(p, base, constrain=None):
    logits = decoder.forward(cfg, base, tokens, positions=pos, segment_ids=seg,
                             lora=dataclasses.replace(ad, params=p), constrain=constrain)
    lp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    m = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (nll * m).sum() / m.sum()

  p, losses = peft_utils.adam_steps(loss_fn, ad.params, base, lr=2e-2, steps=5)
  print(f"prefix tuning losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.02
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, base))
  for k in prefix.MLP_KEYS:
    assert not np.array_equal(np.asarray(p[k]), np.asarray(ad.params[k])), k
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
  print(f"prefix 8-device vs 1: loss {abs(float(loss8) - float(loss1)):.2e}, grad {gdiff:.2e}")
  assert abs(float(loss8) - float(loss1)) < 1e-5 and gdiff < 1e-5


def test_refusals_are_named(tmp_path):
  cfg = config_lib.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=176,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
  good = prefix.save_peft(cfg, prefix.init(cfg, PC, key=jax.random.key(1)), str(tmp_path / "g"))
  with open(os.path.join(good, "adapter_config.json")) as f:
    pc = json.load(f)
  d = tmp_path / "heads"
  d.mkdir()
  (d / "adapter_config.json").write_text(json.dumps(dict(pc, num_attention_heads=4,
                                                         token_dim=64)))
  (d / "adapter_model.safetensors").write_bytes(
      (tmp_path / "g" / "adapter_model.safetensors").read_bytes())
  with pytest.raises(ValueError, match=r"token_dim=64 but this model needs 32"):
    prefix.load_peft(cfg, str(d))
  params = decoder.init(cfg, jax.random.key(0))
  ad = prefix.init(cfg, PC, key=jax.random.key(1))
  with pytest.raises(ValueError, match=r"prefix_tuning is not mergeable"):
    prefix.METHOD.merge(cfg, params, ad)
  with pytest.raises(NotImplementedError, match=r"sampling with prefix tuning"):
    jaxtune.generate(cfg, params, [[3, 4, 5]], max_new_tokens=2, lora=ad)
