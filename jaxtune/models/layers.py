"""The building blocks of a Llama-family decoder, as pure functions over arrays.

Kept apart from `decoder.py`, which only composes them, so that each block stays small and
testable on its own. `linear` is the one place where a kernel leaf is interpreted (dense,
4-bit `quant.QArray`, or an adapter leaf from `jaxtune.peft`, which calls back into
`linear` for its base matmul). Shapes use B batch, T (query) time, S (key) time, D model
width, H query heads, K kv heads, Dh head dim, F mlp width, V vocab.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import quant


# Cheap elementwise blocks are rematerialised in the backward pass (jax.checkpoint, nothing
# saved but the inputs): otherwise autodiff keeps their float32 / [.., F] intermediates per
# layer (two f32 copies of a bf16 x per norm; silu(gate) and its sigmoid per MLP), close to
# half of a bf16 layer's activation memory, to save one fused elementwise pass.
# prevent_cse=False: they run inside the layer scan, where CSE cannot undo the remat.


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in float32, cast back to x's dtype: x / rms(x) * scale. x [..., D], scale [D].

  For low-precision x the float32 intermediates are recomputed in the backward pass
  rather than stored (for float32 x they are x-sized anyway, and the op order stays).
  """
  if x.dtype == jnp.float32:
    return _rms_norm(x, scale, eps)
  return _rms_norm_remat(x, scale, eps)


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  y = x32 * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


_rms_norm_remat = jax.checkpoint(_rms_norm, static_argnums=(2,), prevent_cse=False)


def rope_inv_freq(cfg: config_lib.ModelConfig) -> jax.Array:
  """Inverse frequencies [Dh/2], including Llama-3.1 ('llama3') and linear scaling."""
  dh = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  rs = cfg.rope_scaling
  if rs.kind == "linear":
    inv = inv / rs.factor
  elif rs.kind == "llama3":
    old = rs.original_max_position_embeddings
    low_wavelen = old / rs.low_freq_factor
    high_wavelen = old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = jnp.where(medium, smoothed, scaled)
  return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' layout. x [B, T, H, Dh], positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def linear(x: jax.Array, w, *, bias: jax.Array | None = None) -> jax.Array:
  """x [..., Din] @ w [Din, Dout] (+ bias [Dout]) -> [..., Dout]. Dispatches on the leaf:

  - a `quant.QArray`: 4-bit kernel, dequantised inside the matmul so XLA fuses it;
  - an object with a `linear(x, *, bias=None)` method: an adapter-wrapped kernel (PEFT
    leaves such as `jaxtune.peft.lora_kernel.LoraKernel`), which computes the whole
    projection itself, bias included, so it decides how its update and the bias combine;
  - otherwise a dense array.

  This module never imports `jaxtune.peft`: adapter leaves are found by duck typing.
  """
  if isinstance(w, quant.QArray):
    y = quant.matmul(x, w)
  elif callable(getattr(w, "linear", None)):
    return w.linear(x, bias=bias)
  else:
    y = jnp.einsum("...d,df->...f", x, w.astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, segment_ids: jax.Array | None,
              impl: str, sliding_window: int = 0) -> jax.Array:
  """Causal GQA attention. q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh].

  impl 'cudnn' uses the fused cuDNN flash kernel (GPU, bf16/fp16, no segments: jax's public
  `dot_product_attention` takes no segment ids, only per-row lengths, so packed rows would
  need a materialised [B, T, T] bias); 'pallas' is the Pallas/Triton flash kernel of
  `jax.experimental.pallas.ops.gpu.attention`, which masks packed segments blockwise from
  the [B, T] ids without a [T, T] mask (GPU; runs interpreted, slowly, elsewhere; k/v are
  repeated to H heads; no sliding window); 'xla' is portable and materialises the mask.
  'auto' on GPU in bf16/fp16 picks cuDNN without segments and Pallas with them (T a
  multiple of 128, no window; on an H200, B=4 T=2048 H=32 Dh=64: fwd+bwd 2.2 ms against
  7.5 ms for 'xla', cuDNN without segments 0.8 ms), else 'xla'. Padding is segment id 0,
  so padded query rows attend only to padding and never produce NaNs.
  """
  b, t = q.shape[:2]
  on_gpu = jax.default_backend() == "gpu"
  if impl == "auto":
    impl = "xla"
    if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16):
      if segment_ids is None:
        impl = "cudnn"
      elif not sliding_window and t % 128 == 0:
        impl = "pallas"
  if impl == "cudnn":
    if segment_ids is not None:
      raise ValueError("attention='cudnn' does not take packed segment ids; use 'auto' or 'xla'")
    window = (sliding_window - 1, 0) if sliding_window else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        implementation="cudnn")
  if impl == "pallas":
    if sliding_window:
      raise ValueError("attention='pallas' has no sliding window; use 'xla'")
    return _pallas_attention(q, k, v, segment_ids, interpret=not on_gpu)
  mask = attention_mask(segment_ids, b, t, sliding_window)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """GQA attention over a KV cache. q [B, T, H, Dh]; k/v [B, K, S, Dh]; mask [B, T, S]
  (True = visible) -> [B, T, H, Dh].

  Query heads are grouped by kv head (head h reads kv head h // (H/K), as in HF's
  repeat_kv) without repeating k/v: the products batch over (B, K), so a decode step reads
  each cached key and value once. Scores and softmax in float32; a row that sees no slot
  gets uniform weights instead of NaN.
  """
  b, t, h, dh = q.shape
  kh = k.shape[1]
  qg = q.reshape(b, t, kh, h // kh, dh)  # [B, T, K, G, Dh]
  s = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype),
                 preferred_element_type=jnp.float32) * (dh ** -0.5)  # [B, K, G, T, S]
  s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bkgts,bksd->btkgd", p.astype(v.dtype), v)  # [B, T, K, G, Dh]
  return o.reshape(b, t, h, dh).astype(q.dtype)


def decode_attention_impl(impl: str, q: jax.Array, num_slots: int, sliding_window: int) -> str:
  """'pallas' (`pallas_decode_attention`) or 'xla' (`cached_attention`) for a decode step.

  'auto' picks the Pallas kernel on GPU in bf16/fp16 when the cache is not a ring (no
  sliding window) and its slots split into power-of-two blocks; 'pallas' forces it (it
  runs interpreted, slowly, off GPU); anything else is XLA."""
  fits = not sliding_window and num_slots % 16 == 0
  if impl == "pallas" and fits:
    return "pallas"
  if (impl == "auto" and fits and jax.default_backend() == "gpu"
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    return "pallas"
  return "xla"


def pallas_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array,
                            end: jax.Array) -> jax.Array:
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
      decode_attention.decode_attn_unbatched, sm_scale=dh ** -0.5, block_h=16, block_k=block,
      k_splits=s // block, num_warps=None, num_stages=2, grid=None,
      interpret=jax.default_backend() != "gpu", debug=False, return_residuals=False,
      normalize_output=True)
  qg = q.reshape(b, kh, h // kh, dh)  # [B, K, G, Dh]
  lo = jnp.broadcast_to(start[:, None], (b, kh)).astype(jnp.int32)
  hi = jnp.broadcast_to(end[:, None], (b, kh)).astype(jnp.int32)
  o = jax.vmap(jax.vmap(inner))(qg, k.astype(q.dtype), v.astype(q.dtype), lo, hi)
  return o.reshape(b, 1, h, dh)


def _pallas_attention(q, k, v, segment_ids, *, interpret: bool):
  """Pallas flash attention, causal, segment-masked. q [B, T, H, Dh], k/v [B, T, K, Dh]."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # lazy: Triton
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)  # [B, T, H, Dh]
  v = jnp.repeat(v, groups, axis=2)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  return pallas_attention.mha(q, k, v, seg, sm_scale=q.shape[-1] ** -0.5, causal=True,
                              interpret=interpret)


@functools.partial(jax.checkpoint, prevent_cse=False)
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up: the gated MLP activation of Llama-family models. [..., F]."""
  return jax.nn.silu(gate) * up
