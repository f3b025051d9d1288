"""The Llama family, and the machinery the Llama-like families (Mistral, Qwen) share.

Shared here: the base key table (`ROWS`), the rope / rope-scaling reader and writer, the
common config.json reader (`read`) and writer (`write`). config.json comes in two
spellings: `rope_theta` / `rope_scaling` / `torch_dtype` (transformers 4.x) and
`rope_parameters` / `dtype` (5.x). Both are read, and both are written, so either version
loads an export:

    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, ...}}
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, ...}}
    -> rope_theta=5e5, RopeScaling(kind="llama3", factor=8.0, ...)
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from jaxtune import config as config_lib
from jaxtune.models.families import base

ROWS: tuple[base.Row, ...] = (
    ("model.embed_tokens.weight", "embed_tokens/embedding", False),
    ("model.layers.{i}.input_layernorm.weight", "layers/input_layernorm/scale", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/self_attn/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/self_attn/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/self_attn/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/self_attn/o_proj/kernel", True),
    ("model.layers.{i}.post_attention_layernorm.weight",
     "layers/post_attention_layernorm/scale", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/down_proj/kernel", True),
    ("model.norm.weight", "norm/scale", False),
    ("lm_head.weight", "lm_head/kernel", True),
)

# Plain Llama blocks: no q/k/v bias, no q/k norm.
BLOCK: Mapping[str, Any] = types.MappingProxyType({"attention_bias": False, "qk_norm": False})

NAME = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def _ids(v) -> tuple[int, ...]:
  if v is None:
    return ()
  return tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))


def read_rope(d: dict[str, Any], source: str) -> tuple[float, config_lib.RopeScaling]:
  """(rope_theta, RopeScaling) from either spelling of config.json."""
  rope = dict(d.get("rope_parameters") or {})
  legacy = d.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
  rs_src = rope if rope.get("rope_type", "default") != "default" else legacy
  kind = rs_src.get("rope_type", rs_src.get("type", "default")) if rs_src else "default"
  if kind in ("default", None):
    return theta, config_lib.RopeScaling()
  if kind in ("llama3", "linear"):
    return theta, config_lib.RopeScaling(
        kind=kind, factor=float(rs_src.get("factor", 1.0)),
        low_freq_factor=float(rs_src.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs_src.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs_src.get("original_max_position_embeddings",
                                                        8192)))
  raise ValueError(f"{source}: rope scaling type {kind!r} is not supported "
                   "(expected default, linear or llama3)")


def write_rope(cfg: config_lib.ModelConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """(rope_parameters, rope_scaling): the 5.x and the 4.x spelling of the rope settings."""
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
  return rope, legacy


def read(d: dict[str, Any], base_cfg: config_lib.ModelConfig, source: str, *, name: str,
         block: Mapping[str, Any], sliding_window: int,
         refused: Mapping[str, str] | None = None) -> config_lib.ModelConfig:
  """The common Llama-like config.json reader.

  Args:
    d: the config.json dict.
    base_cfg: compute options (dtype, remat, ...) are kept from it.
    source: named in errors.
    name: the ModelConfig.family written.
    block: the family's block flags, written as they are.
    sliding_window: the window the family's own keys say (0 = full attention).
    refused: {config key: what to call it} for keys that must not be true beyond
      mlp_bias, e.g. {"attention_bias": "llama attention_bias=true (o_proj bias)"}.
  """
  for key, what in {"mlp_bias": "mlp_bias=true", **(refused or {})}.items():
    if d.get(key):
      raise ValueError(f"{source}: {what} is not supported")
  heads = int(d["num_attention_heads"])
  theta, scaling = read_rope(d, source)
  return dataclasses.replace(
      base_cfg,
      family=name,
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
      max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
      sliding_window=int(sliding_window),
      bos_token_id=-1 if d.get("bos_token_id") is None else int(d["bos_token_id"]),
      eos_token_id=_ids(d.get("eos_token_id")),
      pad_token_id=-1 if d.get("pad_token_id") is None else int(d["pad_token_id"]),
      **block,
  )


def write(cfg: config_lib.ModelConfig, dtype: str, *, architecture: str,
          model_type: str) -> dict[str, Any]:
  """The common Llama-like config.json dict; families add their own keys to it."""
  rope, legacy = write_rope(cfg)
  eos = list(cfg.eos_token_id)
  return {
      "architectures": [architecture],
      "model_type": model_type,
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


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  """Llama reads `sliding_window` when present; its o_proj bias is refused."""
  return read(d, base_cfg, source, name=NAME, block=BLOCK,
              sliding_window=d.get("sliding_window") or 0,
              refused={"attention_bias": "llama attention_bias=true (o_proj bias)"})


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d.update(attention_bias=False, mlp_bias=False)
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="LlamaForSequenceClassification",
    rows=ROWS,
    block=BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
