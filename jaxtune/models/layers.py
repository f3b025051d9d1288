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


@functools.partial(jax.checkpoint, prevent_cse=False)
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up: the gated MLP activation of Llama-family models. [..., F]."""
  return jax.nn.silu(gate) * up
