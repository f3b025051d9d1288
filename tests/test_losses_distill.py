"""Tests for jaxtune.losses.distill: forward/reverse KL, generalised JSD, temperature, top-k.

Hand-derived values on two- and three-token vocabularies (arithmetic in the docstrings),
an independent float64 numpy implementation on random inputs for values and gradients
(central finite differences), TRL's JSD edge cases, mask handling, jit/vmap and bf16.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import losses
from tests.numerics import fd_grad

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- numpy refs


def np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_kl(loga, logb):
  return (np.exp(loga) * (loga - logb)).sum(-1)


def np_distill(student, teacher, mask, kind="forward_kl", temperature=1.0, beta=0.5, top_k=0):
  s, t = student / temperature, teacher / temperature
  if top_k:
    ids = np.argsort(-t, axis=-1)[..., :top_k]
    s, t = np.take_along_axis(s, ids, -1), np.take_along_axis(t, ids, -1)
  ls, lt = np_log_softmax(s), np_log_softmax(t)
  if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
    per = np_kl(lt, ls)
  elif kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
    per = np_kl(ls, lt)
  else:
    lm = np.log(beta * np.exp(lt) + (1 - beta) * np.exp(ls))
    per = beta * np_kl(lt, lm) + (1 - beta) * np_kl(ls, lm)
  per = per * temperature**2
  return (per * mask).sum() / max(mask.sum(), 1.0)




def random_logits(seed, b=2, t=3, v=5):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(b, t, v)) * 2
  teacher = rng.normal(size=(b, t, v)) * 2
  mask = np.ones((b, t))
  mask[1, 1:] = 0.0
  return student, teacher, mask


def dl(**kw):
  """jit-compiled distill_loss with fixed hyperparameters."""
  return jax.jit(functools.partial(losses.distill_loss, **kw))


# ----------------------------------------------------------------------------- by hand


@pytest.mark.parametrize("kind,want", [
    ("forward_kl", 0.1438410), ("reverse_kl", 0.1308120), ("jsd", 0.0338221)])
def test_distill_by_hand(kind, want):
  """Student [0, ln3] -> q = [1/4, 3/4]; teacher [0, 0] -> p = [1/2, 1/2].
  forward KL(p||q) = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3) = 0.1438410.
  reverse KL(q||p) = 0.25 ln(0.25/0.5) + 0.75 ln(0.75/0.5) = -0.1732868 + 0.3040988 = 0.1308120.
  JSD, beta = 0.5: m = [3/8, 5/8]; KL(p||m) = 0.5 ln(4/3) + 0.5 ln(4/5) = 0.0322693,
  KL(q||m) = 0.25 ln(2/3) + 0.75 ln(6/5) = -0.1013663 + 0.1367412 = 0.0353749;
  JSD = 0.5 * 0.0322693 + 0.5 * 0.0353749 = 0.0338221.
  A second, masked position holds garbage logits (+-1e4) and changes nothing."""
  student = jnp.array([[[0.0, LN3], [1e4, -1e4]]])
  teacher = jnp.array([[[0.0, 0.0], [-1e4, 1e4]]])
  loss, m = dl(kind=kind)(student, teacher, jnp.array([[1.0, 0.0]]))
  np.testing.assert_allclose(loss, want, atol=1e-6)
  assert float(m["tokens"]) == 1.0


def test_distill_temperature_by_hand():
  """T = 2: student [0, 2 ln3] / 2 = [0, ln3], teacher [0, 0]: KL(p||q) = 0.1438410 as above,
  times T^2 = 4: 0.5753641."""
  loss, _ = dl(temperature=2.0)(jnp.array([[[0.0, 2 * LN3]]]), jnp.zeros((1, 1, 2)),
                                jnp.ones((1, 1)))
  np.testing.assert_allclose(loss, 0.5753641, atol=1e-6)


def test_distill_top_k_by_hand():
  """Teacher [ln2, 0, -5], top_k = 2 keeps ids {0, 1}: p = softmax([ln2, 0]) = [2/3, 1/3].
  Student [0, 0, 7] gathered at {0, 1} is [0, 0] -> q = [1/2, 1/2] (its mass on id 2 is
  not penalised). KL(p||q) = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.1917880 - 0.1351550 = 0.0566330."""
  loss, _ = dl(top_k=2)(jnp.array([[[0.0, 0.0, 7.0]]]),
                        jnp.array([[[math.log(2.0), 0.0, -5.0]]]), jnp.ones((1, 1)))
  np.testing.assert_allclose(loss, 0.0566330, atol=1e-6)


def test_mix_with_ce_by_hand():
  """alpha = 0.25: 0.25 * 2 + 0.75 * 4 = 0.5 + 3 = 3.5."""
  mixed = jax.jit(functools.partial(losses.mix_with_ce, alpha=0.25))(2.0, 4.0)
  np.testing.assert_allclose(mixed, 3.5, atol=1e-7)
  assert mixed.dtype == jnp.float32


# ----------------------------------------------------------------------------- vs numpy


@pytest.mark.parametrize("kw", [
    dict(kind="forward_kl"), dict(kind="reverse_kl", temperature=2.0),
    dict(kind="jsd", beta=0.5), dict(kind="jsd", beta=0.2, temperature=0.7),
    dict(kind="forward_kl", top_k=3), dict(kind="jsd", beta=0.7, top_k=2, temperature=1.5)],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_distill_matches_numpy_values_and_grads(kw):
  """Random logits with one fully masked row (zero gradient there)."""
  student, teacher, mask = random_logits(sum(map(ord, str(kw))))
  (val, _), grad = jax.jit(jax.value_and_grad(
      functools.partial(losses.distill_loss, **kw), has_aux=True))(
          *[jnp.asarray(x, jnp.float32) for x in (student, teacher, mask)])
  np.testing.assert_allclose(val, np_distill(student, teacher, mask, **kw), rtol=1e-5)
  want = fd_grad(lambda x: np_distill(x, teacher, mask, **kw), student)
  np.testing.assert_allclose(grad, want, atol=1e-5)
  assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_jsd_edges_follow_trl_and_teacher_is_constant():
  """TRL's GKD convention: jsd with beta = 0 is exactly forward KL(teacher||student) and
  beta = 1 exactly reverse KL(student||teacher). The teacher gets zero gradient."""
  student, teacher, mask = [jnp.asarray(x, jnp.float32) for x in random_logits(1)]
  fwd, rev = dl(kind="forward_kl")(student, teacher, mask)[0], dl(kind="reverse_kl")(
      student, teacher, mask)[0]
  np.testing.assert_allclose(dl(kind="jsd", beta=0.0)(student, teacher, mask)[0], fwd, rtol=1e-6)
  np.testing.assert_allclose(dl(kind="jsd", beta=1.0)(student, teacher, mask)[0], rev, rtol=1e-6)
  assert abs(float(fwd) - float(rev)) > 1e-3  # the two edges really differ
  g_teacher = jax.jit(jax.grad(lambda t: losses.distill_loss(student, t, mask, kind="jsd")[0]))(
      teacher)
  assert np.all(np.asarray(g_teacher) == 0.0)


def test_top_k_full_vocab_equals_full():
  student, teacher, mask = [jnp.asarray(x, jnp.float32) for x in random_logits(2)]
  np.testing.assert_allclose(dl(kind="jsd", top_k=5)(student, teacher, mask)[0],
                             dl(kind="jsd")(student, teacher, mask)[0], rtol=1e-6)


# ----------------------------------------------------------------------------- precomputed top-k


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_precomputed_topk_equals_online_topk(kind):
  """Teacher top-3 log-probs (log_softmax at T = 1) and ids, as stored offline, give the
  same value and student gradient as distill_loss(top_k=3) at T = 2 (the per-position
  log-normaliser cancels when renormalising over the k ids)."""
  student, teacher, mask = [jnp.asarray(x, jnp.float32) for x in random_logits(3, v=6)]
  top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(teacher, axis=-1), 3)
  online = lambda s: losses.distill_loss(s, teacher, mask, kind=kind, temperature=2.0, top_k=3)
  offline = lambda s: losses.distill_loss_with_teacher_topk(
      s, top_lp, top_ids, mask, temperature=2.0, kind=kind)
  (v1, _), g1 = jax.jit(jax.value_and_grad(online, has_aux=True))(student)
  (v2, _), g2 = jax.jit(jax.value_and_grad(offline, has_aux=True))(student)
  np.testing.assert_allclose(v2, v1, rtol=1e-5)
  np.testing.assert_allclose(g2, g1, atol=1e-6)
  want = np_distill(np.asarray(student, np.float64), np.asarray(teacher, np.float64),
                    np.asarray(mask), kind=kind, temperature=2.0, top_k=3)
  np.testing.assert_allclose(v2, want, rtol=1e-5)


def test_precomputed_topk_minus_inf_entries_are_ignored():
  """A stored -inf log-prob (fewer than K candidates) is padding, dropped from both the
  teacher and the student support: with K = 3 and the third entry -inf (its id pointing
  anywhere), every kind equals the K = 2 loss, values and student gradients."""
  student, teacher, mask = [jnp.asarray(x, jnp.float32) for x in random_logits(4)]
  top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(teacher, axis=-1), 3)
  padded_lp = top_lp.at[..., 2].set(-jnp.inf)
  padded_ids = top_ids.at[..., 2].set(0)

  @jax.jit
  def all_kinds(s, lp, ids):  # values and student gradients of the three kinds, one compile
    out = []
    for kind in ("forward_kl", "reverse_kl", "jsd"):
      fn = lambda s: losses.distill_loss_with_teacher_topk(s, lp, ids, mask, kind=kind)[0]
      out.append(jax.value_and_grad(fn)(s))
    return out

  for (v3, g3), (v2, g2) in zip(all_kinds(student, padded_lp, padded_ids),
                                all_kinds(student, top_lp[..., :2], top_ids[..., :2])):
    np.testing.assert_allclose(v3, v2, rtol=1e-5)
    np.testing.assert_allclose(g3, g2, atol=1e-6)


# ----------------------------------------------------------------------------- dtypes, vmap


def test_distill_bf16_and_vmap():
  """bf16 logits -> float32 loss equal to the numpy value on the bf16-rounded inputs; vmap
  over a leading axis of 3 equals a loop."""
  student, teacher, mask = random_logits(5)
  s16, t16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  fn = dl(kind="jsd", beta=0.3, temperature=1.5)
  loss, metrics = fn(s16, t16, jnp.asarray(mask))
  assert loss.dtype == jnp.float32 and metrics["tokens"].dtype == jnp.float32
  want = np_distill(np.asarray(s16, np.float64), np.asarray(t16, np.float64), mask, kind="jsd",
                    beta=0.3, temperature=1.5)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  ss = jnp.asarray(np.stack([student, student * 0.5, -student]), jnp.float32)
  tt = jnp.asarray(np.stack([teacher] * 3), jnp.float32)
  mm = jnp.asarray(np.stack([mask] * 3), jnp.float32)
  batched, _ = jax.jit(jax.vmap(fn))(ss, tt, mm)
  np.testing.assert_allclose(batched, [fn(ss[i], tt[i], mm[i])[0] for i in range(3)], rtol=1e-6)
