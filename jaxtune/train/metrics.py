"""Where a run's numbers go: WORKDIR/metrics.jsonl and TensorBoard, from process 0 only.

One JSON object per logged step ({"step": n, "loss": ..., "epoch": ..., ...}); eval rows
carry val_* keys. On resume, lines past the resume step are dropped (they are re-run), a
torn last line (a run killed mid-write) is ignored, and TensorBoard events past the resume
step are purged (tensorboardX `purge_step`), so no step appears twice.

tensorboardX is optional: without it a warning is logged once and only metrics.jsonl is
written. Per-source losses (`loss/source{i}` from a mixture) are logged under the source's
file name (`loss/chat.jsonl`).

`Meter` turns step n's metrics future into a row while step n+1 runs (the host never waits
on the step it just launched). Its tokens/s is an average over a window that starts when
the host begins preparing a batch after a pause (compilation, eval, checkpoint) and ends
when the step's results are fetched: every counted step's batch preparation and device time
lies inside the window, so the rate is never overstated. The loop waits for the first
(compiling) step to finish before the window opens, so no uncounted step runs inside it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import jax

from jaxtune.train import flops

_log = logging.getLogger("jaxtune")
_TB_HINT = ("tensorboardX is not installed: metrics go to metrics.jsonl only "
            "(pip install tensorboardX for TensorBoard events)")
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
  if msg not in _warned:
    _warned.add(msg)
    _log.warning(msg)


def _summary_writer(logdir: str, purge_step: int | None):
  """A tensorboardX SummaryWriter, or None (warned once) when tensorboardX is missing."""
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  except ImportError:
    _warn_once(_TB_HINT)
    return None
  return tensorboardX.SummaryWriter(logdir, purge_step=purge_step)


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
    # Events at steps >= purge_step (written before an interruption) are dropped.
    self._tb = _summary_writer(os.path.join(workdir, "tb"),
                               resume_step + 1 if resume_step > 0 else None)

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
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


def source_labels(names) -> list[str]:
  """Short unique metric labels for data sources: the file name when unique, else the
  source as given. ["data/a.jsonl", "x/b.jsonl"] -> ["a.jsonl", "b.jsonl"]."""
  names = [str(n) for n in names]
  base = [os.path.basename(n.rstrip("/")) or n for n in names]
  labels = base if len(set(base)) == len(base) else names
  return [re.sub(r"\s+", "_", l) for l in labels]


def rename_sources(metrics: dict, names) -> dict:
  """{..., "loss/source1": x} -> {..., "loss/<label of source 1>": x} (also val_loss/...)."""
  labels = source_labels(names)
  out = {}
  for k, v in metrics.items():
    m = re.fullmatch(r"(.*/)source(\d+)", k)
    if m and int(m.group(2)) < len(labels):
      k = m.group(1) + labels[int(m.group(2))]
    out[k] = v
  return out


class Meter:
  """Step n's metrics future -> a logged row (tokens/s, MFU, epoch, skipped_steps)."""

  def __init__(self, cfg, model_cfg, writer, bar, start: int, *, skipped_total: int = 0,
               source_names=()):
    self.cfg, self.writer, self.bar, self.start = cfg, writer, bar, start
    self.per_token = flops.train_flops_per_token(model_cfg, cfg.data.seq_len,
                                                 peft=cfg.peft.method != "none")
    self.peak = flops.peak_flops()
    self.source_names = tuple(source_names)
    self.pending = None  # (step, metrics future, window tokens through step, window start)
    self.t0 = None  # window start (None: paused; the next tick opens a window)
    self.first = None  # first step counted in the window
    self.win_tokens = 0
    self.last_val: dict = {}
    self.skipped_total = skipped_total
    self.consecutive_skipped = 0
    self.skip_run = (0, 0)  # (first, last) step of the latest run of skipped steps
    self.train_losses: list[float] = []  # losses of the steps since the last eval

  def tick(self, step: int) -> None:
    """Called before the host prepares `step`'s batch: opens a window after a pause."""
    if self.t0 is None:
      self.t0, self.first, self.win_tokens = time.perf_counter(), step, 0

  def pause(self) -> None:
    """Closes the window (after compilation, eval or a checkpoint): that time is not counted."""
    self.t0 = None

  def push(self, step: int, fut, tokens: int, **extra) -> None:
    self.flush()
    counted = self.t0 is not None and self.first is not None and step >= self.first
    if counted:
      self.win_tokens += tokens
    self.pending = (step, fut, self.win_tokens if counted else 0,
                    self.t0 if counted else None, extra)

  def flush(self) -> None:
    if self.pending is None:
      return
    s, fut, tokens, t0, extra = self.pending
    self.pending = None
    m = {k: float(v) for k, v in jax.device_get(fut).items()}
    if t0 is not None and t0 == self.t0 and tokens:
      rate = tokens / max(time.perf_counter() - t0, 1e-9)
      m["tokens_per_s"] = rate
      if self.peak:
        m["mfu"] = self.per_token * rate / (self.peak * jax.device_count())
    m.pop("weight", None)
    self._count_skip(s, m)
    if not self.consecutive_skipped and "loss" in m:
      self.train_losses.append(m["loss"])
    m.update(extra)
    m = rename_sources(m, self.source_names)
    if s % self.cfg.train.log_every == 0 or s == self.cfg.train.max_steps:
      self.writer.write(s, m)
    post = {"loss": f"{m['loss']:.4f}"}
    if "val_loss" in self.last_val:
      post["val"] = f"{self.last_val['val_loss']:.4f}"
    if "epoch" in m:
      post["epoch"] = f"{m['epoch']:.2f}"
    self.bar.set_postfix(**post)

  def take_train_loss(self) -> float | None:
    """Mean training loss of the (not skipped) steps since the last call; None if none."""
    losses, self.train_losses = self.train_losses, []
    return sum(losses) / len(losses) if losses else None

  def _count_skip(self, step: int, m: dict) -> None:
    skipped = m.pop("skipped", 0.0) > 0
    self.skipped_total += int(skipped)
    self.consecutive_skipped = self.consecutive_skipped + 1 if skipped else 0
    m["skipped_steps"] = float(self.skipped_total)
    if skipped:
      self.skip_run = (step if self.consecutive_skipped == 1 else self.skip_run[0], step)
      _log.warning("step %d: loss=%s grad_norm=%s is not finite: update skipped (%d in a row; "
                   "the run stops after train.max_skipped=%d)", step, m.get("loss"),
                   m.get("grad_norm"), self.consecutive_skipped, self.cfg.train.max_skipped)
