"""PEFT adapter names for a language model that lives inside a multimodal wrapper.

`peft` names an adapter tensor after the module path in the model it wraps. For a
`Gemma3ForConditionalGeneration` base that path runs through transformers' in-memory
module names (`jaxtune.hf.multimodal`):

    text model (Gemma3ForCausalLM)  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
    wrapper                         base_model.model.model.language_model.layers.{i}.
                                    self_attn.q_proj.lora_A.weight

`for_base` renames an adapter about to be written when its `base_model_name_or_path` is such
a wrapper (followed through jaxtune runs, `hf.io.wrapper_source`) and writes
`target_modules` as a regex over the language model, so that `peft` adapts exactly the
modules the file holds, not the vision tower's `q_proj` / `k_proj` / `v_proj` as well.
`AdapterFile` reads either naming (and the legacy `language_model.model.*` one) as the text
model's; adapters of the vision tower or projector (a `peft` run on the whole wrapper) do
not touch the text logits and are skipped with a warning.
"""

from __future__ import annotations

import logging
import re

import safetensors

from jaxtune import config as config_lib
from jaxtune.hf import io
from jaxtune.hf import multimodal

_log = logging.getLogger("jaxtune")


def for_base(tensors: dict, peft_config: dict) -> tuple[dict, dict]:
  """(tensors, adapter_config) named for the adapter's base model (see the module doc)."""
  spec = peft_config.get("base_model_name_or_path") or ""
  stem = multimodal.ADAPTER_PREFIX + "model."
  if not spec or not any(k.startswith(stem) for k in tensors):
    return tensors, peft_config
  try:
    found = io.wrapper_source(spec)
  except (OSError, ValueError, KeyError) as e:
    _log.warning("cannot read the adapter's base model %r (%s: %s); its tensors are named "
                 "for the text model", spec, type(e).__name__, e)
    return tensors, peft_config
  if found is None:
    return tensors, peft_config
  w = found[0]
  tensors = {multimodal.adapter_name(w, k): v for k, v in tensors.items()}
  tm = peft_config.get("target_modules")
  if isinstance(tm, (list, tuple)) and tm:
    names = "|".join(re.escape(n) for n in sorted(tm))
    peft_config = dict(peft_config,
                       target_modules=rf"{re.escape(w.in_memory.text)}.*\.({names})")
  return tensors, peft_config


def _wrappers(cfg: config_lib.ModelConfig) -> list[multimodal.Wrapper]:
  return [w for w in multimodal.WRAPPERS.values() if w.family == cfg.family]


class AdapterFile:
  """`safetensors.safe_open(path)` with a wrapper's adapter names shown as the text
  model's (`keys`, `get_tensor`, `get_slice`; a context manager like safe_open)."""

  def __init__(self, path: str, cfg: config_lib.ModelConfig):
    self._handle = safetensors.safe_open(path, framework="np")
    self._names: dict[str, str] = {}
    skipped, wrappers = [], _wrappers(cfg)
    for name in self._handle.keys():
      text = name
      for w in wrappers:
        text = multimodal.adapter_text_name(w, name)
        if text != name:
          break
      if text is None:
        skipped.append(name)
        continue
      if text in self._names:
        raise ValueError(f"{path}: tensors {self._names[text]} and {name} adapt the same "
                         "language-model module")
      self._names[text] = name
    if skipped:
      _log.warning("%s: skipped %d adapter tensor(s) of the vision tower / projector (e.g. "
                   "%s): jaxtune trains the language model only", path, len(skipped),
                   skipped[0])

  def keys(self) -> list[str]:
    return list(self._names)

  def get_tensor(self, name: str):
    return self._handle.get_tensor(self._names[name])

  def get_slice(self, name: str):
    return self._handle.get_slice(self._names[name])

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False
