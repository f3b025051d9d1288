"""The memory planner: compile the real train step ahead of time, with no weights and no
data, and say per device what it needs; pick the largest micro-batch that fits.

    p = memory.plan(cfg)                 # launch/train.py --plan
    print(memory.plan_lib.report(p))              # params, optimizer, gradients, activations, total
    cfg = memory.resolve_micro_batch(cfg, workdir)   # train.micro_batch=auto | N

The state, the frozen trees and the batch are `jax.ShapeDtypeStruct`s with the run's
shardings (params from `decoder.init`'s shapes, 4-bit leaves from quantising those shapes,
adapters from the PEFT method's `init` traced with `jax.eval_shape`, the batch from the
loader's own assembly of padding rows), so the program compiled here is the one
`setup.build` jits for the run (`setup.jit_train_step`, same shardings and donation) on the
configured mesh. XLA's `compiled.memory_analysis()` is per device: the predicted peak is
the inputs (state, frozen trees, batch) + outputs - donated aliases + temporaries. The split into params, optimizer
state and batch is exact (bytes of each leaf's shard); the gradients are an estimate (the
trainable leaves' shard bytes, plus float32 accumulators with gradient accumulation) that
lives inside XLA's temporaries, and activations are the rest of the temporaries.

The device limit is `train.device_memory_gib` when set, else the device's own allocator
limit (`memory_stats()["bytes_limit"]` on GPU / TPU); CPU reports none, so the plan has
bytes and no verdict. `train.micro_batch=auto` keeps `data.batch_size` (the global batch)
and searches, by bisection over the micro-batches that split evenly over the batch shards,
for the largest whose peak stays under (1 - train.memory_margin) x the limit, then sets
`optim.grad_accum` to match (accumulation is exact: the same update as the full batch).
Methods planned: sft, dpo (reference frozen, adapters_off or none) and reward; distill
(a teacher to load) and grpo (rollouts) are refused with a one-line error.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import methods
from jaxtune import peft
from jaxtune import quant
from jaxtune import sharding
from jaxtune import weights
from jaxtune.data import packing
from jaxtune.models import decoder
from jaxtune.peft import qlora
from jaxtune.train import optim
from jaxtune.train import plan as plan_lib
from jaxtune.train import setup
from jaxtune.train import state as state_lib

_log = logging.getLogger("jaxtune")
PLANNED_METHODS = ("sft", "dpo", "reward")


@dataclasses.dataclass
class Abstract:
  """A run's train-step inputs as ShapeDtypeStructs with shardings, and what jits it."""
  cfg: config_lib.TrainConfig
  model_cfg: config_lib.ModelConfig
  mesh: Any
  state: state_lib.TrainState
  frozen: dict
  batch: dict
  objective: Any
  optimizer: Any
  schedule: Any
  state_sh: Any
  frozen_sh: Any


def _sds(x, sh):
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)


def _abstract_of(tree):
  """Concrete arrays -> ShapeDtypeStructs with their shardings (abstract leaves kept)."""
  return jax.tree_util.tree_map(lambda x: _sds(x, x.sharding), tree)


def _placed(fn, *args):
  """fn(*args) as ShapeDtypeStructs with the shardings XLA gives its outputs (a traced
  copy of sharded params keeps their shardings), computing nothing."""
  shapes = jax.eval_shape(fn, *args)
  if not jax.tree_util.tree_leaves(shapes):
    return shapes
  out_sh = jax.jit(fn).lower(*args).compile().output_shardings
  return jax.tree_util.tree_map(_sds, shapes, out_sh)


def abstract_params(cfg: config_lib.TrainConfig, model_cfg, mesh):
  """The base params a run loads, abstract and sharded (4-bit QArrays for QLoRA)."""
  shapes = jax.eval_shape(functools.partial(decoder.init, model_cfg), jax.random.PRNGKey(0))
  q = weights.quant_for(cfg)
  if q is not None:
    shapes = jax.eval_shape(functools.partial(
        qlora.quantize_params, method=q.method, group_size=q.group_size,
        double_quant=q.double_quant), shapes)
  axes = quant.tree_axes(shapes, decoder.axes(model_cfg))
  return jax.tree_util.tree_map(_sds, shapes, sharding.tree_shardings(mesh, axes, shapes))


def abstract_batch(cfg: config_lib.TrainConfig, kind: str, mesh, pad_id: int = 0) -> dict:
  """The global batch's keys, shapes and dtypes, from the loader's assembly of padding rows."""
  b, t = cfg.data.batch_size, cfg.data.seq_len
  if kind == "sft":
    host = packing.assemble([[] for _ in range(b)], t, pad_id)
  else:
    host = packing.assemble_pairs([None] * b, t, pad_id)
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in host.items()}


def _check_method(cfg: config_lib.TrainConfig):
  method = methods.check(cfg)
  if cfg.method not in PLANNED_METHODS:
    raise config_lib.ConfigError(
        f"the memory planner (--plan, train.micro_batch=auto) does not plan method="
        f"{cfg.method} yet (a teacher to load or rollouts to sample); planned: "
        f"{', '.join(PLANNED_METHODS)}; set train.micro_batch to a number instead")
  if cfg.method == "dpo" and cfg.dpo.reference == "precomputed":
    raise config_lib.ConfigError(
        "the memory planner cannot plan dpo.reference=precomputed (the table is computed "
        "from the data); plan with dpo.reference=frozen or adapters_off")
  return method


def _data_standin(cfg: config_lib.TrainConfig, tokenizer):
  """What the method hooks read from ctx.data, without reading any record."""
  n = len([s for s in cfg.data.train_files.split(",") if s.strip()]) or 1
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return types.SimpleNamespace(source_names=tuple(f"source{i}" for i in range(n)),
                               train=types.SimpleNamespace(pad_id=int(pad)), eval=[])


def build(cfg: config_lib.TrainConfig, *, mesh=None, tokenizer=None) -> Abstract:
  """The abstract job of `cfg` (checks first, like setup.prepare; no weights, no data)."""
  method = _check_method(cfg)
  cfg = config_lib.resolve_paths(cfg)
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  tokenizer = tokenizer or data_lib.tokenizer_from_config(cfg)
  model_cfg, _ = plan_lib.architecture(cfg, tokenizer)
  params = abstract_params(cfg, model_cfg, mesh)
  adapters = adapter_axes = None
  if cfg.peft.method != "none":
    pm = peft.get(cfg.peft.method)
    adapters = jax.eval_shape(lambda p: pm.init(model_cfg, p, cfg.peft, jax.random.PRNGKey(0)),
                              params)
    adapter_axes = pm.axes(model_cfg, adapters).params
  data = _data_standin(cfg, tokenizer)
  ctx = methods.Context(cfg=cfg, model_cfg=model_cfg, mesh=mesh, params=params,
                        adapters=adapters, tokenizer=tokenizer, data=data)
  extra = method.extra_trainable(ctx)
  if extra is not None:  # a reward head: small real arrays, made abstract
    trees, axes = extra
    trees = _abstract_of(trees)
    if adapters is None:
      params = {**params, **trees}
    else:
      adapters = dataclasses.replace(adapters, params={**adapters.params, **trees})
      adapter_axes = {**adapter_axes, **axes}
    ctx = dataclasses.replace(ctx, params=params, adapters=adapters)
  frozen_extra = _placed(lambda p: method.frozen(dataclasses.replace(ctx, params=p)), params)
  if adapters is None:
    trainable, frozen = params, {}
  else:
    sh = sharding.tree_shardings(mesh, adapter_axes, adapters.params)
    trainable, frozen = jax.tree_util.tree_map(_sds, adapters.params, sh), {"base": params}
  frozen = {**frozen, **frozen_extra}
  optimizer = optim.make(cfg.optim, cfg.train.max_steps)
  trainable_sh = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
  state_sh = setup.state_shardings(optimizer, trainable, trainable_sh, mesh)
  opt = jax.tree_util.tree_map(_sds, jax.eval_shape(optimizer.init, trainable),
                               state_sh.opt_state)
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  state = state_lib.TrainState(step=_sds(jax.ShapeDtypeStruct((), jnp.int32), state_sh.step),
                               trainable=trainable, opt_state=opt, rng=_sds(rng, state_sh.rng))
  return Abstract(cfg=cfg, model_cfg=model_cfg, mesh=mesh, state=state, frozen=frozen,
                  batch=abstract_batch(cfg, method.data_kind, mesh, data.train.pad_id),
                  objective=method.objective(ctx), optimizer=optimizer,
                  schedule=optim.schedule(cfg.optim, cfg.train.max_steps), state_sh=state_sh,
                  frozen_sh=jax.tree_util.tree_map(lambda x: x.sharding, frozen))


def device_bytes(tree) -> int:
  """Bytes of one device's shards of an abstract (or concrete) tree (the largest shard)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


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
  grads = device_bytes(trainable)
  if grad_accum > 1:  # float32 sums over the micro-batches next to each micro-batch's grads
    grads += sum(device_bytes(x) // np.dtype(x.dtype).itemsize * 4
                 for x in jax.tree_util.tree_leaves(trainable))
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
          "model.remat=full, a smaller data.seq_len or more fsdp devices")


def batch_shards(mesh) -> int:
  """Devices the batch rows are split over (the mesh axes of sharding.RULES["batch"])."""
  return int(np.prod([dict(mesh.shape).get(a, 1) for a in sharding.RULES["batch"]]))


def micro_batches(cfg: config_lib.TrainConfig, mesh) -> list[int]:
  """Micro-batch sizes (descending) that divide data.batch_size and split evenly over the
  batch shards (batch_shards)."""
  b, shards = cfg.data.batch_size, batch_shards(mesh)
  return [m for m in range(b, 0, -1) if b % m == 0 and m % shards == 0]


def search(job: Abstract, limit: int, margin: float) -> tuple[dict | None, list[dict]]:
  """(the largest micro-batch's estimate whose peak <= (1 - margin) x limit, or None;
  every estimate made, largest first): the whole batch first, then the smallest, then
  bisection between them (the peak grows with the micro-batch)."""
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

  lo, hi = 0, len(sizes) - 1  # the answer is the first index that fits
  if fits(lo):  # the whole batch at once: one compile
    return tried[sizes[lo]], list(tried.values())
  if not fits(hi):
    return None, list(tried.values())
  while lo < hi:
    mid = (lo + hi) // 2
    if fits(mid):
      hi = mid
    else:
      lo = mid + 1
  return tried[sizes[lo]], sorted(tried.values(), key=lambda e: -e["micro_batch"])


def plan(cfg: config_lib.TrainConfig, *, mesh=None) -> dict:
  """The plan of `cfg` as a JSON-able dict: per-device bytes, limit, verdict; with
  train.micro_batch=auto the chosen micro-batch and every one tried."""
  job = build(cfg, mesh=mesh)
  cfg = job.cfg
  limit, margin = device_limit(cfg), cfg.train.memory_margin
  mb, tried = cfg.train.micro_batch, []
  if mb == "auto":
    if not limit:
      raise config_lib.ConfigError(
          "train.micro_batch=auto needs a device memory limit: this device "
          f"({jax.devices()[0].device_kind}) reports none; set train.device_memory_gib")
    chosen, tried = search(job, limit, margin)
    if chosen is None:
      smallest = tried[-1]
      raise config_lib.ConfigError(
          f"train.micro_batch=auto: even micro-batch {smallest['micro_batch']} needs "
          f"{plan_lib.gib(smallest['total'])} per device, over {1 - margin:.0%} of "
          f"{plan_lib.gib(limit)}; try model.remat=full, a smaller data.seq_len, peft.method=lora "
          "or more fsdp devices")
    est = chosen
  else:
    accum = cfg.data.batch_size // int(mb) if mb else cfg.optim.grad_accum
    est = estimate(job, accum)
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
      "micro_batch_setting": mb, **{k: v for k, v in est.items() if k != "fits"},
      "limit": limit, "margin": margin,
      "verdict": verdict(est["total"], limit, margin),
      "tried": [{k: e[k] for k in ("micro_batch", "grad_accum", "total", "fits")}
                for e in tried],
  }


def resolve_micro_batch(cfg: config_lib.TrainConfig, workdir: str) -> config_lib.TrainConfig:
  """`cfg` with optim.grad_accum set from train.micro_batch (auto: planned, the plan logged
  and written to WORKDIR/plan.json); unchanged when train.micro_batch is ""."""
  mb = cfg.train.micro_batch
  if not mb:
    return cfg
  if cfg.optim.grad_accum != 1 and (mb == "auto" or
                                    cfg.data.batch_size // int(mb) != cfg.optim.grad_accum):
    raise config_lib.ConfigError(
        f"train.micro_batch={mb} sets optim.grad_accum, which is {cfg.optim.grad_accum}: "
        "set one of them (leave optim.grad_accum at 1)")
  if mb == "auto":
    p = plan(cfg)
    plan_lib.write(p, workdir)
    _log.info("%s", plan_lib.report(p))
    accum = p["grad_accum"]
    if jax.process_index() == 0:
      print(f"train.micro_batch=auto: micro-batch {p['micro_batch']} x grad_accum {accum} "
            f"= data.batch_size {cfg.data.batch_size}; predicted peak {plan_lib.gib(p['total'])} per "
            f"device of {plan_lib.gib(p['limit'])} (plan in {os.path.join(workdir, 'plan.json')})",
            flush=True)
  else:
    accum = cfg.data.batch_size // int(mb)
  return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=accum))
