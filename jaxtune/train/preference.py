"""Registers the methods beyond SFT in `methods.METHODS`: dpo, reward and distill.

`methods.prepare` imports this module (if present) before it looks `cfg.method` up, so
`--set=method=dpo|reward|distill` works from every launcher. Each method lives in its own
module; this one only wires their hooks into `methods.Method`:

    dpo      data 'preference'   jaxtune.train.dpo      reference: frozen copy, adapters off,
                                                        or a precomputed table
    reward   data 'preference'   jaxtune.train.reward   scalar head, Bradley-Terry, HF
                                                        *ForSequenceClassification export
    distill  data 'sft'          jaxtune.train.distill  frozen teacher run in the step

The reward head is trainable next to the params or adapters, through the
`methods.Method.extra_trainable(ctx) -> (trees, axes)` hook.
"""

from __future__ import annotations

from jaxtune import sharding
from jaxtune.train import distill
from jaxtune.train import dpo
from jaxtune.train import methods
from jaxtune.train import reward

def _reward_objective(ctx):
  return reward.make_objective(ctx.model_cfg, ctx.cfg.method_cfg,
                               lora_scale=None if ctx.adapters is None else ctx.adapters.scale,
                               constrain=sharding.constrainer(ctx.mesh))


def _reward_method() -> methods.Method:
  return methods.Method(data_kind="preference", objective=_reward_objective,
                        export=reward.export, extra_trainable=reward.extra_trainable)


def register() -> None:
  """(Re)registers dpo, reward and distill; idempotent."""
  methods.METHODS["dpo"] = methods.Method(data_kind="preference", objective=dpo.objective,
                                          frozen=dpo.frozen)
  methods.METHODS["reward"] = _reward_method()
  methods.METHODS["distill"] = methods.Method(data_kind="sft", objective=distill.objective,
                                              frozen=distill.frozen)


register()
