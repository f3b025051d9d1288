"""Orbax checkpoints of a run: TrainState, data position, resolved config and provenance.

Each checkpoint is one orbax step directory with three items: `state` (a plain tree; a run
saves its TrainState as {step, trainable, opt_state, rng}), `data` (the loader's position,
JSON) and `meta` (the resolved config and the data/tokenizer fingerprint, JSON). This module
takes and returns plain trees and imports nothing from the trainer.
Orbax writes a step into a temporary directory and renames it only once every item is
complete on every host, so an interrupted save is never listed as a resume point.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
  """A keep-N, optionally async, orbax CheckpointManager over DIR/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
    """Saves the tree `state` with the loader position and meta (async unless disabled)."""
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state: dict):
    """(state tree, data_state, meta) at `step`, placed per the ShapeDtypeStruct shardings
    of `abstract_state`."""
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def is_run(path: str) -> bool:
  """True for a run's workdir (or a `launch/convert.py --from_hf` output) with checkpoints."""
  return os.path.isdir(os.path.join(path, "checkpoints"))


def read(path: str, step: int | None = None):
  """(trainable tree, meta) of a run's checkpoint, without the optimizer's structure.

  `path` is a run's workdir, its `checkpoints` dir, or a `launch/convert.py --from_hf` output.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  mngr = ocp.CheckpointManager(path, item_names=("state", "data", "meta"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise ValueError(f"{path}: no complete checkpoint")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return restored["state"]["trainable"], meta
