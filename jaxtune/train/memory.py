"""The memory planner: compile the real train step ahead of time, with no weights and no
data, and say per device what it needs; pick the largest micro-batch that fits, and the
fastest remat policy that fits.

    p = memory.plan(cfg)                 # launch/train.py --plan
    print(memory.plan_lib.report(p))     # params, optimizer, gradients, activations, total
    cfg = memory.resolve(cfg, workdir)   # train.micro_batch=auto | N, model.remat=auto

The state, the frozen trees and the batch come from `abstract_job.build` (ShapeDtypeStructs
with the run's shardings), so the program compiled here is the one `setup.build` jits for
the run (`setup.jit_train_step`, same shardings and donation) on the configured mesh. XLA's
`compiled.memory_analysis()` is per device: the predicted peak is the inputs (state, frozen
trees, batch) + outputs - donated aliases + temporaries. The split into params, optimizer
state and batch is exact (bytes of each leaf's shard); the gradients are an estimate (the
trainable leaves' shard bytes, plus float32 accumulators with gradient accumulation) that
lives inside XLA's temporaries, and activations are the rest of the temporaries.

The device limit is `train.device_memory_gib` when set, else the device's own allocator
limit (`memory_stats()["bytes_limit"]` on GPU / TPU); CPU reports none, so the plan has
bytes and no verdict. `train.micro_batch=auto` keeps `data.batch_size` (the global batch)
and searches the micro-batches that split evenly over the batch shards for the largest whose
peak stays under (1 - train.memory_margin) x the limit (the whole batch; then the one the
whole batch's activations, scaled, predict to fit, and its larger neighbour; bisection when
that guess is wrong), then sets `optim.grad_accum` to match (accumulation is exact: the same
update as the full batch).

`model.remat=auto` tries the remat policies fastest first (REMAT_CHOICES: none, dots_no_batch,
full with unrolled layers; dots_no_batch, full with scanned ones, where no remat was measured
slower) and takes the first with which the step fits; with
`train.micro_batch=auto` too, the first whose micro-batch is the whole batch or holds at least
MIN_MICRO_TOKENS tokens per device (else the one that fits the most rows). Remat changes
only what the backward pass recomputes, never the update. With no device limit (CPU) it is
the fastest. Each policy tried costs one compile (a search, with micro_batch=auto).

Methods planned: sft, dpo (reference frozen, adapters_off or none) and reward; distill
(a teacher to load) and grpo (rollouts) are refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax
import numpy as np

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.train import abstract_job
from jaxtune.train import optim
from jaxtune.train import plan as plan_lib
from jaxtune.train import setup

_log = logging.getLogger("jaxtune")
Abstract = abstract_job.Abstract
device_bytes = abstract_job.device_bytes
# model.remat=auto tries these in order, fastest first (measured on one H200, Llama-3.2-1B
# shape, packed chat, batch 8 x 2048, docs/BENCHMARKS.md): unrolled layers run fastest with no
# remat; scanned layers run faster with dots_no_batch (63.0k tokens/s) than with none (58.8k:
# the scan then stores every elementwise output of every layer), so none is not tried there.
REMAT_CHOICES = {"unrolled": ("none", "dots_no_batch", "full"),
                 "scanned": ("dots_no_batch", "full")}
MIN_MICRO_TOKENS = 8192  # remat=auto with micro_batch=auto: tokens per device per micro-step


def estimate(job: Abstract, grad_accum: int) -> dict:
  """Compiles the train step with `grad_accum` micro-batches; per-device bytes by category."""
  t0 = time.perf_counter()
  step = setup.jit_train_step(job.objective, job.optimizer, job.schedule, job.state_sh,
                              job.frozen_sh, job.mesh, grad_accum=grad_accum,
                              finite_updates=optim.finite_updates(job.cfg.optim))
  compiled = step.lower(job.state, job.frozen, job.batch).compile()
  ma = compiled.memory_analysis()
  xla = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  # Every input is on the device during the step, also those XLA drops as unused (a batch
  # key the objective never reads), so inputs are counted leaf by leaf, not by XLA.
  inputs = device_bytes((job.state, job.frozen, job.batch))
  total = inputs + xla["output"] - xla["alias"] + xla["temp"]
  trainable = job.state.trainable
  grads = device_bytes(trainable) + (accumulator_bytes(job) if grad_accum > 1 else 0)
  frozen = dict(job.frozen)
  base = frozen.pop("base", {})
  per_device = {
      "params": device_bytes(base) + device_bytes(trainable),
      "reference": device_bytes(frozen),
      "optimizer": device_bytes(job.state.opt_state),
      "gradients": min(grads, xla["temp"]),
      "batch": device_bytes(job.batch),
  }
  per_device["activations"] = max(xla["temp"] - per_device["gradients"], 0)
  batch = job.cfg.data.batch_size
  return {"micro_batch": batch // grad_accum, "grad_accum": grad_accum,
          "per_device": per_device, "total": total, "xla": xla,
          "compile_s": round(time.perf_counter() - t0, 2)}


def device_limit(cfg: config_lib.TrainConfig) -> int | None:
  """Per-device bytes to plan against: train.device_memory_gib, else the device's own
  allocator limit (GPU, TPU), else None (CPU)."""
  if cfg.train.device_memory_gib > 0:
    return int(cfg.train.device_memory_gib * 2**30)
  stats = jax.local_devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def verdict(total: int, limit: int | None, margin: float) -> str:
  if not limit:
    return "no verdict: no device memory limit known (set train.device_memory_gib)"
  if total <= limit * (1 - margin):
    return f"fits ({plan_lib.gib(limit - total)} free)"
  if total <= limit:
    return f"tight: fits, but inside the train.memory_margin={margin:g} reserve"
  return (f"does not fit: {plan_lib.gib(total - limit)} short; try train.micro_batch=auto, "
          "model.remat=auto, a smaller data.seq_len or more fsdp devices")


def batch_shards(mesh) -> int:
  """Devices the batch rows are split over (the mesh axes of sharding.RULES["batch"])."""
  return int(np.prod([dict(mesh.shape).get(a, 1) for a in sharding.RULES["batch"]]))


def accumulator_bytes(job: Abstract) -> int:
  """Per device: the float32 sums over the micro-batches that gradient accumulation keeps
  next to each micro-batch's gradients."""
  return sum(device_bytes(x) // np.dtype(x.dtype).itemsize * 4
             for x in jax.tree_util.tree_leaves(job.state.trainable))


def micro_batches(cfg: config_lib.TrainConfig, mesh) -> list[int]:
  """Micro-batch sizes (descending) that divide data.batch_size and split evenly over the
  batch shards (batch_shards)."""
  b, shards = cfg.data.batch_size, batch_shards(mesh)
  return [m for m in range(b, 0, -1) if b % m == 0 and m % shards == 0]


def _guess(whole: dict, sizes: list[int], budget: float, acc: int) -> int:
  """Index of the largest micro-batch predicted to fit, from the whole batch's estimate:
  activations scaled by the micro-batch, plus the float32 accumulators (the last index when
  none is predicted to)."""
  for i, m in enumerate(sizes):
    act = whole["per_device"]["activations"] * (1 - m / sizes[0])
    if whole["total"] - act + (acc if m < sizes[0] else 0) <= budget:
      return i
  return len(sizes) - 1


def search(job: Abstract, limit: int, margin: float) -> tuple[dict | None, list[dict]]:
  """(the largest micro-batch's estimate whose peak <= (1 - margin) x limit, or None;
  every estimate made, largest first). The whole batch first (one compile when it fits);
  then the micro-batch its estimate predicts to fit (`_guess`) and its larger neighbour,
  which settle it when the guess is right; else bisection between what fits and what
  does not (the peak grows with the micro-batch)."""
  sizes = micro_batches(job.cfg, job.mesh)
  if not sizes:
    raise config_lib.ConfigError(
        f"train.micro_batch=auto: data.batch_size={job.cfg.data.batch_size} has no "
        f"micro-batch that splits over the {batch_shards(job.mesh)} batch shards of the "
        "mesh; expected a multiple of them")
  budget = limit * (1 - margin)
  tried: dict[int, dict] = {}

  def fits(i: int) -> bool:
    m = sizes[i]
    if m not in tried:
      tried[m] = estimate(job, job.cfg.data.batch_size // m)
      tried[m]["fits"] = tried[m]["total"] <= budget
      _log.info("plan: micro-batch %d (grad_accum %d): %s per device -> %s", m,
                tried[m]["grad_accum"], plan_lib.gib(tried[m]["total"]),
                "fits" if tried[m]["fits"] else "too big")
    return tried[m]["fits"]

  done = lambda i: (tried[sizes[i]] if i is not None else None,
                    sorted(tried.values(), key=lambda e: -e["micro_batch"]))
  if fits(0):
    return done(0)
  if len(sizes) == 1:
    return done(None)
  lo, hi = 0, None  # sizes[lo] does not fit; sizes[hi] fits (None: none known to)
  guess = max(_guess(tried[sizes[0]], sizes, budget, accumulator_bytes(job)), 1)
  if fits(guess):
    hi = guess
    if guess - 1 > lo:  # its larger neighbour: the next guess up
      if fits(guess - 1):
        hi = guess - 1
      else:
        lo = guess - 1
  else:
    lo = guess
    last = len(sizes) - 1
    if lo == last or not fits(last):
      return done(None)
    hi = last
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      hi = mid
    else:
      lo = mid
  return done(hi)


def _fit(job: Abstract, limit: int | None, margin: float) -> tuple[dict | None, list[dict]]:
  """(the estimate of the micro-batch the run takes, with "fits"; None when
  train.micro_batch=auto finds none; the estimates of the search)."""
  cfg = job.cfg
  mb = cfg.train.micro_batch
  if mb == "auto":
    return search(job, limit, margin)
  est = estimate(job, cfg.data.batch_size // int(mb) if mb else cfg.optim.grad_accum)
  est["fits"] = not limit or est["total"] <= limit * (1 - margin)
  return est, []


def _busy(est: dict | None, job: Abstract) -> bool:
  """Whether model.remat=auto takes this policy: it fits, and with micro_batch=auto its
  micro-batch is the whole batch or has MIN_MICRO_TOKENS tokens per device."""
  if est is None or not est["fits"]:
    return False
  cfg = job.cfg
  rows = est["micro_batch"] // batch_shards(job.mesh)
  return (cfg.train.micro_batch != "auto" or est["micro_batch"] == cfg.data.batch_size
          or rows * cfg.data.seq_len >= MIN_MICRO_TOKENS)


def remat_choices(model_cfg: config_lib.ModelConfig) -> tuple[str, ...]:
  """The policies model.remat=auto tries, fastest first, for this layer layout."""
  return REMAT_CHOICES["scanned" if model_cfg.scan_layers else "unrolled"]


def _choose_remat(cfg: config_lib.TrainConfig, mesh, limit: int | None, margin: float):
  """model.remat=auto: ((job, estimate, search) of the chosen policy, every policy tried as
  {remat, fits, micro_batch, grad_accum, total}). No limit: the fastest."""
  attempts, summary = [], []
  choices = remat_choices(cfg.model)
  tokenizer = None
  for remat in (choices if limit else choices[:1]):
    job = abstract_job.build(dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, remat=remat)), mesh=mesh, tokenizer=tokenizer)
    mesh, tokenizer = job.mesh, job.tokenizer  # the next policy's build reuses both
    est, tried = _fit(job, limit, margin)
    attempts.append((job, est, tried))
    summary.append({"remat": remat, "fits": bool(est and est["fits"]),
                    **({k: est[k] for k in ("micro_batch", "grad_accum", "total")} if est else {})})
    if est is not None:
      _log.info("plan: model.remat=%s: %s per device at micro-batch %d -> %s", remat,
                plan_lib.gib(est["total"]), est["micro_batch"],
                "fits" if est["fits"] else "too big")
    if _busy(est, job):
      return attempts[-1], summary
  # None keeps the device busy: the one that fits the most rows (the faster on ties).
  fitting = [a for a in attempts if a[1] is not None and a[1]["fits"]]
  return (max(fitting, key=lambda a: a[1]["micro_batch"]) if fitting else attempts[-1]), summary


def plan(cfg: config_lib.TrainConfig, *, mesh=None) -> dict:
  """The plan of `cfg` as a JSON-able dict: per-device bytes, limit, verdict; with
  train.micro_batch=auto the chosen micro-batch and every one tried; with model.remat=auto
  the chosen policy and every one tried."""
  limit, margin = device_limit(cfg), cfg.train.memory_margin
  mb = cfg.train.micro_batch
  if mb == "auto" and not limit:
    raise config_lib.ConfigError(
        "train.micro_batch=auto needs a device memory limit: this device "
        f"({jax.devices()[0].device_kind}) reports none; set train.device_memory_gib")
  remats = []
  if cfg.model.remat == "auto":
    (job, est, tried), remats = _choose_remat(cfg, mesh, limit, margin)
  else:
    job = abstract_job.build(cfg, mesh=mesh)
    est, tried = _fit(job, limit, margin)
  if est is None:
    smallest = tried[-1]
    raise config_lib.ConfigError(
        f"train.micro_batch=auto: even micro-batch {smallest['micro_batch']} needs "
        f"{plan_lib.gib(smallest['total'])} per device, over {1 - margin:.0%} of "
        f"{plan_lib.gib(limit)}; try "
        + ("" if cfg.model.remat == "auto" else "model.remat=auto, ")
        + "a smaller data.seq_len, peft.method=lora or more fsdp devices")
  cfg = job.cfg
  devices = job.mesh.devices.flatten()
  return {
      "method": cfg.method, "peft": cfg.peft.method,
      "model": {"family": job.model_cfg.family, "layers": job.model_cfg.num_layers,
                "hidden": job.model_cfg.hidden_size, "vocab": job.model_cfg.vocab_size,
                "params": job.model_cfg.num_params(), "dtype": job.model_cfg.dtype,
                "param_dtype": job.model_cfg.param_dtype, "remat": job.model_cfg.remat},
      "mesh": dict(job.mesh.shape), "devices": len(devices),
      "device_kind": devices[0].device_kind, "platform": devices[0].platform,
      "batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len,
      "micro_batch_setting": mb, "remat_setting": "auto" if remats else cfg.model.remat,
      **{k: v for k, v in est.items() if k != "fits"},
      "limit": limit, "margin": margin,
      "verdict": verdict(est["total"], limit, margin),
      "tried": [{k: e[k] for k in ("micro_batch", "grad_accum", "total", "fits")}
                for e in tried],
      "remat_tried": remats,
  }


def resolve(cfg: config_lib.TrainConfig, workdir: str) -> config_lib.TrainConfig:
  """`cfg` with optim.grad_accum set from train.micro_batch and model.remat=auto replaced by
  a policy (auto: planned, the plan logged and written to WORKDIR/plan.json); unchanged
  when neither is set."""
  mb, remat = cfg.train.micro_batch, cfg.model.remat
  if not mb and remat != "auto":
    return cfg
  if mb and cfg.optim.grad_accum != 1 and (mb == "auto" or
                                           cfg.data.batch_size // int(mb) != cfg.optim.grad_accum):
    raise config_lib.ConfigError(
        f"train.micro_batch={mb} sets optim.grad_accum, which is {cfg.optim.grad_accum}: "
        "set one of them (leave optim.grad_accum at 1)")
  accum = cfg.optim.grad_accum
  if mb != "auto" and remat == "auto" and not device_limit(cfg):  # CPU: nothing to plan against
    remat = remat_choices(cfg.model)[0]
    if jax.process_index() == 0:
      print(f"model.remat=auto: {remat} (no device memory limit known; "
            "set train.device_memory_gib to plan)", flush=True)
  elif mb == "auto" or remat == "auto":
    p = plan(cfg)
    plan_lib.write(p, workdir)
    _log.info("%s", plan_lib.report(p))
    accum, remat = p["grad_accum"], p["model"]["remat"]
    if jax.process_index() == 0:
      print(plan_lib.resolved_line(p, os.path.join(workdir, "plan.json")), flush=True)
  elif mb:
    accum = cfg.data.batch_size // int(mb)
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat),
                             optim=dataclasses.replace(cfg.optim, grad_accum=accum))
