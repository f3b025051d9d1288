"""Token-level teacher-student distillation losses: forward KL, reverse KL, generalised JSD.

The student matches the teacher's next-token distribution at every unmasked position.
The teacher may arrive as full logits (a frozen model run in the same step) or as its
top-k log-probabilities and token ids precomputed offline and read from a file. The
teacher is a constant of the step (`lax.stop_gradient`). All maths in float32.

Notation: p = teacher distribution, q = student distribution at one position, both after
dividing the logits by the temperature T; KL(a||b) = sum_v a_v (log a_v - log b_v).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxtune.losses import sft

_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _kl(logp, logq):
  """KL(p||q) over the last axis from log-probs; terms with p == 0 count as 0. [..., V] -> [...]"""
  p = jnp.exp(logp)
  pos = p > 0
  logp_safe = jnp.where(pos, logp, 0.0)
  logq_safe = jnp.where(pos, logq, 0.0)
  return jnp.sum(jnp.where(pos, p * (logp_safe - logq_safe), 0.0), axis=-1)


def _divergence(student_logp, teacher_logp, kind, beta):
  """Per-position divergence [...] from log-probs [..., V] (see `distill_loss`)."""
  if kind == "forward_kl":
    return _kl(teacher_logp, student_logp)
  if kind == "reverse_kl":
    return _kl(student_logp, teacher_logp)
  # Generalised JSD with TRL GKDTrainer's edge cases: beta = 0 / 1 are the forward /
  # reverse KL themselves (the limits of JSD_beta / beta and JSD_beta / (1 - beta)).
  if beta == 0.0:
    return _kl(teacher_logp, student_logp)
  if beta == 1.0:
    return _kl(student_logp, teacher_logp)
  log_m = jnp.logaddexp(teacher_logp + math.log(beta),
                        student_logp + math.log1p(-beta))  # [..., V]
  return beta * _kl(teacher_logp, log_m) + (1.0 - beta) * _kl(student_logp, log_m)


def _check_hparams(kind, temperature, beta):
  if kind not in _KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {_KINDS}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta must be in [0, 1], got {beta}")


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array, *,
                 kind: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                 top_k: int = 0):
  """Masked token mean of T^2 D(p, q); p = softmax(teacher / T), q = softmax(student / T).

  D by `kind`:
    forward_kl: KL(p||q), the classic distillation loss (Hinton et al. 2015), mode-covering.
    reverse_kl: KL(q||p), mode-seeking (e.g. Gu et al. 2024, MiniLLM).
    jsd:        generalised JSD (Agarwal et al. 2024, GKD, Eq. 1, as in TRL's
                GKDTrainer.generalized_jsd_loss): m = beta p + (1 - beta) q,
                JSD_beta = beta KL(p||m) + (1 - beta) KL(q||m). Edge cases as in TRL:
                beta = 0 gives exactly KL(p||q) (forward) and beta = 1 exactly KL(q||p)
                (reverse); strictly between, JSD_beta itself (which tends to 0 at the
                ends: it is ~ beta KL(p||q) near 0 and ~ (1 - beta) KL(q||p) near 1).
  The T^2 factor keeps gradient magnitudes independent of T (Hinton et al. 2015, Sec. 2).
  (TRL's GKD divides by T but does not multiply by T^2: identical at T = 1.)

  top_k > 0 keeps only the teacher's k largest logits at each position: p is renormalised
  over those k ids, and the student's logits are gathered at the same ids and
  renormalised over them too (both are distributions on the same k-point support, so every
  kind stays a proper divergence, >= 0 and 0 iff the student matches the teacher's
  top-k shape; the student's mass outside the top-k is not penalised).

  Args:
    student_logits: [B, T, V], any float dtype (gradients flow here).
    teacher_logits: [B, T, V], any float dtype (constant).
    mask: [B, T] 0/1 loss mask.
    kind: "forward_kl" | "reverse_kl" | "jsd".
    temperature: T > 0.
    beta: JSD mixture weight of the teacher, in [0, 1] (jsd only).
    top_k: 0 for the full vocabulary, else k in [1, V].

  Returns:
    (loss, {"loss", "tokens"}), float32 scalars.
  """
  _check_hparams(kind, temperature, beta)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"student_logits {student_logits.shape} and teacher_logits "
                     f"{teacher_logits.shape} must have the same [B, T, V] shape")
  vocab = student_logits.shape[-1]
  if not 0 <= top_k <= vocab:
    raise ValueError(f"top_k must be in [0, V={vocab}], got {top_k}")
  s = jnp.asarray(student_logits, jnp.float32) / temperature  # [B, T, V]
  t = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32)) / temperature
  if top_k:
    t, ids = jax.lax.top_k(t, top_k)  # [B, T, K], [B, T, K]
    s = jnp.take_along_axis(s, ids, axis=-1)  # [B, T, K]
  per_token = _divergence(jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1),
                          kind, beta) * temperature**2  # [B, T]
  loss = sft.masked_mean(per_token, mask)
  tokens = jnp.sum(jnp.broadcast_to(jnp.asarray(mask, jnp.float32), per_token.shape))
  return loss, {"loss": loss, "tokens": tokens}


def distill_loss_with_teacher_topk(student_logits: jax.Array, teacher_topk_logprobs: jax.Array,
                                   teacher_topk_ids: jax.Array, mask: jax.Array, *,
                                   temperature: float = 1.0, kind: str = "forward_kl",
                                   beta: float = 0.5):
  """`distill_loss(..., top_k=K)` from a teacher's precomputed top-K log-probs and ids.

  p = softmax(teacher_topk_logprobs / T) over the K stored ids (a log-prob differs from
  the logit by a per-position constant, so this equals the top-K of softmax(logits / T)
  renormalised); q = softmax(student_logits[..., ids] / T) over the same ids. Loss =
  masked mean over tokens of T^2 * D(p, q), D as in `distill_loss` (Hinton et al. 2015;
  Agarwal et al. 2024 for jsd). Stored entries of -inf (fewer than K candidates) are
  padding: they are removed from both distributions (their ids may be anything in range).

  Args:
    student_logits: [B, T, V], any float dtype.
    teacher_topk_logprobs: [B, T, K] teacher log-probabilities at temperature 1.
    teacher_topk_ids: [B, T, K] int token ids in [0, V).
    mask: [B, T] 0/1 loss mask.
    temperature, kind, beta: as in `distill_loss`.

  Returns:
    (loss, {"loss", "tokens"}), float32 scalars.
  """
  _check_hparams(kind, temperature, beta)
  if (teacher_topk_logprobs.shape != teacher_topk_ids.shape
      or teacher_topk_logprobs.shape[:-1] != student_logits.shape[:-1]):
    raise ValueError(
        f"expected student_logits [B, T, V] and teacher top-k logprobs/ids [B, T, K]; got "
        f"{student_logits.shape}, {teacher_topk_logprobs.shape}, {teacher_topk_ids.shape}")
  vocab = student_logits.shape[-1]
  ids = jnp.clip(jnp.asarray(teacher_topk_ids, jnp.int32), 0, vocab - 1)  # [B, T, K]
  s = jnp.take_along_axis(jnp.asarray(student_logits, jnp.float32), ids, axis=-1)
  t = jax.lax.stop_gradient(jnp.asarray(teacher_topk_logprobs, jnp.float32))  # [B, T, K]
  # -inf teacher entries are padding: drop them from the student's support as well.
  s = jnp.where(t > -jnp.inf, s / temperature, -1e30)  # [B, T, K]
  per_token = _divergence(jax.nn.log_softmax(s, axis=-1),
                          jax.nn.log_softmax(t / temperature, axis=-1),
                          kind, beta) * temperature**2  # [B, T]
  loss = sft.masked_mean(per_token, mask)
  tokens = jnp.sum(jnp.broadcast_to(jnp.asarray(mask, jnp.float32), per_token.shape))
  return loss, {"loss": loss, "tokens": tokens}


def mix_with_ce(distill: jax.Array, ce: jax.Array, *, alpha: float) -> jax.Array:
  """alpha * distill + (1 - alpha) * ce: the soft/hard target mix of Hinton et al. 2015.

  Pass the distillation loss (already scaled by T^2) and the plain cross-entropy on the
  ground-truth tokens; alpha = 1 is pure distillation, alpha = 0 pure SFT.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  return alpha * jnp.asarray(distill, jnp.float32) + (1.0 - alpha) * jnp.asarray(ce, jnp.float32)
