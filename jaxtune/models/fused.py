"""Side-by-side projections for decoding: q|k|v and gate|up as one matrix product each.

A decode step multiplies a few hundred rows by every weight, so its matrix products are
short and wide, and several small ones cost more than one of their combined width (one
H200, Llama-3.2-1B shape, 256 rows: the q, k, v, o, gate, up, down products of 16 layers
take 1.49 ms separately and 1.09 ms with q|k|v and gate|up fused; docs/BENCHMARKS.md). The
sampler's decode program (`sampling/engine.py`) therefore adds, before its loop, a fused
entry beside each layer's own projections:

    self_attn: {"q_proj", "k_proj", "v_proj", ...} + {"qkv_proj": {"kernel": [D, (H+2K)*Dh]}}
    mlp:       {"gate_proj", "up_proj", "down_proj"} + {"gate_up_proj": {"kernel": [D, 2F]}}

and the decoder block (`decoder._block`) uses a fused entry when it finds one (unrolled
layers get it per layer, a uniform scanned stack [L, ...] along the same last axis). The
weights are concatenated once per decode call, never per token: a transient copy of those
projections, which the sampler makes only when it takes at most half the free device memory
(`engine.fit_fuse`, which sizes it by abstract evaluation of `fuse_layer`; ~2 GB for a
1B model, ~14 GB for an 8B one in bf16). Leaves are concatenated by `concat_out`: dense
arrays directly, adapter leaves that know how (`LoraKernel.concat_out`: bases side by side, LoRA factors block-diagonal); a
4-bit base or any other leaf is left unfused. Training never sees these entries.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

QKV = "qkv_proj"
GATE_UP = "gate_up_proj"
GROUPS = (("self_attn", QKV, ("q_proj", "k_proj", "v_proj")),
           ("mlp", GATE_UP, ("gate_proj", "up_proj")))


def concat_out(kernels: list) -> Any:
  """One kernel leaf [..., in, sum(out)] equal to `kernels` ([..., in, out_i]) side by side,
  or None when some leaf cannot be concatenated. A leaf type joins in by defining a
  classmethod `concat_out(kernels)` returning such a leaf or None."""
  if all(isinstance(k, jax.Array) for k in kernels):
    return jnp.concatenate(kernels, axis=-1)
  first = type(kernels[0])
  join = getattr(first, "concat_out", None)
  if join is None or any(type(k) is not first for k in kernels):
    return None
  return join(kernels)


def fuse_layer(layer: dict) -> dict:
  """One layer's params with the fused entries added where every part can be joined (the
  parts' own entries stay: adapters such as LLaMA-Adapter read k_proj / v_proj)."""
  out = dict(layer)
  for group, name, parts in GROUPS:
    sub = layer.get(group)
    if not isinstance(sub, dict) or not all(p in sub for p in parts):
      continue  # an MoE layer's mlp, or a family without these projections
    biases = [sub[p].get("bias") for p in parts]
    if any(b is None for b in biases) and any(b is not None for b in biases):
      continue
    kernel = concat_out([sub[p]["kernel"] for p in parts])
    if kernel is None:
      continue
    entry = {"kernel": kernel}
    if biases[0] is not None:
      entry["bias"] = jnp.concatenate(biases, axis=-1)
    out[group] = dict(sub, **{name: entry})
  return out


def products(lin, x: jax.Array, sub: dict, name: str, sizes: tuple[int, ...] | None = None
             ) -> list:
  """The parts of group `name` (QKV or GATE_UP) applied to x, each [..., size] (sizes None:
  equal parts): one product split back (the fused entry, when `fuse_layer` added it), else
  each part's own product. lin(x, entry) is the block's projection."""
  parts = next(p for _, n, p in GROUPS if n == name)
  if name not in sub:
    return [lin(x, sub[p]) for p in parts]
  y = lin(x, sub[name])
  if sizes is None:
    return jnp.split(y, len(parts), axis=-1)
  return jnp.split(y, [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)], axis=-1)
