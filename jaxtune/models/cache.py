"""The KV cache of autoregressive decoding: preallocated keys and values, written in place.

Sampling runs the decoder once over the prompts (prefill) and then once per new token. So that
a step costs one token's work, each layer's keys and values are kept in a buffer allocated
once for the whole generation and updated in place (the sampler's `lax.while_loop` carries
it; XLA writes one slot per step, nothing is copied). The decoder's own block computes q, k, v
and calls `Layer.attend`, so there is one block for training and decoding (`decoder.py`).

    k, v  [L, B, K, S, Dh]   stacked over layers (scanned decoder), or a tuple of L
                             [B, K, S, Dh] buffers (unrolled decoder: `scan_layers=False`)
    pos   [B, S] int32       the position of the token held in each slot; -1 = empty

Slots are per row, and every row writes the same slot in a step (prompts are left-padded to
a common length P, with padding slots at position -1), so a step's write is one
`dynamic_update_slice`. A row sees the slots whose position is <= its query's position (and,
with a sliding window W, > query - W): positions, not slot indices, define the mask, which
is what lets a sliding-window model keep only S = W slots as a ring (slot = column mod S):

    cols   0 1 2 3 4 5 6 7 | 8 9 ...    P = 8 prompt columns, then one column per new token
    row 0  . . . a b c d e | f g        prompt of 5 (3 padding slots at -1), positions 0..
    row 1  a b c d e f g h | i j        prompt of 8

The KV layout [B, K, S, Dh] puts the per-(row, kv head) batch dims first and S next to Dh,
so a decode step's q . k and p . v are batched matrix products over contiguous slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune.models import attention as attention_lib


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys, values and slot positions of every layer (see the module docstring)."""
  k: Any  # [L, B, K, S, Dh], or a tuple of L [B, K, S, Dh]
  v: Any
  pos: Any  # [B, S] int32, -1 = empty

  @property
  def slots(self) -> int:
    return self.pos.shape[-1]


jax.tree_util.register_dataclass(KVCache)


def slots(cfg: config_lib.ModelConfig, total: int) -> int:
  """Slots to allocate for `total` = prompt columns + new tokens: all of them, or only the
  window for a sliding-window model whose window is shorter (a ring of W slots). A model
  with some global layers (Gemma 2/3) keeps every slot: its sliding layers mask the same
  buffer by position."""
  windows = set(cfg.layer_windows)
  if len(windows) == 1 and cfg.sliding_window and cfg.sliding_window < total:
    return cfg.sliding_window
  return total


def init(cfg: config_lib.ModelConfig, batch: int, num_slots: int, dtype) -> KVCache:
  """An empty cache (zeros, every slot at position -1); stacked iff cfg.scan_layers."""
  shape = (batch, cfg.num_kv_heads, num_slots, cfg.head_dim)
  if cfg.scan_layers:
    k = jnp.zeros((cfg.num_layers, *shape), dtype)
    v = jnp.zeros((cfg.num_layers, *shape), dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(k, v, jnp.full((batch, num_slots), -1, jnp.int32))


def axes(cfg: config_lib.ModelConfig) -> KVCache:
  """Logical axes of `init`'s cache (for sharding.spec / constraints)."""
  one = ("batch", "kv_heads", "seq", "head_dim")
  if cfg.scan_layers:
    k = v = ("layers", *one)
  else:
    k = v = tuple(one for _ in range(cfg.num_layers))
  return KVCache(k, v, ("batch", "seq"))


def constrain(kv: KVCache, cfg: config_lib.ModelConfig, constrain_fn) -> KVCache:
  """kv with every buffer constrained to its logical axes by `constrain_fn(x, axes)`."""
  ax = axes(cfg)
  if cfg.scan_layers:
    k, v = constrain_fn(kv.k, ax.k), constrain_fn(kv.v, ax.v)
  else:
    k = tuple(constrain_fn(x, a) for x, a in zip(kv.k, ax.k))
    v = tuple(constrain_fn(x, a) for x, a in zip(kv.v, ax.v))
  return KVCache(k, v, constrain_fn(kv.pos, ax.pos))


def ring(x: jax.Array, num_slots: int, axis: int) -> jax.Array:
  """The last `num_slots` columns of x along `axis`, each at slot (column mod num_slots).

  x has P columns; for P <= num_slots they stay at 0..P-1 (padded with nothing: the caller
  writes them at slot 0). E.g. P = 7, S = 3: columns 4, 5, 6 go to slots 1, 2, 0.
  """
  p = x.shape[axis]
  if p <= num_slots:
    return x
  last = jax.lax.slice_in_dim(x, p - num_slots, p, axis=axis)
  return jnp.roll(last, (p - num_slots) % num_slots, axis=axis)


def prefill_positions(cols: jax.Array, num_slots: int) -> jax.Array:
  """Slot positions after the prompt: cols [B, P] (position of each column, < 0 = padding)
  -> pos [B, S], -1 for padding and for slots not yet written."""
  b, p = cols.shape
  cols = jnp.where(cols < 0, -1, cols).astype(jnp.int32)
  if p >= num_slots:
    return ring(cols, num_slots, axis=1)
  return jnp.concatenate([cols, jnp.full((b, num_slots - p), -1, jnp.int32)], axis=1)


def write_positions(kv: KVCache, slot: jax.Array, positions: jax.Array) -> KVCache:
  """kv with slot `slot` ([] int32) of every row now holding position positions [B]."""
  pos = jax.lax.dynamic_update_slice(kv.pos, positions[:, None].astype(jnp.int32),
                                     (jnp.zeros((), jnp.int32), slot))
  return dataclasses.replace(kv, pos=pos)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer's view of the cache, handed to the decoder block (`decoder._block(kv=)`).

  k, v: the layer's buffers [B, K, S, Dh], or the stacked [L, B, K, S, Dh] with `layer`
  its (traced) index. pos [B, S]: slot positions including this call's tokens. slot: the
  slot of this call's token (decode). prefill: static; True writes the P prompt columns
  (ring-wrapped when P > S) and attends within the prompt; False writes one token and
  attends over the cache. gapless: static; a row's filled slots are one run (no
  prompt-tuning prefix before the left padding), which the Pallas decode kernel needs.
  """
  k: Any
  v: Any
  pos: Any
  slot: Any
  layer: Any = None
  prefill: bool = _static(False)
  gapless: bool = _static(True)

  def _write(self, buf: jax.Array, new: jax.Array, start) -> jax.Array:
    """buf with `new` [B, K, T, Dh] written at slot `start` (of this layer)."""
    new = new.astype(buf.dtype)
    zero = jnp.zeros((), jnp.int32)
    if self.layer is None:
      return jax.lax.dynamic_update_slice(buf, new, (zero, zero, start, zero))
    return jax.lax.dynamic_update_slice(buf, new[None], (self.layer, zero, zero, start, zero))

  def _read(self, buf: jax.Array) -> jax.Array:
    if self.layer is None:
      return buf
    return jax.lax.dynamic_index_in_dim(buf, self.layer, axis=0, keepdims=False)

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, positions: jax.Array,
             impl: str, sliding_window: int = 0,
             prefill_attention=None, mesh=None, scale: float | None = None,
             softcap: float = 0.0) -> tuple[jax.Array, "Layer"]:
    """Writes this call's k, v [B, T, K, Dh] and attends q [B, T, H, Dh] -> [B, T, H, Dh].

    Prefill: attention within the prompt (`prefill_attention()`, the decoder's own, with
    padding as segment 0), and the prompt's keys and values stored. Decode (T = 1): the
    token's k, v stored at `slot`, then attention over every slot whose position is
    visible from positions [B, T]. mesh: the decode kernel runs per device under it.
    scale / softcap: the softmax scale and score soft-cap (`attention.cached_attention`).
    """
    kt = jnp.swapaxes(k, 1, 2)  # [B, K, T, Dh]
    vt = jnp.swapaxes(v, 1, 2)
    zero = jnp.zeros((), jnp.int32)
    if self.prefill:
      o = prefill_attention()
      s = self.pos.shape[-1]
      new = dataclasses.replace(self, k=self._write(self.k, ring(kt, s, 2), zero),
                                v=self._write(self.v, ring(vt, s, 2), zero))
      return o, new
    if q.shape[1] != 1:
      raise ValueError(f"cached decoding takes one token per row, got q {q.shape}")
    new = dataclasses.replace(self, k=self._write(self.k, kt, self.slot),
                              v=self._write(self.v, vt, self.slot))
    kc, vc = new._read(new.k), new._read(new.v)
    pallas = attention_lib.decode_attention_impl(impl, q, self.pos.shape[-1], sliding_window,
                                                 softcap)
    if self.gapless and pallas == "pallas":
      # No ring: a row's keys are the slots from its first prompt token to this one.
      start = jnp.argmax(self.pos >= 0, axis=-1).astype(jnp.int32)  # [B]
      end = jnp.broadcast_to(self.slot + 1, start.shape).astype(jnp.int32)
      return attention_lib.pallas_decode_attention(q, kc, vc, start, end, mesh=mesh,
                                                   scale=scale), new
    kpos = self.pos[:, None, :]  # [B, 1, S]
    qpos = positions[:, :, None]  # [B, T, 1]
    mask = (kpos >= 0) & (kpos <= qpos)
    if sliding_window:
      mask &= (qpos - kpos) < sliding_window
    return attention_lib.cached_attention(q, kc, vc, mask, scale=scale, softcap=softcap), new


jax.tree_util.register_dataclass(Layer)
