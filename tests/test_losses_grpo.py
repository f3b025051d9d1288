"""Tests for jaxtune.losses.grpo: group advantages and the clipped GRPO/DAPO/Dr. GRPO loss.

Hand-derived values (arithmetic in the docstrings) for advantages, the clipped surrogate,
both KL estimators and all three aggregations; an independent float64 numpy
implementation on random inputs for values and gradients (central finite differences);
masking with garbage in padded positions; jit/vmap and bf16.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import losses
from tests.numerics import fd_grad
from tests.numerics import f32

# ----------------------------------------------------------------------------- numpy refs


def np_grpo(logps, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, beta=0.04, est="k3",
            agg="token_mean", max_tokens=None):
  adv = adv[:, None] if adv.ndim == 1 else adv
  ratio = np.exp(logps - old)
  surrogate = np.minimum(ratio * adv, np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv)
  per = -surrogate
  if beta:
    kl = logps - ref if est == "k1" else np.exp(ref - logps) - (ref - logps) - 1
    per = per + beta * kl
  per = np.where(mask > 0, per, 0.0) * mask
  if agg == "token_mean":
    return per.sum() / max(mask.sum(), 1)
  if agg == "seq_mean":
    return (per.sum(-1) / np.maximum(mask.sum(-1), 1)).mean()
  return per.sum() / (logps.shape[0] * (max_tokens or logps.shape[1]))






# ----------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
  """Groups of 2: [0, 2] has mean 1 and sample std sqrt((1 + 1) / 1) = sqrt2 = 1.4142136,
  so A = -+1 / (1.4142136 + 1e-4) = -+0.7070568; [1, 1] has std 0, so A = 0.
  Without std (Dr. GRPO): [-1, 1, 0, 0].
  A group of 4, [1, 0, 0, 0], eps = 0: mean 0.25, deviations [0.75, -0.25 x3], sample
  variance (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5: A = [1.5, -0.5, -0.5, -0.5]."""
  adv = jax.jit(losses.group_advantages, static_argnums=1)
  r = jnp.array([0.0, 2.0, 1.0, 1.0])
  np.testing.assert_allclose(adv(r, 2), [-0.7070568, 0.7070568, 0.0, 0.0], atol=1e-6)
  no_std = jax.jit(functools.partial(losses.group_advantages, group_size=2, normalize_std=False))
  np.testing.assert_allclose(no_std(r), [-1.0, 1.0, 0.0, 0.0], atol=1e-7)
  four = jax.jit(functools.partial(losses.group_advantages, group_size=4, eps=0.0))
  np.testing.assert_allclose(four(jnp.array([1.0, 0.0, 0.0, 0.0])), [1.5, -0.5, -0.5, -0.5],
                             atol=1e-6)


@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_matches_numpy(normalize_std):
  rng = np.random.default_rng(0)
  r = rng.normal(size=12)
  g = r.reshape(3, 4)
  want = g - g.mean(1, keepdims=True)
  if normalize_std:
    want = want / (g.std(1, ddof=1, keepdims=True) + 1e-4)
  fn = jax.jit(functools.partial(losses.group_advantages, group_size=4,
                                 normalize_std=normalize_std))
  got = fn(jnp.asarray(r, jnp.float32))
  np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-6)
  assert fn(jnp.asarray(r, jnp.bfloat16)).dtype == jnp.float32
  with pytest.raises(ValueError, match="group_size"):
    losses.group_advantages(jnp.zeros(10), 4)


# ----------------------------------------------------------------------------- loss by hand


def hand_batch():
  """B = 2, T = 3. Row 0: A = +1, logp - old = [0.5, 0, 0.1], all tokens live.
  Row 1: A = -1, logp - old = [-0.5, 0.3, garbage], last token masked."""
  old = jnp.array([[-1.0, -2.0, -0.5], [-1.0, -1.5, -3.0]])
  logps = old + jnp.array([[0.5, 0.0, 0.1], [-0.5, 0.3, 40.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  return logps, old, jnp.array([1.0, -1.0]), mask


@pytest.mark.parametrize("agg,max_tokens,want", [
    ("token_mean", None, -0.2310624), ("seq_mean", None, -0.0133971),
    ("dr_grpo", None, -0.1925520), ("dr_grpo", 4, -0.1444140)])
def test_grpo_loss_by_hand(agg, max_tokens, want):
  """eps_low = eps_high = 0.2, beta = 0. Ratios: row 0 [e^.5, 1, e^.1] = [1.6487213, 1,
  1.1051709]; row 1 [e^-.5, e^.3] = [0.6065307, 1.3498588].
  Surrogates min(ratio A, clip(ratio, 0.8, 1.2) A): row 0 [1.2 (high clip), 1, 1.1051709];
  row 1 [min(-0.6065307, -0.8) = -0.8 (low clip), min(-1.3498588, -1.2) = -1.3498588].
  Per-token loss = -surrogate, sum = -1.2 - 1 - 1.1051709 + 0.8 + 1.3498588 = -1.1553121.
  token_mean: / 5 = -0.2310624. seq_mean: (-3.3051709 / 3 + 2.1498588 / 2) / 2 =
  (-1.1017236 + 1.0749294) / 2 = -0.0133971. dr_grpo: / (2 * 3) = -0.1925520, with
  max_tokens = 4: / 8 = -0.1444140.
  Metrics: clip low = 1/5 (row 1 token 0), clip high = 1/5 (row 0 token 0), region 2/5,
  ratio mean = (1.6487213 + 1 + 1.1051709 + 0.6065307 + 1.3498588) / 5 = 1.1420563."""
  fn = jax.jit(functools.partial(losses.grpo_loss, beta=0.0, loss_agg=agg,
                                 max_tokens=max_tokens))
  logps, old, adv, mask = hand_batch()
  loss, m = fn(logps, old, None, adv, mask)
  np.testing.assert_allclose(loss, want, atol=1e-6)
  np.testing.assert_allclose(
      [m["clip_ratio/low"], m["clip_ratio/high"], m["clip_ratio/region"], m["ratio"], m["kl"]],
      [0.2, 0.2, 0.4, 1.1420563, 0.0], atol=1e-6)


@pytest.mark.parametrize("est,want_kl", [("k3", 0.3068528), ("k1", -0.6931472)])
def test_grpo_kl_estimators_by_hand(est, want_kl):
  """One token with logp = old (ratio 1) and A = 0, so the surrogate is 0; ref - logp = ln2.
  k3 = e^ln2 - ln2 - 1 = 2 - 0.6931472 - 1 = 0.3068528; k1 = logp - ref = -ln2 = -0.6931472.
  beta = 0.1: loss = 0.1 * kl."""
  logp = jnp.array([[-2.0]])
  fn = jax.jit(functools.partial(losses.grpo_loss, beta=0.1, kl_estimator=est))
  loss, m = fn(logp, logp, logp + math.log(2.0), jnp.zeros(1), jnp.ones((1, 1)))
  np.testing.assert_allclose(loss, 0.1 * want_kl, atol=1e-7)
  np.testing.assert_allclose(m["kl"], want_kl, atol=1e-6)


# ----------------------------------------------------------------------------- vs numpy


def random_batch(seed, b=3, t=6, per_token_adv=False):
  rng = np.random.default_rng(seed)
  old = -rng.uniform(0.1, 4.0, size=(b, t))
  logps = old + rng.normal(size=(b, t)) * 0.4  # ratios spread across both clip edges
  ref = old + rng.normal(size=(b, t)) * 0.3
  adv = rng.normal(size=(b, t) if per_token_adv else (b,))
  mask = np.ones((b, t))
  mask[1, 3:] = 0.0
  mask[2, 1:] = 0.0
  logps[mask == 0] = -200.0  # garbage in padding: exp(ref - logp) would overflow float32
  return logps, old, ref, adv, mask


@pytest.mark.parametrize("seed,kw", [
    (0, dict()), (1, dict(loss_agg="seq_mean", kl_estimator="k1")),
    (4, dict(loss_agg="dr_grpo", max_tokens=8, epsilon_low=0.1, epsilon_high=0.28)),
    (11, dict(beta=0.0, loss_agg="seq_mean", per_token_adv=True))],
    ids=["token_mean-k3", "seq_mean-k1", "dr_grpo-asym", "seq_mean-beta0-token_adv"])
def test_grpo_matches_numpy_values_and_grads(seed, kw):
  """Seeds chosen so that both the low and the high clip bind on some live token (asserted
  through the metrics), so both branches of the min/clip are differentiated."""
  kw = dict(kw)
  logps, old, ref, adv, mask = random_batch(seed, per_token_adv=kw.pop("per_token_adv", False))
  np_kw = dict(eps_low=kw.get("epsilon_low", 0.2), eps_high=kw.get("epsilon_high", 0.2),
               beta=kw.get("beta", 0.04), est=kw.get("kl_estimator", "k3"),
               agg=kw.get("loss_agg", "token_mean"), max_tokens=kw.get("max_tokens"))
  fn = functools.partial(losses.grpo_loss, **kw)
  (val, metrics), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(
      *f32(logps, old, ref, adv, mask))
  assert float(metrics["clip_ratio/low"]) > 0 and float(metrics["clip_ratio/high"]) > 0
  np.testing.assert_allclose(val, np_grpo(logps, old, ref, adv, mask, **np_kw), rtol=1e-5,
                             atol=1e-7)
  want = fd_grad(lambda x: np_grpo(x, old, ref, adv, mask, **np_kw), logps)
  np.testing.assert_allclose(grad, want, atol=1e-5)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_grpo_masked_garbage_and_constants():
  """Padding garbage (logp = -200, i.e. exp(ref - logp) = inf in float32) changes neither
  value nor gradient; old_logps and ref_logps get zero gradient; ref_logps may be None
  only when beta = 0 (same loss as passing it), otherwise an error."""
  logps, old, ref, adv, mask = random_batch(7)
  clean = logps.copy()
  clean[mask == 0] = old[mask == 0]
  vg = jax.jit(jax.value_and_grad(lambda *a: losses.grpo_loss(*a)[0], argnums=(0, 1, 2)))
  v_dirty, g_dirty = vg(*f32(logps, old, ref, adv, mask))
  v_clean, g_clean = vg(*f32(clean, old, ref, adv, mask))
  assert np.isfinite(float(v_dirty))
  np.testing.assert_allclose(v_dirty, v_clean, rtol=1e-6)
  np.testing.assert_allclose(g_dirty[0], g_clean[0], atol=1e-7)
  assert np.all(np.asarray(g_dirty[1]) == 0.0) and np.all(np.asarray(g_dirty[2]) == 0.0)
  no_kl = jax.jit(functools.partial(losses.grpo_loss, beta=0.0))
  np.testing.assert_allclose(no_kl(*f32(logps, old, None, adv, mask))[0],
                             no_kl(*f32(logps, old, ref, adv, mask))[0], rtol=1e-6)
  with pytest.raises(ValueError, match="ref_logps"):
    losses.grpo_loss(*f32(logps, old, None, adv, mask), beta=0.04)


def test_grpo_bf16_and_vmap():
  """bf16 inputs -> float32 loss and metrics, equal to the numpy value on the rounded
  inputs; vmap over a leading axis of 2 equals a loop."""
  logps, old, ref, adv, mask = random_batch(8)
  logps[mask == 0] = old[mask == 0]
  b16 = [jnp.asarray(x, jnp.bfloat16) for x in (logps, old, ref, adv)]
  fn = jax.jit(losses.grpo_loss)
  loss, metrics = fn(*b16, jnp.asarray(mask))
  assert loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
  rounded = [np.asarray(x.astype(jnp.float32), np.float64) for x in b16]
  np.testing.assert_allclose(loss, np_grpo(*rounded, mask), rtol=1e-5, atol=1e-7)
  stacked = f32(*[np.stack([x, x]) for x in (logps, old, ref)], np.stack([adv, -adv]),
                np.stack([mask, mask]))
  batched, bm = jax.jit(jax.vmap(fn))(*stacked)
  for i in range(2):
    one, om = fn(*[x[i] for x in stacked])
    np.testing.assert_allclose(batched[i], one, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bm["clip_ratio/high"][i], om["clip_ratio/high"])
