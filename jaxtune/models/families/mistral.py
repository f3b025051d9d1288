"""Mistral: Llama blocks with an optional sliding attention window.

config.json's `sliding_window` (null = full attention) is the window, in tokens, every
layer attends over: {"sliding_window": 4096} -> ModelConfig(sliding_window=4096).
"""

from __future__ import annotations

from typing import Any

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama

NAME = "mistral"
ARCHITECTURE = "MistralForCausalLM"


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  return llama.read(d, base_cfg, source, name=NAME, block=llama.BLOCK,
                    sliding_window=d.get("sliding_window") or 0)


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = llama.write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d["sliding_window"] = cfg.sliding_window or None
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="MistralForSequenceClassification",
    rows=llama.ROWS,
    block=llama.BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
