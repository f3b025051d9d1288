"""Attention kernels: training/prefill attention over a whole sequence, and attention over a
KV cache for decoding. Pure functions over arrays; which kernel runs is chosen here, from the
configured `model.attention` ('auto' | 'xla' | 'cudnn' | 'pallas' | 'splash'), the backend,
the dtype and what the call needs (packed segment ids, a sliding window, a soft-cap).

Custom kernels (Pallas, Triton, cuDNN, TPU splash) are opaque to XLA's partitioner: given a
`mesh`, they run under `shard_map` with rows over the batch axes ('data', 'fsdp') and heads
over 'tensor' (sharding.RULES' 'batch' and 'act_heads'), so each device computes only its
own rows and heads and nothing is all-gathered around them.

Shapes: B batch, T query time, S key time (cache slots), H query heads, K kv heads,
Dh head dim. `scale` is the softmax scale (default Dh ** -0.5); `softcap` > 0 caps the
scores as softcap * tanh(s / softcap) before the mask (Gemma 2). The 'xla' paths and the
TPU 'splash' kernel implement the soft-cap: 'auto' on GPU falls back to 'xla' when it is set,
and asking for a GPU kernel with a soft-cap is an error.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtune import sharding

# The fused kernels need the sequence to split into 128-token blocks.
BLOCK = 128


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
              softcap: float = 0.0, mesh=None) -> jax.Array:
  """Causal GQA attention. q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh].

  impl 'cudnn' is cuDNN's fused flash kernel (GPU, bf16/fp16). jax's public
  `dot_product_attention` takes no segment ids, so given packed rows 'cudnn' checks at run
  time, per device, whether every row is one example followed by padding (`unpacked`): then
  plain causal cuDNN is exact for every real token (a real token never sees a later
  position), and only the padding positions' outputs differ from the segment mask's (they
  read the example; nothing reads them back). Packed rows take cuDNN's packed (THD) layout
  with each run of ids as its own causal sequence (up to 64 runs a row; Hopper or newer),
  else the Pallas kernel. 'pallas' is the Pallas/Triton flash kernel of
  `jax.experimental.pallas.ops.gpu.attention`, which masks segments block by block from the
  [B, T] ids (GPU; k/v repeated to H heads; no window). 'splash' is JAX's TPU splash
  kernel (`pallas.ops.tpu.splash_attention`) with segment ids, sliding window and soft-cap.
  Off their backend the Pallas kernels run interpreted (slowly: for tests). 'xla' is
  portable and materialises the [B, 1, T, T] mask.

  'auto': on GPU in bf16/fp16 without soft-cap, 'cudnn' (with the run-time unpacked check
  when there are segments; packed rows need T % 128 == 0 and no window, else 'xla'); on TPU
  'splash' when T % 128 == 0; else 'xla'. Padding is segment id 0, so padded query rows
  attend only to padding and never produce NaNs. `mesh`: see the module docstring.
  """
  impl = _choose(impl, q, segment_ids, sliding_window, softcap)
  if impl == "xla":
    b, t = q.shape[:2]
    mask = attention_mask(segment_ids, b, t, sliding_window)
    return masked_attention(q, k, v, mask, scale=scale, softcap=softcap)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  interpret = jax.default_backend() != ("tpu" if impl == "splash" else "gpu")
  if impl == "splash":
    fn = functools.partial(_splash_attention, scale=scale, softcap=softcap,
                           sliding_window=sliding_window, interpret=interpret)
  elif impl == "pallas":
    fn = functools.partial(_pallas_attention, scale=scale, interpret=interpret)
  else:
    fn = functools.partial(_cudnn_attention, scale=scale, sliding_window=sliding_window,
                           interpret=interpret)
  return shard_kernel(fn, mesh, q, k, v, segment_ids)


def _choose(impl: str, q, segment_ids, sliding_window: int, softcap: float) -> str:
  """The kernel for `attention`; errors name what the forced kernel cannot do."""
  t = q.shape[1]
  backend = jax.default_backend()
  if impl == "auto":
    impl = "xla"
    if backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and not softcap:
      packed_ok = not sliding_window and t % BLOCK == 0
      impl = "cudnn" if segment_ids is None or packed_ok else "xla"
    elif backend == "tpu" and t % BLOCK == 0:
      impl = "splash"
  if impl not in ("xla", "cudnn", "pallas", "splash"):
    raise ValueError(f"unknown attention {impl!r} (expected auto, xla, cudnn, pallas, splash)")
  if softcap and impl in ("cudnn", "pallas"):
    raise ValueError(f"attention={impl!r} has no logit soft-cap; use 'auto' or 'xla'")
  if sliding_window and (impl == "pallas" or (impl == "cudnn" and segment_ids is not None)):
    raise ValueError(f"attention={impl!r} has no sliding window with packed segment ids; "
                     "use 'xla'")
  if impl == "splash" and t % BLOCK:
    raise ValueError(f"attention='splash' needs the sequence length to be a multiple of "
                     f"{BLOCK}, got {t}")
  return impl


def shard_kernel(fn, mesh, q, k, v, segment_ids):
  """fn(q, k, v, segment_ids) -> o, run per device under `shard_map` over `mesh`.

  Rows split over the mesh axes of 'batch', query heads over those of 'act_heads' (each by
  `sharding.spec`, so an axis that does not divide stays whole). When kv heads do not split
  like the query heads, k/v are repeated to H heads first, so a device's query heads find
  their own kv heads locally. No mesh, or one device: fn called directly."""
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, segment_ids)
  qs = sharding.spec(("batch", "seq", "act_heads", "head_dim"), q.shape, mesh)
  heads = qs[2]
  if heads is not None and k.shape[2] % sharding.axis_size(mesh, heads):
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
  ks = PartitionSpec(qs[0], None, heads, None)
  if segment_ids is None:
    return jax.shard_map(lambda q, k, v: fn(q, k, v, None), mesh=mesh, in_specs=(qs, ks, ks),
                         out_specs=qs, check_vma=False)(q, k, v)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, PartitionSpec(qs[0], None)),
                       out_specs=qs, check_vma=False)(q, k, v, segment_ids)


def unpacked(segment_ids: jax.Array) -> jax.Array:
  """Bool []: every row is one segment followed only by padding (id 0), or all padding.
  Then causal attention without segments equals the segment mask on every real token."""
  real = segment_ids != 0  # [B, T]
  prefix = jnp.all(real[:, 1:] <= real[:, :-1])  # no real token after padding
  return prefix & jnp.all(~real | (segment_ids == segment_ids[:, :1]))


# Runs per row (a padding run counts) that cuDNN's packed layout is compiled for; rows with
# more take the Pallas kernel. Its cost grows with the bound, about 0.028 ms per slot of
# forward + backward at 8 x 2048 tokens on an H200 (docs/BENCHMARKS.md), so the steps are
# fine: the bench's chat rows packed at 2048 tokens hold 34-39 runs.
PACKED_RUNS = (16, 24, 32, 40, 48, 64)


def gpu_branch(segment_ids: jax.Array) -> jax.Array:
  """Int []: 0 unpacked rows; i in 1..len(PACKED_RUNS) the smallest packed-layout bound that
  holds every row's runs; len(PACKED_RUNS) + 1 none does (the Pallas kernel)."""
  runs = jnp.max(run_count(segment_ids))
  return jnp.where(unpacked(segment_ids), 0,
                   1 + jnp.searchsorted(jnp.asarray(PACKED_RUNS), runs)).astype(jnp.int32)


def _cudnn_attention(q, k, v, segment_ids, *, scale, sliding_window, interpret):
  """cuDNN causal flash attention. With segment ids, one `lax.switch` on this device's rows:
  unpacked -> plain causal cuDNN; packed with at most PACKED_RUNS[i] runs per row -> cuDNN's
  packed layout (`cudnn_packed_attention`); more -> the Pallas kernel. Where the packed
  layout cannot be built (not Hopper or newer, or a jax whose private cuDNN module changed),
  packed rows go to Pallas."""

  def causal(q, k, v):
    window = (sliding_window - 1, 0) if sliding_window else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window,
                                        scale=scale, implementation="cudnn")

  if segment_ids is None:
    return causal(q, k, v)
  pallas = functools.partial(_pallas_attention, segment_ids=segment_ids, scale=scale,
                             interpret=interpret)
  try:
    packed = [functools.partial(cudnn_packed_attention, segment_ids=segment_ids, scale=scale,
                                max_runs=m) for m in PACKED_RUNS]
    return jax.lax.switch(gpu_branch(segment_ids), [causal, *packed, pallas], q, k, v)
  except (ImportError, AttributeError, TypeError, NotImplementedError, RuntimeError):
    return jax.lax.cond(unpacked(segment_ids), causal, pallas, q, k, v)


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
                            end: jax.Array, *, scale: float | None = None,
                            mesh=None) -> jax.Array:
  """One query token per row over a KV cache with the Pallas/Triton decode kernel of
  `jax.experimental.pallas.ops.gpu.decode_attention`. q [B, 1, H, Dh]; k/v [B, K, S, Dh];
  the row's keys are the slots [start, end) (start [B], end [B] int32) -> [B, 1, H, Dh].

  The slots split into blocks of up to 128; blocks past `end` are skipped, so a step reads
  only the filled part of the cache. The kernel runs per (row, kv head) with that kv head's
  query group, so k/v are read in place (no repeat, no transpose). Given a `mesh`, it runs
  under `shard_map`: rows over the batch axes, kv heads (with their query groups) over
  'tensor' when the kv heads split evenly, else heads stay whole.
  """
  b, _, h, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  fn = functools.partial(_decode_local, scale=dh ** -0.5 if scale is None else scale,
                         block=next(c for c in (128, 64, 32, 16) if s % c == 0))
  if mesh is None or mesh.size == 1:
    return fn(q, k, v, start, end)
  rows = sharding.spec(("batch", "seq", "act_kv_heads", "head_dim"), (b, 1, kh, dh), mesh)
  qs = PartitionSpec(rows[0], None, rows[2], None)
  ks = PartitionSpec(rows[0], rows[2], None, None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qs, ks, ks, PartitionSpec(rows[0]),
                                                PartitionSpec(rows[0])),
                       out_specs=qs, check_vma=False)(q, k, v, start, end)


def _decode_local(q, k, v, start, end, *, scale: float, block: int):
  """`pallas_decode_attention` on one device's rows and heads."""
  from jax.experimental.pallas.ops.gpu import decode_attention  # lazy: Triton
  b, _, h, dh = q.shape
  kh, s = k.shape[1], k.shape[2]
  inner = functools.partial(
      decode_attention.decode_attn_unbatched, sm_scale=scale,
      block_h=16, block_k=block, k_splits=s // block, num_warps=None, num_stages=2, grid=None,
      interpret=jax.default_backend() != "gpu", debug=False, return_residuals=False,
      normalize_output=True)
  qg = q.reshape(b, kh, h // kh, dh)  # [B, K, G, Dh]
  lo = jnp.broadcast_to(start[:, None], (b, kh)).astype(jnp.int32)
  hi = jnp.broadcast_to(end[:, None], (b, kh)).astype(jnp.int32)
  o = jax.vmap(jax.vmap(inner))(qg, k.astype(q.dtype), v.astype(q.dtype), lo, hi)
  return o.reshape(b, 1, h, dh)


def _pallas_attention(q, k, v, segment_ids=None, *, scale, interpret: bool):
  """Pallas flash attention, causal, segment-masked. q [B, T, H, Dh], k/v [B, T, K, Dh]."""
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # lazy: Triton
  groups = q.shape[2] // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)  # [B, T, H, Dh]
  v = jnp.repeat(v, groups, axis=2)
  seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
  return pallas_attention.mha(q, k, v, seg, sm_scale=scale, causal=True, interpret=interpret)


def segment_runs(segment_ids: jax.Array, max_runs: int):
  """Per row, the runs of equal ids (a padding run included) in cuDNN's packed layout:
  offsets [B, M+1] and lengths [B, M] (-1 past a row's runs), and the run count [B].

      [[1, 1, 2, 0]] , M = 3  ->  offsets [[0, 2, 3, -1]], lengths [[2, 1, 1]], count [3]
  Runs past M are dropped (the caller checks count <= M)."""
  b = segment_ids.shape[0]
  run = _run_index(segment_ids)  # [B, T]
  count = run[:, -1] + 1
  lengths = jax.vmap(lambda r: jax.ops.segment_sum(jnp.ones_like(r), r, max_runs))(run)
  offsets = jnp.cumsum(lengths, axis=1) - lengths
  valid = jnp.arange(max_runs)[None, :] < count[:, None]
  lengths = jnp.where(valid, lengths, -1).astype(jnp.int32)
  offsets = jnp.concatenate([jnp.where(valid, offsets, -1), jnp.full((b, 1), -1)], axis=1)
  return offsets.astype(jnp.int32), lengths, count


def _run_index(segment_ids: jax.Array) -> jax.Array:
  """[B, T] int32: which run of equal ids (0, 1, ...) each token is in."""
  b = segment_ids.shape[0]
  new = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                        axis=1)
  return jnp.cumsum(new, axis=1, dtype=jnp.int32) - 1


def run_count(segment_ids: jax.Array) -> jax.Array:
  """[B] int32: runs of equal ids per row (the padding run included)."""
  return _run_index(segment_ids)[:, -1] + 1


def cudnn_packed_attention(q, k, v, segment_ids, *, scale: float, max_runs: int = 16):
  """cuDNN's fused attention over packed rows (its THD "max_seg_per_batch" layout): each
  run of equal segment ids is its own causal sequence. GPU only; reaches into
  `jax._src.cudnn.fused_attention_stablehlo` (jax's public `dot_product_attention` takes
  per-row lengths but no offsets): the one private JAX API in jaxtune, chosen by measurement
  (docs/BENCHMARKS.md) and guarded (`_cudnn_attention` falls back to Pallas if it fails to
  build). Rows with more than `max_runs` runs are not supported (their later runs would be
  dropped) and raise nothing: callers check `run_count` first."""
  from jax._src.cudnn import fused_attention_stablehlo as fa  # private: a candidate only
  offsets, lengths, _ = segment_runs(segment_ids, max_runs)
  return fa.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths,
                                  q_offsets=offsets, kv_offsets=offsets, scale=scale,
                                  mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def _splash_attention(q, k, v, segment_ids, *, scale, softcap, sliding_window, interpret):
  """JAX's TPU splash kernel: causal (or a causal window), segment ids, soft-cap, GQA as MQA
  per kv head (no k/v repeat). q [B, T, H, Dh], k/v [B, T, K, Dh] -> [B, T, H, Dh]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # lazy: TPU kernels
      splash_attention_kernel as splash, splash_attention_mask as masks)
  b, t, h, dh = q.shape
  kh = k.shape[2]
  one = (masks.LocalMask((t, t), (sliding_window - 1, 0), offset=0) if sliding_window
         else masks.CausalMask((t, t)))
  blk = next(c for c in (512, 256, 128) if t % c == 0)
  sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk,
                            block_q_dkv=blk, block_kv_dkv=blk, block_kv_dkv_compute=blk,
                            block_q_dq=blk, block_kv_dq=blk)
  kernel = splash.make_splash_mqa_single_device(
      mask=masks.MultiHeadMask([one] * (h // kh)), block_sizes=sizes,
      attn_logits_soft_cap=softcap or None, interpret=interpret)
  qg = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, kh, h // kh, dh)
  qg = qg.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
  kt, vt = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, T, Dh]
  if segment_ids is None:
    per_head = jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv))
    o = jax.vmap(per_head)(qg, kt, vt)
  else:
    seg = segment_ids.astype(jnp.int32)
    per_head = jax.vmap(lambda qq, kk, vv, s: kernel(qq, kk, vv, segment_ids=s),
                        in_axes=(0, 0, 0, None))
    o = jax.vmap(per_head)(qg, kt, vt, splash.SegmentIds(q=seg, kv=seg))
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh).astype(q.dtype)  # [B, T, H, Dh]
