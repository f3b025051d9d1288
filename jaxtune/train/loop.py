"""The host loop: batches -> jitted step -> metrics, evals, checkpoints, resume, HF export.

    summary = loop.train(cfg, workdir)

Per step: the method's next host batch (`Method.batches`: the data loader, or rollouts made
with `run.state`) becomes a global array, the step is dispatched, and the previous step's
metrics are fetched (one step behind, so the host never waits on the step it just
launched). Every `log_every` steps a line goes to WORKDIR/metrics.jsonl and TensorBoard
(process 0 only); every `eval_every` the validation loss is computed; every
`checkpoint.every_steps` orbax saves state + data position. A restart with the same
workdir resumes from the latest complete checkpoint; SIGTERM saves a checkpoint at the
next step boundary and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import jax
import numpy as np
import tqdm

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune.train import flops
from jaxtune.train import metrics as metrics_lib
from jaxtune.train import setup
from jaxtune.train import state as state_lib

_log = logging.getLogger("jaxtune")


def _agree(flag: bool) -> bool:
  """True on every process if it is True on any (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def device_batch(host_batch: dict, batch_sharding) -> dict:
  """This process's numpy rows -> global arrays for the step (non-array values dropped)."""
  arrays = {k: v for k, v in host_batch.items() if isinstance(v, np.ndarray)}
  return data_lib.to_global(arrays, batch_sharding)


def evaluate(run: setup.Run, state, batches: list, limit: int) -> dict:
  """Mean of each eval metric over up to `limit` eval batches (0 = all)."""
  totals: dict = {}
  for i, batch in enumerate(batches):
    if limit and i >= limit:
      break
    out = run.eval_step(state.trainable, run.frozen, device_batch(batch, run.batch_sharding))
    for k, (s, n) in jax.device_get(out).items():
      a, b = totals.get(k, (0.0, 0.0))
      totals[k] = (a + float(s), b + float(n))
  return {f"val_{k}": s / max(n, 1e-9) for k, (s, n) in totals.items()}


class _Stop:
  """Set by SIGTERM: finish the step, checkpoint, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    _log.warning("signal %d: checkpointing at the next step boundary", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


@dataclasses.dataclass
class Progress:
  """Loop state that survives a resume (stored in checkpoint meta under "loop")."""
  best: float = float("inf")
  bad_evals: int = 0
  stopped_early: bool = False

  def to_meta(self) -> dict:
    return {"best": None if self.best == float("inf") else self.best,
            "bad_evals": self.bad_evals, "stopped_early": self.stopped_early}

  @classmethod
  def from_meta(cls, d: dict) -> "Progress":
    best = d.get("best")
    return cls(best=float("inf") if best is None else best, bad_evals=d.get("bad_evals", 0),
               stopped_early=d.get("stopped_early", False))


class _Meter:
  """Turns step n's metrics future into a logged row while step n+1 runs: tokens/s and MFU
  over the wall time between fetches, excluding compile (first step), eval and save."""

  def __init__(self, cfg, run, writer, bar, start: int):
    self.cfg, self.writer, self.bar, self.start = cfg, writer, bar, start
    self.per_token = flops.train_flops_per_token(run.model_cfg, cfg.data.seq_len,
                                                 peft=cfg.peft.method != "none")
    self.peak = flops.peak_flops()
    self.pending = None  # (step, metrics future, tokens)
    self.t_last = time.perf_counter()
    self.last_val: dict = {}

  def push(self, step: int, fut, tokens: int) -> None:
    self.flush()
    self.pending = (step, fut, tokens)

  def restart_clock(self) -> None:
    self.t_last = time.perf_counter()

  def flush(self) -> None:
    if self.pending is None:
      return
    s, fut, tokens = self.pending
    self.pending = None
    m = {k: float(v) for k, v in jax.device_get(fut).items()}
    now = time.perf_counter()
    dt, self.t_last = max(now - self.t_last, 1e-9), now
    if s > self.start + 1:  # the first step of a process includes compilation
      m["tokens_per_s"] = tokens / dt
      if self.peak:
        m["mfu"] = self.per_token * tokens / dt / (self.peak * jax.device_count())
    m.pop("weight", None)
    if s % self.cfg.train.log_every == 0 or s == self.cfg.train.max_steps:
      self.writer.write(s, m)
    val = {"val": f"{self.last_val['val_loss']:.4f}"} if "val_loss" in self.last_val else {}
    self.bar.set_postfix(loss=f"{m['loss']:.4f}", **val)


def _resume(job: setup.Job, ckpt) -> tuple[state_lib.TrainState, int, Progress]:
  """(state, start step, progress): restored from the latest checkpoint, or fresh."""
  run = job.run
  latest = ckpt.latest_step()
  if latest is None:
    return run.state, 0, Progress()
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
  run.state = None  # the fresh buffers are freed before the restored ones arrive
  tree, data_state, saved_meta = ckpt.restore(latest, target.to_dict())
  job.data.train.restore(data_state)
  _log.info("resumed from %s step %d", ckpt.directory, latest)
  return state_lib.TrainState.from_dict(tree), latest, Progress.from_meta(
      saved_meta.get("loop", {}))


def _eval(job: setup.Job, state, step: int, meter: _Meter, progress: Progress) -> None:
  cfg = job.cfg
  meter.flush()
  meter.last_val = evaluate(job.run, state, job.data.eval, cfg.train.eval_batches)
  meter.writer.write(step, meter.last_val)
  meter.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4f}"
                                              for k, v in meter.last_val.items()))
  if meter.last_val["val_loss"] < progress.best - 1e-6:
    progress.best, progress.bad_evals = meter.last_val["val_loss"], 0
  else:
    progress.bad_evals += 1
  patience = cfg.train.early_stopping_patience
  if patience and progress.bad_evals >= patience:
    meter.bar.write(f"early stopping at step {step}: no val_loss improvement in "
                    f"{progress.bad_evals} evals")
    progress.stopped_early = True
  meter.restart_clock()


def _steps(job: setup.Job, ckpt, meter: _Meter, state, start: int, progress: Progress,
           meta: dict) -> tuple[state_lib.TrainState, int]:
  """Runs steps start+1 .. max_steps (or until early stop / SIGTERM); returns (state, step)."""
  cfg, run = job.cfg, job.run
  batches = iter(job.method.batches(job.ctx, run))
  step = start
  run.state = state
  with _Stop() as stop:
    while step < cfg.train.max_steps and not progress.stopped_early:
      host_batch = next(batches)
      tokens = int(np.prod(host_batch["tokens"].shape)) * jax.process_count()
      state, fut = run.train_step(state, run.frozen,
                                  device_batch(host_batch, run.batch_sharding))
      run.state = state
      step += 1
      meter.push(step, fut, tokens)
      meter.bar.update(1)
      is_last = step == cfg.train.max_steps
      if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or is_last) and job.data.eval:
        _eval(job, state, step, meter, progress)
      # Every process must see the same stop decision before the collective save.
      stopping = stop.requested
      if jax.process_count() > 1:
        stopping = _agree(stopping) if (step % 10 == 0 or is_last) else False
      if step % cfg.checkpoint.every_steps == 0 or is_last or progress.stopped_early or stopping:
        meter.flush()  # its metrics line lands before the checkpoint that covers it
        ckpt.save(step, state.to_dict(), job.data.train.state(),
                  {**meta, "loop": progress.to_meta()})
        meter.restart_clock()
      if stopping:
        break
    meter.flush()
  return state, step


def train(cfg: config_lib.TrainConfig, workdir: str) -> dict:
  """Runs (or resumes) the job described by `cfg` in `workdir`; returns a summary dict."""
  job = setup.prepare(cfg)  # checks first, then mesh, tokenizer, data, weights, steps
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
  state, start, progress = _resume(job, ckpt)
  ds = job.data
  meta = {"config": config_lib.to_dict(cfg), "model_config": config_lib.to_dict(job.run.model_cfg),
          "data_fingerprint": ds.fingerprint, "provenance": ds.provenance}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  writer = metrics_lib.MetricsWriter(workdir, start)
  bar = tqdm.tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True,
                  disable=not cfg.train.progress or jax.process_index() != 0)
  meter = _Meter(cfg, job.run, writer, bar, start)
  step = start
  try:
    state, step = _steps(job, ckpt, meter, state, start, progress, meta)
  finally:
    bar.close()
    ckpt.wait()
    writer.close()
  export_dir = None
  if cfg.checkpoint.export_hf and (step >= cfg.train.max_steps or progress.stopped_early):
    export_dir = job.export(state, os.path.join(workdir, "hf"), meta)
  ckpt.close()
  last_val = meter.last_val
  summary = {"step": step, "resumed_from": start, "export": export_dir,
             "processes": jax.process_count(), "devices": jax.device_count(), **last_val}
  if jax.process_index() == 0:
    bar.write(f"done at step {step}" + (f"; val_loss={last_val['val_loss']:.4f}"
                                        if last_val else "")
              + (f"; HF export in {export_dir}" if export_dir else ""))
  return summary
