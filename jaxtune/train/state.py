"""TrainState: everything a step updates, as one pytree (checkpointed as a dict).

The frozen side of a run (a LoRA base, a DPO reference, a distillation teacher) is not in
the state: it is a separate argument of the step and is never differentiated or saved.

    TrainState(step=int32[], trainable={...params or adapters...}, opt_state=(...), rng=uint32[2])
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class TrainState:
  step: jax.Array  # int32 []
  trainable: dict  # full params, or the LoRA adapter tree
  opt_state: object  # optax state over `trainable` only
  rng: jax.Array  # uint32 [2]

  def to_dict(self) -> dict:
    return {"step": self.step, "trainable": self.trainable, "opt_state": self.opt_state,
            "rng": self.rng}

  @classmethod
  def from_dict(cls, d: dict) -> "TrainState":
    return cls(step=d["step"], trainable=d["trainable"], opt_state=d["opt_state"], rng=d["rng"])


jax.tree_util.register_dataclass(TrainState,
                                 data_fields=["step", "trainable", "opt_state", "rng"],
                                 meta_fields=[])
