"""Pairwise preference losses: DPO and its variants (cDPO, IPO, SLiC hinge, rDPO), SimPO, ORPO.

They share one shape: per-example sequence log-probabilities of a chosen and a rejected
completion ([B] arrays, from `losses.sequence_logprobs`) go in, a batch-mean loss and
reward metrics come out. Reference-model log-probabilities are constants of the step, so
they pass through `lax.stop_gradient`. Everything is float32 whatever the input dtype.

Notation: c, r are the policy log-probs of chosen/rejected, c0, r0 the reference ones,
h = (c - c0) - (r - r0) the log-ratio difference, sigma the logistic function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _check_same_shape(**arrays):
  shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"inputs must share one shape [B]; got {shapes}")


def _reward_metrics(chosen_rewards, rejected_rewards):
  """rewards/{chosen,rejected,accuracy,margin} from [B] implicit rewards (no gradient)."""
  chosen_rewards = jax.lax.stop_gradient(chosen_rewards)
  rejected_rewards = jax.lax.stop_gradient(rejected_rewards)
  return {
      "rewards/chosen": jnp.mean(chosen_rewards),
      "rewards/rejected": jnp.mean(rejected_rewards),
      "rewards/accuracy": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
      "rewards/margin": jnp.mean(chosen_rewards - rejected_rewards),
  }


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0):
  """DPO-family loss on sequence log-probs, mean over the batch.

  With h = (c - c0) - (r - r0) per example and eps = label_smoothing:
    sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
             (Rafailov et al. 2023, DPO, Eq. 7; eps > 0 is conservative DPO, Mitchell 2023
             "A note on DPO with noisy preferences" (cDPO)).
    ipo:     (h - 1 / (2 beta))^2  (Azar et al. 2023, IPO, Eq. 17, beta = their tau).
             Like TRL's DPOTrainer, h is NOT multiplied by beta, and TRL feeds IPO
             length-AVERAGED log-probs (sum / #tokens). Pass
             `sequence_logprobs(..., average=True)` to match TRL; summed log-probs give
             the paper's literal formula, whose scale grows with sequence length.
    hinge:   relu(1 - beta h)  (Zhao et al. 2023, SLiC-HF, with the DPO log-ratio).
    robust:  ((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)
             (Chowdhury et al. 2024, rDPO, an unbiased loss under label-flip rate eps;
             requires eps < 1/2).

  Args:
    policy_chosen, policy_rejected: [B] policy log-probs (gradients flow here).
    ref_chosen, ref_rejected: [B] reference log-probs (treated as constants).
    beta: inverse temperature / KL strength (> 0).
    loss_type: "sigmoid" | "ipo" | "hinge" | "robust".
    label_smoothing: eps, the assumed preference-label noise (sigmoid and robust only).

  Returns:
    (loss, metrics) with metrics "loss", "rewards/chosen" (mean beta (c - c0)),
    "rewards/rejected" (mean beta (r - r0)), "rewards/accuracy" (fraction with chosen
    reward > rejected reward), "rewards/margin" (mean of their difference).
  """
  if loss_type not in _DPO_LOSS_TYPES:
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {_DPO_LOSS_TYPES}")
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  if loss_type in ("ipo", "hinge") and label_smoothing != 0.0:
    raise ValueError(f"label_smoothing applies to 'sigmoid' and 'robust' only, got "
                     f"{label_smoothing} with loss_type={loss_type!r}")
  if not 0.0 <= label_smoothing < (0.5 if loss_type == "robust" else 1.0):
    raise ValueError(f"label_smoothing={label_smoothing} out of range for {loss_type!r}")
  _check_same_shape(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                    ref_chosen=ref_chosen, ref_rejected=ref_rejected)
  c, r = _f32(policy_chosen), _f32(policy_rejected)  # [B]
  c0 = jax.lax.stop_gradient(_f32(ref_chosen))  # [B]
  r0 = jax.lax.stop_gradient(_f32(ref_rejected))  # [B]
  chosen_logratio = c - c0  # [B]
  rejected_logratio = r - r0  # [B]
  h = chosen_logratio - rejected_logratio  # [B]
  eps = label_smoothing
  if loss_type == "sigmoid":
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
  elif loss_type == "ipo":
    losses = (h - 1.0 / (2.0 * beta)) ** 2
  elif loss_type == "hinge":
    losses = jax.nn.relu(1.0 - beta * h)
  else:  # robust
    losses = ((1.0 - eps) * -jax.nn.log_sigmoid(beta * h)
              + eps * jax.nn.log_sigmoid(-beta * h)) / (1.0 - 2.0 * eps)
  loss = jnp.mean(losses)
  metrics = {"loss": loss}
  metrics.update(_reward_metrics(beta * chosen_logratio, beta * rejected_logratio))
  return loss, metrics


def simpo_loss(policy_chosen_avg: jax.Array, policy_rejected_avg: jax.Array, *,
               beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0):
  """SimPO: reference-free, length-normalised DPO with a target reward margin.

  z = beta (c - r) - gamma, loss = mean(-(1 - eps) log sigma(z) - eps log sigma(-z))
  (Meng et al. 2024, SimPO). c, r are length-AVERAGED log-probs
  (`sequence_logprobs(..., average=True)`); the implicit reward is beta * c.

  gamma is the ABSOLUTE reward margin (the paper's gamma, subtracted after scaling by
  beta), as in TRL's CPOTrainer(loss_type="simpo"): there `simpo_gamma` is divided by
  beta before the log-ratio is scaled by beta, which is the same z. The SimPO repository's
  later `gamma_beta_ratio` knob is gamma / beta: pass gamma = beta * gamma_beta_ratio.

  Args:
    policy_chosen_avg, policy_rejected_avg: [B] average per-token log-probs.
    beta: reward scale (paper: 2.0 to 2.5).
    gamma: target reward margin (paper: 0.5 to 1.6).
    label_smoothing: eps, as in cDPO.

  Returns:
    (loss, metrics): "loss" and rewards/{chosen,rejected,accuracy,margin} with reward
    beta * (average log-prob).
  """
  _check_same_shape(policy_chosen_avg=policy_chosen_avg,
                    policy_rejected_avg=policy_rejected_avg)
  c, r = _f32(policy_chosen_avg), _f32(policy_rejected_avg)  # [B]
  z = beta * (c - r) - gamma  # [B]
  eps = label_smoothing
  losses = -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
  loss = jnp.mean(losses)
  metrics = {"loss": loss}
  metrics.update(_reward_metrics(beta * c, beta * r))
  return loss, metrics


def _log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012), NaN-free grads."""
  small = x < -math.log(2.0)
  x_small = jnp.where(small, x, -1.0)
  x_large = jnp.where(small, -1.0, x)
  return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_large)))


def orpo_loss(policy_chosen_avg: jax.Array, policy_rejected_avg: jax.Array,
              chosen_nll: jax.Array, *, beta: float = 0.1):
  """ORPO: SFT negative log-likelihood plus an odds-ratio preference penalty.

  With c, r the length-AVERAGED log-probs (so exp(c) is a per-token probability < 1):
    log_odds = (c - r) - (log(1 - exp(c)) - log(1 - exp(r)))
    loss = mean(chosen_nll) + beta * mean(-log sigma(log_odds))
  (Hong et al. 2024, ORPO; beta is their lambda; TRL's ORPOTrainer uses the
  same formula with `beta` as the name). log(1 - exp(x)) is computed stably.

  Args:
    policy_chosen_avg, policy_rejected_avg: [B] average per-token log-probs (< 0).
    chosen_nll: the SFT loss on the chosen completions: a scalar or [B] (averaged here).
      TRL's ORPOTrainer passes the scalar mean NLL over every token of the batch's chosen
      sequences, prompt included (so longer answers weigh more than in a mean of
      per-sequence means); `jaxtune.methods.dpo` computes that by default
      (dpo.orpo_nll=token, see `methods.dpo.orpo_token_nll`).
    beta: weight of the odds-ratio term.

  Returns:
    (loss, metrics): "loss", "nll", "log_odds_ratio" (mean log sigma(log_odds)),
    "log_odds_chosen" (mean log_odds) and rewards/{chosen,rejected,accuracy,margin} with
    reward beta * (average log-prob).
  """
  _check_same_shape(policy_chosen_avg=policy_chosen_avg,
                    policy_rejected_avg=policy_rejected_avg)
  c, r = _f32(policy_chosen_avg), _f32(policy_rejected_avg)  # [B]
  log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))  # [B]
  log_sig = jax.nn.log_sigmoid(log_odds)  # [B]
  nll = jnp.mean(_f32(chosen_nll))
  loss = nll - beta * jnp.mean(log_sig)
  metrics = {
      "loss": loss,
      "nll": jax.lax.stop_gradient(nll),
      "log_odds_ratio": jax.lax.stop_gradient(jnp.mean(log_sig)),
      "log_odds_chosen": jax.lax.stop_gradient(jnp.mean(log_odds)),
  }
  metrics.update(_reward_metrics(beta * c, beta * r))
  return loss, metrics
