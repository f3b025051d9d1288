"""Layers that differ in kind: alternating sliding-window and global attention.

Gemma 2 alternates sliding and full attention layers; Gemma 3 runs five sliding layers per
global one, with its own rope base on the sliding ones. Such per-layer options are static
(the window picks the attention kernel and the KV-cache mask; the rope base its table), so
they are not scanned as data: the stacked layers [L, ...] are regrouped as [G, P, ...],
where P is the period of the pattern, and `lax.scan` runs over the G groups with the P
layers of a group unrolled, each with its own static `Kind`. Layers past the last whole
period (L mod P of them) run unrolled after the scan:

    layer_types = (s, f, s, f, s)     ->  period 2: scan over 2 groups of (s, f), then s
    layer_types = (s,) * 5 + (f,) ... ->  period 6 (Gemma 3: 26 layers = 4 x 6 + 2)

A model whose layers are all alike has period 1; the decoder then keeps its plain
one-layer scan (`uniform`), so Llama-family models run exactly the code they always ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune.models import layers


@dataclasses.dataclass(frozen=True)
class Kind:
  """The static options of one layer: attention window (0 = full) and whether it uses the
  local rope base (`ModelConfig.rope_local_theta`: every sliding layer does)."""
  window: int
  local: bool


def kinds(cfg: config_lib.ModelConfig) -> tuple[Kind, ...]:
  """Kind of every layer, from `layer_types` (or uniform: cfg.sliding_window everywhere)."""
  if cfg.layer_types and len(cfg.layer_types) != cfg.num_layers:
    raise ValueError(f"model.layer_types has {len(cfg.layer_types)} entries for "
                     f"num_layers={cfg.num_layers}")
  bad = sorted(set(cfg.layer_types) - {"sliding_attention", "full_attention"})
  if bad:
    raise ValueError(f"model.layer_types: {bad[0]!r} is not a layer type (expected "
                     "sliding_attention or full_attention)")
  # Sliding layers (window > 0) use the local rope base when the model has one.
  return tuple(Kind(w, bool(cfg.rope_local_theta) and w > 0) for w in cfg.layer_windows)


def period(ks: tuple[Kind, ...]) -> int:
  """The shortest P with ks[i] == ks[i % P] for every layer i."""
  n = len(ks)
  for p in range(1, n + 1):
    if all(ks[i] == ks[i % p] for i in range(n)):
      return p
  return max(n, 1)


def uniform(cfg: config_lib.ModelConfig) -> bool:
  """True when every layer is of the same kind (the plain one-layer scan applies)."""
  return period(kinds(cfg)) == 1


def attention_scale(cfg: config_lib.ModelConfig) -> float | None:
  """The softmax scale: query_pre_attn_scalar ** -0.5 (Gemma), else None (head_dim's)."""
  if cfg.query_pre_attn_scalar:
    return float(cfg.query_pre_attn_scalar) ** -0.5
  return None


def rope(cfg: config_lib.ModelConfig, positions: jax.Array,
         segment_ids: jax.Array | None = None) -> dict[bool, tuple[Any, float]]:
  """{local: (inv_freq [R/2] or LongRoPE's [B, T, R/2], cos/sin factor)} for the rope
  kinds the layers use."""
  out = {False: (layers.rope_inv_freq(cfg, positions, segment_ids),
                 layers.rope_attention_factor(cfg))}
  if cfg.rope_local_theta:
    out[True] = (layers.rope_inv_freq(cfg, positions, local=True),
                 layers.rope_attention_factor(cfg, local=True))
  return out


def _take(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def scan(body: Callable, carry, stacked, ks: tuple[Kind, ...]):
  """carry after body(carry, layer, kind, i) over every layer, in order.

  stacked: the layer params [L, ...] (any leaf type whose arrays all lead with L). The
  layers are scanned in groups of one period (unrolled inside the group); `i` is the layer
  index, traced inside the scan and a Python int for the trailing layers. Returns carry.
  """
  n, p = len(ks), period(ks)
  g = n // p
  if g:
    grouped = jax.tree_util.tree_map(lambda a: a[:g * p].reshape(g, p, *a.shape[1:]), stacked)

    def group(c, xs):
      layer_g, gi = xs
      for j in range(p):
        c = body(c, _take(layer_g, j), ks[j], gi * p + j)
      return c, None

    carry, _ = jax.lax.scan(group, carry, (grouped, jnp.arange(g, dtype=jnp.int32)))
  for i in range(g * p, n):
    carry = body(carry, _take(stacked, i), ks[i], i)
  return carry
