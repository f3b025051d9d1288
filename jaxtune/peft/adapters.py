"""`Adapters`: the LoRA adapter tree and its hyperparameters, as one pytree, and its `apply`.

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

and `apply(params, rng)` replaces each targeted kernel of the base params by a
`lora_kernel.LoraKernel(w=kernel, a, b, key)` leaf, whose `linear` adds
`scale * (dropout(x) @ a) @ b` to `x @ kernel`; the decoder runs that tree unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jaxtune.peft import lora_kernel

# Projections a LoRA factor pair can attach to: {parent module: projection names}. The
# MoE experts (models/moe.py) are kernels [L, E, in, out] with factors a [L, E, in, r],
# b [L, E, r, out]: one LoRA per expert, PEFT's `target_parameters` layout.
SUPPORTED = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "mlp/experts": ("gate_up_proj", "down_proj"),
}
EXPERT_PARENT = "mlp/experts"
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

  def apply(self, params: dict, rng: jax.Array | None = None) -> dict:
    """The base params with each adapted kernel replaced by a `LoraKernel` leaf.

    rng: None for evaluation (no dropout); a PRNG key in a training step, which turns on
    dropout on the adapters' inputs when `dropout` > 0. See the module-level `apply`.
    """
    return apply(self, params, rng)


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
        if parent == "mlp" and name == "experts" and isinstance(ab, dict):  # MoE experts
          out.update(_module(f"layers/{EXPERT_PARENT}/{n}", EXPERT_PARENT, n, x)
                     for n, x in ab.items())
        else:
          out.update([_module(f"layers/{parent}/{name}", parent, name, ab)])
  return out


def _module(path: str, parent: str, name: str, ab) -> tuple[str, dict]:
  """(path, ab) of one adapter module, checked (errors name the path)."""
  if parent not in SUPPORTED or name not in SUPPORTED[parent]:
    raise ValueError(f"adapter tree: {path} is not a supported projection "
                     f"(supported: {', '.join(SUPPORTED_KERNELS)})")
  if not isinstance(ab, dict) or set(ab) != {"a", "b"}:
    got = sorted(ab) if isinstance(ab, dict) else type(ab).__name__
    raise ValueError(f"adapter tree: {path} must hold exactly 'a' and 'b', got {got}")
  return path, ab


def apply(adapters: Adapters, params: dict, rng: jax.Array | None = None) -> dict:
  """`params` with `LoraKernel(w, a, b, key)` in place of every adapted kernel.

  Only the dicts on the way to an adapted kernel are copied; every other leaf is shared.
  Every adapter module must find its kernel in `params` with the shape a @ b has (errors
  name the path and shapes), and an already wrapped kernel is refused.

  Dropout keys reproduce the stream of the former `decoder.hidden_states(dropout_rng=)`:
  layer l, projection i (q, k, v, o, gate, up, down = 0..6) uses
  `fold_in(split(rng, L)[l], i)`; the [L] keys ride in the leaf's `key` child and the
  layer scan slices them like the kernels.
  """
  use_dropout = adapters.dropout > 0 and rng is not None
  out = dict(params)
  for path, ab in sorted(modules(adapters.params).items()):
    kpath = path + "/kernel"
    *parents, proj = path.split("/")
    node = out
    for part in (*parents, proj):  # copy the dicts on the way down, share the rest
      child = node.get(part)
      if not isinstance(child, dict):
        raise ValueError(f"adapters.apply: params have no {kpath} for the adapter {path}")
      node[part] = node = dict(child)
    w = node.get("kernel")
    if w is None:
      raise ValueError(f"adapters.apply: params have no {kpath} for the adapter {path}")
    if isinstance(w, lora_kernel.LoraKernel):
      raise ValueError(f"adapters.apply: {kpath} is already adapter-wrapped (applied twice?)")
    a, b = ab["a"], ab["b"]  # [L, in, r], [L, r, out]
    ab_shape = (*a.shape[:-1], b.shape[-1])
    if tuple(w.shape) != ab_shape:
      raise ValueError(f"adapters.apply: {kpath} has shape {tuple(w.shape)}, but a "
                       f"{tuple(a.shape)} @ b {tuple(b.shape)} gives {ab_shape}")
    key = None
    if use_dropout and EXPERT_PARENT in path:
      raise ValueError(f"adapters.apply: LoRA dropout on MoE experts ({path}) is not "
                       "supported (PEFT's expert LoRA has none either); set peft.dropout=0")
    if use_dropout:
      key = _dropout_keys(rng, a.shape, SUPPORTED_NAMES.index(proj), kpath)
    node["kernel"] = lora_kernel.LoraKernel(w=w, a=a, b=b, key=key, scale=adapters.scale,
                                            dropout=adapters.dropout)
  return out


def _dropout_keys(rng: jax.Array, a_shape: tuple[int, ...], index: int, kpath: str):
  """[L] per-layer keys for projection `index`: fold_in(split(rng, L)[l], index)."""
  if len(a_shape) != 3:
    raise ValueError(f"adapters.apply: dropout needs factors stacked over layers; {kpath} "
                     f"has a of shape {tuple(a_shape)} (expected [L, in, r])")
  keys = jax.random.split(rng, a_shape[0])  # [L, 2] raw or [L] typed
  return jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)
