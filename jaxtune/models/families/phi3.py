"""Phi-3 and Phi-4-mini (model_type phi3): Llama blocks with fused projections, partial
rotary embeddings and LongRoPE.

The checkpoint fuses q/k/v into `qkv_proj` ([Q + 2 K*Dh, D]) and gate/up into
`gate_up_proj` ([2F, D], gate first); import splits them into jaxtune's separate kernels
(so LoRA targets, 4-bit quantisation and sharding are the same as every family's) and
export concatenates them again, bit-identically (`jaxtune.hf.keys`, tuple rows).

    partial_rotary_factor: 0.75          -> rotary on the first 3/4 of each head
    rope_scaling: {"type": "longrope", "short_factor": [...], "long_factor": [...]},
    original_max_position_embeddings: 4096, max_position_embeddings: 131072
        -> RopeScaling(kind="longrope", short_factor, long_factor,
                       attention_factor=sqrt(1 + ln(131072 / 4096) / ln(4096)))

LongRoPE divides the frequencies by the short factors while the longest position of a call
fits in the original context and by the long factors beyond it, as transformers does.
`sliding_window` (Phi-3-mini: 2047) windows every layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama

NAME = "phi3"
ARCHITECTURE = "Phi3ForCausalLM"
QKV = ("layers/self_attn/q_proj/kernel", "layers/self_attn/k_proj/kernel",
       "layers/self_attn/v_proj/kernel")
GATE_UP = ("layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel")

ROWS: tuple[base.Row, ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers/input_layernorm/scale", False),
    ("model.layers.{i}.self_attn.qkv_proj.weight", QKV, True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/self_attn/o_proj/kernel", True),
    ("model.layers.{i}.post_attention_layernorm.weight",
     "layers/post_attention_layernorm/scale", False),
    ("model.layers.{i}.mlp.gate_up_proj.weight", GATE_UP, True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/down_proj/kernel", True),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)


def _rope(d: dict[str, Any], source: str) -> tuple[dict[str, Any], float, config_lib.RopeScaling]:
  """(rope params for llama.read, partial_rotary_factor, scaling) from either spelling."""
  rp = dict(d.get("rope_parameters") or {})
  rs = dict(d.get("rope_scaling") or {})
  src = rs if rs else rp
  kind = src.get("rope_type", src.get("type", "default")) or "default"
  theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
  partial = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor") or 1.0))
  plain = {"rope_parameters": {"rope_type": "default", "rope_theta": theta},
           "rope_scaling": None}
  if kind == "default":
    return plain, partial, config_lib.RopeScaling()
  if kind not in ("longrope", "su"):
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported for phi3 "
                     "(expected default or longrope)")
  original = src.get("original_max_position_embeddings",
                     d.get("original_max_position_embeddings"))
  if original is None or not src.get("short_factor") or not src.get("long_factor"):
    raise ValueError(f"{source}: longrope needs original_max_position_embeddings, "
                     "short_factor and long_factor")
  factor, attention = _derived(int(d["max_position_embeddings"]), int(original),
                               src.get("factor"))
  if src.get("attention_factor") is not None:
    attention = float(src["attention_factor"])
  half = int(int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])
             * partial) // 2
  for key in ("short_factor", "long_factor"):
    if len(src[key]) != half:
      raise ValueError(f"{source}: longrope {key} has {len(src[key])} entries, expected "
                       f"{half} (rotary dims / 2)")
  return plain, partial, config_lib.RopeScaling(
      kind="longrope", factor=float(factor), original_max_position_embeddings=int(original),
      short_factor=tuple(float(x) for x in src["short_factor"]),
      long_factor=tuple(float(x) for x in src["long_factor"]),
      attention_factor=float(attention))


# transformers' Phi-3 config defaults for keys a config.json may leave out.
DEFAULTS = {"tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
            "pad_token_id": 32000, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  d = {**DEFAULTS, **d}
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{source}: hidden_act={act!r} is not supported (expected silu)")
  plain, partial, scaling = _rope(d, source)
  cfg = llama.read({**d, **plain}, base_cfg, source, name=NAME, block=llama.BLOCK,
                   sliding_window=d.get("sliding_window") or 0,
                   refused={"attention_bias": "phi3 attention_bias=true"})
  return dataclasses.replace(cfg, rope_scaling=scaling, partial_rotary_factor=partial)


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  rs = cfg.rope_scaling
  if rs.kind not in ("none", "longrope"):
    raise ValueError(f"phi3 export: rope scaling {rs.kind!r} cannot be written "
                     "(transformers' Phi-3 takes default or longrope)")
  d = llama.write(dataclasses.replace(cfg, rope_scaling=config_lib.RopeScaling()), dtype,
                  architecture=ARCHITECTURE, model_type=NAME)
  d.update(sliding_window=cfg.sliding_window or None,
           partial_rotary_factor=cfg.partial_rotary_factor,
           original_max_position_embeddings=cfg.max_position_embeddings)
  d["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
  if rs.kind == "longrope":
    scaling = {"rope_type": "longrope", "short_factor": list(rs.short_factor),
               "long_factor": list(rs.long_factor), "factor": rs.factor,
               "attention_factor": rs.attention_factor,
               "original_max_position_embeddings": rs.original_max_position_embeddings}
    d["original_max_position_embeddings"] = rs.original_max_position_embeddings
    # transformers 4.x takes exactly type / short_factor / long_factor (5.x reads this dict
    # before rope_parameters): factor and attention_factor only when not the derived ones.
    derived = _derived(cfg.max_position_embeddings, rs.original_max_position_embeddings)
    legacy = {"type": "longrope", "short_factor": scaling["short_factor"],
              "long_factor": scaling["long_factor"]}
    if (rs.factor, rs.attention_factor) != derived:
      legacy.update(factor=rs.factor, attention_factor=rs.attention_factor)
    d["rope_scaling"] = legacy
    d["rope_parameters"].update(scaling)
  return d


def _derived(max_positions: int, original: int, factor=None) -> tuple[float, float]:
  """(factor, attention_factor) as transformers derives them when the config has none."""
  factor = float(factor or max_positions / original)
  return factor, (1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="Phi3ForSequenceClassification",
    rows=ROWS,
    block=llama.BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
