"""jaxtune.peft: parameter-efficient fine-tuning as tree operations over the base params.

    from jaxtune.peft import lora    # Adapters, init, axes, apply, merge, save_peft, load_peft
    from jaxtune.peft import qlora   # 4-bit base: load_quantized, quantize_params
    from jaxtune.peft import dora    # DoRA ("dora", and "qdora" over the 4-bit base)
    from jaxtune.peft import ia3     # IA3 scaling vectors
    from jaxtune.peft import prompt  # prompt tuning ("prompt_tuning": virtual tokens)
    from jaxtune.peft import prefix  # prefix tuning ("prefix_tuning": per-layer KV prefix)
    from jaxtune.peft import llama_adapter  # LLaMA-Adapter's gated adaption prompts
    from jaxtune.peft import base    # the PeftMethod protocol

    method = jaxtune.peft.get("lora")                      # a base.PeftMethod
    adapters = jaxtune.peft.load_peft(cfg, adapter_dir)    # any PEFT kind jaxtune reads
    jaxtune.peft.save_peft(cfg, adapters, out_dir, base_model_name_or_path="...")

`METHODS` is the explicit registry of `peft.method` values: a new method is one module and
one line here (nothing registers itself on import). "none" (full fine-tuning) is a valid
`peft.method` without a method object: `get("none")` is None. `jaxtune.lora` is
`jaxtune.peft.lora`.
"""

from __future__ import annotations

from typing import Any

from jaxtune import config as config_lib
from jaxtune.peft import base
from jaxtune.peft import dora
from jaxtune.peft import ia3
from jaxtune.peft import llama_adapter
from jaxtune.peft import lora
from jaxtune.peft import peft_io
from jaxtune.peft import prefix
from jaxtune.peft import prompt
from jaxtune.peft import qlora

NONE = "none"

METHODS: dict[str, base.PeftMethod] = {
    "lora": lora.METHOD,
    "qlora": qlora.METHOD,
    "dora": dora.METHOD,
    "qdora": dora.QDORA,
    "ia3": ia3.METHOD,
    "prompt_tuning": prompt.METHOD,
    "prefix_tuning": prefix.METHOD,
    "llama_adapter": llama_adapter.METHOD,
}


def names() -> tuple[str, ...]:
  """The registered method names (without "none"), e.g. ("lora", "qlora")."""
  return tuple(METHODS)


def get(name: str) -> base.PeftMethod | None:
  """The PEFT method for a `peft.method` value; None for "none" (full fine-tuning).

  Anything else is a ConfigError naming peft.method and the values it takes.
  """
  if name == NONE:
    return None
  if name not in METHODS:
    raise config_lib.ConfigError(
        f"bad value for peft.method: {name!r} (expected one of {', '.join((NONE, *METHODS))})")
  return METHODS[name]


def _method_of(adapters: Any) -> base.PeftMethod:
  """The first registered method whose adapters type `adapters` is."""
  for method in METHODS.values():
    if isinstance(adapters, method.adapters_type):
      return method
  types = sorted({m.adapters_type.__name__ for m in METHODS.values()})
  raise TypeError(f"save_peft: {type(adapters).__name__} is not an adapters object of a "
                  f"PEFT method jaxtune supports (expected one of {', '.join(types)})")


def save_peft(cfg: config_lib.ModelConfig, adapters: Any, out_dir: str, *,
              base_model_name_or_path: str = "") -> str:
  """Writes any supported adapters as a Hugging Face PEFT directory; returns out_dir."""
  return _method_of(adapters).save(cfg, adapters, out_dir,
                                   base_model_name_or_path=base_model_name_or_path)


def load_peft(cfg: config_lib.ModelConfig, adapter_dir: str) -> Any:
  """Reads a Hugging Face PEFT directory (or hub id) of any kind jaxtune supports.

  The method is picked by the `peft_type` of its adapter_config.json (where several
  methods share one, e.g. LORA for lora and dora, the one whose `accepts(config)` is true,
  else the one without `accepts`); an unsupported type is an error naming the supported.
  """
  local_dir, pc = peft_io.read_adapter_config(adapter_dir)
  peft_type = pc.get("peft_type")
  same = [m for m in METHODS.values() if m.peft_type == peft_type]
  chosen = ([m for m in same if getattr(m, "accepts", None) and m.accepts(pc)]
            or [m for m in same if not getattr(m, "accepts", None)])
  if chosen:
    return chosen[0].load(cfg, local_dir)
  types = sorted({m.peft_type for m in METHODS.values()})
  raise ValueError(f"{local_dir}: peft_type {peft_type!r} is not supported (supported: "
                   f"{', '.join(types)})")
