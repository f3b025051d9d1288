"""Mixtral (8x7B, 8x22B): Mistral attention blocks with a MoE MLP in every layer.

The top-k router weights are always renormalised; each expert is `intermediate_size` wide.
On disk (the Hub, and transformers 5's save_pretrained) the experts keep the original
names, one tensor per expert:

    model.layers.{i}.block_sparse_moe.gate.weight            [E, D]  router
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  [F, D]  gate
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  [F, D]  up
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  [D, F]  down

`router_jitter_noise` > 0 (training-time input noise) is refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama
from jaxtune.models.families import qwen3_moe

NAME = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
EXPERTS = base.ExpertKeys(prefix="model.layers.{i}.block_sparse_moe", gate="w1", up="w3",
                          down="w2")
# Mixtral's MLP lives in the expert table only: the dense MLP rows are dropped.
ROWS = tuple(r for r in llama.ROWS if ".mlp." not in r[0])


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  if float(d.get("router_jitter_noise") or 0.0) > 0:
    raise ValueError(f"{source}: router_jitter_noise={d['router_jitter_noise']} is not "
                     "supported (expected 0)")
  cfg = llama.read(d, base_cfg, source, name=NAME, block=llama.BLOCK,
                   sliding_window=d.get("sliding_window") or 0)
  return dataclasses.replace(
      cfg, num_experts=int(d["num_local_experts"]),
      num_experts_per_tok=int(d.get("num_experts_per_tok", 2)), moe_intermediate_size=0,
      norm_topk_prob=True, router_aux_loss_coef=qwen3_moe.aux_coef(d, base_cfg),
      dense_layers=())


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  if cfg.dense_layers or not cfg.norm_topk_prob:
    raise ValueError("mixtral export: every layer is MoE with renormalised top-k weights "
                     f"(got dense_layers={cfg.dense_layers}, norm_topk_prob="
                     f"{cfg.norm_topk_prob})")
  d = llama.write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d.update(sliding_window=cfg.sliding_window or None, num_local_experts=cfg.num_experts,
           num_experts_per_tok=cfg.num_experts_per_tok,
           intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
           router_aux_loss_coef=max(cfg.router_aux_loss_coef, 0.0),
           router_jitter_noise=0.0, output_router_logits=False)
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="MixtralForSequenceClassification",
    rows=ROWS,
    block=llama.BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
    experts=EXPERTS,
)
