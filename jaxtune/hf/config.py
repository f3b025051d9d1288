"""config.json <-> ModelConfig for the Llama family (Llama, Mistral, Qwen2, Qwen3).

Reads both spellings transformers has used: `rope_theta` / `rope_scaling` / `torch_dtype`
(4.x) and `rope_parameters` / `dtype` (5.x). Writes both, so either version loads the export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxtune import config as config_lib

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _ids(v) -> tuple[int, ...]:
  if v is None:
    return ()
  return tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))


def from_hf(d: dict[str, Any], base: config_lib.ModelConfig | None = None,
            source: str = "config.json") -> config_lib.ModelConfig:
  """ModelConfig from an HF config dict; compute options are kept from `base`."""
  base = base or config_lib.ModelConfig()
  family = d.get("model_type")
  if family not in ARCHITECTURES:
    raise ValueError(f"{source}: model_type {family!r} is not supported "
                     f"(expected one of {', '.join(ARCHITECTURES)})")
  if d.get("mlp_bias"):
    raise ValueError(f"{source}: mlp_bias=true is not supported")
  if family == "llama" and d.get("attention_bias"):
    raise ValueError(f"{source}: llama attention_bias=true (o_proj bias) is not supported")
  heads = int(d["num_attention_heads"])
  rope = dict(d.get("rope_parameters") or {})
  legacy = d.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
  rs_src = rope if rope.get("rope_type", "default") != "default" else legacy
  kind = rs_src.get("rope_type", rs_src.get("type", "default")) if rs_src else "default"
  if kind in ("default", None):
    scaling = config_lib.RopeScaling()
  elif kind in ("llama3", "linear"):
    scaling = config_lib.RopeScaling(
        kind=kind, factor=float(rs_src.get("factor", 1.0)),
        low_freq_factor=float(rs_src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs_src.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs_src.get("original_max_position_embeddings",
                                                        8192)))
  else:
    raise ValueError(f"{source}: rope scaling type {kind!r} is not supported "
                     "(expected default, linear or llama3)")
  window = d.get("sliding_window") or 0
  if family == "qwen2" or family == "qwen3":
    window = window if d.get("use_sliding_window") else 0
  return dataclasses.replace(
      base,
      family=family,
      vocab_size=int(d["vocab_size"]),
      hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]),
      num_layers=int(d["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(d.get("num_key_value_heads") or heads),
      head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      attention_bias=family == "qwen2",
      qk_norm=family == "qwen3",
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      sliding_window=int(window),
      bos_token_id=-1 if d.get("bos_token_id") is None else int(d["bos_token_id"]),
      eos_token_id=_ids(d.get("eos_token_id")),
      pad_token_id=-1 if d.get("pad_token_id") is None else int(d["pad_token_id"]),
  )


def to_hf(cfg: config_lib.ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
  """An HF config dict that `transformers.AutoConfig` loads (4.x and 5.x)."""
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  legacy = None
  rs = cfg.rope_scaling
  if rs.kind == "llama3":
    legacy = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
              "high_freq_factor": rs.high_freq_factor,
              "original_max_position_embeddings": rs.original_max_position_embeddings}
  elif rs.kind == "linear":
    legacy = {"rope_type": "linear", "factor": rs.factor}
  if legacy:
    rope.update(legacy)
  eos = list(cfg.eos_token_id)
  d = {
      "architectures": [ARCHITECTURES[cfg.family]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": legacy,
      "rope_parameters": rope,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "attention_dropout": 0.0,
      "bos_token_id": None if cfg.bos_token_id < 0 else cfg.bos_token_id,
      "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None,
      "pad_token_id": None if cfg.pad_token_id < 0 else cfg.pad_token_id,
      "torch_dtype": dtype,
      "dtype": dtype,
      "use_cache": True,
  }
  if cfg.family == "llama":
    d.update(attention_bias=False, mlp_bias=False)
  if cfg.family in ("mistral",):
    d["sliding_window"] = cfg.sliding_window or None
  if cfg.family in ("qwen2", "qwen3"):
    d.update(use_sliding_window=bool(cfg.sliding_window),
             sliding_window=cfg.sliding_window or None, max_window_layers=cfg.num_layers)
  if cfg.family == "qwen3":
    d["attention_bias"] = False
  return d
