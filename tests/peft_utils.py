"""Shared by the PEFT method tests: a few jitted Adam steps over an adapter tree."""

import jax
import optax


def adam_steps(loss_fn, params, base, *, lr: float, steps: int):
  """(trained params, [loss per step]) after `steps` Adam updates of loss_fn(params, base)."""
  opt = optax.adam(lr)

  @jax.jit
  def step(p, s, base):
    loss, g = jax.value_and_grad(loss_fn)(p, base)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  p, s, losses = params, opt.init(params), []
  for _ in range(steps):
    p, s, loss = step(p, s, base)
    losses.append(float(loss))
  return p, losses
