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

Models whose layers differ (Gemma 2/3: sliding layers of window W and global ones) keep two
groups when W is shorter than the generation's C columns: `KVCache.local`, a ring of W
slots for the sliding layers, and the top-level k, v, pos with every column for the global
layers. Each group is laid out as above over its own layers, with its own `pos` (the same
columns, each at slot column mod its S). E.g. Gemma 3, layers (5 sliding, 1 global) x G:

    kv.local  k, v [5G, B, K, W, Dh]   pos [B, W]   slot = column mod W
    kv        k, v [G, B, K, C, Dh]    pos [B, C]   slot = column

Layer i is entry `_rank` of its group (the layers of its group before it; from a traced i
in the grouped scan, counted per period of the layer pattern). A model whose layers share
one window (or none), a generation of at most W columns, or prompt tuning (the sampler
keeps every column there: padding sits between the virtual tokens and the prompt, so the
last W columns may miss in-window tokens) has one group.

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
from jaxtune.models import layer_pattern


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys, values and slot positions of every layer (see the module docstring): one group,
  or the global layers' with the sliding layers' ring in `local`."""
  k: Any  # [L, B, K, S, Dh], or a tuple of L [B, K, S, Dh]
  v: Any
  pos: Any  # [B, S] int32, -1 = empty
  local: "KVCache | None" = None  # sliding layers' ring [L_local, B, K, W, Dh] (Gemma 2/3)

  @property
  def slots(self) -> int:
    return self.pos.shape[-1]


jax.tree_util.register_dataclass(KVCache)


def slots(cfg: config_lib.ModelConfig, total: int, virtual: int = 0) -> tuple[int, int]:
  """(S, S_local): cache slots to allocate for `total` columns (prompt-tuning tokens, prompt
  and new tokens). A ring of the window W where it is shorter than `total`: S = W for a
  model whose layers all slide over W; S = total and S_local = W (its sliding layers' ring)
  for a model with some global layers too (Gemma 2/3); else S = total, S_local = 0 (one
  group). No ring with `virtual` prompt-tuning tokens: the padding between them and the
  prompt would push in-window virtual tokens out of the last W columns."""
  w = cfg.sliding_window
  if virtual or not 0 < w < total:
    return total, 0
  return (w, 0) if len(set(cfg.layer_windows)) == 1 else (total, w)


def _group(cfg: config_lib.ModelConfig, n: int, batch: int, num_slots: int,
           dtype) -> KVCache:
  shape = (batch, cfg.num_kv_heads, num_slots, cfg.head_dim)
  if cfg.scan_layers:
    k, v = jnp.zeros((n, *shape), dtype), jnp.zeros((n, *shape), dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(n))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(n))
  return KVCache(k, v, jnp.full((batch, num_slots), -1, jnp.int32))


def _sliding(cfg: config_lib.ModelConfig) -> tuple[bool, ...]:
  return tuple(w > 0 for w in cfg.layer_windows)


def init(cfg: config_lib.ModelConfig, batch: int, num_slots: int, dtype,
         local: int = 0) -> KVCache:
  """An empty cache (zeros, every slot at position -1); stacked iff cfg.scan_layers.
  local: the sliding layers' ring (`local_slots`; 0 = one group of num_slots for all)."""
  if not local:
    return _group(cfg, cfg.num_layers, batch, num_slots, dtype)
  n = sum(_sliding(cfg))
  return dataclasses.replace(_group(cfg, cfg.num_layers - n, batch, num_slots, dtype),
                             local=_group(cfg, n, batch, local, dtype))


_ONE = ("batch", "act_kv_heads", "seq", "head_dim")


def axes(kv: KVCache) -> KVCache:
  """The logical axes of each buffer of `kv` (stacked or per layer, one group or two), for
  sharding.spec and constraints."""
  def group(g):
    k = tuple(_ONE for _ in g.k) if isinstance(g.k, tuple) else ("layers", *_ONE)
    return KVCache(k, k, ("batch", "seq"))

  return _groups(kv, group)


def constrain(kv: KVCache, constrain_fn) -> KVCache:
  """kv with every buffer constrained to its logical axes (`axes`) by `constrain_fn(x, axes)`."""
  return jax.tree.map(constrain_fn, kv, axes(kv))


def _groups(kv: KVCache, fn) -> KVCache:
  """kv with fn(group) -> group applied to each group (the top level keeps its `local`)."""
  out = fn(kv)
  return out if kv.local is None else dataclasses.replace(out, local=fn(kv.local))


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


def set_prefill_positions(kv: KVCache, cols: jax.Array) -> KVCache:
  """kv with each group's slot positions after the prompt (`prefill_positions`)."""
  return _groups(kv, lambda g: dataclasses.replace(g, pos=prefill_positions(cols, g.slots)))


def write_positions(kv: KVCache, column: jax.Array, positions: jax.Array) -> KVCache:
  """kv with column `column` ([] int32) of every row now holding position positions [B]:
  in each group at slot column mod its S."""
  def write(g):
    pos = jax.lax.dynamic_update_slice(g.pos, positions[:, None].astype(jnp.int32),
                                       (jnp.zeros((), jnp.int32), column % g.slots))
    return dataclasses.replace(g, pos=pos)
  return _groups(kv, write)


def unstacked(kv: KVCache) -> KVCache:
  """kv with stacked [L, ...] buffers split into tuples of L per-layer buffers."""
  return _groups(kv, lambda g: g if isinstance(g.k, tuple) else
                 dataclasses.replace(g, k=tuple(g.k), v=tuple(g.v)))


def _rank(flags: tuple[bool, ...], i, flag: bool):
  """Index of layer i among the layers whose flag is `flag`: an int for an int i; for a
  traced i (a scan over groups of one period p of the pattern, `layer_pattern.scan`),
  (i // p) * (its layers per period) + (its layers before i mod p in the period)."""
  if isinstance(i, int):
    return sum(f == flag for f in flags[:i])
  p = layer_pattern.period(flags)
  before = [sum(f == flag for f in flags[:j]) for j in range(p + 1)]
  return (i // p) * before[p] + jnp.asarray(before[:p], jnp.int32)[i % p]


def _locate(kv: KVCache, cfg: config_lib.ModelConfig, i, window: int):
  """(layer i's group, its index there, whether the group is `local`)."""
  if kv.local is None:
    return kv, i, False
  local = window > 0
  return (kv.local if local else kv), _rank(_sliding(cfg), i, local), local


def layer(kv: KVCache, cfg: config_lib.ModelConfig, i, window: int, *, column=0,
          prefill: bool, gapless: bool) -> "Layer":
  """Layer i's view (`Layer`) of kv, with its static window; column: this step's (decode)."""
  g, r, _ = _locate(kv, cfg, i, window)
  slot = column % g.slots
  if isinstance(g.k, tuple):
    return Layer(g.k[r], g.v[r], g.pos, slot, None, prefill=prefill, gapless=gapless)
  return Layer(g.k, g.v, g.pos, slot, r, prefill=prefill, gapless=gapless)


def store(kv: KVCache, cfg: config_lib.ModelConfig, i, window: int, new: "Layer") -> KVCache:
  """kv with layer i's buffers as `layer` and the block left them (`new`)."""
  g, r, local = _locate(kv, cfg, i, window)
  if isinstance(g.k, tuple):
    k, v = g.k[:r] + (new.k,) + g.k[r + 1:], g.v[:r] + (new.v,) + g.v[r + 1:]
  else:
    k, v = new.k, new.v
  if local:
    return dataclasses.replace(kv, local=dataclasses.replace(g, k=k, v=v))
  return dataclasses.replace(kv, k=k, v=v)


@dataclasses.dataclass(frozen=True)
class Layer:
  """One layer's view of the cache, handed to the decoder block (`decoder._block(kv=)`).

  k, v: the layer's buffers [B, K, S, Dh], or its group's stacked [L, B, K, S, Dh] with
  `layer` its (traced) index there. pos [B, S]: the group's slot positions including this
  call's tokens. slot: the slot of this call's token (decode). prefill: static; True
  writes the P prompt columns (ring-wrapped when P > S) and attends within the prompt;
  False writes one token and attends over the cache. gapless: static; a row's filled
  slots are one run (no prompt-tuning prefix before the left padding), which the Pallas
  decode kernel needs.
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
