"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention blocks with MoE MLPs.

The router softmax is renormalised over the top-k only with `norm_topk_prob`. Dense layers
come from `mlp_only_layers` and `decoder_sparse_step` (layer i is MoE iff i is not in
mlp_only_layers and (i + 1) % decoder_sparse_step == 0); jaxtune keeps the resulting list as
`ModelConfig.dense_layers` and writes it back as mlp_only_layers with decoder_sparse_step=1:

    {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    -> dense_layers=(0, 2, 3)   (only layer 1 is MoE)

Experts are stored one tensor per expert ("model.layers.{i}.mlp.experts.{e}.gate_proj.
weight", ...), as on the Hub and as transformers 5 saves them. `num_experts` is also read
under transformers 5's spelling `num_local_experts`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama
from jaxtune.models.families import qwen2
from jaxtune.models.families import qwen3

NAME = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
EXPERTS = base.ExpertKeys(prefix="model.layers.{i}.mlp")


def aux_coef(d: dict[str, Any], base_cfg: config_lib.ModelConfig) -> float:
  """The configured router_aux_loss_coef if set (>= 0), else the checkpoint's value."""
  if base_cfg.router_aux_loss_coef >= 0:
    return base_cfg.router_aux_loss_coef
  return float(d.get("router_aux_loss_coef") or 0.0)


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  cfg = llama.read(d, base_cfg, source, name=NAME, block=qwen3.BLOCK,
                   sliding_window=qwen2.window(d))
  experts = int(d.get("num_experts", d.get("num_local_experts")) or 0)
  step = int(d.get("decoder_sparse_step") or 1)
  only = {int(i) for i in d.get("mlp_only_layers") or ()}
  dense = tuple(i for i in range(cfg.num_layers)
                if i in only or not (experts > 0 and (i + 1) % step == 0))
  if experts == 0 or len(dense) == cfg.num_layers:
    raise ValueError(f"{source}: a qwen3_moe config without MoE layers (num_experts="
                     f"{experts}, mlp_only_layers={sorted(only)}, decoder_sparse_step={step}); "
                     "load it as model_type qwen3")
  return dataclasses.replace(
      cfg, num_experts=experts, num_experts_per_tok=int(d.get("num_experts_per_tok", 8)),
      moe_intermediate_size=int(d["moe_intermediate_size"]),
      norm_topk_prob=bool(d.get("norm_topk_prob", False)),
      router_aux_loss_coef=aux_coef(d, base_cfg), dense_layers=dense)


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = llama.write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d.update(qwen2.window_fields(cfg))
  d.update(attention_bias=False, num_experts=cfg.num_experts,
           num_experts_per_tok=cfg.num_experts_per_tok,
           moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
           norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=1,
           mlp_only_layers=list(cfg.dense_layers),
           router_aux_loss_coef=max(cfg.router_aux_loss_coef, 0.0),
           output_router_logits=False)
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="Qwen3MoeForSequenceClassification",
    rows=llama.ROWS + qwen3.QK_NORM_ROWS,
    block=qwen3.BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
    experts=EXPERTS,
)
