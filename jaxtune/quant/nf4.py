"""4-bit code books, and quantize / dequantize of one kernel array to and from a `QArray`.

Blockwise absmax quantization (QLoRA, Dettmers et al. 2023, sec. 3): the input rows of a
kernel [..., in, out] are cut into groups of `group_size` consecutive rows; each group and
output column has a scale s = max |w| over its rows; every weight is normalised, x = w / s
in [-1, 1], and replaced by the index of the nearest value of a 16-entry code book:

  nf4   the NormalFloat4 values of QLoRA / bitsandbytes (quantiles of N(0, 1) rescaled
        to [-1, 1], with an exact 0); largest gap 1 - 0.696 = 0.304 (at -1), so the
        error is at most 0.152 s.
  int4  symmetric integers: code k stands for (k - 8) / 7, i.e. q * s / 7 with
        q = round(7 x) in -7..7 (the code for -8 exists but is never produced, so 0 is
        exact and the grid is symmetric); error at most s / 14.

The weight comes back as codebook[code] * s (float32 arithmetic, cast to `dtype`).

Bytes per parameter (packed codes are 0.5):
  scales bfloat16 (default), g=64:  0.5 + 2/64                = 0.53125
  scales float32,            g=64:  0.5 + 4/64                = 0.5625  (over 0.55)
  scales bfloat16,           g=128: 0.5 + 2/128               = 0.515625
  double_quant,              g=64:  0.5 + 1/64 + 4/(64*256)   = 0.515869 (out % 256 == 0)

Double quantization (QLoRA sec. 3, "quantizing the quantization constants"): the float32
group scales are themselves quantized to uint8, in blocks of 256 consecutive scales along
the output axis, each block with one float32 step = max(block) / 255:
s' = round(s / step) * step, so |s - s'| <= step / 2 = max(block) / 510. bitsandbytes
instead subtracts the mean and uses a dynamic 8-bit float map; this linear unsigned form
keeps the same byte count with a simple, checkable bound. Weights are normalised by the
stored scale (bf16-rounded, or s'), so codes are optimal for what dequantize computes.

Host-side, layer-by-layer loading: `quantize_array` takes a numpy array (computed with
numpy, result children are numpy, nothing touches a device) or a jax array (jitted). A
loader quantizes each layer as it reads it and stacks the results:

    >>> layers = [np.asarray(read(f"layers.{i}.q_proj.weight")).T for i in range(L)]
    >>> q = quant.quantize_stacked(layers, method="nf4", group_size=64)  # [L, D, F]
    >>> q = jax.device_put(q, shardings)      # only the 4-bit tree ever reaches a device
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune.quant import qarray

# The 16 NF4 values, copied from bitsandbytes `csrc/kernels.cu` (`nf4_dequantization_lut`,
# MIT license), the data type of QLoRA (Dettmers et al. 2023, arXiv:2305.14314, sec. 3 and
# appendix E): create_normal_map(offset=0.9677083) rounded to float32.
NF4_CODEBOOK = np.array([
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
], dtype=np.float64)

# int4: code k -> (k - 8) / 7; k = 0 (-8/7) is never produced by quantize.
INT4_CODEBOOK = (np.arange(16, dtype=np.float64) - 8.0) / 7.0

DOUBLE_QUANT_BLOCK = 256  # first-level scales per float32 second-level step


def codebook(method: str) -> np.ndarray:
  """The 16 normalised values [16] float64 that codes 0..15 stand for."""
  if method == "nf4":
    return NF4_CODEBOOK
  if method == "int4":
    return INT4_CODEBOOK
  raise ValueError(f"unknown quantization method {method!r}; expected one of "
                   f"{qarray.METHODS}")


def _thresholds(method: str) -> np.ndarray:
  """float32 [15]: midpoints between neighbouring codes (ties go to the lower code)."""
  book = codebook(method)
  if method == "int4":
    book = book[1:]  # never choose -8/7: codes 1..15
  mids = (book[:-1] + book[1:]) / 2
  return mids.astype(np.float32)


def _nearest_codes(xp, x, method: str):
  """uint8 codes of the nearest code-book value to each normalised x (same shape)."""
  codes = xp.full(x.shape, 1 if method == "int4" else 0, dtype=np.uint8)
  for t in _thresholds(method):
    codes = codes + (x > t).astype(np.uint8)
  return codes


def _quantize_scales(xp, absmax):
  """Double quantization: f32 [..., G, out] -> (uint8 [..., G, out], f32 [..., G, nb])."""
  *lead, n_out = absmax.shape
  nb = -(-n_out // DOUBLE_QUANT_BLOCK)
  pad = nb * DOUBLE_QUANT_BLOCK - n_out
  a = xp.pad(absmax, [(0, 0)] * len(lead) + [(0, pad)])
  a = a.reshape(*lead, nb, DOUBLE_QUANT_BLOCK)  # [..., G, nb, 256]
  step = xp.max(a, axis=-1) * np.float32(1 / 255)  # [..., G, nb]
  safe = xp.where(step > 0, step, np.float32(1))
  codes = xp.clip(xp.round(a / safe[..., None]), 0, 255).astype(np.uint8)
  codes = codes.reshape(*lead, nb * DOUBLE_QUANT_BLOCK)[..., :n_out]
  return codes, step.astype(np.float32)


def _dequantize_scales(xp, scales, scales2):
  """uint8 [..., G, out] codes and f32 [..., G, nb] steps -> f32 [..., G, out]."""
  n_out = scales.shape[-1]
  step = xp.repeat(scales2, DOUBLE_QUANT_BLOCK, axis=-1)[..., :n_out]
  return scales.astype(np.float32) * step


def _quantize_core(xp, w, method, group_size, scale_dtype, double_quant):
  """Shared numpy / jax body: w [..., in, out] -> (packed, scales, scales2)."""
  w = w.astype(np.float32)
  *lead, n_in, n_out = w.shape
  wg = w.reshape(*lead, n_in // group_size, group_size, n_out)  # [..., G, g, out]
  absmax = xp.max(xp.abs(wg), axis=-2)  # [..., G, out]
  if double_quant:
    scales, scales2 = _quantize_scales(xp, absmax)
    s = _dequantize_scales(xp, scales, scales2)  # [..., G, out] f32
  else:
    scales, scales2 = absmax.astype(scale_dtype), None
    s = scales.astype(np.float32)
  safe = xp.where(s > 0, s, np.float32(1))
  codes = _nearest_codes(xp, wg / safe[..., None, :], method)  # [..., G, g, out]
  codes = codes.reshape(*lead, n_in // 2, 2, n_out)
  packed = codes[..., 0, :] | (codes[..., 1, :] << np.uint8(4))  # [..., in/2, out]
  return packed, scales, scales2


_quantize_jax = jax.jit(
    functools.partial(_quantize_core, jnp),
    static_argnames=("method", "group_size", "scale_dtype", "double_quant"))


def quantize_array(x: Any, method: str = "nf4", group_size: int = 64, *,
                   double_quant: bool = False, scale_dtype: Any = jnp.bfloat16,
                   dtype: Any = None) -> qarray.QArray:
  """Quantizes one kernel x [..., in, out] (numpy or jax) to a QArray.

  Args:
    x: float array, input rows on axis -2; any leading axes (layers) are kept.
    method: 'nf4' or 'int4'.
    group_size: input rows per scale; must be even and divide x.shape[-2].
    double_quant: quantize the scales to uint8 with a float32 step per 256 of them.
    scale_dtype: dtype of the scales without double_quant (bfloat16 or float32).
    dtype: dtype `dequantize` returns; defaults to x.dtype.

  numpy in -> numpy children (host only); jax in -> jax children (jitted).
  """
  codebook(method)  # validates method
  shape = tuple(x.shape)
  if len(shape) < 2:
    raise ValueError(f"quantize_array needs a kernel [..., in, out], got shape {shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"quantize_array needs a float array, got dtype {x.dtype}")
  if group_size <= 0 or group_size % 2:
    raise ValueError(f"group_size must be a positive even number, got {group_size}")
  if shape[-2] % group_size:
    raise ValueError(f"input dim {shape[-2]} of shape {shape} is not divisible by "
                     f"group_size {group_size}")
  scale_dtype = np.dtype(scale_dtype)
  out_dtype = np.dtype(x.dtype if dtype is None else dtype)
  if isinstance(x, (np.ndarray, np.generic)):
    packed, scales, scales2 = _quantize_core(
        np, np.asarray(x), method, group_size, scale_dtype, double_quant)
  else:
    packed, scales, scales2 = _quantize_jax(
        x, method=method, group_size=group_size, scale_dtype=scale_dtype,
        double_quant=double_quant)
  return qarray.QArray(packed=packed, scales=scales, scales2=scales2, method=method,
                       group_size=group_size, dtype=out_dtype,
                       double_quant=double_quant)


def quantize_stacked(layers: Sequence[Any], method: str = "nf4", group_size: int = 64,
                     **kwargs) -> qarray.QArray:
  """Quantizes per-layer kernels [in, out] one at a time and stacks them: [L, in, out].

  Bit-identical to `quantize_array(np.stack(layers), ...)`, but the float copy of the
  stack never exists: peak extra memory is one layer. kwargs go to `quantize_array`.
  """
  return qarray.stack(
      [quantize_array(w, method, group_size, **kwargs) for w in layers])


def unpack_codes(packed: Any) -> jax.Array:
  """uint8 [..., in/2, out] -> uint8 codes [..., in, out] (row 2i low nibble, 2i+1 high)."""
  packed = jnp.asarray(packed)
  *lead, half_in, n_out = packed.shape
  codes = jnp.stack([packed & 0xF, packed >> 4], axis=-2)  # [..., in/2, 2, out]
  return codes.reshape(*lead, 2 * half_in, n_out)


def _lookup(codes: jax.Array, method: str) -> jax.Array:
  """uint8 codes [...] -> float32 codebook values [...] by a 4-level select tree.

  Elementwise only (15 selects between constants): XLA fuses it into the consumer, and
  unlike a gather from the table it keeps whatever sharding the codes have.
  """
  vals = [np.float32(v) for v in codebook(method)]  # 16 constants
  for bit in range(4):
    on = ((codes >> bit) & 1).astype(bool)
    vals = [jnp.where(on, vals[2 * j + 1], vals[2 * j]) for j in range(len(vals) // 2)]
  return vals[0]


def dequantize(q: qarray.QArray) -> jax.Array:
  """QArray -> the kernel [..., in, out] in q.dtype: codebook[code] * scale (float32 math).

  Works under jit (XLA fuses it into the consumer) and on any leading axes.
  """
  if not isinstance(q, qarray.QArray):
    raise TypeError(f"dequantize expects a QArray, got {type(q).__name__}")
  *lead, n_in, n_out = q.shape
  g = q.group_size
  vals = _lookup(unpack_codes(q.packed), q.method)  # [..., in, out] f32
  if q.double_quant:
    s = _dequantize_scales(jnp, jnp.asarray(q.scales), jnp.asarray(q.scales2))
  else:
    s = jnp.asarray(q.scales).astype(jnp.float32)  # [..., in/g, out]
  w = vals.reshape(*lead, n_in // g, g, n_out) * s[..., None, :]  # [..., in/g, g, out]
  return w.reshape(*lead, n_in, n_out).astype(q.dtype)


def matmul(x: jax.Array, w: Any) -> jax.Array:
  """x [..., d] @ w [d, f] -> [..., f], where w is a QArray or a plain array.

  The dequantisation sits inside the einsum's inputs, so under jit XLA fuses it and the
  float kernel is a temporary of this op only. For a QArray the product is also
  rematerialised in the backward pass (`jax.checkpoint`): autodiff would otherwise keep
  the dequantised kernel as a residual for x's gradient, i.e. a full-precision copy of
  every quantised layer for the whole backward pass, which is the memory QLoRA exists to
  save. The backward pass dequantises again (one elementwise pass over the 4-bit codes);
  the recomputed product itself is dead code and XLA drops it. Output dtype follows jnp
  promotion of x.dtype and w.dtype.
  """
  if isinstance(w, qarray.QArray):
    if w.ndim != 2:
      raise ValueError(f"matmul needs a 2D kernel [d, f], got a QArray of shape "
                       f"{w.shape}; scan over the leading layer axis first")
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f"matmul: x {x.shape} and kernel {w.shape} disagree on d")
    return _dequant_matmul(x, w)
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"matmul: x {x.shape} and kernel {w.shape} disagree on d")
  return jnp.einsum("...d,df->...f", x, w)


@functools.partial(jax.checkpoint, prevent_cse=False)
def _dequant_matmul(x: jax.Array, w: qarray.QArray) -> jax.Array:
  return jnp.einsum("...d,df->...f", x, dequantize(w))
