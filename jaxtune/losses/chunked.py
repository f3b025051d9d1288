"""Losses from the final hidden states and the output weight, a chunk of tokens at a time.

`chunked_cross_entropy` (the SFT loss) and `chunked_token_logprobs` (the per-token
log-probabilities every preference / RL objective starts from) take hidden states
[B, T, D] and the output projection instead of logits: the B*T tokens are cut into chunks
of `chunk_size` (the last one padded with masked tokens) and reduced with `lax.scan`, so
neither the forward nor the backward pass holds [B*T, V] float32 logits.

Both have a custom VJP whose chunk loop forms the gradients while a chunk's logits are live:
with weights m (the loss mask, or the cotangent of the log-probs), the gradient w.r.t. a
chunk's logits z is (softmax(z) - onehot(y)) * m, so dhidden = g @ W^T and dW += h^T @ g.
The cross-entropy does this inside its forward (3 logits-sized matmuls per chunk, 2 when W
is not differentiated, e.g. a frozen LoRA base); the log-probs, whose weights are known only
in the backward, recompute each chunk there (4 and 3).

On a mesh (`mesh=` and `row_axes=`: the mesh axes the rows of `hidden` are split over) each
device scores only its own rows under `shard_map`, and the scalar sums and dW are summed
over those axes once, at the end; `chunk_size` then counts a chunk of the whole mesh, each
device taking its share (so per-device memory halves with twice the devices). Left to the
compiler, the scan over chunks of the flattened B*T tokens would gather every row onto
every device and run the whole output head there (measured on 2 H200s with the rows split
in two: the head's GEMMs took twice their one-GPU time on each GPU). The weight enters each
device whole (an FSDP-split weight is gathered first, as its matmul needs anyway); a
vocabulary split over a tensor axis is the caller's case to leave to the compiler
(`models/head.py` does).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxtune import sharding


def chunked_cross_entropy(hidden: jax.Array, embedding_or_kernel: jax.Array,
                          targets: jax.Array, mask: jax.Array, *, chunk_size: int,
                          transpose: bool = False, softcap: float = 0.0, mesh=None,
                          row_axes=None, logits_dtype=jnp.float32):
  """`cross_entropy_loss` computed from final hidden states, one token chunk at a time.

  logits = hidden @ W (W: [D, V] kernel, `transpose=False`) or hidden @ E^T (E: [V, D]
  tied embedding table, `transpose=True`), float32 accumulation. Peak logits memory is
  chunk_size * V floats (split over the row shards on a mesh), not B * T * V. Same value
  and gradients as `cross_entropy_loss(hidden @ W, targets, mask)` (up to float32 summation order; the
  logits gradient is cast to W's dtype before its two matmuls, as autodiff of a bf16 model
  does).

  Args:
    hidden: [B, T, D] final (normed) hidden states, any float dtype.
    embedding_or_kernel: [D, V] if transpose=False, [V, D] if transpose=True.
    targets: [B, T] int ids.
    mask: [B, T] 0/1 loss mask.
    chunk_size: tokens per chunk (> 0); on a mesh, of the whole mesh: each device scores
      ceil(chunk_size / row shards) of its own rows at a time.
    transpose: True when the weight is an embedding table [V, D] (tied embeddings).
    softcap: > 0 caps the logits as softcap * tanh(z / softcap) (Gemma 2); the chain rule
      factor 1 - tanh^2 is applied to the fused gradient.
    mesh, row_axes: run per device, rows split over the mesh axes `row_axes` (a name or a
      tuple of names, as in a PartitionSpec); None (default): one program over all rows.
    logits_dtype: the dtype the projection writes each chunk's logits in (float32
      accumulation either way); the loss math runs in float32 after it. float32 (default),
      or the activation dtype as transformers' bf16 lm_head: half the bytes in the head's
      passes over the [chunk, V] logits, bf16 rounding of each logit.

  Returns:
    (loss, {"loss": loss, "tokens": number of unmasked tokens}), float32 scalars.
  """
  opts = _check(hidden, embedding_or_kernel, targets, chunk_size, transpose, softcap,
                logits_dtype)
  split = _split(mesh, row_axes)
  y = jnp.asarray(targets, jnp.int32)
  m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), targets.shape)
  total = _nll_sum(hidden, embedding_or_kernel, y, m, _per_device_opts(opts, split), split)
  tokens = jnp.sum(m)
  loss = total / jnp.maximum(tokens, 1.0)
  return loss, {"loss": loss, "tokens": tokens}


def chunked_token_logprobs(hidden: jax.Array, embedding_or_kernel: jax.Array,
                           targets: jax.Array, *, chunk_size: int, transpose: bool = False,
                           softcap: float = 0.0, mesh=None, row_axes=None,
                           logits_dtype=jnp.float32) -> jax.Array:
  """log p(targets) [B, T] float32 from hidden states [B, T, D], one token chunk at a time.

  Same value and gradients as `token_logprobs(hidden @ W, targets)`; arguments as in
  `chunked_cross_entropy`. Ids outside [0, V) are clipped (mask them downstream).
  """
  opts = _check(hidden, embedding_or_kernel, targets, chunk_size, transpose, softcap,
                logits_dtype)
  split = _split(mesh, row_axes)
  return _token_lp(hidden, embedding_or_kernel, jnp.asarray(targets, jnp.int32),
                   _per_device_opts(opts, split), split)


def _check(hidden, w, targets, chunk_size, transpose, softcap, logits_dtype) -> tuple:
  if hidden.ndim != 3 or hidden.shape[:2] != targets.shape:
    raise ValueError(f"hidden must be [B, T, D] with [B, T] == targets.shape; got hidden "
                     f"{hidden.shape}, targets {targets.shape}")
  d = hidden.shape[-1]
  w_d = w.shape[1] if transpose else w.shape[0]
  if w.ndim != 2 or w_d != d:
    want = "[V, D]" if transpose else "[D, V]"
    raise ValueError(f"embedding_or_kernel must be {want} with D={d} (transpose="
                     f"{transpose}); got {w.shape}")
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
  return (int(chunk_size), bool(transpose), float(softcap), jnp.dtype(logits_dtype).name)


def _split(mesh, row_axes):
  """(mesh, row_axes) when rows really split over devices, else None (one program)."""
  if mesh is None or row_axes is None or mesh.size == 1:
    return None
  return mesh, row_axes


def _per_device_opts(opts: tuple, split) -> tuple:
  """opts with the chunk cut to each device's share: `chunk_size` counts the tokens of one
  chunk of the whole mesh, so a device scores ceil(chunk_size / row shards) of its own rows
  at a time and the head's [C, V] temporaries shrink with the devices like every other
  activation (Llama-3-8B at fsdp=2, chunk 4096: 1.5 GiB less per GPU)."""
  if split is None:
    return opts
  return (-(-opts[0] // sharding.axis_size(*split)),) + opts[1:]


# Specs of _per_device's arguments and results: 'R' marks the row-split dimension.
_ROWS3 = ("R", None, None)  # hidden states / dh [B, T, D]
_ROWS2 = ("R", None)  # targets, mask, log-probs, per-token NLL [B, T]
_WHOLE = ()  # the weight, dW, scalars: whole on every device


def _per_device(fn, split, in_specs, out_specs):
  """fn as is (split None), or under shard_map with these specs (_ROWS3, _ROWS2, _WHOLE)."""
  if split is None:
    return fn
  mesh, axes = split
  spec = lambda s: P(*(axes if a == "R" else None for a in s))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(s) for s in in_specs),
                       out_specs=tuple(spec(s) for s in out_specs), check_vma=False)


def _psum(x, split):
  return x if split is None else jax.lax.psum(x, split[1])


def _chunks(x: jax.Array, c: int) -> jax.Array:
  """[B, T, ...] -> [K, C, ...]: the B*T entries in chunks of c, the last padded with 0."""
  n = x.shape[0] * x.shape[1]
  flat = x.reshape((n,) + x.shape[2:])
  flat = jnp.pad(flat, [(0, (-n) % c)] + [(0, 0)] * (flat.ndim - 1))
  return flat.reshape((-1, c) + x.shape[2:])


def _unchunk(x: jax.Array, lead: tuple[int, int]) -> jax.Array:
  """[K, C, ...] -> [B, T, ...] (lead = (B, T)), dropping the padding."""
  n = lead[0] * lead[1]
  return x.reshape((-1,) + x.shape[2:])[:n].reshape(lead + x.shape[2:])


def _logits(h_c, w, opts):
  """[C, D] x W -> float32 logits [C, V] (written in opts' logits dtype first), soft-capped
  when opts' cap > 0."""
  _, transpose, cap, dtype = opts
  spec = "cd,vd->cv" if transpose else "cd,dv->cv"
  z = jnp.einsum(spec, h_c, w, preferred_element_type=jnp.dtype(dtype)).astype(jnp.float32)
  return cap * jnp.tanh(z / cap) if cap else z


def _vocab(w, opts) -> int:
  return w.shape[0] if opts[1] else w.shape[1]


def _scan_logprobs(h, w, y, opts) -> jax.Array:
  """log p(y) [B, T] of this device's rows."""
  c = opts[0]
  yc = _chunks(jnp.clip(y, 0, _vocab(w, opts) - 1), c)

  def body(_, xs):
    z = _logits(xs[0], w, opts)  # [C, V]
    picked = jnp.take_along_axis(z, xs[1][:, None], axis=-1)[:, 0]
    return None, picked - jax.nn.logsumexp(z, axis=-1)

  _, lp = jax.lax.scan(body, None, (_chunks(h, c), yc))
  return _unchunk(lp, y.shape)


def _fused(h, w, y, m, opts, need_w: bool):
  """(sum m * nll, dh [B, T, D], dW (or a 0 scalar), nll [B, T]) for weights m [B, T]:
  the gradients of sum_t m_t * nll_t, formed chunk by chunk beside the logits."""
  c, transpose, cap, _ = opts
  wt_spec = "cv,vd->cd" if transpose else "cv,dv->cd"  # dh = g @ W^T
  dw_spec = "cd,cv->vd" if transpose else "cd,cv->dv"  # dW = h^T @ g
  yc = _chunks(jnp.clip(y, 0, _vocab(w, opts) - 1), c)

  def body(carry, xs):
    total, dw = carry
    h_c, y_c, m_c = xs
    logits = _logits(h_c, w, opts)  # [C, V] f32 (capped)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [C]
    picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
    nll = jnp.where(m_c != 0, lse - picked, 0.0)  # 0 where masked, whatever the logits
    weight = jnp.where(m_c != 0, m_c, 0.0)  # [C]
    onehot = jnp.arange(logits.shape[-1])[None, :] == y_c[:, None]
    g = (jnp.exp(logits - lse[:, None]) - onehot) * weight[:, None]  # [C, V] d/dlogits
    if cap:  # through z = cap * tanh(u / cap): dz/du = 1 - (z / cap)^2
      g = g * (1.0 - jnp.square(logits / cap))
    g = g.astype(w.dtype)
    dh_c = jnp.einsum(wt_spec, g, w, preferred_element_type=jnp.float32).astype(h.dtype)
    if need_w:
      dw = dw + jnp.einsum(dw_spec, h_c.astype(w.dtype), g,
                           preferred_element_type=jnp.float32)
    return (total + jnp.sum(nll * m_c), dw), (dh_c, nll)

  dw0 = jnp.zeros(w.shape if need_w else (), jnp.float32)
  (total, dw), (dh, nll) = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), dw0), (_chunks(h, c), yc, _chunks(m, c)))
  dw = dw.astype(w.dtype) if need_w else dw
  return total, _unchunk(dh, y.shape), dw, _unchunk(nll, y.shape)


# --------------------------------------------------------------- sum of masked token NLLs
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _nll_sum(h, w, y, m, opts, split):
  def local(h, w, y, m):
    nll = -_scan_logprobs(h, w, y, opts)
    return (_psum(jnp.sum(jnp.where(m != 0, nll, 0.0) * m), split),)
  return _per_device(local, split, (_ROWS3, _WHOLE, _ROWS2, _ROWS2), (_WHOLE,))(h, w, y, m)[0]


def _nll_sum_fwd(h, w, y, m, opts, split):
  need_w, need_m = w.perturbed, m.perturbed
  h, w, y, m = h.value, w.value, y.value, m.value

  def local(h, w, y, m):
    total, dh, dw, nll = _fused(h, w, y, m, opts, need_w)
    return _psum(total, split), dh, _psum(dw, split) if need_w else dw, nll

  total, dh, dw, nll = _per_device(local, split, (_ROWS3, _WHOLE, _ROWS2, _ROWS2),
                                   (_WHOLE, _ROWS3, _WHOLE, _ROWS2))(h, w, y, m)
  return total, (dh, dw if need_w else None, nll if need_m else None)


def _nll_sum_bwd(opts, split, res, ct):
  del opts, split
  dh, dw, nll = res
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    ct = jnp.zeros((), jnp.float32)
  scale = lambda a: None if a is None else (a * ct.astype(a.dtype))
  return scale(dh), scale(dw), None, scale(nll)


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)


# ----------------------------------------------------------------------- token log-probs
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _token_lp(h, w, y, opts, split):
  return _per_device(lambda h, w, y: (_scan_logprobs(h, w, y, opts),), split,
                     (_ROWS3, _WHOLE, _ROWS2), (_ROWS2,))(h, w, y)[0]


def _token_lp_fwd(h, w, y, opts, split):
  need_w = w.perturbed
  h, w, y = h.value, w.value, y.value
  # residuals are arrays or None: a marker array says that W is differentiated
  return _token_lp(h, w, y, opts, split), (h, w, y, jnp.zeros(()) if need_w else None)


def _token_lp_bwd(opts, split, res, ct):
  h, w, y, marker = res
  need_w = marker is not None
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return None, None, None

  def local(h, w, y, g):  # d(sum g * lp) = -d(sum g * nll): the fused pass with m = -g
    _, dh, dw, _ = _fused(h, w, y, -g.astype(jnp.float32), opts, need_w)
    return dh, _psum(dw, split) if need_w else dw

  dh, dw = _per_device(local, split, (_ROWS3, _WHOLE, _ROWS2, _ROWS2), (_ROWS3, _WHOLE))(
      h, w, y, ct)
  return dh, dw if need_w else None, None


_token_lp.defvjp(_token_lp_fwd, _token_lp_bwd, symbolic_zeros=True)
