"""`PeftMethod`: the protocol every parameter-efficient fine-tuning method implements.

Adding a PEFT method (DoRA, IA3, prompt or prefix tuning, LLaMA-Adapter) is one new module
with an object of this shape, plus one line in the `METHODS` table of `jaxtune.peft`. The
decoder knows none of them: `apply` hands it the base params with the targeted leaves
replaced by wrapped leaves (like `lora_kernel.LoraKernel`) that `layers.linear` runs.

    >>> method = jaxtune.peft.get(cfg.peft.method)            # e.g. lora.METHOD
    >>> adapters = method.init(model_cfg, params, cfg.peft, key)   # trainable tree
    >>> shardings = sharding.tree_shardings(mesh, method.axes(model_cfg, adapters), adapters)
    >>> wrapped = method.apply(params, adapters, rng)           # in the step, under grad
    >>> logits = decoder.forward(model_cfg, wrapped, tokens)
    >>> dense = method.merge(model_cfg, params, adapters)       # export a full model
    >>> method.save(model_cfg, adapters, "out/")                # Hugging Face PEFT files

The adapters object a method returns is a pytree (jit, grad, optax, orbax see its arrays)
with an `apply(params, rng=None)` method of its own, so code holding adapters (e.g.
`decoder.forward(..., lora=adapters)`) need not know the method.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from jaxtune import config as config_lib


@runtime_checkable
class PeftMethod(Protocol):
  """One PEFT method.

  Attributes:
    name: the `peft.method` config value, e.g. "lora".
    quantized_base: True when the frozen base is loaded 4-bit (QLoRA); the weights loader
      then loads it through `qlora.load_from_config`.
    peft_type: the Hugging Face PEFT `peft_type` its files carry, e.g. "LORA".
    adapters_type: the class of the adapters object `init` and `load` return.
  """
  name: str
  quantized_base: bool
  peft_type: str
  adapters_type: type

  def init(self, model_cfg: config_lib.ModelConfig, params: dict,
           peft_cfg: config_lib.PeftConfig, key: jax.Array) -> Any:
    """Fresh adapters for `params` (dense, QArray or ShapeDtypeStruct leaves) per peft_cfg.

    At init the adapted model computes exactly what the base computes."""

  def axes(self, model_cfg: config_lib.ModelConfig, adapters: Any) -> Any:
    """The adapters' container with logical-axis tuples as its array leaves."""

  def apply(self, params: dict, adapters: Any, rng: jax.Array | None = None) -> dict:
    """The base params with each targeted leaf replaced by its wrapped leaf.

    rng: None for evaluation; a PRNG key in a training step (dropout and the like)."""

  def merge(self, model_cfg: config_lib.ModelConfig, params: dict, adapters: Any) -> dict:
    """Dense params computing what `apply` computes (where the method is mergeable)."""

  def save(self, model_cfg: config_lib.ModelConfig, adapters: Any, out_dir: str, *,
           base_model_name_or_path: str = "") -> str:
    """Writes a Hugging Face PEFT adapter directory that `peft` loads; returns out_dir."""

  def load(self, model_cfg: config_lib.ModelConfig, adapter_dir: str) -> Any:
    """Reads a Hugging Face PEFT adapter directory (or hub id) of this method."""
