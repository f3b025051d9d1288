"""Token log-probabilities and the supervised fine-tuning (cross-entropy) loss.

Every other loss in `jaxtune.losses` starts from per-token log-probabilities of the
target tokens, so they are computed once, here, with one float32 logsumexp over the
vocabulary (never a second float32 softmax). `losses.chunked` computes the same SFT loss
and log-probabilities from the final hidden states and the output projection, one chunk of
tokens at a time, so neither the forward nor the backward pass holds [B*T, V] float32
logits.

Conventions shared by the whole package:
  * masks are [B, T] arrays of 0/1 (bool, int or float; float values act as weights);
    a masked position contributes exactly nothing, values and gradients, even when its
    target id is garbage (e.g. -100 padding) or its logits are huge;
  * means over an empty mask are 0, never NaN (denominators are clamped to >= 1);
  * all arithmetic is float32 whatever the input dtype; hyperparameters are keyword-only
    Python scalars or strings (close over them with functools.partial before jax.jit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(mask * values) in float32, where masked-out values (even NaN/inf) count as 0."""
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), values.shape)
  return jnp.sum(jnp.where(mask != 0, values, 0.0) * mask)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(mask * values) / max(sum(mask), 1): the mean over unmasked entries (0 if none)."""
  values = jnp.asarray(values, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), values.shape)
  return masked_sum(values, mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _check_logits_targets(logits, targets, name="logits"):
  if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
    raise ValueError(
        f"{name} must be [..., V] with leading dims equal to targets' shape; got "
        f"{name} {logits.shape} and targets {targets.shape}")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position: logits[b, t, y] - logsumexp_v logits[b, t, v].

  Args:
    logits: [B, T, V] unnormalised scores, any float dtype (cast to float32 once).
    targets: [B, T] integer token ids. Ids outside [0, V) (e.g. -100 padding) are
      clipped into range and give a finite, meaningless value: mask them downstream.

  Returns:
    [B, T] float32 log-probabilities. The softmax appears only inside the gradient of
    the logsumexp, once.
  """
  _check_logits_targets(logits, targets)
  logits = jnp.asarray(logits, jnp.float32)  # [B, T, V]
  vocab = logits.shape[-1]
  targets = jnp.clip(jnp.asarray(targets, jnp.int32), 0, vocab - 1)  # [B, T]
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
  return picked - lse


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                      average: bool = False) -> jax.Array:
  """Per-sequence log-probability of the masked target tokens.

  sum_t mask[b, t] * log p(targets[b, t]), or, with `average=True`, that sum divided by
  max(sum_t mask[b, t], 1) (the length-normalised log-probability used by IPO as TRL runs
  it, SimPO and ORPO).

  Args:
    logits: [B, T, V], any float dtype.
    targets: [B, T] int ids.
    mask: [B, T] 0/1 (or weights).
    average: divide by the number of unmasked tokens of each sequence.

  Returns:
    [B] float32.
  """
  lp = token_logprobs(logits, targets)  # [B, T]
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), lp.shape)  # [B, T]
  total = jnp.sum(jnp.where(mask != 0, lp, 0.0) * mask, axis=-1)  # [B]
  if average:
    total = total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """The SFT loss: mean over unmasked tokens of -log p(target).

  loss = sum_{b,t} m[b,t] * -log softmax(logits[b,t])[y[b,t]] / max(sum m, 1)
  (maximum-likelihood next-token training; e.g. Radford et al. 2018, Ouyang et al. 2022
  for the instruction-tuning use).

  Args:
    logits: [B, T, V], any float dtype.
    targets: [B, T] int ids (already shifted so that logits[:, t] predicts targets[:, t]).
    mask: [B, T] 0/1 loss mask.

  Returns:
    (loss, {"loss": loss, "tokens": number of unmasked tokens}), float32 scalars.
  """
  lp = token_logprobs(logits, targets)  # [B, T]
  loss = masked_mean(-lp, mask)
  tokens = jnp.sum(jnp.broadcast_to(jnp.asarray(mask, jnp.float32), lp.shape))
  return loss, {"loss": loss, "tokens": tokens}
