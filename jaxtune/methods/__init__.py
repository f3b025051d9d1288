"""Training methods: one module per method, one explicit registry.

    sft       next-token cross-entropy (full FT, continued pre-training, chat SFT, LoRA)
    dpo       DPO-family preference losses, reference frozen / adapters off / precomputed
    reward    Bradley-Terry scalar reward model, HF *ForSequenceClassification export
    distill   student vs. a frozen teacher (in-step, 4-bit, or a precomputed top-k file)
    grpo      group-relative policy optimisation with rollouts from the engine's sampler

`--set=method=NAME` picks one; its options live in the config section of the same name
(`--set=dpo.beta=0.2`). `check(cfg)` validates the method, the model family, the PEFT
method and the method's own options before any data or weights are touched. Adding a
method is one module with a `base.Method` subclass and a `METHOD` instance, one line here,
and its config section in `jaxtune/config.py` (see docs/ARCHITECTURE.md).
"""

from jaxtune import config as config_lib
from jaxtune import peft
from jaxtune.methods import base
from jaxtune.methods import distill
from jaxtune.methods import dpo
from jaxtune.methods import grpo
from jaxtune.methods import reward
from jaxtune.methods import sft
from jaxtune.models import families

METHODS: dict[str, base.Method] = {
    "sft": sft.METHOD,
    "dpo": dpo.METHOD,
    "reward": reward.METHOD,
    "distill": distill.METHOD,
    "grpo": grpo.METHOD,
}

Context = base.Context
Method = base.Method


def get(name: str) -> base.Method:
  """The registered method called `name`; a one-line ConfigError naming the choices."""
  config_lib.check_choice("method", name, tuple(METHODS))
  return METHODS[name]


def check(cfg: config_lib.TrainConfig) -> base.Method:
  """Every check that needs no data and no weights; returns the run's method.

  Raises config.ConfigError naming the first bad key (generic ranges, model.family,
  peft.method, peft.dropout, the method's own section).
  """
  config_lib.validate(cfg)
  method = get(cfg.method)
  if not cfg.model.hf_path:
    families.get(cfg.model.family)
  if cfg.peft.method != "none":
    peft.get(cfg.peft.method)
  if cfg.peft.dropout and (cfg.method != "sft" or cfg.peft.method == "none"):
    raise config_lib.ConfigError(f"bad value for peft.dropout: {cfg.peft.dropout} (LoRA dropout "
                                 "applies to method=sft with peft.method=lora|qlora only)")
  method.check(cfg)
  return method
