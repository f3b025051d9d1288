"""Token log-probabilities and the supervised fine-tuning (cross-entropy) loss.

Every other loss in `jaxtune.losses` starts from per-token log-probabilities of the
target tokens, so they are computed once, here, with one float32 logsumexp over the
vocabulary (never a second float32 softmax). `chunked_cross_entropy` computes the same
SFT loss from the final hidden states and the output projection, one chunk of tokens at
a time, so neither the forward nor the backward pass holds [B*T, V] float32 logits.

Conventions shared by the whole package:
  * masks are [B, T] arrays of 0/1 (bool, int or float; float values act as weights);
    a masked position contributes exactly nothing, values and gradients, even when its
    target id is garbage (e.g. -100 padding) or its logits are huge;
  * means over an empty mask are 0, never NaN (denominators are clamped to >= 1);
  * all arithmetic is float32 whatever the input dtype; hyperparameters are keyword-only
    Python scalars or strings (close over them with functools.partial before jax.jit).
"""

from __future__ import annotations

import functools

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


def chunked_cross_entropy(hidden: jax.Array, embedding_or_kernel: jax.Array,
                          targets: jax.Array, mask: jax.Array, *, chunk_size: int,
                          transpose: bool = False, softcap: float = 0.0):
  """`cross_entropy_loss` computed from final hidden states, one token chunk at a time.

  logits = hidden @ W (W: [D, V] kernel, `transpose=False`) or hidden @ E^T (E: [V, D]
  tied embedding table, `transpose=True`), float32 accumulation. The B*T tokens are cut
  into chunks of `chunk_size` (the last one padded with masked tokens) and reduced with
  `lax.scan`. Peak logits memory is chunk_size * V floats, not B * T * V. Same value and
  gradients as `cross_entropy_loss(hidden @ W, targets, mask)` (up to float32 summation
  order; the logits gradient is cast to W's dtype before its two matmuls, as autodiff of
  a bf16 model does).

  The gradients are fused into the forward scan (a custom VJP): with d = sum(mask), the
  loss gradient w.r.t. chunk logits z is (softmax(z) - onehot(y)) * m / d, so while a
  chunk's logits are live the forward also forms dhidden = g @ W^T and accumulates
  dW += h^T @ g, and the backward only scales them. That is 3 logits-sized matmuls per
  chunk (2 when W is not differentiated, e.g. a frozen LoRA base, detected through
  `custom_vjp(symbolic_zeros=True)`) against 4 for store-nothing rematerialisation.

  Args:
    hidden: [B, T, D] final (normed) hidden states, any float dtype.
    embedding_or_kernel: [D, V] if transpose=False, [V, D] if transpose=True.
    targets: [B, T] int ids.
    mask: [B, T] 0/1 loss mask.
    chunk_size: tokens per chunk (> 0).
    transpose: True when the weight is an embedding table [V, D] (tied embeddings).
    softcap: > 0 caps the logits as softcap * tanh(z / softcap) (Gemma 2); the chain rule
      factor 1 - tanh^2 is applied to the fused gradient.

  Returns:
    (loss, {"loss": loss, "tokens": number of unmasked tokens}), float32 scalars.
  """
  if hidden.ndim != 3 or hidden.shape[:2] != targets.shape:
    raise ValueError(f"hidden must be [B, T, D] with [B, T] == targets.shape; got hidden "
                     f"{hidden.shape}, targets {targets.shape}")
  d = hidden.shape[-1]
  w_d = embedding_or_kernel.shape[1] if transpose else embedding_or_kernel.shape[0]
  if embedding_or_kernel.ndim != 2 or w_d != d:
    want = "[V, D]" if transpose else "[D, V]"
    raise ValueError(f"embedding_or_kernel must be {want} with D={d} (transpose="
                     f"{transpose}); got {embedding_or_kernel.shape}")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
  vocab = embedding_or_kernel.shape[0] if transpose else embedding_or_kernel.shape[1]

  n = targets.size
  pad = (-n) % chunk_size
  h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0)))  # [N', D]
  y = jnp.pad(jnp.clip(jnp.asarray(targets, jnp.int32).reshape(n), 0, vocab - 1), (0, pad))
  m = jnp.pad(jnp.broadcast_to(jnp.asarray(mask, jnp.float32), targets.shape).reshape(n),
              (0, pad))  # [N']
  n_chunks = (n + pad) // chunk_size
  h = h.reshape(n_chunks, chunk_size, d)  # [K, C, D]
  y = y.reshape(n_chunks, chunk_size)  # [K, C]
  m = m.reshape(n_chunks, chunk_size)  # [K, C]

  total = _nll_sum(h, embedding_or_kernel, y, m, (transpose, float(softcap)))
  tokens = jnp.sum(m)
  loss = total / jnp.maximum(tokens, 1.0)
  return loss, {"loss": loss, "tokens": tokens}


def _chunk_logits(h_c, w, opts):
  """[C, D] x W -> float32 logits [C, V], soft-capped when opts = (transpose, cap > 0)."""
  transpose, cap = opts
  spec = "cd,vd->cv" if transpose else "cd,dv->cv"
  z = jnp.einsum(spec, h_c, w, preferred_element_type=jnp.float32).astype(jnp.float32)
  return cap * jnp.tanh(z / cap) if cap else z


def _chunk_nll(logits, y_c, m_c):
  """Masked token NLLs [C] (0 where m == 0, whatever the logits) and the logsumexp [C]."""
  lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
  picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]  # [C]
  return jnp.where(m_c != 0, lse - picked, 0.0), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_sum(h, w, y, m, opts):
  """sum_k sum_c m * nll over chunks: h [K, C, D], w [D, V] | [V, D], y / m [K, C].

  opts = (transpose, softcap), static."""
  def body(total, xs):
    h_c, y_c, m_c = xs
    nll, _ = _chunk_nll(_chunk_logits(h_c, w, opts), y_c, m_c)
    return total + jnp.sum(nll * m_c), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y, m))
  return total


def _nll_sum_fwd(h, w, y, m, opts):
  transpose, cap = opts
  need_w = w.perturbed
  need_m = m.perturbed
  h, w, y, m = h.value, w.value, y.value, m.value
  wt_spec = "cv,vd->cd" if transpose else "cv,dv->cd"  # dh = g @ W^T
  dw_spec = "cd,cv->vd" if transpose else "cd,cv->dv"  # dW = h^T @ g

  def body(carry, xs):
    total, dw = carry
    h_c, y_c, m_c = xs
    logits = _chunk_logits(h_c, w, opts)  # [C, V] f32 (capped)
    nll, lse = _chunk_nll(logits, y_c, m_c)
    weight = jnp.where(m_c != 0, m_c, 0.0)  # [C]
    probs = jnp.exp(logits - lse[:, None])  # [C, V]
    onehot = jnp.arange(logits.shape[-1])[None, :] == y_c[:, None]
    g = (probs - onehot) * weight[:, None]  # [C, V] dNLL/dlogits
    if cap:  # through z = cap * tanh(u / cap): dz/du = 1 - (z / cap)^2
      g = g * (1.0 - jnp.square(logits / cap))
    g = g.astype(w.dtype)
    dh_c = jnp.einsum(wt_spec, g, w, preferred_element_type=jnp.float32).astype(h.dtype)
    if need_w:
      dw = dw + jnp.einsum(dw_spec, h_c.astype(w.dtype), g,
                           preferred_element_type=jnp.float32)
    return (total + jnp.sum(nll * m_c), dw), (dh_c, nll)

  dw0 = jnp.zeros(w.shape, jnp.float32) if need_w else jnp.zeros((), jnp.float32)
  (total, dw), (dh, nll) = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), (h, y, m))
  res = (dh, dw.astype(w.dtype) if need_w else None, nll if need_m else None)
  return total, res


def _nll_sum_bwd(opts, res, ct):
  del opts
  dh, dw, nll = res
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    ct = jnp.zeros((), jnp.float32)
  scale = lambda a: None if a is None else (a * ct.astype(a.dtype))
  return scale(dh), scale(dw), None, scale(nll)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)
