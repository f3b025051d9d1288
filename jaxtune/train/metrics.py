"""Where a run's numbers go: WORKDIR/metrics.jsonl and TensorBoard, from process 0 only.

One JSON object per logged step ({"step": n, "loss": ..., ...}); eval rows carry val_*
keys. On resume, lines past the resume step are dropped (they are re-run), and a torn last
line (a run killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
  """metrics.jsonl (one object per logged step) + TensorBoard events, on process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):  # drop lines past the resume point: they are re-run
      with open(self.path) as f:
        keep = [l for l in f if step_of(l) is not None and step_of(l) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step":
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a blank or torn (killed mid-write) line."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None
