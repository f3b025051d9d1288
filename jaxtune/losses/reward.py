"""Bradley-Terry loss for training a scalar reward model on preference pairs.

A reward model scores the chosen and the rejected completion of each pair; the loss is
the negative log-likelihood of the observed preference under the Bradley-Terry model.
Separate from `dpo.py` because its inputs are free scalar scores, not log-probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reward_loss(chosen_scores: jax.Array, rejected_scores: jax.Array, *, margin=None):
  """Bradley-Terry pairwise loss: mean(-log sigma(s_c - s_r - margin)).

  P(chosen > rejected) = sigma(s_c - s_r) (Bradley & Terry 1952), used for RLHF reward
  models by Ouyang et al. 2022 (InstructGPT, Eq. 1); the optional margin follows Touvron
  et al. 2023 (Llama 2, Eq. 2: a larger required gap for more clearly preferred pairs).

  Args:
    chosen_scores, rejected_scores: [B] scalar rewards (any float dtype).
    margin: None, a scalar or a [B] array of required score gaps (treated as data).

  Returns:
    (loss, metrics): "loss", "accuracy" (fraction with s_c > s_r) and "margin" (mean of
    s_c - s_r), float32 scalars.
  """
  if jnp.shape(chosen_scores) != jnp.shape(rejected_scores):
    raise ValueError(f"chosen_scores {jnp.shape(chosen_scores)} and rejected_scores "
                     f"{jnp.shape(rejected_scores)} must have the same shape")
  c = jnp.asarray(chosen_scores, jnp.float32)  # [B]
  r = jnp.asarray(rejected_scores, jnp.float32)  # [B]
  diff = c - r  # [B]
  z = diff if margin is None else diff - jax.lax.stop_gradient(jnp.asarray(margin, jnp.float32))
  loss = jnp.mean(-jax.nn.log_sigmoid(z))
  diff = jax.lax.stop_gradient(diff)
  return loss, {
      "loss": loss,
      "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
      "margin": jnp.mean(diff),
  }
