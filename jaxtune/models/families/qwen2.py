"""Qwen2 (and Qwen2.5): Llama blocks with q/k/v biases; the window is opt-in.

Qwen configs carry a `sliding_window` even when it is off: it applies only with
`use_sliding_window: true`. The export writes `max_window_layers` = all layers, so a
windowed model is windowed everywhere, as jaxtune's decoder computes it. The Qwen helpers
here are shared with `jaxtune.models.families.qwen3`.
"""

from __future__ import annotations

import types
from typing import Any, Mapping

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama

NAME = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"

QKV_BIAS_ROWS: tuple[base.Row, ...] = (
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/self_attn/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/self_attn/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/self_attn/v_proj/bias", False),
)
BLOCK: Mapping[str, Any] = types.MappingProxyType({"attention_bias": True, "qk_norm": False})


def window(d: dict[str, Any]) -> int:
  """The sliding window a Qwen config.json asks for: 0 unless use_sliding_window."""
  return (d.get("sliding_window") or 0) if d.get("use_sliding_window") else 0


def window_fields(cfg: config_lib.ModelConfig) -> dict[str, Any]:
  """The config.json keys for cfg.sliding_window, in Qwen's spelling."""
  return dict(use_sliding_window=bool(cfg.sliding_window),
              sliding_window=cfg.sliding_window or None, max_window_layers=cfg.num_layers)


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  return llama.read(d, base_cfg, source, name=NAME, block=BLOCK, sliding_window=window(d))


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = llama.write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d.update(window_fields(cfg))
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="Qwen2ForSequenceClassification",
    rows=llama.ROWS + QKV_BIAS_ROWS,
    block=BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
