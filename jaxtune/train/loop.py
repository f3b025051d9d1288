"""The host loop: data -> jitted step -> metrics, evals, checkpoints, resume, HF export.

    summary = loop.train(cfg, workdir)

Per step: the next batch of this process's rows becomes a global array, the step is
dispatched, and the previous step's metrics are fetched (one step behind, so the host
never waits on the step it just launched). Every `log_every` steps a line goes to
WORKDIR/metrics.jsonl and TensorBoard (process 0 only); every `eval_every` the validation
loss is computed; every `checkpoint.every_steps` orbax saves state + data position.
A restart with the same workdir resumes from the latest complete checkpoint; SIGTERM
saves a checkpoint at the next step boundary and exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import numpy as np
import tqdm

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune.train import flops
from jaxtune.train import methods
from jaxtune.train import setup

_log = logging.getLogger("jaxtune")


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
        keep = [l for l in f if _step_of(l) is not None and _step_of(l) <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    import tensorboardX
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


def _step_of(line: str) -> int | None:
  """The step of a metrics.jsonl line; None for a blank or torn (killed mid-write) line."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def _agree(flag: bool) -> bool:
  """True on every process if it is True on any (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def evaluate(run: setup.Run, state, batches: list, limit: int) -> dict:
  """Mean of each eval metric over up to `limit` eval batches (0 = all)."""
  totals: dict = {}
  for i, batch in enumerate(batches):
    if limit and i >= limit:
      break
    out = run.eval_step(state.trainable, run.frozen, setup.global_batch(batch, run.batch_sharding))
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
    for sig in (signal.SIGTERM,):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    _log.warning("signal %d: checkpointing at the next step boundary", signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def train(cfg: config_lib.TrainConfig, workdir: str) -> dict:
  """Runs (or resumes) the job described by `cfg` in `workdir`; returns a summary dict."""
  config_lib.validate(cfg)
  os.makedirs(workdir, exist_ok=True)
  job = methods.prepare(cfg)  # mesh, tokenizer, data, model, run, exporter
  run, ds = job.run, job.data
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
  state = run.state
  start = 0
  latest = ckpt.latest_step()
  loop_state = {"best": float("inf"), "bad_evals": 0, "stopped_early": False}
  if latest is not None:
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    del state, run.state
    state, data_state, saved_meta = ckpt.restore(latest, target)
    ds.train.restore(data_state)
    loop_state.update(saved_meta.get("loop", {}))
    if loop_state["best"] is None:
      loop_state["best"] = float("inf")
    start = latest
    _log.info("resumed from %s step %d", ckpt.directory, latest)
  meta = {"config": config_lib.to_dict(cfg), "model_config": config_lib.to_dict(run.model_cfg),
          "data_fingerprint": ds.fingerprint,
          "provenance": ds.provenance}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  writer = MetricsWriter(workdir, start)
  seq = cfg.data.seq_len
  per_token = flops.train_flops_per_token(run.model_cfg, seq, peft=cfg.peft.method != "none")
  peak = flops.peak_flops()
  best, bad_evals, last_val = loop_state["best"], loop_state["bad_evals"], {}
  pending = None  # (step, metrics future, tokens): fetched one step behind
  bar = tqdm.tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True,
                  disable=not cfg.train.progress or jax.process_index() != 0)
  t_last = time.perf_counter()
  step = start

  def flush(pending, t_now):
    nonlocal t_last
    s, fut, tokens = pending
    m = {k: float(v) for k, v in jax.device_get(fut).items()}
    dt = max(t_now - t_last, 1e-9)
    t_last = t_now
    if s > start + 1:  # the first step of a process includes compilation
      m["tokens_per_s"] = tokens / dt
      if peak:
        m["mfu"] = per_token * tokens / dt / (peak * jax.device_count())
    m.pop("weight", None)
    if s % cfg.train.log_every == 0 or s == cfg.train.max_steps:
      writer.write(s, m)
    bar.set_postfix(loss=f"{m['loss']:.4f}", **({"val": f"{last_val['val_loss']:.4f}"}
                                                 if last_val else {}))
    return m

  stopped_early = loop_state["stopped_early"]
  try:
    with _Stop() as stop:
      while step < cfg.train.max_steps and not stopped_early:
        host_batch = next(ds.train)
        batch = setup.global_batch(host_batch, run.batch_sharding)
        tokens = int(np.prod(host_batch["tokens"].shape)) * jax.process_count()
        state, metrics = run.train_step(state, run.frozen, batch)
        step += 1
        if pending is not None:
          flush(pending, time.perf_counter())
        pending = (step, metrics, tokens)
        bar.update(1)
        is_last = step == cfg.train.max_steps
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or is_last) and ds.eval:
          flush(pending, time.perf_counter())
          pending = None
          last_val = evaluate(run, state, ds.eval, cfg.train.eval_batches)
          writer.write(step, last_val)
          bar.write(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in last_val.items()))
          if last_val["val_loss"] < best - 1e-6:
            best, bad_evals = last_val["val_loss"], 0
          else:
            bad_evals += 1
          if (cfg.train.early_stopping_patience
              and bad_evals >= cfg.train.early_stopping_patience):
            bar.write(f"early stopping at step {step}: no val_loss improvement in {bad_evals} "
                      "evals")
            stopped_early = True
          t_last = time.perf_counter()
        # Every process must see the same stop decision before the collective save.
        stopping = stop.requested
        if jax.process_count() > 1 and (step % 10 == 0 or is_last):
          stopping = _agree(stopping)
        elif jax.process_count() > 1:
          stopping = False
        if step % cfg.checkpoint.every_steps == 0 or is_last or stopped_early or stopping:
          if pending is not None:  # its metrics line lands before the checkpoint that covers it
            flush(pending, time.perf_counter())
            pending = None
          loop_meta = {"best": None if best == float("inf") else best, "bad_evals": bad_evals,
                       "stopped_early": stopped_early}
          ckpt.save(step, state, ds.train.state(), {**meta, "loop": loop_meta})
          t_last = time.perf_counter()
        if stopping:
          break
      if pending is not None:
        flush(pending, time.perf_counter())
  finally:
    bar.close()
    ckpt.wait()
    writer.close()
  export_dir = None
  if cfg.checkpoint.export_hf and (step >= cfg.train.max_steps or stopped_early):
    export_dir = job.export(state, os.path.join(workdir, "hf"), meta)
  ckpt.close()
  summary = {"step": step, "resumed_from": start, "export": export_dir,
             "processes": jax.process_count(), "devices": jax.device_count(), **last_val}
  if jax.process_index() == 0:
    bar.write(f"done at step {step}" + (f"; val_loss={last_val['val_loss']:.4f}"
                                        if last_val else "")
              + (f"; HF export in {export_dir}" if export_dir else ""))
  return summary

