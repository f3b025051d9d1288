"""QLoRA: quantize-on-load keeps float kernels off the device, 4-bit bytes, training on CPU.

The base is a tiny `transformers` Llama whose widths (128, 192) divide the default group
size 64, saved to disk and read back through `qlora.load_quantized`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxtune
from jaxtune import config as config_lib
from jaxtune import quant
from jaxtune import sharding
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.peft import lora
from jaxtune.peft import qlora
from tests import hf_models

PROJ = ["layers/self_attn/q_proj/kernel", "layers/self_attn/k_proj/kernel",
        "layers/self_attn/v_proj/kernel", "layers/self_attn/o_proj/kernel",
        "layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel", "layers/mlp/down_proj/kernel"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama_q")
  model = hf_models.make("llama2", hidden_size=128, intermediate_size=192,
                         num_attention_heads=4, num_key_value_heads=2)
  model.save_pretrained(d, safe_serialization=True)
  return str(d)


@pytest.fixture(scope="module")
def qmodel(hf_dir):
  return qlora.load_quantized(hf_dir, method="nf4", group_size=64, dtype=jnp.float32)


def _tokens(seed, b=4, t=24, v=101):
  return np.random.RandomState(seed).randint(0, v, size=(b, t)).astype(np.int32)


def test_quantize_on_load_never_places_float_kernels(hf_dir, qmodel):
  placed = {}

  def place(path, x):
    placed[path] = x
    return jax.tree.map(jnp.asarray, x)

  cfg, qparams = qlora.load_quantized(hf_dir, method="nf4", group_size=64, dtype=jnp.float32,
                                      place=place)
  # The projection kernels reach `place` already packed, as numpy (host) children.
  assert sorted(p for p, x in placed.items() if isinstance(x, quant.QArray)) == sorted(PROJ)
  for p in PROJ:
    assert isinstance(placed[p].packed, np.ndarray) and placed[p].packed.dtype == np.uint8
  assert all(isinstance(x, np.ndarray) for p, x in placed.items() if p not in PROJ)
  flat = tree.flatten(qparams)
  assert flat["layers/mlp/down_proj/kernel"].shape == (2, 192, 128)
  assert isinstance(flat["layers/mlp/down_proj/kernel"].packed, jax.Array)
  assert not isinstance(flat["lm_head/kernel"], quant.QArray)
  # Same result as quantizing the loaded float params in memory, bit for bit.
  _, params = jaxtune.load_hf(hf_dir)
  mem = tree.flatten(qlora.quantize_params(params, method="nf4", group_size=64))
  for p in PROJ:
    np.testing.assert_array_equal(flat[p].packed, mem[p].packed, err_msg=p)
    np.testing.assert_array_equal(np.asarray(flat[p].scales, np.float32),
                                  np.asarray(mem[p].scales, np.float32), err_msg=p)
  # Bytes held by the 4-bit base.
  nbytes, nparams = quant.num_bytes(qparams)
  assert nparams == sum(int(np.prod(flat[p].shape)) for p in PROJ)
  print(f"nf4 g=64 bf16 scales: {nbytes / nparams:.5f} bytes/param over {nparams} params")
  assert nbytes / nparams <= 0.55
  _, dq = qlora.load_quantized(hf_dir, method="int4", double_quant=True, dtype=jnp.float32)
  nbytes, nparams = quant.num_bytes(dq)
  print(f"int4 g=64 double quant: {nbytes / nparams:.5f} bytes/param")
  assert nbytes / nparams <= 0.55
  # The quantized model is the dequantized model, and close to the float one.
  tokens = _tokens(0)
  qlogits = np.asarray(decoder.forward(cfg, qparams, tokens))
  dlogits = np.asarray(decoder.forward(cfg, quant.dequantize_tree(qparams), tokens))
  flogits = np.asarray(decoder.forward(cfg, params, tokens))
  print(f"nf4 vs dequantized {np.abs(qlogits - dlogits).max():.2e}, vs float "
        f"{np.abs(qlogits - flogits).max():.2e} (float logits std {flogits.std():.2e})")
  assert np.abs(qlogits - dlogits).max() < 1e-5
  assert 0 < np.abs(qlogits - flogits).max() < 0.5 * np.abs(flogits).max()


def test_group_size_that_does_not_divide_is_named(hf_dir):
  with pytest.raises(ValueError, match=r"layers/self_attn/q_proj/kernel has shape \(2, 128, "
                                       r"128\).*group_size=256"):
    qlora.load_quantized(hf_dir, group_size=256, dtype=jnp.float32)


def _ce(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def test_qlora_training_lowers_loss_and_keeps_base(qmodel):
  cfg, qparams = qmodel
  ad = lora.init(cfg, qparams, rank=8, alpha=16, key=jax.random.key(0))
  tokens = jnp.asarray(_tokens(1, b=4, t=32))
  frozen = jax.tree.map(lambda x: np.array(x, copy=True), qparams)
  opt = optax.adamw(3e-3, weight_decay=0.0)

  @jax.jit
  def step(p, state, base):
    loss, g = jax.value_and_grad(
        lambda p: _ce(decoder.forward(cfg, base, tokens, lora=dataclasses.replace(ad, params=p)),
                      tokens))(p)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, loss

  p, state, losses = ad.params, opt.init(ad.params), []
  for _ in range(20):
    p, state, loss = step(p, state, qparams)
    losses.append(float(loss))
  print(f"QLoRA losses {losses[0]:.4f} -> {losses[-1]:.4f}")
  assert losses[-1] < losses[0] - 0.5 and all(np.isfinite(losses))
  # The 4-bit base is bit-identical; its codes and scales were never trained.
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.asarray, qparams))
  trained = dataclasses.replace(ad, params=p)

  # Adapters off = the reference model (DPO / GRPO KL base), from the same base params: the
  # dequantized dense base (merging the untrained adapters, B = 0, adds nothing to it).
  ref = np.asarray(lora.reference_logits(cfg, qparams, tokens))
  dense_base = lora.merge(cfg, qparams, ad)
  np.testing.assert_array_equal(
      np.asarray(tree.flatten(dense_base)["layers/mlp/up_proj/kernel"]),
      np.asarray(quant.dequantize(qparams["layers"]["mlp"]["up_proj"]["kernel"])))
  diff = np.abs(ref - np.asarray(decoder.forward(cfg, dense_base, tokens))).max()
  print(f"QLoRA reference vs dequantized dense base max abs diff {diff:.2e}")
  assert diff < 1e-5
  on = np.asarray(decoder.forward(cfg, qparams, tokens, lora=trained))
  assert np.abs(on - ref).max() > 0.1
  # Merging into the dequantized base gives a dense model with the same logits.
  merged = lora.merge(cfg, qparams, trained)
  assert not any(isinstance(x, quant.QArray) for x in tree.flatten(merged).values())
  diff = np.abs(np.asarray(decoder.forward(cfg, merged, tokens)) - on).max()
  print(f"QLoRA merged vs unmerged max abs diff {diff:.2e}")
  assert diff < 1e-5


def test_load_onto_mesh_shards_the_4bit_leaves(hf_dir, qmodel):
  cfg, qparams = qmodel
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  _, sq = qlora.load_quantized(hf_dir, dtype=jnp.float32, mesh=mesh)
  P = jax.sharding.PartitionSpec
  q = sq["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, 128, 128]: packed [L, 64, 128]
  assert q.packed.sharding.spec == P(None, "fsdp", "tensor")
  # 128 / 64 = 2 rows do not split over fsdp=4, so the heads dim takes tensor and fsdp
  assert q.scales.sharding.spec == P(None, None, ("tensor", "fsdp"))
  down = sq["layers"]["mlp"]["down_proj"]["kernel"]  # [L, 192, 128]: packed [L, 96, 128]
  assert down.packed.sharding.spec == P(None, ("tensor", "fsdp"), None)  # FSDP on the rows
  assert down.packed.addressable_shards[0].data.shape == (2, 12, 128)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sq),
               jax.tree.map(np.asarray, qparams))
  tokens = _tokens(2, b=8, t=16)
  fwd = jax.jit(lambda p, t: decoder.forward(cfg, p, t, constrain=sharding.constrainer(mesh)))
  diff = np.abs(np.asarray(fwd(sq, tokens)) - np.asarray(decoder.forward(cfg, qparams, tokens)))
  print(f"QLoRA base sharded vs one device max abs diff {diff.max():.2e}")
  assert diff.max() < 1e-5
