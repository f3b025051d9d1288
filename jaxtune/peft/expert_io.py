"""PEFT's LoRA-on-experts tensors (`target_parameters`) <-> jaxtune's expert LoRA factors.

PEFT (>= 0.17) adapts a 3-D expert parameter with a `ParamWrapper`: for transformers 5's
fused `mlp.experts.gate_up_proj` [E, 2F, D] and `mlp.experts.down_proj` [E, D, F] it keeps
one rank-r LoRA per expert, stored as two Linear weights (checked against peft 0.21):

    lora_A.weight [E*r, in]   rows e*r .. e*r+r-1 are expert e's A_e [r, in]
    lora_B.weight [out, r*E]  column k*E + e is expert e's B_e[:, k]  (rank-major)

and delta_e = scaling * B_e @ A_e ([out, in]), i.e. jaxtune's a [E, in, r] = A_e.T and
b [E, r, out] = B_e.T per layer. When both parameters are adapted, PEFT nests the wrappers:
gate_up_proj's is the inner one, so its tensors carry an extra ".base_layer":

    base_model.model.model.layers.{i}.mlp.experts.base_layer.lora_A.weight  (gate_up_proj)
    base_model.model.model.layers.{i}.mlp.experts.lora_A.weight             (down_proj)

Both Mixtral and Qwen3-MoE name the module "model.layers.{i}.mlp.experts" in transformers 5.
Only MoE layers (`moe.moe_layers`) have experts.
"""

from __future__ import annotations

import numpy as np

from jaxtune import config as config_lib
from jaxtune.models import moe

MODULE = "model.layers.{i}.mlp.experts"
PARAMS = {"layers/mlp/experts/gate_up_proj": "mlp.experts.gate_up_proj",
          "layers/mlp/experts/down_proj": "mlp.experts.down_proj"}


def is_expert(module: str) -> bool:
  return module in PARAMS


def _stem(prefix: str, path: str, adapted: set[str], i: int) -> str:
  nested = path.endswith("gate_up_proj") and "layers/mlp/experts/down_proj" in adapted
  return prefix + MODULE.format(i=i) + (".base_layer" if nested else "")


def write(cfg: config_lib.ModelConfig, modules: dict[str, tuple[np.ndarray, np.ndarray]],
          rank: int, prefix: str) -> dict[str, np.ndarray]:
  """{tensor name: array} for expert modules {path: (a [Lm, E, in, r], b [Lm, E, r, out])}."""
  out = {}
  e = cfg.num_experts
  for path, (a, b) in modules.items():
    for j, i in enumerate(moe.moe_layers(cfg)):
      stem = _stem(prefix, path, set(modules), i)
      out[stem + ".lora_A.weight"] = np.ascontiguousarray(
          a[j].transpose(0, 2, 1).reshape(e * rank, -1))  # [E*r, in]
      out[stem + ".lora_B.weight"] = np.ascontiguousarray(
          b[j].transpose(2, 1, 0).reshape(-1, rank * e))  # [out, r*E]
  return out


def target_parameters(modules) -> list[str]:
  return [PARAMS[p] for p in PARAMS if p in modules]


def modules_for(cfg: config_lib.ModelConfig, target_params, source: str) -> list[str]:
  """The jaxtune expert modules named by adapter_config's target_parameters (errors name
  an unsupported entry)."""
  names = {v: k for k, v in PARAMS.items()}
  out = []
  for t in target_params or ():
    if t not in names:
      raise ValueError(f"{source}: target_parameters entry {t!r} is not supported "
                       f"(expected {sorted(names)})")
    out.append(names[t])
  if out and not moe.is_moe(cfg):
    raise ValueError(f"{source}: target_parameters {list(target_params)} need a MoE model; "
                     f"this is a dense {cfg.family} model")
  return out


def read(cfg: config_lib.ModelConfig, get, modules: list[str], rank: int, prefix: str,
         source: str) -> dict[str, dict[str, np.ndarray]]:
  """{path: {"a": [Lm, E, in, r], "b": [Lm, E, r, out]}} read with get(name) -> array|None."""
  e, d, f = cfg.num_experts, cfg.hidden_size, moe.expert_width(cfg)
  dims = {"layers/mlp/experts/gate_up_proj": (d, 2 * f),
          "layers/mlp/experts/down_proj": (f, d)}
  out = {}
  for path in modules:
    n_in, n_out = dims[path]
    a_s, b_s = [], []
    for i in moe.moe_layers(cfg):
      stem = _stem(prefix, path, set(modules), i)
      want = {".lora_A.weight": (e * rank, n_in), ".lora_B.weight": (n_out, rank * e)}
      got = {}
      for sfx, shape in want.items():
        t = get(stem + sfx)
        if t is None:
          raise ValueError(f"{source}: missing tensor {stem + sfx} (expected {list(shape)})")
        if tuple(t.shape) != shape:
          raise ValueError(f"{source}: tensor {stem + sfx} has shape {list(t.shape)}, "
                           f"expected {list(shape)} (experts={e}, r={rank})")
        got[sfx] = t.astype(np.float32)
      a_s.append(got[".lora_A.weight"].reshape(e, rank, n_in).transpose(0, 2, 1))
      b_s.append(got[".lora_B.weight"].reshape(n_out, rank, e).transpose(2, 1, 0))
    out[path] = {"a": np.stack(a_s), "b": np.stack(b_s)}
  return out


def names(cfg: config_lib.ModelConfig, modules: list[str], prefix: str) -> set[str]:
  """Every tensor name `read` consumes (so the generic reader can skip them)."""
  return {_stem(prefix, p, set(modules), i) + sfx for p in modules
          for i in moe.moe_layers(cfg) for sfx in (".lora_A.weight", ".lora_B.weight")}
