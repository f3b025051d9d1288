"""The host loop: batches -> jitted step -> metrics, evals, checkpoints, resume, HF export.

    summary = loop.train(cfg, workdir, allow_changed=())

Per step: the method's next host batch (`Method.batches`: the data loader, or rollouts made
with `run.state`) becomes a global array, the step is dispatched, and the previous step's
metrics are fetched (one step behind, so the host never waits on the step it just
launched). Every `log_every` steps a line goes to WORKDIR/metrics.jsonl and TensorBoard
(process 0 only); every `eval_every` the validation loss is computed; every
`checkpoint.every_steps` orbax saves state + data position.

A restart with the same workdir resumes from the latest complete checkpoint, after the
resume guard (`train/resume.py`) has compared the checkpoint's config and inputs with this
run's. `summary["status"]` says how the run ended (launch/train.py maps it to the exit code):

    completed       reached train.max_steps                                      exit 0
    early_stopped   train.early_stopping_patience evals without improvement      exit 0
    interrupted     SIGTERM or SIGINT (Ctrl-C): checkpoint at the step boundary   exit 3
                    (a second Ctrl-C exits at once, without saving)
    diverged        train.max_skipped consecutive steps with a non-finite loss    exit 4
                    or grad norm (each skipped inside the step, see step.py);
                    nothing is saved after them

With early stopping or `checkpoint.keep_best=METRIC`, the checkpoint of the best value of
that metric (val_loss by default) is kept outside the keep-N rotation (saved at the eval that
found it) and is the one exported. Retention, generation metrics, the forgetting and
overfitting warnings and the end-of-run report.md / plots / model card are
`train/evaluate.py`'s (eval.*).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
import tqdm

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import quant
from jaxtune.train import evaluate as eval_lib
from jaxtune.train import memory
from jaxtune.train import metrics as metrics_lib
from jaxtune.train import resume
from jaxtune.train import setup
from jaxtune.train import state as state_lib
from jaxtune.train import stop as stop_lib

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


@dataclasses.dataclass
class Progress:
  """Loop state that survives a resume (stored in checkpoint meta under "loop")."""
  best: float = float("inf")
  best_step: int | None = None
  bad_evals: int = 0
  stopped_early: bool = False
  skipped: int = 0
  evals: dict = dataclasses.field(default_factory=dict)  # evaluate.Tracker's state
  metric: str = "val_loss"  # what `best` measures (checkpoint.keep_best)

  def to_meta(self) -> dict:
    return {"best": None if self.best == float("inf") else self.best,
            "best_step": self.best_step, "bad_evals": self.bad_evals,
            "stopped_early": self.stopped_early, "skipped": self.skipped,
            "evals": self.evals, "metric": self.metric}

  @classmethod
  def from_meta(cls, d: dict) -> "Progress":
    best = d.get("best")
    return cls(best=float("inf") if best is None else best, best_step=d.get("best_step"),
               bad_evals=d.get("bad_evals", 0), stopped_early=d.get("stopped_early", False),
               skipped=d.get("skipped", 0), evals=d.get("evals", {}),
               metric=d.get("metric", "val_loss"))


def keep_best(cfg: config_lib.TrainConfig) -> bool:
  return bool(eval_lib.best_metric(cfg))


def param_counts(run: setup.Run) -> tuple[int, int]:
  """(total, trainable) parameters: the model (its frozen base with PEFT) + trainable
  leaves; 4-bit kernels count the weights they stand for. A DPO reference or a teacher
  is not counted."""
  def size(t):
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(t, is_leaf=quant.is_qarray))
  trainable = size(run.state.trainable)
  return trainable + size(run.frozen.get("base", {})), trainable


def _epoch(loader) -> float | None:
  """Epochs of train data consumed so far (fractional), from the loader's position."""
  if not hasattr(loader, "state") or not hasattr(loader, "rows_in_epoch"):
    return None
  pos = loader.state()
  return pos["epoch"] + pos["index"] / max(loader.rows_in_epoch(), 1)


def _abstract(state):
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _resume(job: setup.Job, ckpt, guard) -> tuple[state_lib.TrainState, int, Progress]:
  """(state, start step, progress): restored from the latest checkpoint, or fresh."""
  run = job.run
  latest = ckpt.latest_step()
  if latest is None:
    return run.state, 0, Progress()
  target = _abstract(run.state)
  run.state = None  # the fresh buffers are freed before the restored ones arrive
  tree, data_state, saved_meta = resume.restore(ckpt, latest, target.to_dict())
  job.data.train.restore(data_state, strict=not (guard and guard.data_allowed))
  _log.info("resumed from %s step %d", ckpt.directory, latest)
  run.state = state_lib.TrainState.from_dict(tree)
  return run.state, latest, Progress.from_meta(saved_meta.get("loop", {}))


def _eval(job: setup.Job, state, step: int, meter, progress: Progress, tracker) -> bool:
  """Evaluates, logs, updates early-stopping progress; True when the best metric improved."""
  cfg = job.cfg
  meter.flush()
  vals = evaluate(job.run, state, job.method.eval_batches(job.ctx, job.run),
                  cfg.train.eval_batches) if job.data.eval else {}
  vals = metrics_lib.rename_sources(vals, job.data.eval_source_names)
  vals.update(tracker.at_eval(job, state, step, vals, meter.take_train_loss()))
  meter.last_val = vals
  meter.writer.write(step, meter.last_val)
  meter.bar.write(f"step {step}: " + " ".join(f"{k}={v:.4f}"
                                              for k, v in meter.last_val.items()))
  improved = eval_lib.update_best(cfg, progress, vals, step)
  progress.evals = tracker.to_meta()
  patience = cfg.train.early_stopping_patience
  if patience and progress.bad_evals >= patience:
    meter.bar.write(f"early stopping at step {step}: no {progress.metric} improvement in "
                    f"{progress.bad_evals} evals (best "
                    f"{eval_lib.best_value(cfg, progress):.4f} at step {progress.best_step})")
    progress.stopped_early = True
  meter.pause()
  return improved


def _tokens(host_batch: dict) -> int:
  """Real (non-padding) tokens of the global batch (this process's count x processes)."""
  seg = host_batch.get("segment_ids")
  n = int(np.count_nonzero(seg)) if isinstance(seg, np.ndarray) else int(
      np.prod(host_batch["tokens"].shape))
  return n * jax.process_count()


def _steps(job: setup.Job, ckpt, meter, state, start: int, progress: Progress,
           meta: dict, tracker) -> tuple[state_lib.TrainState, int, str]:
  """Runs steps start+1 .. max_steps (or until a stop); returns (state, step, status)."""
  cfg, run = job.cfg, job.run
  batches = iter(job.method.batches(job.ctx, run))
  step, status, best = start, "completed", keep_best(cfg)
  diverged = lambda: meter.consecutive_skipped >= cfg.train.max_skipped  # noqa: E731
  run.state = state
  with stop_lib.Stop() as stop:
    while step < cfg.train.max_steps and not progress.stopped_early:
      meter.tick(step + 1)
      host_batch = next(batches)
      epoch = _epoch(job.data.train)
      state, fut = run.train_step(state, run.frozen,
                                  device_batch(host_batch, run.batch_sharding))
      run.state = state
      if step == start:  # compiled in the dispatch above: that step is not counted, its
        jax.block_until_ready(fut)  # execution included (else it runs into the next window)
        meter.pause()
      step += 1
      meter.push(step, fut, _tokens(host_batch), **({} if epoch is None else {"epoch": epoch}))
      meter.bar.update(1)
      if diverged():
        status = "diverged"
        break
      is_last = step == cfg.train.max_steps
      improved = False
      if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or is_last) and (
          job.data.eval or tracker.active):
        improved = _eval(job, state, step, meter, progress, tracker)
      # Every process must see the same stop decision before the collective save.
      stopping = stop.requested
      if jax.process_count() > 1:
        stopping = _agree(stopping) if (step % 10 == 0 or is_last) else False
      if (step % cfg.checkpoint.every_steps == 0 or is_last or progress.stopped_early
          or stopping or (improved and best)):
        meter.flush()  # its metrics line lands before the checkpoint that covers it
        if diverged():
          status = "diverged"
          break
        progress.skipped = meter.skipped_total
        ckpt.protect([progress.best_step] if best else [])
        ckpt.save(step, state.to_dict(), job.data.train.state(),
                  {**meta, "loop": progress.to_meta()})
        meter.pause()
      if stopping:
        status = "interrupted"
        break
    meter.flush()
  if status == "completed" and diverged():
    status = "diverged"
  if status == "completed" and progress.stopped_early:
    status = "early_stopped"
  return state, step, status


def _export(job: setup.Job, ckpt, step: int, progress: Progress, meta: dict,
            workdir: str) -> tuple[str, int]:
  """(export dir, exported step): the best checkpoint with keep_best, else the last state."""
  exported, state = step, job.run.state
  if (keep_best(job.cfg) and progress.best_step is not None and progress.best_step != step
      and progress.best_step in ckpt.all_steps()):
    target = _abstract(state).to_dict()
    job.run.state = state = None  # the last state is checkpointed: free it first
    tree, _, _ = resume.restore(ckpt, progress.best_step, target)
    state, exported = state_lib.TrainState.from_dict(tree), progress.best_step
    job.run.state = state  # the exported state: the final evaluation runs on it
  out = job.export(state, os.path.join(workdir, "hf"), {**meta, "exported_step": exported})
  return out, exported


def _identity(cfg: config_lib.TrainConfig) -> dict | None:
  """The run's input identities known before data and weights (None if not readable yet:
  `setup.prepare` then reports the bad path itself)."""
  try:
    return {"base": resume.weights_identity(cfg.model.hf_path)}
  except (ValueError, OSError):
    return None


def _guard(cfg, workdir: str, allow_changed) -> tuple[object, object, dict | None]:
  """(checkpointer or None, guard or None, identity) after the phase-1 resume check."""
  if cfg.train.max_skipped <= 0:
    raise config_lib.ConfigError(f"bad value for train.max_skipped: {cfg.train.max_skipped} "
                                 "(expected > 0)")
  identity = _identity(cfg)
  if not checkpoint_lib.is_run(workdir):
    resume.check_allow(tuple(allow_changed), cfg)
    return None, None, identity
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                     async_save=cfg.checkpoint.async_save)
  latest = ckpt.latest_step()
  if latest is None:
    resume.check_allow(tuple(allow_changed), cfg)
    return ckpt, None, identity
  try:  # compare like with like: the saved config's paths are resolved (absolute)
    cfg = config_lib.resolve_paths(cfg)
  except config_lib.ConfigError:
    pass  # a missing path: setup.prepare reports it
  guard = resume.Guard(ckpt.directory, latest, ckpt.meta(latest), cfg, allow_changed)
  guard.check_config(identity or {})
  return ckpt, guard, identity


def _final_line(status: str, step: int, summary: dict, meter, ckpt) -> str:
  if status == "interrupted":
    return (f"interrupted at step {step}: checkpoint saved in {ckpt.directory}; run the same "
            "command again to resume")
  if status == "diverged":
    first, last = meter.skip_run
    return (f"stopped at step {last}: loss or grad norm not finite in {last - first + 1} "
            f"consecutive steps ({first}-{last}; train.max_skipped="
            f"{summary['max_skipped']}); updates were skipped and nothing was saved after "
            f"them (latest checkpoint: step {ckpt.latest_step()}); lower optim.lr or check "
            "the data at those steps")
  line = f"done at step {step}" + (" (early stopping)" if status == "early_stopped" else "")
  if "val_loss" in meter.last_val:
    line += f"; val_loss={meter.last_val['val_loss']:.4f}"
  if summary["export"]:
    best = (summary["exported_step"] == summary["best_step"]
            and summary["best_value"] is not None)
    line += (f"; HF export of step {summary['exported_step']}"
             + (f" (best {summary['best_metric']}={summary['best_value']:.4f})" if best else "")
             + f" in {summary['export']}")
  return line


def train(cfg: config_lib.TrainConfig, workdir: str, allow_changed=()) -> dict:
  """Runs (or resumes) the job described by `cfg` in `workdir`; returns a summary dict.

  allow_changed: config keys or sections whose change since the checkpoint is accepted
  (recorded in the checkpoint meta); other meaning-changing changes raise
  resume.ResumeError (a ConfigError) naming each key with old -> new.
  A workdir on a bucket (s3://, gs://) runs in a local staging copy (checkpoint.stage).
  """
  workdir = checkpoint_lib.local_workdir(workdir)
  ckpt, guard, identity = _guard(cfg, workdir, allow_changed)
  cfg = memory.resolve(cfg, workdir)  # micro_batch -> grad_accum, remat=auto -> policy
  job = setup.prepare(cfg)  # checks first, then mesh, tokenizer, data, weights, steps
  cfg = job.cfg  # with resolved paths
  job.ctx.workdir = workdir
  if guard is not None:
    guard.check_inputs(job.data.provenance, job.run.model_cfg)
  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt or checkpoint_lib.Checkpointer(workdir, keep=cfg.checkpoint.keep,
                                             async_save=cfg.checkpoint.async_save)
  state, start, progress = _resume(job, ckpt, guard)
  metric = eval_lib.best_metric(cfg) or "val_loss"
  if progress.metric != metric:  # checkpoint.keep_best changed on resume: a new best
    progress.best, progress.best_step, progress.bad_evals, progress.metric = (
        float("inf"), None, 0, metric)
  ckpt.protect([progress.best_step] if keep_best(cfg) else [])
  ds = job.data
  meta = {"config": config_lib.to_dict(cfg), "model_config": config_lib.to_dict(job.run.model_cfg),
          "data_fingerprint": ds.fingerprint, "provenance": ds.provenance,
          "identity": identity or _identity(cfg) or {},
          "allowed_changes": guard.history() if guard else []}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(cfg))
  writer = metrics_lib.MetricsWriter(workdir, start)
  bar = tqdm.tqdm(total=cfg.train.max_steps, initial=start, desc="train", dynamic_ncols=True,
                  disable=not cfg.train.progress or jax.process_index() != 0)
  meter = metrics_lib.Meter(cfg, job.run.model_cfg, writer, bar, start,
                            skipped_total=progress.skipped, source_names=ds.source_names)
  total, trainable = param_counts(job.run)
  _start_line(cfg, job, bar, start, total, trainable)
  tracker = eval_lib.Tracker(job, progress.evals, initial=lambda: setup.load_weights(
      cfg, job.run.mesh, job.tokenizer)[1])  # full FT's KL base, loaded only when asked
  tracker.start(job, state, start, writer)  # step 0: the base model's retention metrics
  progress.evals = tracker.to_meta()
  step, status = start, "completed"
  try:
    state, step, status = _steps(job, ckpt, meter, state, start, progress, meta, tracker)
  finally:
    bar.close()
    ckpt.wait()
    writer.close()
  del state  # job.run.state holds it (and _export may replace it by the best checkpoint)
  export_dir = exported = None
  if cfg.checkpoint.export_hf and status in ("completed", "early_stopped"):
    export_dir, exported = _export(job, ckpt, step, progress, meta, workdir)
  summary = {"step": step, "resumed_from": start, "status": status, "export": export_dir,
             "exported_step": exported, "best_step": progress.best_step,
             "best_metric": progress.metric, "best_value": eval_lib.best_value(cfg, progress),
             "best_val_loss": (eval_lib.best_value(cfg, progress)
                               if progress.metric == "val_loss" else None),
             "skipped_steps": meter.skipped_total, "max_skipped": cfg.train.max_skipped,
             "params": total, "trainable_params": trainable,
             "processes": jax.process_count(), "devices": jax.device_count(), **meter.last_val}
  if jax.process_index() == 0:
    bar.write(_final_line(status, step, summary, meter, ckpt))
  ckpt.close()
  summary["warnings"] = [msg for _, msg in tracker.book.warnings]
  summary["eval_summary"] = ""
  if status in ("completed", "early_stopped"):  # report.md, plots/loss.png, model card
    summary["eval_summary"] = eval_lib.finish(job, tracker, summary, job.run.state, workdir)
  summary["export"] = checkpoint_lib.publish(workdir, summary["export"])  # bucket workdirs
  return summary


def _start_line(cfg, job: setup.Job, bar, start: int, total: int, trainable: int) -> None:
  """The run's size at start: parameters (total, trainable) and steps per epoch."""
  if jax.process_index() != 0:
    return
  line = f"params: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f}%)"
  rows = getattr(job.data.train, "rows_in_epoch", None)
  if rows is not None:
    n = rows()
    line += (f"; data: {n:,} rows of seq_len {cfg.data.seq_len} per epoch, "
             f"{cfg.data.batch_size} per step (~{n / cfg.data.batch_size:.1f} steps/epoch)")
  if cfg.train.epochs > 0:
    line += f"; train.epochs={cfg.train.epochs:g}: {cfg.train.max_steps} steps"
  if start:
    line += f"; resuming at step {start}"
  bar.write(line)
