"""LoRA dropout: inverted dropout on the adapters' inputs, unbiased, in training steps only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune.models import layers
from tests import launch_utils as lu


def test_linear_dropout_is_unbiased_and_drops_at_the_rate():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(3, 16), jnp.float32)
  w = jnp.asarray(rng.randn(16, 8), jnp.float32)
  ad = {"a": jnp.asarray(rng.randn(16, 4), jnp.float32),
        "b": jnp.asarray(rng.randn(4, 8), jnp.float32)}
  rate = 0.3
  plain = layers.linear(x, w, lora=ad, lora_scale=2.0)
  keys = jax.random.split(jax.random.PRNGKey(1), 4000)
  outs = jax.vmap(lambda k: layers.linear(x, w, lora=ad, lora_scale=2.0, lora_dropout=rate,
                                          dropout_key=k))(keys)  # [N, 3, 8]
  mean, sem = outs.mean(0), outs.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(np.asarray(mean - plain)) < 5 * np.asarray(sem) + 1e-5)
  # The base path is untouched: with B = 0 every key gives the base output exactly.
  zero_b = {"a": ad["a"], "b": jnp.zeros_like(ad["b"])}
  one = layers.linear(x, w, lora=zero_b, lora_scale=2.0, lora_dropout=rate, dropout_key=keys[0])
  np.testing.assert_array_equal(np.asarray(one), np.asarray(x @ w))
  # The fraction of dropped inputs is the rate (a = identity exposes dropout(x) @ b = I).
  eye = {"a": jnp.eye(16), "b": jnp.eye(16)}
  dropped = jax.vmap(lambda k: layers.linear(jnp.ones((64, 16)), jnp.zeros((16, 16)), lora=eye,
                                             lora_dropout=rate, dropout_key=k))(keys[:50])
  frac = float(np.mean(np.asarray(dropped) == 0))
  assert abs(frac - rate) < 0.02, frac
  np.testing.assert_allclose(np.asarray(dropped)[np.asarray(dropped) != 0], 1 / (1 - rate),
                             rtol=1e-6)


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
