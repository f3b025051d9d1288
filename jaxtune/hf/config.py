"""config.json <-> ModelConfig, for every family in `jaxtune.models.families`.

The mapping itself lives with each family (`Family.from_hf` / `Family.to_hf`); this module
is the one entry point the loaders and exporters call, dispatching on config.json's
`model_type` when reading and on `ModelConfig.family` when writing. A multimodal wrapper's
config.json (Gemma 3's model_type "gemma3") reads as its language model's
(`multimodal.text_config`).
"""

from __future__ import annotations

from typing import Any

from jaxtune import config as config_lib
from jaxtune.hf import multimodal
from jaxtune.models import families

# {family: causal-LM architecture}, derived from the family table.
ARCHITECTURES = {name: f.architecture for name, f in families.FAMILIES.items()}


def from_hf(d: dict[str, Any], base: config_lib.ModelConfig | None = None,
            source: str = "config.json") -> config_lib.ModelConfig:
  """ModelConfig from an HF config dict; compute options are kept from `base`."""
  d = multimodal.text_config(d, source)  # a multimodal wrapper: its language model's
  family = families.for_model_type(d.get("model_type"), source)
  return family.from_hf(d, base or config_lib.ModelConfig(), source)


def to_hf(cfg: config_lib.ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
  """An HF config dict that `transformers.AutoConfig` loads (4.x and 5.x)."""
  return families.get(cfg.family).to_hf(cfg, dtype)


def generation_config(hf: dict[str, Any]) -> dict[str, Any]:
  """generation_config.json of an HF config dict (`to_hf`'s): its bos / eos / pad ids."""
  return {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
          if hf.get(k) is not None}
