"""Registers the methods beyond SFT in `methods.METHODS`: dpo, reward and distill.

`methods.prepare` imports this module (if present) before it looks `cfg.method` up, so
`--set=method=dpo|reward|distill` works from every launcher. Each method lives in its own
module; this one only wires their hooks into `methods.Method`:

    dpo      data 'preference'   jaxtune.train.dpo      reference: frozen copy, adapters off,
                                                        or a precomputed table
    reward   data 'preference'   jaxtune.train.reward   scalar head, Bradley-Terry, HF
                                                        *ForSequenceClassification export
    distill  data 'sft'          jaxtune.train.distill  frozen teacher run in the step

The reward head is trainable next to the params or adapters. `methods.Method` may offer an
`extra_trainable(ctx) -> (trees, axes)` hook for that; without it (older `methods.py`) the
head is added to the full-FT params dict in place before `setup.build` sees it, and
LoRA reward models are refused with a ConfigError naming the missing hook.
"""

from __future__ import annotations

import dataclasses

from jaxtune import sharding
from jaxtune.train import distill
from jaxtune.train import dpo
from jaxtune.train import methods
from jaxtune.train import reward

_HAS_EXTRA_TRAINABLE = "extra_trainable" in {f.name for f in dataclasses.fields(methods.Method)}


def _reward_objective(ctx):
  if not _HAS_EXTRA_TRAINABLE:
    reward.attach_head_in_place(ctx)
  return reward.make_objective(ctx.model_cfg, ctx.cfg.method_cfg,
                               lora_scale=None if ctx.adapters is None else ctx.adapters.scale,
                               constrain=sharding.constrainer(ctx.mesh))


def _reward_method() -> methods.Method:
  kwargs = dict(data_kind="preference", objective=_reward_objective, export=reward.export)
  if _HAS_EXTRA_TRAINABLE:
    kwargs["extra_trainable"] = reward.extra_trainable
  return methods.Method(**kwargs)


def register() -> None:
  """(Re)registers dpo, reward and distill; idempotent."""
  methods.METHODS["dpo"] = methods.Method(data_kind="preference", objective=dpo.objective,
                                          frozen=dpo.frozen)
  methods.METHODS["reward"] = _reward_method()
  methods.METHODS["distill"] = methods.Method(data_kind="sft", objective=distill.objective,
                                              frozen=distill.frozen)


register()
