"""Qwen3: Llama blocks with a per-head RMSNorm on q and k, no biases.

The sliding window follows Qwen2's spelling (`use_sliding_window` + `sliding_window`).
"""

from __future__ import annotations

import types
from typing import Any, Mapping

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama
from jaxtune.models.families import qwen2

NAME = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"

QK_NORM_ROWS: tuple[base.Row, ...] = (
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/self_attn/q_norm/scale", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/self_attn/k_norm/scale", False),
)
BLOCK: Mapping[str, Any] = types.MappingProxyType({"attention_bias": False, "qk_norm": True})


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  return llama.read(d, base_cfg, source, name=NAME, block=BLOCK,
                    sliding_window=qwen2.window(d))


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = llama.write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d.update(qwen2.window_fields(cfg))
  d["attention_bias"] = False
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="Qwen3ForSequenceClassification",
    rows=llama.ROWS + QK_NORM_ROWS,
    block=BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
