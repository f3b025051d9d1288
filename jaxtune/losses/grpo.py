"""Group-relative policy optimisation: group advantages and the clipped surrogate loss.

GRPO samples a group of completions per prompt, scores them, and uses each reward's
standing within its group as the advantage of every token of that completion; the policy
is updated with a PPO-style clipped importance ratio and, optionally, a KL penalty to a
reference model. The variants that matter in practice (DAPO's asymmetric clip and token
mean, Dr. GRPO's constant normaliser and no std division) are options here, not copies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtune.losses import sft

_KL_ESTIMATORS = ("k1", "k3")
_LOSS_AGGS = ("token_mean", "seq_mean", "dr_grpo")


def group_advantages(rewards: jax.Array, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-4) -> jax.Array:
  """Advantage of each completion relative to the other completions of its prompt.

  A_i = (r_i - mean_g(r)) / (std_g(r) + eps) (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2,
  outcome supervision), or A_i = r_i - mean_g(r) with `normalize_std=False` (Liu et al.
  2025, Dr. GRPO, which drops the std to remove the question-difficulty bias).
  std_g is the UNBIASED sample std (divides by G - 1), as TRL's GRPOTrainer computes it
  (torch.std); a group with equal rewards gets advantage 0.

  Args:
    rewards: [N] float, N = num_prompts * group_size, each group's G rewards consecutive.
    group_size: G (>= 2 when normalize_std, since the sample std needs two samples).
    normalize_std: divide by the group std.
    eps: added to the std.

  Returns:
    [N] float32 advantages (no gradient to the rewards).
  """
  rewards = jax.lax.stop_gradient(jnp.asarray(rewards, jnp.float32))
  if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards must be [N] with N divisible by group_size; got "
                     f"{rewards.shape} and group_size={group_size}")
  if normalize_std and group_size < 2:
    raise ValueError("normalize_std=True needs group_size >= 2 (sample std of one reward)")
  grouped = rewards.reshape(-1, group_size)  # [P, G]
  centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)  # [P, G]
  if normalize_std:
    centred = centred / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
  return centred.reshape(-1)


def grpo_loss(logps: jax.Array, old_logps: jax.Array, ref_logps, advantages: jax.Array,
              mask: jax.Array, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
              beta: float = 0.04, kl_estimator: str = "k3", loss_agg: str = "token_mean",
              max_tokens: int | None = None):
  """Clipped-surrogate policy loss with an optional per-token KL penalty.

  Per token (Shao et al. 2024, DeepSeekMath, Sec. 4.1; Schulman et al. 2017, PPO):
    ratio     = exp(logp - old_logp)
    surrogate = min(ratio A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) A)
                (asymmetric "clip-higher", Yu et al. 2025, DAPO; equal epsilons = PPO)
    kl        = k1: logp - ref_logp, or
                k3: exp(ref_logp - logp) - (ref_logp - logp) - 1 (unbiased, >= 0)
                (Schulman 2020, "Approximating KL divergence"; GRPO uses k3)
    loss_tok  = -(surrogate - beta kl)
  Aggregation over the [B, T] masked tokens (`loss_agg`):
    token_mean: sum(m loss_tok) / sum(m)  -- every token weighs the same (DAPO, Sec. 3.3;
                TRL's "bnpo").
    seq_mean:   mean_b[sum_t(m loss_tok) / sum_t(m)]  -- original GRPO (TRL's "grpo").
    dr_grpo:    sum(m loss_tok) / (B * max_tokens)  -- constant normaliser, no length
                bias (Liu et al. 2025, Dr. GRPO); max_tokens defaults to T.
  Denominators are clamped to >= 1. old_logps and ref_logps are constants
  (`lax.stop_gradient`); with old_logps == logps (one update per batch) ratio = 1 and the
  gradient is the plain policy gradient.

  Args:
    logps: [B, T] current-policy log-probs of the sampled tokens (gradients flow here).
    old_logps: [B, T] log-probs under the sampling policy.
    ref_logps: [B, T] reference log-probs, or None when beta == 0.
    advantages: [B] per-sequence (broadcast over tokens) or [B, T] per-token.
    mask: [B, T] 0/1 completion mask.
    epsilon_low, epsilon_high: clip range [1 - epsilon_low, 1 + epsilon_high].
    beta: KL coefficient (0 disables the penalty).
    kl_estimator: "k1" | "k3".
    loss_agg: "token_mean" | "seq_mean" | "dr_grpo".
    max_tokens: dr_grpo normaliser (the generation budget); default T.

  Returns:
    (loss, metrics): "loss", "kl" (masked mean of the per-token estimator; 0 when
    ref_logps is None), "ratio" (masked mean ratio), "clip_ratio/low" (fraction of tokens
    with ratio < 1 - epsilon_low and A < 0, where the clip binds), "clip_ratio/high"
    (ratio > 1 + epsilon_high and A > 0), "clip_ratio/region" (either).
  """
  if kl_estimator not in _KL_ESTIMATORS:
    raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected one of {_KL_ESTIMATORS}")
  if loss_agg not in _LOSS_AGGS:
    raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {_LOSS_AGGS}")
  if ref_logps is None and beta != 0:
    raise ValueError(f"ref_logps is None but beta={beta}; pass ref_logps or set beta=0")
  shapes = {"logps": logps.shape, "old_logps": old_logps.shape, "mask": jnp.shape(mask)}
  if ref_logps is not None:
    shapes["ref_logps"] = ref_logps.shape
  if logps.ndim != 2 or len(set(shapes.values())) != 1:
    raise ValueError(f"logps, old_logps, ref_logps and mask must all be [B, T]; got {shapes}")
  b, t = logps.shape
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
  if adv.shape == (b,):
    adv = adv[:, None]  # [B, 1]
  elif adv.shape != (b, t):
    raise ValueError(f"advantages must be [B]={b} or [B, T]={(b, t)}; got {adv.shape}")

  m = jnp.asarray(mask, jnp.float32)  # [B, T]
  # Zero the masked positions first: padding may hold garbage (exp overflow), and a
  # select passes exactly-zero gradients without multiplying through inf.
  live = m != 0
  logps = jnp.where(live, jnp.asarray(logps, jnp.float32), 0.0)  # [B, T]
  old = jax.lax.stop_gradient(jnp.where(live, jnp.asarray(old_logps, jnp.float32), 0.0))
  ratio = jnp.exp(logps - old)  # [B, T]
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)  # [B, T]
  surrogate = jnp.minimum(ratio * adv, clipped * adv)  # [B, T]
  per_token = -surrogate

  if ref_logps is not None:
    ref = jax.lax.stop_gradient(jnp.where(live, jnp.asarray(ref_logps, jnp.float32), 0.0))
    if kl_estimator == "k1":
      kl = logps - ref
    else:
      d = ref - logps
      kl = jnp.exp(d) - d - 1.0
    if beta != 0:
      per_token = per_token + beta * kl
    kl_mean = sft.masked_mean(jax.lax.stop_gradient(kl), m)
  else:
    kl_mean = jnp.zeros((), jnp.float32)

  if loss_agg == "token_mean":
    loss = sft.masked_mean(per_token, m)
  elif loss_agg == "seq_mean":
    per_seq = jnp.sum(jnp.where(m != 0, per_token, 0.0) * m, axis=-1)  # [B]
    loss = jnp.mean(per_seq / jnp.maximum(jnp.sum(m, axis=-1), 1.0))
  else:  # dr_grpo
    norm = t if max_tokens is None else max_tokens
    loss = sft.masked_sum(per_token, m) / (b * norm)

  ratio_ng = jax.lax.stop_gradient(ratio)
  low = ((ratio_ng < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)  # [B, T]
  high = ((ratio_ng > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)  # [B, T]
  metrics = {
      "loss": loss,
      "kl": kl_mean,
      "ratio": sft.masked_mean(ratio_ng, m),
      "clip_ratio/low": sft.masked_mean(low, m),
      "clip_ratio/high": sft.masked_mean(high, m),
      "clip_ratio/region": sft.masked_mean(jnp.maximum(low, high), m),
  }
  return loss, metrics
