"""Export of a language model fine-tuned out of a multimodal checkpoint, as that checkpoint.

A Gemma 3 text model whose source (`ModelConfig.hf_path`, followed through jaxtune
checkpoints by `jaxtune.hf.io.source_config`) is a `Gemma3ForConditionalGeneration` is
written back as one, so HF tooling gets the architecture it was given:

- the language model's tensors are the tuned ones (the family's key table, in the dtype
  asked for), named as the source names them (legacy `language_model.model.*` or
  in-memory `model.language_model.*`, `jaxtune.hf.multimodal`);
- every other tensor (vision tower, projector) is copied unchanged from the source's
  safetensors, read one output shard at a time (`files.Lazy`);
- config.json is the source's, with the dtype fields set to the export's and the run's
  `jaxtune` metadata added; generation_config.json and the processor's
  preprocessor_config.json / processor_config.json are copied when the source has them.

When the tuned config is not the source's text config (a source that is not where the model
came from), `write` logs a warning and returns False: the caller then writes the text
model alone (`Gemma3ForCausalLM`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import numpy as np

from jaxtune import config as config_lib
from jaxtune.hf import config as hf_config
from jaxtune.hf import files
from jaxtune.hf import keys
from jaxtune.hf import multimodal

_log = logging.getLogger("jaxtune")

# Files of the source copied next to the weights when it has them (never overwritten).
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json")
DTYPE_KEYS = ("dtype", "torch_dtype")


def _config(d: dict, dtype: str, metadata: dict | None) -> dict:
  """The source config.json with the export's dtype (and the run's metadata)."""
  out = dict(d)
  out.update({k: dtype for k in DTYPE_KEYS})
  if isinstance(out.get("text_config"), dict):
    out["text_config"] = dict(out["text_config"])
    out["text_config"].update({k: dtype for k in DTYPE_KEYS if k in out["text_config"]})
  if metadata:
    out["jaxtune"] = metadata
  return out


def differences(cfg: config_lib.ModelConfig, d: dict, source: str) -> list[str]:
  """The ModelConfig fields in which `cfg` differs from the text config of config dict `d`
  (compute options aside)."""
  src = dataclasses.replace(hf_config.from_hf(d, cfg, source), hf_path=cfg.hf_path)
  return [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(src, f.name)]


class SourceOverwrite(Exception):
  """An export into its own source directory. Not a ValueError: `hf.io.save_hf` must not
  fall back to writing the text model over the source's files."""


def write(cfg: config_lib.ModelConfig, flat: dict[str, np.ndarray], out_dir: str,
          model_dir: str, *, dtype: str, metadata: dict | None = None,
          max_shard_bytes: int = 5 * 2**30) -> bool:
  """Writes the wrapper checkpoint of source `model_dir` with the tuned text params `flat`
  ({param path: host array}); False (nothing written) if the source does not fit `cfg`."""
  source = os.path.join(model_dir, "config.json")
  if os.path.realpath(out_dir) == os.path.realpath(model_dir):
    raise SourceOverwrite(f"{out_dir}: is the source whose vision tensors the export copies; "
                          "export to another directory")
  with open(source) as f:
    d = json.load(f)
  w = multimodal.get(d.get("model_type"))
  if w is None or w.family != cfg.family:
    raise ValueError(f"{source}: not a multimodal checkpoint of a {cfg.family} model")
  diff = differences(cfg, d, source)
  if diff:
    _log.warning("%s: the tuned model's config differs from this %s's text config in %s; "
                 "exporting the text model alone (%s) to %s", source, w.architecture,
                 ", ".join(diff), hf_config.ARCHITECTURES[cfg.family], out_dir)
    return False
  tensors = files.Tensors(model_dir)
  naming, _, others = multimodal.split(w, tensors.shapes, model_dir, tensors.file_of)
  out: dict = {naming.from_text(k): v for k, v in keys.to_hf(cfg, flat).items()}
  out.update({k: files.Lazy(tensors, k) for k in others})
  files.save_safetensors(out, out_dir, max_shard_bytes=max_shard_bytes, metadata=metadata)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(_config(d, dtype, metadata), f, indent=2)
  for name in SIDE_FILES:
    src, dst = os.path.join(model_dir, name), os.path.join(out_dir, name)
    if os.path.exists(src) and not os.path.exists(dst):
      shutil.copyfile(src, dst)
  if not os.path.exists(os.path.join(out_dir, "generation_config.json")):
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:  # as the text export
      json.dump(hf_config.generation_config(hf_config.to_hf(cfg, dtype=dtype)), f, indent=2)
  _log.info("%s: wrote a %s (%s naming): tuned language model, %d vision tower / projector "
            "tensors copied from %s", out_dir, w.architecture, naming.name, len(others),
            model_dir)
  return True
