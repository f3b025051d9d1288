"""Gemma 2: (1 + w) RMSNorm, four norms per block, GeGLU, scaled embeddings, soft-caps,
alternating sliding-window and global layers. The Gemma helpers here are shared with
`jaxtune.models.families.gemma3`.

config.json -> ModelConfig:

    hidden_activation: gelu_pytorch_tanh      -> hidden_act (GeGLU)
    query_pre_attn_scalar: 256                 -> attention scale 256 ** -0.5
    attn_logit_softcapping: 50.0               -> attn_logit_softcap (xla attention paths)
    final_logit_softcapping: 30.0              -> final_logit_softcap (models/head.py)
    sliding_window: 4096, layer_types: [...]   -> sliding_window, layer_types (default:
                                                  sliding on even layers, global on odd)

Norms store w (zero-initialised) and scale by 1 + w; embeddings are multiplied by
sqrt(hidden_size) rounded to the compute dtype, as transformers does.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Mapping

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import llama

NAME = "gemma2"
ARCHITECTURE = "Gemma2ForCausalLM"
SLIDING, FULL = "sliding_attention", "full_attention"

SANDWICH_ROWS: tuple[base.Row, ...] = (
    ("model.layers.{i}.pre_feedforward_layernorm.weight",
     "layers/pre_feedforward_layernorm/scale", False),
    ("model.layers.{i}.post_feedforward_layernorm.weight",
     "layers/post_feedforward_layernorm/scale", False),
)
BLOCK: Mapping[str, Any] = types.MappingProxyType({
    "attention_bias": False, "qk_norm": False, "norm_one_plus": True, "sandwich_norms": True,
    "embed_scale": True, "hidden_act": "gelu_pytorch_tanh"})


def _none0(v) -> float:
  return 0.0 if v is None else float(v)


def layer_types(d: dict[str, Any], pattern: int, source: str) -> tuple[str, ...]:
  """config.json's `layer_types`, or every `pattern`-th layer global (1-based), the rest
  sliding: Gemma 2's alternation (pattern 2) and Gemma 3's `sliding_window_pattern`."""
  n = int(d["num_hidden_layers"])
  types_ = d.get("layer_types")
  if types_ is None:
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))
  types_ = tuple(types_)
  bad = sorted(set(types_) - {SLIDING, FULL})
  if len(types_) != n or bad:
    raise ValueError(f"{source}: layer_types must list {n} entries of {SLIDING} or {FULL}, "
                     f"got {list(types_)}")
  return types_


# transformers' Gemma config defaults for keys a config.json may leave out.
DEFAULTS = {"tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2, "rms_norm_eps": 1e-6}


def read(d: dict[str, Any], base_cfg: config_lib.ModelConfig, source: str, *, name: str,
         block: Mapping[str, Any], pattern: int, rope_d: dict[str, Any]) -> config_lib.ModelConfig:
  """The Gemma reader: the Llama-like fields (rope from `rope_d`) plus Gemma's own; keys
  left out take transformers' Gemma defaults (tied embeddings, pad 0, eos 1, bos 2)."""
  d = {**DEFAULTS, **d}
  act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise ValueError(f"{source}: hidden_activation={act!r} is not supported "
                     "(expected gelu_pytorch_tanh)")
  if d.get("use_bidirectional_attention"):
    raise ValueError(f"{source}: use_bidirectional_attention=true is not supported "
                     "(jaxtune's decoder is causal)")
  types_ = layer_types(d, pattern, source)
  window = d.get("sliding_window")
  if SLIDING in types_ and not window:
    raise ValueError(f"{source}: sliding_attention layers need an integer sliding_window, "
                     f"got {window!r}")
  if len(set(types_)) == 1:  # all alike: the uniform spelling (layer_types=())
    window = window if types_[0] == SLIDING else 0
    types_ = ()
  cfg = llama.read({**d, **rope_d}, base_cfg, source, name=name, block=block,
                   sliding_window=window or 0,
                   refused={"attention_bias": f"{name} attention_bias=true"})
  scalar = float(d.get("query_pre_attn_scalar") or cfg.head_dim)
  return dataclasses.replace(
      cfg, layer_types=types_,
      query_pre_attn_scalar=0.0 if scalar == cfg.head_dim else scalar,  # 0: head_dim's
      final_logit_softcap=_none0(d.get("final_logit_softcapping")))


def write(cfg: config_lib.ModelConfig, dtype: str, *, architecture: str,
          model_type: str) -> dict[str, Any]:
  """The Gemma config.json dict (both transformers spellings of rope, as Llama's)."""
  d = llama.write(cfg, dtype, architecture=architecture, model_type=model_type)
  del d["hidden_act"]
  scalar = cfg.query_pre_attn_scalar or cfg.head_dim
  d.update(hidden_activation=cfg.hidden_act, attention_bias=False,
           query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
           sliding_window=cfg.sliding_window or None,
           layer_types=[SLIDING if w else FULL for w in cfg.layer_windows],
           final_logit_softcapping=cfg.final_logit_softcap or None)
  return d


def from_hf(d: dict[str, Any], base_cfg: config_lib.ModelConfig,
            source: str) -> config_lib.ModelConfig:
  cfg = read(d, base_cfg, source, name=NAME, block=BLOCK, pattern=2, rope_d={})
  return dataclasses.replace(cfg, attn_logit_softcap=_none0(d.get("attn_logit_softcapping")))


def to_hf(cfg: config_lib.ModelConfig, dtype: str) -> dict[str, Any]:
  d = write(cfg, dtype, architecture=ARCHITECTURE, model_type=NAME)
  d["attn_logit_softcapping"] = cfg.attn_logit_softcap or None
  return d


FAMILY = base.Family(
    name=NAME,
    model_types=(NAME,),
    architecture=ARCHITECTURE,
    seq_cls_architecture="Gemma2ForSequenceClassification",
    rows=llama.ROWS + SANDWICH_ROWS,
    block=BLOCK,
    from_hf=from_hf,
    to_hf=to_hf,
)
