"""Attention kernels: training/prefill attention over a whole sequence, and attention over a
KV cache for decoding. Pure functions over arrays; which kernel runs is chosen here, from the
configured `model.attention` ('auto' | 'xla' | 'cudnn' | 'pallas'), the backend, the dtype
and what the call needs (packed segment ids, a sliding window, a soft-cap).

Shapes: B batch, T query time, S key time (cache slots), H query heads, K kv heads,
Dh head dim. `scale` is the softmax scale (default Dh ** -0.5); `softcap` > 0 caps the
scores as softcap * tanh(s / softcap) before the mask (Gemma 2). Only the 'xla' paths
implement the soft-cap: 'auto' falls back to them when it is set, and asking for another
kernel with a soft-cap is an error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def attention_mask(segment_ids: jax.Array | None, b: int, t: int,
                   sliding_window: int = 0) -> jax.Array:
  """Boolean [B, 1, T, T]: causal, within one segment (padding attends padding), windowed."""
  q = jnp.arange(t)[:, None]
  k = jnp.arange(t)[None, :]
  mask = (k <= q)
  if sliding_window:
    mask &= (q - k) < sliding_window
  mask = jnp.broadcast_to(mask, (b, t, t))
  if segment_ids is not None:
    mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return mask[:, None]


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     scale: float | None = None, softcap: float = 0.0) -> jax.Array:
  """Portable GQA attention with an explicit boolean mask [B, 1|H, T, S] (True = visible).
  q [B, T, H, Dh], k/v [B, S, K, Dh] -> [B, T, H, Dh]. XLA's fused path when there is no
  soft-cap; with one, scores in float32, capped, masked, softmaxed."""
  if not softcap:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
  b, t, h, dh = q.shape
  kh = k.shape[2]
  scale = dh ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, h // kh, dh)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
  s = softcap * jnp.tanh(s / softcap)
  m = jnp.broadcast_to(mask, (b, h) + mask.shape[2:]).reshape(b, kh, h // kh, t, -1)
  s = jnp.where(m, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v)
  return o.reshape(b, t, h, dh).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None,
              impl: str, sliding_window: int = 0, scale: float | None = None,
              softcap: float = 0.0) -> jax.Array:
  """Causal GQA attention. q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh].

  impl 'cudnn' uses the fused cuDNN flash kernel (GPU, bf16/fp16, no segments: jax's public
  `dot_product_attention` takes no segment ids, only per-row lengths, so packed rows would
  need a materialised [B, T, T] bias); 'pallas' is the Pallas/Triton flash kernel of
  `jax.experimental.pallas.ops.gpu.attention`, which masks packed segments blockwise from
  the [B, T] ids without a [T, T] mask (GPU; runs interpreted, slowly, elsewhere; k/v are
  repeated to H heads; no sliding window); 'xla' is portable and materialises the mask.
  'auto' on GPU in bf16/fp16 picks cuDNN without segments and Pallas with them (T a
  multiple of 128, no window; on an H200, B=4 T=2048 H=32 Dh=64: fwd+bwd 2.2 ms against
  7.5 ms for 'xla', cuDNN without segments 0.8 ms), else 'xla'; with a soft-cap, 'xla'.
  Padding is segment id 0, so padded query rows attend only to padding and never produce
  NaNs.
  """
  b, t = q.shape[:2]
  on_gpu = jax.default_backend() == "gpu"
  if impl == "auto":
    impl = "xla"
    if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) and not softcap:
      if segment_ids is None:
        impl = "cudnn"
      elif not sliding_window and t % 128 == 0:
        impl = "pallas"
  if softcap and impl != "xla":
    raise ValueError(f"attention={impl!r} has no logit soft-cap; use 'auto' or 'xla'")
  if impl == "cudnn":
    if segment_ids is not None:
      raise ValueError("attention='cudnn' does not take packed segment ids; use 'auto' or 'xla'")
    window = (sliding_window - 1, 0) if sliding_window else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        scale=scale, implementation="cudnn")
  if impl == "pallas":
    if sliding_window:
      raise ValueError("attention='pallas' has no sliding window; use 'xla'")
    return _pallas_attention(q, k, v, segment_ids, scale=scale, interpret=not on_gpu)
  mask = attention_mask(segment_ids, b, t, sliding_window)
  return masked_attention(q, k, v, mask, scale=scale, softcap=softcap)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                     scale: float | None = None, softcap: float = 0.0) -> jax.Array:
  """GQA attention over a KV cache. q [B, T, H, Dh]; k/v [B, K, S, Dh]; mask [B, T, S]
  (True = visible) -> [B, T, H, Dh].

  Query heads are grouped by kv head (head h reads kv head h // (H/K), as in HF's
  repeat_kv) without repeating k/v: the products batch over (B, K), so a decode step reads
  each cached key and value once. Scores and softmax in float32; a row that sees no slot
  gets uniform weights instead of NaN.
  """
  b, t, h, dh = q.shape
  kh = k.shape[1]
  scale = dh ** -0.5 if scale is None else scale
  qg = q.reshape(b, t, kh, h // kh, dh)  # [B, T, K, G, Dh]
  s = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
  if softcap:
    s = softcap * jnp.tanh(s / softcap)
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v)  # [B, T, K, G, Dh]
  return o.reshape(b, t, h, dh).astype(q.dtype)


def decode_attention_impl(impl: str, q: jax.Array, num_slots: int, sliding_window: int,
                          softcap: float = 0.0) -> str:
  """'pallas' (`pallas_decode_attention`) or 'xla' (`cached_attention`) for a decode step.

  'auto' picks the Pallas kernel on GPU in bf16/fp16 when the cache is not a ring (no
  sliding window), there is no soft-cap, and its slots split into power-of-two blocks;
  'pallas' forces it (it runs interpreted, slowly, off GPU); anything else is XLA."""
  fits = not sliding_window and not softcap and num_slots % 16 == 0
  if impl == "pallas" and fits:
    return "pallas"
  if (impl == "auto" and fits and jax.default_backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    return "pallas"
  return "xla"


def pallas_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
                            end: jax.Array, *, scale: float | None = None) -> jax.Array:
  """One query token per row over a KV cache with the Pallas/Triton decode kernel of
  `jax.experimental.pallas.ops.gpu.decode_attention`. q [B, 1, H, Dh]; k/v [B, K, S, Dh];
  the row's keys are the slots [start, end) (start [B], end [B] int32) -> [B, 1, H, Dh].

  The slots split into blocks of up to 128; blocks past `end` are skipped, so a step reads
  only the filled part of the cache. The kernel runs per (row, kv head) with that kv head's
  query group, so k/v are read in place (no repeat, no transpose).
  """
  from jax.experimental.pallas.ops.gpu import decode_attention  # lazy: Triton
  b, _, h, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  block = next(c for c in (128, 64, 32, 16) if s % c == 0)
  inner = functools.partial(
      decode_attention.decode_attn_unbatched, sm_scale=dh ** -0.5 if scale is None else scale,
      block_h=16, block_k=block, k_splits=s // block, num_warps=None, num_stages=2, grid=None,
      interpret=jax.default_backend() != "gpu", debug=False, return_residuals=False,
      normalize_output=True)
  qg = q.reshape(b, kh, h // kh, dh)  # [B, K, G, Dh]
  lo = jnp.broadcast_to(start[:, None], (b, kh)).astype(jnp.int32)
  hi = jnp.broadcast_to(end[:, None], (b, kh)).astype(jnp.int32)
  o = jax.vmap(jax.vmap(inner))(qg, k.astype(q.dtype), v.astype(q.dtype), lo, hi)
  return o.reshape(b, 1, h, dh)


def _pallas_attention(q, k, v, segment_ids, *, scale, interpret: bool):
  """Pallas flash attention, causal, segment-masked. q [B, T, H, Dh], k/v [B, T, K, Dh]."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # lazy: Triton
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)  # [B, T, H, Dh]
  v = jnp.repeat(v, groups, axis=2)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return pallas_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, interpret=interpret)
