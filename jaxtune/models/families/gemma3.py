"""Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text): Gemma 2's block with a
(1 + w) RMSNorm on q and k, no attention soft-cap, and its own rope per layer kind.

Five sliding layers per global one by default (`sliding_window_pattern`, or the explicit
`layer_types`). Sliding layers use the local base without scaling; global layers the
global base with the rope scaling (linear x8 on the 4B+ checkpoints). Both spellings:

    4.x: {"rope_theta": 1e6, "rope_local_base_freq": 1e4,
          "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    5.x: {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                 "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default",
                                                    "rope_theta": 1e4}}}
    -> rope_theta=1e6, rope_scaling=linear x8, rope_local_theta=1e4

rope_local_theta=0 (sliding layers on the global rope, scaling included) is written as the
same rope_parameters for both kinds, which only the 5.x spelling can say.
`attn_logit_softcapping` is not read: transformers' Gemma 3 attention does not apply it.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import gemma2
from jaxtune.models.families import llama
from jaxtune.models.families import qwen3

NAME = "gemma3"
MODEL_TYPE = "gemma3_text"
ARCHITECTURE = "Gemma3ForCausalLM"
BLOCK: Mapping[str, Any] = types.MappingProxyType({**gemma2.BLOCK, "qk_norm": True})
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' defaults


def _ropes(d: dict[str, Any], source: str) -> tuple[dict[str, Any], float]:
  """(global rope params as a flat 5.x dict, local theta) from either spelling; local theta
  0 when the sliding layers' rope is the global one (scaling included)."""
  rp = d.get("rope_parameters") or {}
  if "full_attention" in rp or "sliding_attention" in rp:
    full = dict(rp.get("full_attention") or {})
    local = dict(rp.get("sliding_attention") or {})
  else:
    full = dict(d.get("rope_scaling") or {})
    full.setdefault("rope_theta", d.get("rope_theta") or GLOBAL_THETA)
    local = {"rope_theta": d.get("rope_local_base_freq") or LOCAL_THETA}
  full.setdefault("rope_theta", GLOBAL_THETA)
  if local == full:
    return full, 0.0
  kind = local.get("rope_type", local.get("type", "default"))
  if kind != "default":
    raise ValueError(f"{source}: rope scaling type {kind!r} on sliding_attention layers is "
                     "not supported (expected default)")
  return full, float(local.get("rope_theta", LOCAL_THETA))


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  full, local_theta = _ropes(d, source)
  cfg = gemma2.read(d, base_cfg, source, name=NAME, block=BLOCK,
                    pattern=int(d.get("sliding_window_pattern") or 6),
                    rope_d={"rope_parameters": full, "rope_scaling": None})
  if local_theta == cfg.rope_theta and cfg.rope_scaling.kind == "none":
    local_theta = 0.0  # the same rope on every layer: the uniform spelling
  return dataclasses.replace(cfg, rope_local_theta=local_theta)


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = gemma2.write(cfg, dtype, architecture=ARCHITECTURE, model_type=MODEL_TYPE)
  local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
  if not cfg.rope_local_theta:  # sliding layers share the global rope (5.x spelling only)
    local = dict(d["rope_parameters"])
  d["rope_parameters"] = {"full_attention": d["rope_parameters"], "sliding_attention": local}
  d.update(rope_local_base_freq=local["rope_theta"], attn_logit_softcapping=None,
           use_bidirectional_attention=False)
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(MODEL_TYPE,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="Gemma3TextForSequenceClassification",
    rows=llama.ROWS + gemma2.SANDWICH_ROWS + qwen3.QK_NORM_ROWS,
    block=BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
