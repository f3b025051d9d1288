"""MoE experts stored fused per layer on disk, read as the per-expert tensors of the Hub.

Some checkpoints hold a layer's experts the way transformers 5's modules do in memory
(`MixtralExperts`, `Qwen3MoeExperts`: `F.linear(x, gate_up_proj[e]).chunk(2)` -> gate, up),
rather than one tensor per expert as the Hub and transformers' own `save_pretrained` do:

    {p}.experts.gate_up_proj   [E, 2F, D]   rows: expert e's gate [F, D], then its up [F, D]
    {p}.experts.down_proj      [E, D, F]    expert e's down [D, F]
    {p}.gate.weight            [E, D]       the router, as in the per-expert layout

with p the family's `ExpertKeys.prefix` (Qwen3-MoE `model.layers.{i}.mlp`, Mixtral
`model.layers.{i}.block_sparse_moe`) or transformers 5's module path
`model.layers.{i}.mlp` (Mixtral's in-memory name). `view` detects the layout from the keys
present and shows the tensors as the per-expert keys of `hf/expert_keys.py`, each a slice of
the fused tensor (so import is bit-identical and the key check is the usual one). Export
keeps writing one tensor per expert, the Hub's layout. The other orientation ([E, D, 2F],
[E, F, D]) is refused by its shape, naming the file, the key and the expected shape, except
where the shapes coincide (D == 2F for gate|up, D == F for down): there the fused layout is
assumed, with a warning in the log, since no shape can tell them apart.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

import numpy as np

from jaxtune import config as config_lib
from jaxtune.hf import expert_keys
from jaxtune.models import families
from jaxtune.models import moe

GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"
MODULE_PREFIX = "model.layers.{i}.mlp"  # transformers 5's in-memory MoE block


def _prefixes(cfg: config_lib.ModelConfig) -> tuple[str, ...]:
  own = families.get(cfg.family).experts.prefix
  return (own,) if own == MODULE_PREFIX else (own, MODULE_PREFIX)


def fused_prefix(cfg: config_lib.ModelConfig, keys) -> str | None:
  """The layer prefix under which the checkpoint stores fused experts, or None."""
  if not moe.is_moe(cfg):
    return None
  for p in _prefixes(cfg):
    rx = re.compile(re.escape(p).replace(re.escape("{i}"), r"\d+") + r"\.experts\."
                    r"(gate_up_proj|down_proj)")
    if any(rx.fullmatch(k) for k in keys):
      return p
  return None


def _check(key: str, shapes: dict, want: tuple[int, ...], what: str, source: str,
           file_of: Callable[[str], str]) -> None:
  if key not in shapes:
    raise ValueError(f"{source}: missing tensor {key} (expected {list(want)}, {what}); the "
                     "checkpoint stores other layers' experts fused")
  if tuple(shapes[key]) != want:
    raise ValueError(f"{file_of(key)}: tensor {key} has shape {list(shapes[key])}, expected "
                     f"{list(want)} ({what})")


def view(cfg: config_lib.ModelConfig, shapes: dict, get: Callable[[str], np.ndarray], *,
         source: str, file_of: Callable[[str], str]):
  """(shapes, get) with fused experts shown as per-expert tensors; unchanged otherwise."""
  p = fused_prefix(cfg, shapes)
  if p is None:
    return shapes, get
  e, d, f = cfg.num_experts, cfg.hidden_size, moe.expert_width(cfg)
  if d in (f, 2 * f):
    logging.getLogger("jaxtune").warning(
        "%s: fused MoE experts with hidden %d and expert width %d: a transposed file has the "
        "same shapes; reading them as transformers' layout ([E, 2F, D], [E, D, F])", source,
        d, f)
  out = dict(shapes)
  alias: dict[str, tuple[str, int | None, slice | None]] = {}
  for i in moe.moe_layers(cfg):
    router, per = expert_keys.layer_keys(cfg, i)
    pre = p.format(i=i)
    gu, dn = f"{pre}.{GATE_UP}", f"{pre}.{DOWN}"
    _check(gu, shapes, (e, 2 * f, d), "[experts, 2 * expert width (gate rows, then up rows), "
           "hidden], transformers' fused layout", source, file_of)
    _check(dn, shapes, (e, d, f), "[experts, hidden, expert width], transformers' fused "
           "layout", source, file_of)
    del out[gu], out[dn]
    for x, (g, u, dk) in enumerate(per):
      both = [k for k in (g, u, dk) if k in shapes]
      if both:
        raise ValueError(f"{file_of(both[0])}: tensor {both[0]} is "
                         f"stored per expert while {gu} holds the same experts fused")
      alias[g], alias[u], alias[dk] = (gu, x, slice(0, f)), (gu, x, slice(f, 2 * f)), (
          dn, x, slice(None))
      out[g], out[u], out[dk] = (f, d), (f, d), (d, f)
    fused_router = f"{pre}.gate.weight"
    if fused_router != router and fused_router in shapes and router not in shapes:
      alias[router] = (fused_router, None, None)
      out[router] = out.pop(fused_router)
  cache: dict[str, np.ndarray] = {}

  def get_view(key: str) -> np.ndarray:
    if key not in alias:
      return get(key)
    src, x, rows = alias[key]
    if src not in cache:  # one fused tensor at a time: the readers go layer by layer
      cache.clear()
      cache[src] = get(src)
    t = cache[src]
    return t if x is None else t[x, rows]

  return out, get_view
