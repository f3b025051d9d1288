"""Models and tokenizers for evaluation, only through `weights.load` and the data package.

    model, w = load.model("runs/lora", mesh=mesh, compute=compute)    # any weights source
    base = load.initial(w, mesh=mesh, compute=compute)   # what that run started from
    tok = load.tokenizer("runs/lora", w)                 # the run's own tokenizer

`initial` is the run's starting point: for a PEFT run the same base params with the
adapters off (no second copy); for full fine-tuning its `model.hf_path`, or its seeded
random init (the exact arrays `train.setup` initialised, same seed and dtype).
"""

from __future__ import annotations

import dataclasses
import os

from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import weights
from jaxtune.data import tokenizer_lib
from jaxtune.eval import runner


def compute_options(*, dtype: str = "float32", logits_chunk: int = 0,
                    attention: str = "auto") -> config_lib.ModelConfig:
  """A ModelConfig that carries only the compute options evaluation runs with."""
  return config_lib.ModelConfig(dtype=dtype, param_dtype=dtype, logits_chunk=logits_chunk,
                                attention=attention)


def model(source: str, *, mesh, compute: config_lib.ModelConfig, adapter: str = "",
          step: int | None = None, name: str = "tuned") -> tuple[runner.Model, weights.Weights]:
  """(runner.Model, the Weights it came from) for any `weights.load` source."""
  if not source:
    raise ValueError("no model given; expected an HF dir, hub id, run dir or checkpoint dir")
  w = weights.load(source, mesh=mesh, base=compute, adapter=adapter, step=step)
  return runner.Model(name, w.model_cfg, w.params, w.adapters), w


def initial(w: weights.Weights, *, mesh, compute: config_lib.ModelConfig,
            name: str = "base") -> runner.Model:
  """The model a run started from (see the module docstring)."""
  if w.run_cfg is None:
    raise ValueError("--base=initial needs a run (a training workdir or checkpoint dir) as "
                     "--model; for an HF model give the base model's path as --base")
  if w.adapters is not None:
    return runner.Model(name, w.model_cfg, w.params, None)
  run = w.run_cfg
  if run.model.hf_path:
    return model(run.model.hf_path, mesh=mesh, compute=compute, name=name)[0]
  arch = dataclasses.replace(w.model_cfg, param_dtype=run.model.param_dtype)
  init = weights.load("", mesh=mesh, base=arch, seed=run.train.seed)
  return runner.Model(name, w.model_cfg, init.params, None)


def tokenizer(source: str, w: weights.Weights, *, override: str = "",
              chat_template: str = ""):
  """The model's tokenizer: `override`, else the run's (`data.tokenizer_from_config`), else
  the one in the model directory; `chat_template` (a file or template text) replaces its
  template."""
  if override:
    tok = data_lib.load_tokenizer(override)
  elif w.run_cfg is not None:
    tok = data_lib.tokenizer_from_config(w.run_cfg)
  else:
    tok = data_lib.load_tokenizer(source)
  if chat_template:
    tok.chat_template = tokenizer_lib.read_template(chat_template)
  if len(tok) > w.model_cfg.vocab_size:
    raise ValueError(f"{source}: the tokenizer has {len(tok)} tokens but the model's vocab is "
                     f"{w.model_cfg.vocab_size}; expected the model's own tokenizer "
                     "(--tokenizer=DIR)")
  return tok


def describe(source: str, adapter: str = "") -> str:
  """The source as the report names it (absolute when local)."""
  where = os.path.abspath(source) if os.path.exists(source) else source
  return where + (f" + adapter {os.path.abspath(adapter)}" if adapter else "")
