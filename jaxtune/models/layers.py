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


def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, one_plus: bool = False) -> jax.Array:
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  y = x32 * jax.lax.rsqrt(var + eps)
  s32 = scale.astype(jnp.float32)
  return (y * ((1.0 + s32) if one_plus else s32)).astype(x.dtype)


_rms_norm_remat = jax.checkpoint(_rms_norm, static_argnums=(2,), prevent_cse=False)
_rms_norm_one_plus_remat = jax.checkpoint(functools.partial(_rms_norm, one_plus=True),
                                          static_argnums=(2,), prevent_cse=False)


def norm(cfg: config_lib.ModelConfig, x: jax.Array, scale: jax.Array) -> jax.Array:
  """The model's RMSNorm: x / rms(x) * scale, or * (1 + scale) when cfg.norm_one_plus
  (Gemma, which stores w and scales by 1 + w, all in float32 as transformers does)."""
  if not cfg.norm_one_plus:
    return rms_norm(x, scale, cfg.rms_norm_eps)
  if x.dtype == jnp.float32:
    return _rms_norm(x, scale, cfg.rms_norm_eps, True)
  return _rms_norm_one_plus_remat(x, scale, cfg.rms_norm_eps)


def rotary_dim(cfg: config_lib.ModelConfig) -> int:
  """How many leading dims of each head the rotary embedding turns (Phi-3's partial)."""
  return int(cfg.head_dim * cfg.partial_rotary_factor)


def rope_inv_freq(cfg: config_lib.ModelConfig, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None, *, local: bool = False) -> jax.Array:
  """Inverse frequencies [R/2] (R = `rotary_dim`), including Llama-3.1 ('llama3'), linear
  and LongRoPE ('longrope') scaling.

  local: a sliding layer of a model with its own local base (`rope_local_theta`, Gemma 3):
  that base, unscaled. LongRoPE ([B, T, R/2]) divides by `short_factor` while a sequence's
  longest position fits in the original context and by `long_factor` beyond it, as
  transformers picks them from max(position_ids) + 1 when it runs that sequence alone: per
  row of positions [B, T], or per packed segment when segment_ids [B, T] are given.
  """
  dh = rotary_dim(cfg)
  if local and cfg.rope_local_theta:
    return 1.0 / (cfg.rope_local_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  rs = cfg.rope_scaling
  if rs.kind == "longrope":
    if positions is None:
      raise ValueError("longrope needs the positions to pick short or long factors")
    short = jnp.asarray(rs.short_factor, jnp.float32)
    long = jnp.asarray(rs.long_factor, jnp.float32)
    base = cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    beyond = _sequence_max(positions, segment_ids) + 1 > rs.original_max_position_embeddings
    return jnp.where(beyond[..., None], 1.0 / (long * base), 1.0 / (short * base))
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


def _sequence_max(positions: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  """The largest position of each token's sequence: [B, 1] per row, or [B, T] per packed
  segment (segment ids < 0, virtual tokens, count with padding's segment 0)."""
  if segment_ids is None:
    return jnp.max(positions, axis=-1, keepdims=True)
  t = positions.shape[-1]
  seg = jnp.clip(segment_ids, 0, t)

  def row(p, s):
    return jax.ops.segment_max(p, s, num_segments=t + 1)[s]
  return jax.vmap(row)(positions, seg)


def rope_attention_factor(cfg: config_lib.ModelConfig, *, local: bool = False) -> float:
  """The factor on cos and sin: LongRoPE's attention_factor on scaled layers, else 1."""
  if cfg.rope_scaling.kind == "longrope" and not (local and cfg.rope_local_theta):
    return cfg.rope_scaling.attention_factor
  return 1.0


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               factor: float = 1.0) -> jax.Array:
  """Rotary embedding, HF 'rotate_half' layout. x [B, T, H, Dh], positions [B, T].

  inv_freq [R/2] turns the first R dims (R < Dh: partial rotary, the rest pass through);
  factor scales cos and sin (LongRoPE's attention factor)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2]
  sin = jnp.sin(angles)[:, :, None, :]
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  x32 = x.astype(jnp.float32)
  r = 2 * inv_freq.shape[-1]
  rest = None
  if r != x.shape[-1]:
    x32, rest = x32[..., :r], x32[..., r:]
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  if rest is not None:
    out = jnp.concatenate([out, rest], axis=-1)
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


@functools.partial(jax.checkpoint, prevent_cse=False)
def geglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """gelu_tanh(gate) * up: Gemma's gated MLP (transformers' gelu_pytorch_tanh). [..., F]."""
  return jax.nn.gelu(gate, approximate=True) * up


def gated(cfg: config_lib.ModelConfig, gate: jax.Array, up: jax.Array) -> jax.Array:
  """The gated MLP activation of cfg.hidden_act (silu -> SwiGLU, gelu_pytorch_tanh -> GeGLU)."""
  if cfg.hidden_act == "silu":
    return swiglu(gate, up)
  if cfg.hidden_act == "gelu_pytorch_tanh":
    return geglu(gate, up)
  raise ValueError(f"model.hidden_act={cfg.hidden_act!r} is not supported "
                   "(expected silu or gelu_pytorch_tanh)")
