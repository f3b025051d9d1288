"""`Adapters`: the LoRA adapter tree and its hyperparameters, as one pytree.

Kept apart from `lora.py` (tree operations) and `peft_io.py` (PEFT files) so both can build
and read it without importing each other. Only `params` is a pytree child: jit,
`jax.value_and_grad`, optax, shardings and orbax see the adapter arrays and nothing else,
while rank, alpha and the scale travel as static metadata.

The adapter tree mirrors the targeted projections of the base params, with the "kernel"
leaf replaced by the two low-rank factors (L layers, r rank):

    base   {"layers": {"self_attn": {"q_proj": {"kernel": [L, D, H*Dh]}, ...},
                       "mlp": {"down_proj": {"kernel": [L, F, D]}, ...}}}
    params {"layers": {"self_attn": {"q_proj": {"a": [L, D, r], "b": [L, r, H*Dh]}},
                       "mlp": {"down_proj": {"a": [L, F, r], "b": [L, r, D]}}}}

and the forward adds `scale * (x @ a) @ b` to each targeted `x @ kernel`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

# Projections a LoRA factor pair can attach to: {parent module: projection names}.
SUPPORTED = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
SUPPORTED_KERNELS = tuple(f"layers/{parent}/{name}/kernel"
                          for parent, names in SUPPORTED.items() for name in names)
SUPPORTED_NAMES = tuple(n for names in SUPPORTED.values() for n in names)


def _static(default=dataclasses.MISSING):
  return dataclasses.field(default=default, metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Adapters:
  """LoRA factors for the targeted projections, plus how they are scaled.

  params: {"layers": {parent: {proj: {"a": [L, in, r], "b": [L, r, out]}}}}.
  scale: alpha / rank, or alpha / sqrt(rank) with rsLoRA (Kalajdzievski 2023).
  targets: the regex over base param paths that selected the kernels.
  dropout: rate of the dropout on adapter inputs in training steps (exported to PEFT too).
  """
  params: Any
  scale: float = _static()
  rank: int = _static()
  alpha: float = _static()
  rslora: bool = _static(False)
  targets: str = _static("")
  dropout: float = _static(0.0)


jax.tree_util.register_dataclass(Adapters)


def scale(rank: int, alpha: float, rslora: bool) -> float:
  """alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA), exactly as PEFT computes it."""
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  return float(alpha / math.sqrt(rank)) if rslora else float(alpha / rank)


def modules(params: dict) -> dict[str, dict]:
  """{"layers/self_attn/q_proj": {"a": ..., "b": ...}} for every module of an adapter tree.

  Errors name the path when the tree is not shaped like an adapter tree.
  """
  out = {}
  for top, layers in params.items():
    if top != "layers" or not isinstance(layers, dict):
      raise ValueError(f"adapter tree: unexpected top-level key {top!r} (expected 'layers')")
    for parent, projs in layers.items():
      for name, ab in projs.items():
        path = f"layers/{parent}/{name}"
        if parent not in SUPPORTED or name not in SUPPORTED[parent]:
          raise ValueError(f"adapter tree: {path} is not a supported projection "
                           f"(supported: {', '.join(SUPPORTED_KERNELS)})")
        if not isinstance(ab, dict) or set(ab) != {"a", "b"}:
          got = sorted(ab) if isinstance(ab, dict) else type(ab).__name__
          raise ValueError(f"adapter tree: {path} must hold exactly 'a' and 'b', got {got}")
        out[path] = ab
  return out
