"""The sampler's inverse-CDF draw (`sampling.select.draw`) against numpy's searchsorted over
the cumulative softmax, an independent reference, and its edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxtune.sampling import select


def _numpy_draw(f: np.ndarray, u: np.ndarray):
  p = np.exp(f - f.max(-1, keepdims=True))
  cdf = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
  return np.array([np.searchsorted(c, x, side="right") for c, x in zip(cdf, u)]), cdf


@pytest.mark.parametrize("vocab", [1000, 1024 * 3, 4099])  # 4099: prime, padded blocks
def test_draw_is_the_inverse_cdf(vocab):
  rng = np.random.default_rng(vocab)
  f = (rng.normal(size=(64, vocab)) * 2.5).astype(np.float32)
  f[:, rng.integers(0, vocab, 50)] = -np.inf  # excluded entries
  u = rng.uniform(size=64).astype(np.float32)
  greedy, got, lse = jax.jit(select.draw)(jnp.asarray(f), jnp.asarray(u))
  want, cdf = _numpy_draw(f.astype(np.float64), u.astype(np.float64))
  got = np.asarray(got)
  for r in np.flatnonzero(got != want):  # only where u sits on a boundary (float rounding)
    assert abs(int(got[r]) - int(want[r])) == 1
    assert abs(cdf[r, min(got[r], want[r])] - u[r]) < 1e-5
  assert np.mean(got == want) >= 0.95
  assert np.all(np.isfinite(f[np.arange(64), got]))
  np.testing.assert_array_equal(np.asarray(greedy), f.argmax(-1))
  finite = np.where(np.isfinite(f), f, -np.inf).astype(np.float64)
  np.testing.assert_allclose(np.asarray(lse), np.log(np.exp(finite).sum(-1)), rtol=1e-5)


def test_draw_frequencies_match_the_softmax():
  """20000 draws from one 37-entry distribution (padded to a block): chi-square."""
  rng = np.random.default_rng(0)
  f = rng.normal(size=37).astype(np.float32)
  u = jax.random.uniform(jax.random.PRNGKey(0), (20000,))
  _, tok, _ = jax.jit(select.draw)(jnp.broadcast_to(jnp.asarray(f), (20000, 37)), u)
  obs = np.bincount(np.asarray(tok), minlength=37)
  p = np.exp(f.astype(np.float64) - f.max())
  assert scipy.stats.chisquare(obs, 20000 * p / p.sum()).pvalue > 1e-3


def test_draw_never_picks_an_excluded_entry_at_the_top_of_the_range():
  """u just below 1 with the last entries excluded: a rounding overshoot lands on the last
  entry with mass, never on an excluded one or past the vocabulary."""
  f = np.full((3, 300), -np.inf, np.float32)
  f[0, :10] = 0.0
  f[1, [3, 150]] = [1.0, 2.0]
  f[2, 299] = 5.0
  u = jnp.full((3,), np.nextafter(np.float32(1), np.float32(0)))
  _, tok, _ = select.draw(jnp.asarray(f), u)
  assert np.asarray(tok).tolist() == [9, 150, 299]


def test_draw_never_picks_an_excluded_entry_at_block_boundaries():
  """A few kept entries, none at a block start, and u stepped a few float32 ulps around
  every cumulative boundary: the float32 block sums and cumulative sums differ in rounding,
  which once left the in-block target slightly negative and returned the block's first
  (excluded) entry."""
  v = 32768
  rng = np.random.default_rng(1)
  keep = np.sort(rng.choice([i for i in range(v) if i % 1024], 60, replace=False))
  f = np.full(v, -np.inf, np.float32)
  f[keep] = rng.normal(size=60).astype(np.float32)
  p = np.exp(f.astype(np.float64) - f.max())
  bounds = np.cumsum(p[keep] / p.sum())
  us = []
  for b in bounds[:-1]:
    x = np.float32(b)
    for _ in range(12):
      x = np.nextafter(x, np.float32(0))
    for _ in range(24):
      us.append(x)
      x = np.nextafter(x, np.float32(1))
  u = jnp.asarray(np.array(us, np.float32))
  _, tok, _ = jax.jit(select.draw)(jnp.broadcast_to(jnp.asarray(f), (len(us), v)), u)
  assert np.all(np.isin(np.asarray(tok), keep))
