"""PEFT LoRA files for fused Hugging Face projections (Phi-3's `qkv_proj`, `gate_up_proj`).

jaxtune splits a fused HF weight into its parts on import (`jaxtune.hf.keys`, tuple rows), so
LoRA adapts q/k/v (gate/up) separately; PEFT adapts the fused Linear. Both are exact:

  export (jaxtune -> PEFT): the n adapted parts' factors stack into one LoRA of rank n*r on
    the fused module, A = [a_1; ...; a_n] and B block-diagonal (zero rows for parts that are
    not adapted), so B A x = the parts' updates side by side. PEFT's `rank_pattern` says
    n*r and `alpha_pattern` keeps the scale alpha / r (alpha * n, or * sqrt(n) with rsLoRA):

        ...self_attn.qkv_proj.lora_A.weight  [3r, D]      rank_pattern {"qkv_proj": 3r}
        ...self_attn.qkv_proj.lora_B.weight  [Q+2KV, 3r]  alpha_pattern {"qkv_proj": 3 alpha}

  import (PEFT -> jaxtune): a fused LoRA of the adapter's rank r splits into one LoRA per
    part with the same A and that part's rows of B (no rank_pattern: every module rank r).

This module imports only the key tables it reads; `peft_io` calls it.
"""

from __future__ import annotations

import math
import re

import numpy as np

from jaxtune import config as config_lib
from jaxtune.hf import keys
from jaxtune.models import decoder
from jaxtune.models import families


# Every fused HF module name of the registered families ("gate_up_proj", "qkv_proj").
FUSED_NAMES = tuple(sorted({t[:-len(".weight")].rsplit(".", 1)[1]
                            for f in families.FAMILIES.values() for t, p, _ in f.rows
                            if isinstance(p, tuple) and t.endswith(".weight")}))


class Templates(dict):
  """`peft_io.module_templates`' dict: a fused part's missing template is a clear error."""

  def __init__(self, family: str, fused: dict[str, str]):
    super().__init__()
    self.family, self.fused = family, fused

  def __missing__(self, module: str):
    if module in self.fused:
      raise ValueError(f"{module} is part of the fused {self.fused[module]} of a {self.family} "
                       "checkpoint; only LoRA / QLoRA adapter files can express it (use "
                       "peft.method=lora or qlora, or merge the adapter)")
    raise KeyError(module)


def groups(cfg: config_lib.ModelConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
  """{HF module name ("qkv_proj"): (HF module template, part modules)} of the family."""
  out = {}
  for template, path, transpose in keys.rows(cfg):
    if isinstance(path, tuple) and transpose and template.endswith(".weight"):
      stem = template[:-len(".weight")]
      out[stem.rsplit(".", 1)[1]] = (stem, tuple(p.rsplit("/", 1)[0] for p in path))
  return out


def part_of(cfg: config_lib.ModelConfig, module: str) -> str | None:
  """The fused HF module name a part module ("layers/self_attn/q_proj") belongs to."""
  for name, (_, parts) in groups(cfg).items():
    if module in parts:
      return name
  return None


def write(cfg: config_lib.ModelConfig, ab: dict[str, tuple[np.ndarray, np.ndarray]], *,
          rank: int, alpha: float, rslora: bool, prefix: str):
  """(tensors, module names, rank_pattern, alpha_pattern) for the fused parts in `ab`
  ({part module: (a [L, in, r], b [L, r, out])})."""
  shapes = decoder.shapes(cfg)
  tensors, names, ranks, alphas = {}, [], {}, {}
  for name, (stem, parts) in groups(cfg).items():
    used = [p for p in parts if p in ab]
    if not used:
      continue
    n = len(used)
    a = np.concatenate([ab[p][0] for p in used], axis=-1)  # [L, in, n*r]
    widths = [shapes[p + "/kernel"][-1] for p in parts]
    b = np.zeros((a.shape[0], n * rank, sum(widths)), a.dtype)  # [L, n*r, out]
    col = 0
    for p, w in zip(parts, widths):
      if p in ab:
        j = used.index(p)
        b[:, j * rank:(j + 1) * rank, col:col + w] = ab[p][1]
      col += w
    for i in range(cfg.num_layers):
      tensors[prefix + stem.format(i=i) + ".lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[prefix + stem.format(i=i) + ".lora_B.weight"] = np.ascontiguousarray(b[i].T)
    names.append(name)
    if n > 1:
      ranks[name] = n * rank
      scaled = alpha * (math.sqrt(n) if rslora else n)
      alphas[name] = int(scaled) if float(scaled).is_integer() else scaled
  return tensors, names, ranks, alphas


def names(cfg: config_lib.ModelConfig, tensor_names, prefix: str) -> set[str]:
  """The tensors of `tensor_names` that are LoRA factors of a fused module."""
  out = set()
  for stem, _ in groups(cfg).values():
    rx = re.compile(re.escape(prefix + stem).replace(re.escape("{i}"), r"\d+")
                    + r"\.lora_[AB]\.weight")
    out |= {n for n in tensor_names if rx.fullmatch(n)}
  return out


def read(cfg: config_lib.ModelConfig, get, present: set[str], rank: int, prefix: str,
         source: str) -> dict[str, dict[str, np.ndarray]]:
  """{part module: {"a": [L, in, r], "b": [L, r, out]}} from fused-module LoRA tensors."""
  shapes = decoder.shapes(cfg)
  out = {}
  for stem, parts in groups(cfg).values():
    stems = [prefix + stem.format(i=i) for i in range(cfg.num_layers)]
    if not any(s + ".lora_A.weight" in present for s in stems):
      continue
    widths = [shapes[p + "/kernel"][-1] for p in parts]
    n_in = shapes[parts[0] + "/kernel"][-2]
    a, b = [], []
    for s in stems:
      for sfx, want, acc in (("lora_A.weight", (rank, n_in), a),
                             ("lora_B.weight", (sum(widths), rank), b)):
        if s + "." + sfx not in present:
          raise ValueError(f"{source}: missing tensor {s}.{sfx} (expected {list(want)}; "
                           "jaxtune adapts every layer of a module)")
        t = get(s + "." + sfx)
        if tuple(t.shape) != want:
          raise ValueError(f"{source}: tensor {s}.{sfx} has shape {list(t.shape)}, expected "
                           f"{list(want)} (r={rank})")
        acc.append(t.astype(np.float32).T)
    a, b = np.stack(a), np.stack(b)  # [L, in, r], [L, r, out]
    cuts = np.cumsum(widths)[:-1]
    for p, piece in zip(parts, np.split(b, cuts, axis=-1)):
      out[p] = {"a": a.copy(), "b": np.ascontiguousarray(piece)}
  return out
