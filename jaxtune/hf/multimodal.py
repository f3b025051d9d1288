"""Multimodal checkpoints whose language model is a jaxtune family, read for text training.

Gemma 3's 4B / 12B / 27B checkpoints are `Gemma3ForConditionalGeneration` (config.json
model_type "gemma3"): a Gemma 3 text decoder plus a SigLIP vision tower and a projector.
jaxtune trains the decoder only:

- config: the wrapper's `text_config` with the defaults transformers applies
  (`transformers.Gemma3Config(**config).text_config`: the Hub's sparse text_config gets
  Gemma3TextConfig's heads, head_dim, vocab, rope bases, ...), plus the wrapper's own token
  ids and `tie_word_embeddings` where it states them (transformers 5 ties the wrapper's
  head by the top-level flag);
- tensors, in either naming (`Naming`), shown to the family's key table as the text
  model's `model.*` / `lm_head.*` keys by `text_view`:

      naming     language model            head                     kept as they are
      legacy     language_model.model.*    language_model.lm_head.*  vision_tower.*,
                                                                     multi_modal_projector.*
      in-memory  model.language_model.*    lm_head.*                 model.vision_tower.*,
                                                                     model.multi_modal_projector.*

  (legacy: the Hub's files, and what transformers 4.x and 5.x `save_pretrained` write;
  in-memory: transformers >= 4.52's module names, which PEFT adapter names follow).

The export (`hf/multimodal_export.py`) writes the wrapper back with the source's other
tensors copied unchanged; PEFT adapters use `adapter_name` / `adapter_text_name`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

ADAPTER_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
# Wrapper config.json keys that override the text config's when stated.
OUTER_KEYS = ("tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class Naming:
  """Where a wrapper keeps its language model's tensors and the rest."""
  name: str
  text: str  # replaces the text model's leading "model."
  head: str  # replaces the text model's leading "lm_head."
  others: tuple[str, ...]  # prefixes of the tensors jaxtune does not train

  def to_text(self, key: str) -> str | None:
    """The text model's key for `key`; None for a tensor under `others`; KeyError else."""
    if key.startswith(self.text):
      return "model." + key[len(self.text):]
    if key.startswith(self.head):
      return "lm_head." + key[len(self.head):]
    if key.startswith(self.others):
      return None
    raise KeyError(key)

  def from_text(self, key: str) -> str:
    """The wrapper's key for a text model key ("model.*" or "lm_head.*")."""
    if key.startswith("model."):
      return self.text + key[len("model."):]
    if key.startswith("lm_head."):
      return self.head + key[len("lm_head."):]
    raise ValueError(f"{key}: not a text model key (expected model.* or lm_head.*)")


@dataclasses.dataclass(frozen=True)
class Wrapper:
  model_type: str  # config.json's
  architecture: str
  config_class: str  # the transformers config class that fills in defaults
  family: str  # the jaxtune family of its language model
  text_model_types: tuple[str, ...]
  namings: tuple[Naming, ...]  # the last one: transformers' in-memory module names

  @property
  def in_memory(self) -> Naming:
    return self.namings[-1]


GEMMA3 = Wrapper(
    model_type="gemma3", architecture="Gemma3ForConditionalGeneration",
    config_class="Gemma3Config", family="gemma3", text_model_types=("gemma3_text",),
    namings=(Naming("legacy", "language_model.model.", "language_model.lm_head.",
                    ("vision_tower.", "multi_modal_projector.")),
             Naming("in-memory", "model.language_model.", "lm_head.",
                    ("model.vision_tower.", "model.multi_modal_projector."))))
WRAPPERS = {GEMMA3.model_type: GEMMA3}


def get(model_type: str | None) -> Wrapper | None:
  """The wrapper read for config.json's `model_type`, or None for a plain text model."""
  return WRAPPERS.get(model_type or "")


def wraps(family: str) -> bool:
  """Whether some multimodal wrapper holds a language model of `family`."""
  return any(w.family == family for w in WRAPPERS.values())


def text_config(d: dict, source: str) -> dict:
  """The language model's config.json dict of a wrapper config (others: `d` itself)."""
  w = get(d.get("model_type"))
  if w is None:
    return d
  import transformers  # pylint: disable=g-import-not-at-top  (config classes only)
  cls = getattr(transformers, w.config_class)
  try:
    full = cls(**{k: v for k, v in d.items() if k != "model_type"})
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f"{source}: transformers' {w.config_class} cannot read this "
                     f"{w.architecture} config ({type(e).__name__}: {e})") from e
  t = full.text_config.to_dict()
  for k in OUTER_KEYS:
    if d.get(k) is not None:
      t[k] = d[k]
  if t.get("model_type") not in w.text_model_types:
    raise ValueError(f"{source}: text_config.model_type {t.get('model_type')!r} is not "
                     f"supported in a {w.architecture} (expected {', '.join(w.text_model_types)})")
  return t


def naming(w: Wrapper, keys, source: str) -> Naming:
  """The naming whose language-model prefix the checkpoint's tensor names use."""
  found = [n for n in w.namings if any(k.startswith(n.text) for k in keys)]
  if len(found) != 1:
    expected = " or ".join(f"{n.text}* ({n.name})" for n in w.namings)
    raise ValueError(f"{source}: a {w.architecture} checkpoint needs its language model's "
                     f"tensors under exactly one of {expected}; found "
                     f"{', '.join(n.text for n in found) or 'neither'}")
  return found[0]


def split(w: Wrapper, shapes: dict, source: str, file_of: Callable[[str], str]
          ) -> tuple[Naming, dict[str, str], list[str]]:
  """(naming, {text key: checkpoint key}, [checkpoint keys kept as they are]).

  A tensor neither under the language model nor under the vision tower / projector is an
  error naming its file, its key and the expected prefixes."""
  n = naming(w, shapes, source)
  text, others = {}, []
  for k in sorted(shapes):
    try:
      t = n.to_text(k)
    except KeyError:
      raise ValueError(
          f"{file_of(k)}: tensor {k} {list(shapes[k])} is not part of a {w.architecture} "
          f"checkpoint in the {n.name} naming (expected keys under {n.text}, {n.head}, "
          f"{', '.join(n.others)})") from None
    if t is None:
      others.append(k)
    else:
      text[t] = k
  return n, text, others


def text_view(w: Wrapper, shapes: dict, get: Callable[[str], np.ndarray], source: str,
              file_of: Callable[[str], str]):
  """(shapes, get) over the text model's keys of a wrapper checkpoint's tensors."""
  _, text, _ = split(w, shapes, source, file_of)
  return {t: shapes[k] for t, k in text.items()}, lambda t: get(text[t])


def adapter_text_name(w: Wrapper, name: str) -> str | None:
  """A PEFT tensor name of the wrapper as the text model's PEFT name (any naming); None
  for an adapter of the vision tower or projector; unchanged if it is a text model's."""
  if not name.startswith(ADAPTER_PREFIX):
    return name
  rest = name[len(ADAPTER_PREFIX):]
  for n in reversed(w.namings):
    try:
      t = n.to_text(rest)
    except KeyError:
      continue
    return None if t is None else ADAPTER_PREFIX + t
  return name


def adapter_name(w: Wrapper, name: str) -> str:
  """The wrapper's PEFT name (transformers' in-memory module names, as `peft` saves them)
  of a text model's PEFT tensor name."""
  if not name.startswith(ADAPTER_PREFIX + "model.") and not name.startswith(
      ADAPTER_PREFIX + "lm_head."):
    return name
  return ADAPTER_PREFIX + w.in_memory.from_text(name[len(ADAPTER_PREFIX):])
