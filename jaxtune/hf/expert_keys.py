"""HF <-> jaxtune keys of MoE routers and experts, one tensor per expert on disk.

The Hub (and transformers 5's save_pretrained, which undoes its in-memory fusion on save)
stores each expert's projections separately; jaxtune stacks them over layers and experts
and fuses gate and up on the output axis, as transformers 5 does in memory:

    model.layers.{i}.mlp.gate.weight                [E, D]   -> layers/mlp/gate/kernel [Lm, D, E]
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight [F, D] \\
    model.layers.{i}.mlp.experts.{e}.up_proj.weight   [F, D] -> .../gate_up_proj/kernel
                                                               [Lm, E, D, 2F] = [gate.T | up.T]
    model.layers.{i}.mlp.experts.{e}.down_proj.weight [D, F] -> .../down_proj/kernel [Lm, E, F, D]

(names per family: `families.base.ExpertKeys`). `to_hf` is the exact inverse of
`to_params`, so import followed by export is bit-identical. Checkpoints that store a layer's
experts fused (transformers 5's in-memory `experts.gate_up_proj` / `experts.down_proj`) are
read through `hf/fused_experts.py`, which shows them as these per-expert keys.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from jaxtune import config as config_lib
from jaxtune.models import families
from jaxtune.models import moe

ROUTER = "layers/mlp/gate/kernel"
GATE_UP = "layers/mlp/experts/gate_up_proj/kernel"
DOWN = "layers/mlp/experts/down_proj/kernel"
PATHS = (ROUTER, GATE_UP, DOWN)


def layer_keys(cfg: config_lib.ModelConfig, i: int):
  """(router key, [(gate, up, down) keys per expert]) of HF layer i."""
  ek = families.get(cfg.family).experts
  pre = ek.prefix.format(i=i)
  per = [tuple(f"{pre}.experts.{e}.{n}.weight" for n in (ek.gate, ek.up, ek.down))
         for e in range(cfg.num_experts)]
  return f"{pre}.gate.weight", per


def hf_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """{HF key: shape} of every router and expert tensor ({} for a dense model)."""
  if not moe.is_moe(cfg):
    return {}
  d, e, f = cfg.hidden_size, cfg.num_experts, moe.expert_width(cfg)
  out = {}
  for i in moe.moe_layers(cfg):
    router, per = layer_keys(cfg, i)
    out[router] = (e, d)
    for g, u, dn in per:
      out[g], out[u], out[dn] = (f, d), (f, d), (d, f)
  return out


def to_params(cfg: config_lib.ModelConfig, get: Callable[[str], np.ndarray],
              paths: Iterable[str] | None = None) -> Iterable[tuple[str, np.ndarray]]:
  """Yields (param path, stacked host array) for the router and the experts."""
  if not moe.is_moe(cfg):
    return
  wanted = set(PATHS if paths is None else paths)
  layers = [layer_keys(cfg, i) for i in moe.moe_layers(cfg)]
  if ROUTER in wanted:
    yield ROUTER, np.stack([get(router).T for router, _ in layers])
  if GATE_UP in wanted:
    yield GATE_UP, np.stack([np.stack([np.concatenate([get(g).T, get(u).T], axis=-1)
                                       for g, u, _ in per]) for _, per in layers])
  if DOWN in wanted:
    yield DOWN, np.stack([np.stack([get(dn).T for _, _, dn in per]) for _, per in layers])


def to_hf(cfg: config_lib.ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{HF key: array} of the router and experts; the exact inverse of `to_params`."""
  if not moe.is_moe(cfg):
    return {}
  f = moe.expert_width(cfg)
  out = {}
  for j, i in enumerate(moe.moe_layers(cfg)):
    router, per = layer_keys(cfg, i)
    out[router] = np.ascontiguousarray(flat[ROUTER][j].T)
    for e, (g, u, dn) in enumerate(per):
      gu = flat[GATE_UP][j, e]  # [D, 2F]
      out[g] = np.ascontiguousarray(gu[:, :f].T)
      out[u] = np.ascontiguousarray(gu[:, f:].T)
      out[dn] = np.ascontiguousarray(flat[DOWN][j, e].T)
  return out
