"""LoRA dropout: inverted dropout on the adapters' inputs, unbiased, in training steps only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.models import decoder
from jaxtune.models import layers
from jaxtune.peft import lora
from jaxtune.peft import lora_kernel
from tests import launch_utils as lu


def test_linear_dropout_is_unbiased_and_drops_at_the_rate():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 16), jnp.float32)
  w = jnp.asarray(rng.randn(16, 8), jnp.float32)
  ad = {"a": jnp.asarray(rng.randn(16, 4), jnp.float32),
        "b": jnp.asarray(rng.randn(4, 8), jnp.float32)}
  rate = 0.3

  def leaf(w, ad, key=None, scale=1.0, dropout=0.0):
    return lora_kernel.LoraKernel(w=w, a=ad["a"], b=ad["b"], key=key, scale=scale,
                                  dropout=dropout)

  plain = layers.linear(x, leaf(w, ad, scale=2.0))
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  outs = jax.vmap(lambda k: layers.linear(x, leaf(w, ad, key=k, scale=2.0,
                                                  dropout=rate)))(keys)  # [N, 3, 8]
  mean, sem = outs.mean(0), outs.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(np.asarray(mean - plain)) < 5 * np.asarray(sem) + 1e-5)
  # The base path is untouched: with B = 0 every key gives the base output exactly.
  zero_b = {"a": ad["a"], "b": jnp.zeros_like(ad["b"])}
  one = layers.linear(x, leaf(w, zero_b, key=keys[0], scale=2.0, dropout=rate))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(x @ w))
  # The fraction of dropped inputs is the rate (a = identity exposes dropout(x) @ b = I).
  eye = {"a": jnp.eye(16), "b": jnp.eye(16)}
  dropped = jax.vmap(lambda k: layers.linear(jnp.ones((64, 16)), leaf(
      jnp.zeros((16, 16)), eye, key=k, dropout=rate)))(keys[:50])
  frac = float(np.mean(np.asarray(dropped) == 0))
  assert abs(frac - rate) < 0.02, frac
  np.testing.assert_allclose(np.asarray(dropped)[np.asarray(dropped) != 0], 1 / (1 - rate),
                             rtol=1e-6)


def test_apply_keys_follow_the_per_layer_per_projection_stream():
  """Layer l, projection i (q k v o gate up down = 0..6): fold_in(split(rng, L)[l], i)."""
  cfg = config_lib.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                               num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8)
  params = decoder.init(cfg, jax.random.PRNGKey(0))
  ad = lora.init(cfg, params, rank=2, key=jax.random.PRNGKey(1))
  rng = jax.random.PRNGKey(7)
  off = tree.flatten(dataclasses.replace(ad, dropout=0.3).apply(params))
  assert all(off[p].key is None for p in lora.select(params, ad.targets))  # eval: no dropout
  assert all(tree.flatten(ad.apply(params, rng))[p].key is None  # rate 0: no dropout
             for p in lora.select(params, ad.targets))
  on = tree.flatten(dataclasses.replace(ad, dropout=0.3).apply(params, rng))
  layer_keys = jax.random.split(rng, cfg.num_layers)
  for i, name in enumerate(["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                            "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                            "mlp/down_proj"]):
    leaf = on[f"layers/{name}/kernel"]
    assert (leaf.scale, leaf.dropout) == (ad.scale, 0.3)
    for layer in range(cfg.num_layers):
      np.testing.assert_array_equal(np.asarray(leaf.key[layer]),
                                    np.asarray(jax.random.fold_in(layer_keys[layer], i)))
  # In a forward pass the masks change the output only where the adapter contributes.
  tokens = np.arange(10, dtype=np.int32)[None] % cfg.vocab_size
  rnd = dataclasses.replace(ad, dropout=0.3, params=jax.tree.map(jnp.ones_like, ad.params))
  eval_out = decoder.forward(cfg, rnd.apply(params), tokens)
  train_out = decoder.forward(cfg, rnd.apply(params, rng), tokens)
  np.testing.assert_array_equal(np.asarray(eval_out), np.asarray(decoder.forward(
      cfg, dataclasses.replace(rnd, dropout=0.0).apply(params, rng), tokens)))
  assert np.abs(np.asarray(train_out) - np.asarray(eval_out)).max() > 1e-3


@pytest.mark.slow
def test_dropout_run_is_reproducible_and_differs_from_no_dropout(tmp_path):
  common = ["--config=configs/tiny_test.py", "--set=peft.method=lora", "--set=train.max_steps=4",
            "--set=train.eval_every=4", "--set=checkpoint.export_hf=false", "--set=optim.lr=1e-2"]
  runs = {}
  for name, rate in (("a", 0.5), ("b", 0.5), ("none", 0.0)):
    wd = str(tmp_path / name)
    lu.run("train.py", *common, f"--set=peft.dropout={rate}", f"--workdir={wd}")
    runs[name] = lu.losses(wd)
  assert runs["a"] == runs["b"]  # same seed, same masks
  assert runs["a"][1] == pytest.approx(runs["none"][1], abs=1e-6)  # B = 0 at step 1
  assert abs(runs["a"][4] - runs["none"][4]) > 1e-4  # the masks changed the updates
  p = lu.run("train.py", "--config=configs/tiny_test.py", "--set=peft.dropout=0.1",
             f"--workdir={tmp_path}/full", check=False)
  assert p.returncode == 2 and "peft.dropout" in p.stderr.strip().splitlines()[-1]
