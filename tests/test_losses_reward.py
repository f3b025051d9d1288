"""Tests for jaxtune.losses.reward: the Bradley-Terry reward-model loss.

Hand-derived values, an independent float64 numpy implementation with its analytic
gradient (dL/ds_c = -(1 - sigma(z)) / B, dL/ds_r = +(1 - sigma(z)) / B), margins, jit,
vmap and bf16 inputs.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import losses

LN3 = math.log(3.0)


def np_reward(c, r, margin):
  """Value and analytic gradients (dc, dr) of mean(-log sigma(c - r - margin))."""
  z = c - r - margin
  loss = np.logaddexp(0.0, -z).mean()
  d = -(1.0 - 1.0 / (1.0 + np.exp(-z))) / z.size
  return loss, d, -d


def test_reward_loss_by_hand():
  """c = [ln3, 1], r = [0, 1]: z = [ln3, 0]; -log sigma(ln3) = -ln(3/4) = 0.2876821,
  -log sigma(0) = ln2 = 0.6931472; mean 0.4904146. accuracy = mean([ln3 > 0, 1 > 1]) = 0.5,
  margin = mean([ln3, 0]) = 0.5493061.
  With a required margin [1, 0] and c = [ln3 + 1, 1], z is again [ln3, 0]: same loss,
  reported margin mean([ln3 + 1, 0]) = 1.0493061."""
  fn = jax.jit(losses.reward_loss)
  loss, m = fn(jnp.array([LN3, 1.0]), jnp.array([0.0, 1.0]))
  np.testing.assert_allclose([loss, m["loss"], m["accuracy"], m["margin"]],
                             [0.4904146, 0.4904146, 0.5, 0.5493061], atol=1e-6)
  with_margin = jax.jit(lambda c, r, mg: losses.reward_loss(c, r, margin=mg))
  loss, m = with_margin(jnp.array([LN3 + 1.0, 1.0]), jnp.array([0.0, 1.0]), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose([loss, m["margin"]], [0.4904146, 1.0493061], atol=1e-6)


def test_reward_loss_matches_numpy_values_and_grads():
  """Random scores and per-pair margins; the margin is data and gets zero gradient."""
  rng = np.random.default_rng(0)
  c, r, mg = rng.normal(size=7) * 2, rng.normal(size=7) * 2, rng.uniform(0, 1, size=7)
  fn = lambda c, r, mg: losses.reward_loss(c, r, margin=mg)
  (val, metrics), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(
      *[jnp.asarray(x, jnp.float32) for x in (c, r, mg)])
  want, dc, dr = np_reward(c, r, mg)
  np.testing.assert_allclose(val, want, rtol=1e-5)
  np.testing.assert_allclose(grads[0], dc, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grads[1], dr, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(grads[2]) == 0.0)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(c > r), atol=1e-7)
  np.testing.assert_allclose(metrics["margin"], np.mean(c - r), rtol=1e-5)
  scalar = jax.jit(functools.partial(losses.reward_loss, margin=0.5))
  np.testing.assert_allclose(scalar(*[jnp.asarray(x, jnp.float32) for x in (c, r)])[0],
                             np_reward(c, r, 0.5)[0], rtol=1e-5)


def test_reward_loss_bf16_and_vmap():
  """bf16 scores give a float32 loss equal to the float32 run on the same values; vmap over
  a leading axis of 3 equals a loop."""
  rng = np.random.default_rng(1)
  c, r = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  fn = jax.jit(losses.reward_loss)
  c16, r16 = jnp.asarray(c[0], jnp.bfloat16), jnp.asarray(r[0], jnp.bfloat16)
  loss, metrics = fn(c16, r16)
  assert loss.dtype == jnp.float32 and metrics["margin"].dtype == jnp.float32
  np.testing.assert_allclose(
      loss, np_reward(np.asarray(c16, np.float64), np.asarray(r16, np.float64), 0.0)[0],
      rtol=1e-5)
  cs, rs = jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32)
  batched, bm = jax.jit(jax.vmap(fn))(cs, rs)
  for i in range(3):
    one, om = fn(cs[i], rs[i])
    np.testing.assert_allclose(batched[i], one, rtol=1e-6)
    np.testing.assert_allclose(bm["accuracy"][i], om["accuracy"])
