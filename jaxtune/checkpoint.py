"""Orbax checkpoints of a run: TrainState, data position, resolved config and provenance.

Each checkpoint is one orbax step directory with three items: `state` (a plain tree; a run
saves its TrainState as {step, trainable, opt_state, rng}), `data` (the loader's position,
JSON) and `meta` (the resolved config and the data/tokenizer fingerprint, JSON). This module
takes and returns plain trees and imports nothing from the trainer.
Orbax writes a step into a temporary directory and renames it only once every item is
complete on every host, so an interrupted save is never listed as a resume point.

Rotation is ours, not orbax's `max_to_keep`: the latest `keep` complete steps are kept,
plus the steps passed to `protect` (the best checkpoint of early stopping / keep_best,
which must survive any number of later saves). Old steps are pruned once the newer ones
are complete (at the next save, `wait` and `close`), never before.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
  """A keep-N, optionally async, orbax CheckpointManager over DIR/checkpoints."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.keep = keep
    self._protected: set[int] = set()
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data", "meta"))

  def protect(self, steps) -> None:
    """Keeps exactly these steps (e.g. {best step}) outside the keep-N rotation."""
    self._protected = {int(s) for s in steps if s is not None}

  def _prune(self) -> None:
    """Deletes complete steps beyond the latest `keep`, except protected ones (all
    processes call it: orbax's delete is collective)."""
    self._mngr.wait_until_finished()
    steps = sorted(self._mngr.all_steps())
    for step in steps[:max(len(steps) - self.keep, 0)]:
      if step not in self._protected:
        self._mngr.delete(step)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
    """Saves the tree `state` with the loader position and meta (async unless disabled)."""
    self._prune()  # the previous saves are complete here: orbax would wait for them anyway
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

  def meta(self, step: int) -> dict:
    """The meta item of `step` alone (the config and identities; no arrays are read)."""
    return self._mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self._prune()

  def close(self) -> None:
    self._prune()
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


def locate(path: str) -> tuple[str, int | None] | None:
  """(directory for `read`, step or None) when `path` is a run's workdir, its `checkpoints`
  dir or one step dir under it (runs/x/checkpoints/12); None for anything else."""
  path = os.path.abspath(path)
  if is_run(path):
    return path, None
  if os.path.basename(path) == "checkpoints" and os.path.isdir(path):
    return path, None
  parent, name = os.path.split(path)
  if os.path.basename(parent) == "checkpoints" and name.isdigit() and os.path.isdir(path):
    return parent, int(name)
  return None


def read_meta(path: str, step: int | None = None) -> dict:
  """The meta item (resolved config, model config, provenance) of a run's checkpoint at
  `step` (default: the latest), without reading any array. `path` as for `locate`."""
  where = locate(path)
  if where is None:
    raise ValueError(f"{path}: not a run's workdir or checkpoint directory")
  directory, at = where
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  mngr = ocp.CheckpointManager(directory, item_names=("state", "data", "meta"))
  step = step if step is not None else at if at is not None else mngr.latest_step()
  if step is None:
    raise ValueError(f"{directory}: no complete checkpoint")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  mngr.close()
  return meta
