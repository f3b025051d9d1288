"""The model families jaxtune reads and writes, in one explicit table.

Adding a family is one module here (its config mapping, key table and block flags as a
`base.Family`) plus one line in `FAMILIES`; nothing registers itself on import.

    >>> get("qwen2").architecture
    'Qwen2ForCausalLM'
    >>> for_model_type("mistral", "config.json").name
    'mistral'
"""

from __future__ import annotations

from jaxtune import config as config_lib
from jaxtune.models.families import base
from jaxtune.models.families import gemma2
from jaxtune.models.families import gemma3
from jaxtune.models.families import llama
from jaxtune.models.families import mistral
from jaxtune.models.families import phi3
from jaxtune.models.families import mixtral
from jaxtune.models.families import qwen2
from jaxtune.models.families import qwen3
from jaxtune.models.families import qwen3_moe

Family = base.Family
Row = base.Row

FAMILIES: dict[str, base.Family] = {
    "llama": llama.FAMILY,
    "mistral": mistral.FAMILY,
    "qwen2": qwen2.FAMILY,
    "qwen3": qwen3.FAMILY,
    "gemma2": gemma2.FAMILY,
    "gemma3": gemma3.FAMILY,
    "phi3": phi3.FAMILY,
    "mixtral": mixtral.FAMILY,
    "qwen3_moe": qwen3_moe.FAMILY,
}


def names() -> tuple[str, ...]:
  """The `ModelConfig.family` values jaxtune supports."""
  return tuple(FAMILIES)


def get(name: str) -> base.Family:
  """The family called `name`; ConfigError naming model.family and the allowed values."""
  if name not in FAMILIES:
    raise config_lib.ConfigError(f"bad value for model.family: {name!r} "
                                 f"(expected one of {', '.join(FAMILIES)})")
  return FAMILIES[name]


def for_model_type(model_type: str | None, source: str) -> base.Family:
  """The family that reads config.json's `model_type`; ValueError naming `source` if none."""
  for family in FAMILIES.values():
    if model_type in family.model_types:
      return family
  supported = [t for family in FAMILIES.values() for t in family.model_types]
  raise ValueError(f"{source}: model_type {model_type!r} is not supported "
                   f"(expected one of {', '.join(supported)})")
