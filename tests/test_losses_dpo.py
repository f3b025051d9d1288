"""Tests for jaxtune.losses.dpo: DPO (sigmoid/cDPO, IPO, hinge, robust), SimPO, ORPO.

Hand-derived values (arithmetic in each docstring), then an independent float64 numpy
implementation on random inputs for values and gradients (central finite differences),
then jit / vmap / bf16 / stop-gradient behaviour.
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

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- numpy refs


def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps):
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    per = -(1 - eps) * np_logsig(beta * h) - eps * np_logsig(-beta * h)
  elif loss_type == "ipo":
    per = (h - 1 / (2 * beta)) ** 2
  elif loss_type == "hinge":
    per = np.maximum(0.0, 1 - beta * h)
  else:
    per = ((1 - eps) * -np_logsig(beta * h) + eps * np_logsig(-beta * h)) / (1 - 2 * eps)
  return per.mean()


def np_simpo(c, r, beta, gamma, eps):
  z = beta * (c - r) - gamma
  return (-(1 - eps) * np_logsig(z) - eps * np_logsig(-z)).mean()


def np_orpo(c, r, nll, beta):
  log_odds = (c - r) - (np.log(1 - np.exp(c)) - np.log(1 - np.exp(r)))
  return nll - beta * np_logsig(log_odds).mean()






# ----------------------------------------------------------------------------- dpo by hand


def hand_pairs():
  """Example 0: chosen log-ratio pc - rc = 10 ln3, rejected log-ratio 0, so h = 10 ln3.
  Example 1: all four log-probs equal, h = 0."""
  pc = jnp.array([10 * LN3 - 20.0, -3.0])
  rc = jnp.array([-20.0, -3.0])
  pr = jnp.array([-15.0, -3.0])
  rr = jnp.array([-15.0, -3.0])
  return pc, pr, rc, rr


def test_dpo_sigmoid_by_hand():
  """beta = 0.1. Ex. 0: beta h = ln3, sigma(ln3) = 3/4, loss = -ln(3/4) = 0.2876821.
  Ex. 1: h = 0, loss = ln 2 = 0.6931472. Mean = 0.4904146.
  rewards/chosen = mean(0.1 * [10 ln3, 0]) = ln3 / 2 = 0.5493061, rewards/rejected = 0,
  accuracy = mean([ln3 > 0, 0 > 0]) = 0.5, margin = 0.5493061."""
  loss, m = jax.jit(functools.partial(losses.dpo_loss, beta=0.1))(*hand_pairs())
  np.testing.assert_allclose(loss, 0.4904146, atol=1e-6)
  np.testing.assert_allclose(m["loss"], 0.4904146, atol=1e-6)
  np.testing.assert_allclose(m["rewards/chosen"], 0.5493061, atol=1e-6)
  np.testing.assert_allclose(m["rewards/rejected"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["rewards/accuracy"], 0.5, atol=1e-7)
  np.testing.assert_allclose(m["rewards/margin"], 0.5493061, atol=1e-6)


@pytest.mark.parametrize("loss_type,want", [("sigmoid", 0.5623351), ("robust", -0.2616241)])
def test_dpo_label_smoothing_by_hand(loss_type, want):
  """Ex. 0 only (beta h = ln3), eps = 0.25, log sigma(ln3) = ln(3/4) = -0.2876821,
  log sigma(-ln3) = ln(1/4) = -1.3862944.
  cDPO:   0.75 * 0.2876821 + 0.25 * 1.3862944 = 0.2157616 + 0.3465736 = 0.5623351.
  robust: (0.75 * 0.2876821 + 0.25 * -1.3862944) / (1 - 0.5) = -0.1308120 / 0.5 = -0.2616241."""
  pc, pr, rc, rr = (x[:1] for x in hand_pairs())
  fn = functools.partial(losses.dpo_loss, beta=0.1, loss_type=loss_type, label_smoothing=0.25)
  np.testing.assert_allclose(jax.jit(fn)(pc, pr, rc, rr)[0], want, atol=1e-6)


def test_dpo_ipo_and_hinge_by_hand():
  """IPO, beta = 0.5: target 1/(2 beta) = 1; h = (-1 - -4) - (-2 - -2) = 3; (3 - 1)^2 = 4.
  Hinge, beta = 0.1: h = 4 gives relu(1 - 0.4) = 0.6, h = 20 gives relu(1 - 2) = 0; mean 0.3."""
  ipo = jax.jit(functools.partial(losses.dpo_loss, beta=0.5, loss_type="ipo"))
  np.testing.assert_allclose(ipo(*f32([-1.0], [-2.0], [-4.0], [-2.0]))[0], 4.0, atol=1e-6)
  hinge = jax.jit(functools.partial(losses.dpo_loss, beta=0.1, loss_type="hinge"))
  np.testing.assert_allclose(hinge(*f32([4.0, 20.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]))[0],
                             0.3, atol=1e-6)


# ----------------------------------------------------------------------------- dpo vs numpy


def random_pairs(seed, b=5):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=b) * 3.0 - 20.0 for _ in range(4)]


@pytest.mark.parametrize("loss_type,beta,eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0),
    ("robust", 0.2, 0.1)])
def test_dpo_matches_numpy_values_and_grads(loss_type, beta, eps):
  pc, pr, rc, rr = random_pairs(sum(map(ord, loss_type)) + int(eps * 10))
  fn = functools.partial(losses.dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=eps)
  (val, _), (gc, gr) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
      *f32(pc, pr, rc, rr))
  np.testing.assert_allclose(val, np_dpo(pc, pr, rc, rr, beta, loss_type, eps), rtol=1e-5)
  np.testing.assert_allclose(gc, fd_grad(lambda x: np_dpo(x, pr, rc, rr, beta, loss_type, eps),
                                         pc), atol=1e-5)
  np.testing.assert_allclose(gr, fd_grad(lambda x: np_dpo(pc, x, rc, rr, beta, loss_type, eps),
                                         pr), atol=1e-5)


def test_dpo_reference_is_constant_and_bad_type_raises():
  """Reference log-probs receive exactly zero gradient; an unknown loss_type is an error
  that lists the valid ones; label smoothing with a loss that ignores it is an error."""
  pc, pr, rc, rr = f32(*random_pairs(1))
  grads = jax.jit(jax.grad(lambda *a: losses.dpo_loss(*a)[0], argnums=(2, 3)))(pc, pr, rc, rr)
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)
  with pytest.raises(ValueError, match="sigmoid"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.dpo_loss(pc, pr, rc, rr, loss_type="ipo", label_smoothing=0.1)


def test_dpo_bf16_jit_vmap():
  """bf16 in, float32 loss and metrics out (value equals the float32 run on the same
  values); vmap over a leading axis of 3 equals a Python loop."""
  pc, pr, rc, rr = random_pairs(2)
  fn = jax.jit(functools.partial(losses.dpo_loss, beta=0.1, label_smoothing=0.1))
  b16 = [jnp.asarray(x, jnp.bfloat16) for x in (pc, pr, rc, rr)]
  loss, metrics = fn(*b16)
  assert loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 and v.shape == () for v in metrics.values())
  np.testing.assert_allclose(loss, fn(*[x.astype(jnp.float32) for x in b16])[0], rtol=1e-6)
  stacked = f32(*[np.stack([x, x * 0.9, x * 1.1]) for x in (pc, pr, rc, rr)])
  batched, bmetrics = jax.jit(jax.vmap(fn))(*stacked)
  for i in range(3):
    one, ometrics = fn(*[x[i] for x in stacked])
    np.testing.assert_allclose(batched[i], one, rtol=1e-6)
    np.testing.assert_allclose(bmetrics["rewards/margin"][i], ometrics["rewards/margin"],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- simpo


def test_simpo_by_hand():
  """beta = 2, gamma = 0.5, c = -0.5, r = -1.0: z = 2 * 0.5 - 0.5 = 0.5;
  loss = -log sigma(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770.
  With eps = 0.1: 0.9 * 0.4740770 + 0.1 * log(1 + e^0.5) = 0.4266693 + 0.0974077 = 0.5240770.
  rewards: chosen 2 * -0.5 = -1, rejected -2, margin 1, accuracy 1.
  Same z as TRL's CPOTrainer simpo: beta * ((c - r) - gamma / beta) = 2 * (0.5 - 0.25)."""
  c, r = jnp.array([-0.5]), jnp.array([-1.0])
  loss, m = jax.jit(losses.simpo_loss)(c, r)  # defaults beta=2.0, gamma=0.5
  np.testing.assert_allclose(loss, 0.4740770, atol=1e-6)
  np.testing.assert_allclose([m["rewards/chosen"], m["rewards/rejected"], m["rewards/margin"],
                              m["rewards/accuracy"]], [-1.0, -2.0, 1.0, 1.0], atol=1e-6)
  smooth = jax.jit(functools.partial(losses.simpo_loss, label_smoothing=0.1))(c, r)[0]
  np.testing.assert_allclose(smooth, 0.5240770, atol=1e-6)


def test_simpo_matches_numpy_values_and_grads():
  rng = np.random.default_rng(3)
  c, r = -rng.uniform(0.1, 3.0, size=6), -rng.uniform(0.1, 3.0, size=6)
  fn = functools.partial(losses.simpo_loss, beta=2.5, gamma=1.2, label_smoothing=0.05)
  (val, _), (gc, gr) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(*f32(c, r))
  np.testing.assert_allclose(val, np_simpo(c, r, 2.5, 1.2, 0.05), rtol=1e-5)
  np.testing.assert_allclose(gc, fd_grad(lambda x: np_simpo(x, r, 2.5, 1.2, 0.05), c), atol=1e-5)
  np.testing.assert_allclose(gr, fd_grad(lambda x: np_simpo(c, x, 2.5, 1.2, 0.05), r), atol=1e-5)


# ----------------------------------------------------------------------------- orpo


def test_orpo_by_hand():
  """c = ln(1/2): odds 0.5/0.5 = 1, log-odds 0. r = ln(1/4): odds 0.25/0.75 = 1/3,
  log-odds -ln3. log odds ratio = 0 - (-ln3) = ln3 = 1.0986123 (the formula:
  (ln0.5 - ln0.25) - (ln0.5 - ln0.75) = ln2 - ln(2/3) = ln3).
  log sigma(ln3) = ln(3/4) = -0.2876821; nll = 2, beta = 0.1:
  loss = 2 + 0.1 * 0.2876821 = 2.0287682."""
  c, r = jnp.array([math.log(0.5)]), jnp.array([math.log(0.25)])
  loss, m = jax.jit(functools.partial(losses.orpo_loss, beta=0.1))(c, r, jnp.float32(2.0))
  np.testing.assert_allclose(loss, 2.0287682, atol=1e-6)
  np.testing.assert_allclose(m["log_odds_chosen"], 1.0986123, atol=1e-6)
  np.testing.assert_allclose(m["log_odds_ratio"], -0.2876821, atol=1e-6)
  np.testing.assert_allclose(m["nll"], 2.0, atol=1e-7)


def test_orpo_matches_numpy_values_and_grads():
  """Random average log-probs including ones close to 0 (probability near 1), where
  log(1 - exp(x)) needs the expm1 branch; gradients w.r.t. c, r and the [B] nll."""
  rng = np.random.default_rng(4)
  c = -np.concatenate([[0.01, 0.05], rng.uniform(0.1, 3.0, size=4)])
  r = -np.concatenate([rng.uniform(0.1, 3.0, size=4), [0.02, 0.3]])
  nll = rng.uniform(0.5, 2.0, size=6)
  fn = functools.partial(losses.orpo_loss, beta=0.25)
  (val, _), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(
      *f32(c, r, nll))
  np.testing.assert_allclose(val, np_orpo(c, r, nll.mean(), 0.25), rtol=1e-5)
  want = [fd_grad(lambda x: np_orpo(x, r, nll.mean(), 0.25), c),
          fd_grad(lambda x: np_orpo(c, x, nll.mean(), 0.25), r),
          np.full(6, 1 / 6)]
  for got, exp in zip(grads, want):
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-5)


def test_simpo_orpo_bf16_vmap():
  rng = np.random.default_rng(5)
  c, r = -rng.uniform(0.1, 2.0, size=(3, 4)), -rng.uniform(0.1, 2.0, size=(3, 4))
  nll = rng.uniform(0.5, 2.0, size=(3,))
  simpo = jax.jit(losses.simpo_loss)
  orpo = jax.jit(losses.orpo_loss)
  assert simpo(*[jnp.asarray(x[0], jnp.bfloat16) for x in (c, r)])[0].dtype == jnp.float32
  assert orpo(*[jnp.asarray(x[0], jnp.bfloat16) for x in (c, r, nll)])[0].dtype == jnp.float32
  cs, rs, ns = f32(c, r, nll)
  np.testing.assert_allclose(jax.jit(jax.vmap(simpo))(cs, rs)[0],
                             [simpo(cs[i], rs[i])[0] for i in range(3)], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(orpo))(cs, rs, ns)[0],
                             [orpo(cs[i], rs[i], ns[i])[0] for i in range(3)], rtol=1e-6)
