"""Shared numerical helpers for the loss tests (independent of the library)."""

import jax.numpy as jnp
import numpy as np


def fd_grad(f, x, h=1e-6):
  """Central finite differences of a float64 scalar function f at x."""
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    g[i] = (f(xp) - f(xm)) / (2 * h)
  return g


def f32(*xs):
  """float32 jax arrays of numpy inputs (None stays None)."""
  return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def jaxpr_eqns(closed_jaxpr):
  """Every equation of a (closed) jaxpr, those of its sub-jaxprs (scan, checkpoint, pjit,
  custom VJP) included, depth first."""
  import jax.extend  # pylint: disable=g-import-not-at-top

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      yield eqn
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from walk(sub)

  yield from walk(closed_jaxpr.jaxpr)
