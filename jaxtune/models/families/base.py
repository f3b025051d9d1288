"""The `Family` record: everything jaxtune knows about one Hugging Face model family.

A family is data plus two pure functions, so adding one (Gemma 2, ...) is one new module
under `jaxtune.models.families` and one line in its `FAMILIES` table. Nothing else branches
on `ModelConfig.family`: `jaxtune.hf.config` and `jaxtune.hf.keys` look the family up.

    Family(name="qwen2", model_types=("qwen2",), architecture="Qwen2ForCausalLM",
           seq_cls_architecture="Qwen2ForSequenceClassification",
           rows=(("model.layers.{i}.self_attn.q_proj.bias",
                  "layers/self_attn/q_proj/bias", False), ...),
           block={"attention_bias": True, "qk_norm": False},
           from_hf=..., to_hf=...)

This module imports only `jaxtune.config`, so families can never form an import cycle with
the decoder, `jaxtune.hf` or the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from jaxtune import config as config_lib

# (HF key template, param path, transpose). `{i}` in the template is the layer index: such
# rows map to a param stacked over layers on its leading axis. `transpose` turns a torch
# Linear weight [out, in] into a kernel [in, out].
Row = tuple[str, str, bool]


@dataclasses.dataclass(frozen=True)
class ExpertKeys:
  """Where a MoE family's router and experts live in an HF checkpoint, one tensor per expert
  (as the Hub stores them and transformers 5 writes them back; `jaxtune.hf.expert_keys`):

      {prefix}.gate.weight                  [E, D]   router -> layers/mlp/gate/kernel
      {prefix}.experts.{e}.{gate}.weight    [F, D]   fused on the output axis ->
      {prefix}.experts.{e}.{up}.weight      [F, D]   layers/mlp/experts/gate_up_proj/kernel
      {prefix}.experts.{e}.{down}.weight    [D, F]   -> layers/mlp/experts/down_proj/kernel
  """
  prefix: str = "model.layers.{i}.mlp"
  gate: str = "gate_proj"
  up: str = "up_proj"
  down: str = "down_proj"


@dataclasses.dataclass(frozen=True)
class Family:
  """One model family.

  Attributes:
    name: the `ModelConfig.family` value.
    model_types: the config.json `model_type` values read as this family; the first one
      is written on export.
    architecture: the causal-LM class, e.g. "LlamaForCausalLM".
    seq_cls_architecture: the reward-model class, e.g. "LlamaForSequenceClassification".
    rows: the HF key table (every tensor the family can have); `jaxtune.hf.keys` keeps
      the rows whose param the config has.
    block: the ModelConfig block flags the family sets, e.g. {"attention_bias": True};
      `from_hf` writes them, the decoder reads the flags, never the family name.
    from_hf: (config.json dict, base ModelConfig, source) -> ModelConfig with the
      architecture fields read from the dict and the compute options kept from base.
    to_hf: (ModelConfig, dtype name) -> config.json dict that transformers loads.
    experts: the MoE families' expert key layout (`ExpertKeys`); None for dense families.
  """
  name: str
  model_types: tuple[str, ...]
  architecture: str
  seq_cls_architecture: str
  rows: tuple[Row, ...]
  block: Mapping[str, Any] = dataclasses.field(hash=False)
  from_hf: Callable[[dict[str, Any], config_lib.ModelConfig, str], config_lib.ModelConfig]
  to_hf: Callable[[config_lib.ModelConfig, str], dict[str, Any]]
  experts: ExpertKeys | None = None
