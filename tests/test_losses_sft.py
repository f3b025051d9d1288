"""Tests for jaxtune.losses.sft: token/sequence log-probs, the SFT loss, its chunked form.

Each function is checked against numbers worked out by hand (arithmetic in the
docstrings) and against an independent float64 numpy implementation on random inputs,
for values and gradients (analytic numpy gradients: d(-log p_y)/d logits = p - onehot(y)).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import losses
from tests import numerics

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- numpy refs


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_token_logprobs(logits, targets):
  return np.take_along_axis(np_log_softmax(logits), targets[..., None], -1)[..., 0]


def np_dlogp_dlogits(logits, targets):
  """d log p(y) / d logits = onehot(y) - softmax(logits), [B, T, V]."""
  p = np.exp(np_log_softmax(logits))
  onehot = np.eye(logits.shape[-1])[targets]
  return onehot - p


def np_cross_entropy(logits, targets, mask):
  """Value and d/dlogits of sum(m * -log p_y) / max(sum m, 1)."""
  n = max(mask.sum(), 1.0)
  lp = np_token_logprobs(logits, targets)
  loss = -(lp * mask).sum() / n
  grad = -np_dlogp_dlogits(logits, targets) * mask[..., None] / n
  return loss, grad


def random_inputs(seed, b=2, t=3, v=7, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, t, v)) * scale
  targets = rng.integers(0, v, size=(b, t))
  mask = (rng.random((b, t)) < 0.7).astype(np.float64)
  mask[0, 0] = 1.0
  return logits, targets, mask


def hand_logits():
  """[1, 3, 2]: rows [0, ln3] (p = [1/4, 3/4]) twice, then [5, 5] (uniform)."""
  return jnp.array([[[0.0, LN3], [0.0, LN3], [5.0, 5.0]]], jnp.float32)


# ----------------------------------------------------------------------------- token_logprobs


def test_token_logprobs_by_hand():
  """softmax([0, ln3]) = [1, 3] / 4, softmax([5, 5]) = [1/2, 1/2]. Targets [1, 0, 1]:
  log(3/4) = -0.2876821, log(1/4) = -1.3862944, log(1/2) = -0.6931472."""
  lp = jax.jit(losses.token_logprobs)(hand_logits(), jnp.array([[1, 0, 1]]))
  assert lp.dtype == jnp.float32 and lp.shape == (1, 3)
  np.testing.assert_allclose(lp, [[-0.2876821, -1.3862944, -0.6931472]], atol=1e-6)


def test_token_logprobs_matches_numpy_values_and_grads():
  logits, targets, _ = random_inputs(0)
  w = np.random.default_rng(1).normal(size=targets.shape)
  y = jnp.asarray(targets)
  weighted = lambda x: jnp.sum(w * losses.token_logprobs(x, y))
  x = jnp.asarray(logits, jnp.float32)
  lp = jax.jit(losses.token_logprobs)(x, y)
  grad = jax.jit(jax.grad(weighted))(x)
  np.testing.assert_allclose(lp, np_token_logprobs(logits, targets), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad, w[..., None] * np_dlogp_dlogits(logits, targets),
                             rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_in_float32_out():
  """bf16 logits are upcast before the logsumexp: result is float32 and equals the float32
  computation on the same (bf16-representable) values."""
  logits, targets, _ = random_inputs(2, v=11)
  x16 = jnp.asarray(logits, jnp.bfloat16)
  lp = losses.token_logprobs(x16, jnp.asarray(targets))
  assert lp.dtype == jnp.float32
  ref = np_token_logprobs(np.asarray(x16.astype(jnp.float32), np.float64), targets)
  np.testing.assert_allclose(lp, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_by_hand():
  """Mask [1, 1, 0] keeps log(3/4) + log(1/4) = -0.2876821 - 1.3862944 = -1.6739765;
  averaged over the 2 unmasked tokens: -0.8369882."""
  targets, mask = jnp.array([[1, 0, 1]]), jnp.array([[1, 1, 0]])
  total = losses.sequence_logprobs(hand_logits(), targets, mask)
  avg = losses.sequence_logprobs(hand_logits(), targets, mask, average=True)
  np.testing.assert_allclose(total, [-1.6739765], atol=1e-6)
  np.testing.assert_allclose(avg, [-0.8369882], atol=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_numpy_values_and_grads(average):
  logits, targets, mask = random_inputs(3, b=3, t=4)
  mask[2] = 0.0  # an empty row: 0, not NaN
  lp = np_token_logprobs(logits, targets)
  denom = np.maximum(mask.sum(-1), 1.0) if average else np.ones(3)
  want = (lp * mask).sum(-1) / denom
  w = np.array([0.5, -1.0, 2.0])
  want_grad = (w / denom)[:, None, None] * mask[..., None] * np_dlogp_dlogits(logits, targets)

  def f(x):
    return losses.sequence_logprobs(x, jnp.asarray(targets), jnp.asarray(mask), average=average)

  x = jnp.asarray(logits, jnp.float32)
  np.testing.assert_allclose(jax.jit(f)(x), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(jax.grad(lambda x: jnp.sum(w * f(x))))(x), want_grad,
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- cross_entropy_loss


def test_cross_entropy_by_hand():
  """Mask [1, 1, 0]: loss = (0.2876821 + 1.3862944) / 2 = 0.8369882 over tokens = 2.
  An all-zero mask gives loss 0 (denominator clamped to 1), not NaN."""
  targets = jnp.array([[1, 0, 1]])
  loss, metrics = losses.cross_entropy_loss(hand_logits(), targets, jnp.array([[1, 1, 0]]))
  np.testing.assert_allclose(loss, 0.8369882, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], 0.8369882, atol=1e-6)
  assert float(metrics["tokens"]) == 2.0
  empty, _ = losses.cross_entropy_loss(hand_logits(), targets, jnp.zeros((1, 3)))
  assert float(empty) == 0.0


def test_cross_entropy_matches_numpy_values_and_grads():
  logits, targets, mask = random_inputs(4, b=3, t=5, v=6)
  want, want_grad = np_cross_entropy(logits, targets, mask)
  fn = lambda x: losses.cross_entropy_loss(x, jnp.asarray(targets), jnp.asarray(mask))[0]
  val, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(val, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)


def test_cross_entropy_masked_positions_are_inert():
  """Garbage at masked positions (target -100, logits 1e4) changes neither the loss nor the
  gradient, and the gradient there is exactly zero."""
  logits, targets, mask = random_inputs(5, b=2, t=4)
  mask[1, 2:] = 0.0
  dirty_logits, dirty_targets = logits.copy(), targets.copy()
  dirty_logits[1, 2:] = 1e4
  dirty_targets[1, 2:] = -100
  fn = lambda x, y: losses.cross_entropy_loss(x, y, jnp.asarray(mask))[0]
  vg = jax.jit(jax.value_and_grad(fn))
  clean_val, clean_grad = vg(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  val, grad = vg(jnp.asarray(dirty_logits, jnp.float32), jnp.asarray(dirty_targets))
  np.testing.assert_allclose(val, clean_val, rtol=1e-6)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)
  np.testing.assert_allclose(grad, clean_grad, atol=1e-7)


def test_sft_jit_and_vmap_equal_loop():
  """vmap over a leading axis of 3 independent batches equals a Python loop of calls."""
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(3, 2, 4, 5)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 5, size=(3, 2, 4)))
  mask = jnp.asarray(rng.random((3, 2, 4)) < 0.6, jnp.float32)
  ce = lambda x, y, m: losses.cross_entropy_loss(x, y, m)[0]
  seq = lambda x, y, m: losses.sequence_logprobs(x, y, m, average=True)
  for fn in (ce, seq):
    batched = jax.jit(jax.vmap(fn))(logits, targets, mask)
    jitted = jax.jit(fn)
    looped = jnp.stack([jitted(logits[i], targets[i], mask[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)


def test_cross_entropy_bf16_in_float32_out():
  logits, targets, mask = random_inputs(7)
  x16 = jnp.asarray(logits, jnp.bfloat16)
  loss, metrics = losses.cross_entropy_loss(x16, jnp.asarray(targets), jnp.asarray(mask))
  assert loss.dtype == jnp.float32 and metrics["tokens"].dtype == jnp.float32
  want, _ = np_cross_entropy(np.asarray(x16.astype(jnp.float32), np.float64), targets, mask)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


# ----------------------------------------------------------------------------- chunked


def chunked_inputs(seed, b=2, t=8, d=8, v=32):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, v)) / math.sqrt(d), jnp.float32)
  targets = rng.integers(0, v, size=(b, t))
  targets[1, -2:] = -100  # padding ids at masked positions
  mask = np.ones((b, t), np.float32)
  mask[1, -2:] = 0.0
  mask[0, 3] = 0.0
  return hidden, kernel, jnp.asarray(targets), jnp.asarray(mask)


@pytest.mark.parametrize("transpose,chunk_size", [(False, 3), (False, 16), (True, 5)])
def test_chunked_cross_entropy_equals_plain_values_and_grads(transpose, chunk_size):
  """Same value and gradients (w.r.t. hidden and the projection) as the plain loss on the
  full logits, including a chunk size that does not divide B*T, and the numpy value."""
  hidden, kernel, targets, mask = chunked_inputs(8)
  weight = kernel.T if transpose else kernel  # [V, D] embedding table or [D, V] kernel

  def chunked(h, w):
    return losses.chunked_cross_entropy(h, w, targets, mask, chunk_size=chunk_size,
                                        transpose=transpose)[0]

  def plain(h, w):
    logits = jnp.einsum("btd,vd->btv" if transpose else "btd,dv->btv", h, w)
    return losses.cross_entropy_loss(logits, targets, mask)[0]

  val, (gh, gw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, weight)
  pval, (pgh, pgw) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(hidden, weight)
  np.testing.assert_allclose(val, pval, rtol=1e-5)
  np.testing.assert_allclose(gh, pgh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, pgw, rtol=1e-5, atol=1e-6)
  np_logits = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
  want, _ = np_cross_entropy(np_logits, np.clip(np.asarray(targets), 0, None),
                             np.asarray(mask, np.float64))
  np.testing.assert_allclose(val, want, rtol=1e-5)
  tokens = jax.jit(lambda h, w: losses.chunked_cross_entropy(
      h, w, targets, mask, chunk_size=chunk_size, transpose=transpose)[1]["tokens"])
  assert float(tokens(hidden, weight)) == float(np.sum(mask))


@pytest.mark.parametrize("transpose", [False, True])
def test_chunked_cross_entropy_soft_capped_equals_plain_and_numpy(transpose):
  """softcap=c caps the logits as c * tanh(z / c) (Gemma 2) inside the fused chunks: same
  value and gradients as the plain loss on capped full logits, and the numpy value."""
  hidden, kernel, targets, mask = chunked_inputs(9)
  hidden = hidden * 4.0  # logits of scale ~10: the cap (5) bends them
  weight = kernel.T if transpose else kernel
  cap = 5.0

  def chunked(h, w):
    return losses.chunked_cross_entropy(h, w, targets, mask, chunk_size=5,
                                        transpose=transpose, softcap=cap)[0]

  def plain(h, w):
    z = jnp.einsum("btd,vd->btv" if transpose else "btd,dv->btv", h, w)
    return losses.cross_entropy_loss(cap * jnp.tanh(z / cap), targets, mask)[0]

  val, (gh, gw) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, weight)
  pval, (pgh, pgw) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1)))(hidden, weight)
  np.testing.assert_allclose(val, pval, rtol=1e-5)
  np.testing.assert_allclose(gh, pgh, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, pgw, rtol=1e-5, atol=1e-6)
  z = np.asarray(hidden, np.float64) @ np.asarray(kernel, np.float64)
  want, _ = np_cross_entropy(cap * np.tanh(z / cap), np.clip(np.asarray(targets), 0, None),
                             np.asarray(mask, np.float64))
  np.testing.assert_allclose(val, want, rtol=1e-5)
  uncapped = losses.chunked_cross_entropy(hidden, weight, targets, mask, chunk_size=5,
                                          transpose=transpose)[0]
  assert abs(float(uncapped) - float(val)) > 1e-2  # the cap really changed the loss


def _largest_intermediate(closed_jaxpr):
  """Largest number of elements of any value produced anywhere in a jaxpr (recursing into
  scan / checkpoint / pjit sub-jaxprs)."""
  return max((int(np.prod(getattr(var.aval, "shape", ())))
              for eqn in numerics.jaxpr_eqns(closed_jaxpr) for var in eqn.outvars), default=0)


def test_chunked_cross_entropy_never_materialises_all_logits():
  """In the traced forward AND backward, no value has B*T*V = 16*32 = 512 elements: the
  biggest is the [D, V] = 256 weight (gradient); chunk logits are [4, 32] = 128. The plain
  loss does produce a 512-element logits array (so the probe can see one)."""
  hidden, kernel, targets, mask = chunked_inputs(9)

  def chunked(h, w):
    return losses.chunked_cross_entropy(h, w, targets, mask, chunk_size=4)[0]

  def plain(h, w):
    return losses.cross_entropy_loss(jnp.einsum("btd,dv->btv", h, w), targets, mask)[0]

  n_logits = targets.size * kernel.shape[1]
  grad_fn = lambda f: jax.value_and_grad(f, argnums=(0, 1))
  assert _largest_intermediate(jax.make_jaxpr(grad_fn(plain))(hidden, kernel)) >= n_logits
  assert _largest_intermediate(jax.make_jaxpr(grad_fn(chunked))(hidden, kernel)) < n_logits


def test_chunked_cross_entropy_bf16_jit_vmap():
  """bf16 hidden/weight give a float32 loss equal to the plain loss on the float32
  upcast; vmap over a leading axis equals a loop of calls."""
  hidden, kernel, targets, mask = chunked_inputs(10)
  h16, w16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  fn = jax.jit(lambda h, w, y, m: losses.chunked_cross_entropy(h, w, y, m, chunk_size=6)[0])
  loss = fn(h16, w16, targets, mask)
  assert loss.dtype == jnp.float32
  logits = jnp.einsum("btd,dv->btv", h16.astype(jnp.float32), w16.astype(jnp.float32))
  np.testing.assert_allclose(loss, losses.cross_entropy_loss(logits, targets, mask)[0],
                             rtol=1e-5)
  hs = jnp.stack([hidden, hidden * 0.5])
  batched = jax.vmap(fn, in_axes=(0, None, None, None))(hs, kernel, targets, mask)
  looped = jnp.stack([fn(hs[i], kernel, targets, mask) for i in range(2)])
  np.testing.assert_allclose(batched, looped, rtol=1e-6)
