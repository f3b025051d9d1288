"""The planner checks and the tables of launch/scale_suite.py (kept apart to stay short).

`plan_checks(smoke)` runs in a process that sees one GPU: for 1B full FT, 1B LoRA and 8B
QLoRA it asks `train/memory.py` for the predicted per-device peak (abstract arrays, nothing
allocated), then builds the same run for real (random weights made one param at a time,
`setup.build`, a batch with the planner's keys and shapes), runs 3 steps and reads
`peak_bytes_in_use`; then `train.micro_batch=auto` on a batch that does not fit whole: the
chosen micro-batch runs, and the next larger one is tried too (expected: out of memory).
"""

import dataclasses
import gc
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKLOADS = {  # name: (bench shape, method, seq, batch)
    "1b_full": ("1b", "full", 2048, 4),
    "1b_lora": ("1b", "lora", 2048, 4),
    "8b_qlora": ("8b", "qlora", 4096, 4),
}


def _cfg(name: str, smoke: bool, **data):
  from jaxtune import config as config_lib
  from launch import bench
  from launch import bench_workers
  shape, method, seq, batch = WORKLOADS[name]
  shape = "tiny" if smoke else shape
  seq, batch = (32, 2) if smoke else (seq, batch)
  model = dict(bench.TUNED[(shape, method)], attention="auto")
  model_cfg = bench_workers.shape_cfg(shape, {"model": model, "precision": "bf16"})
  return config_lib.TrainConfig(
      model=model_cfg,
      peft=config_lib.PeftConfig(method="none" if method == "full" else method,
                                 **bench_workers.LORA),
      optim=config_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0),
      data=config_lib.DataConfig(**{"seq_len": seq, "batch_size": batch, **data}),
      mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1),  # the process's one device
      train=config_lib.LoopConfig(max_steps=1000, progress=False))


def _host_batch(cfg, mesh, vocab: int) -> dict:
  from jaxtune.train import abstract_job
  shapes = abstract_job.abstract_batch(cfg, "sft", mesh)
  rng = np.random.default_rng(0)
  b, t = shapes["tokens"].shape
  seq = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  host = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": np.ones((b, t), np.float32),
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
          "source_ids": np.zeros((b, t), np.int32)}
  assert set(host) == set(shapes), (set(host), set(shapes))
  return {k: v.astype(shapes[k].dtype) for k, v in host.items()}


def _real_run(cfg, model_cfg, mesh, steps: int) -> dict:
  """The run of `cfg` for real: `steps` steps, then the peak of every device."""
  import jax
  from jaxtune import peft
  from jaxtune.train import loop
  from jaxtune.train import setup
  from launch import bench_workers
  params = bench_workers._lean_init(model_cfg, jax.random.PRNGKey(0),  # pylint: disable=protected-access
                                    quantize=cfg.peft.method == "qlora")
  adapters = axes = None
  if cfg.peft.method != "none":
    pm = peft.get(cfg.peft.method)
    adapters = pm.init(model_cfg, params, cfg.peft, jax.random.PRNGKey(2))
    axes = pm.axes(model_cfg, adapters).params
  run = setup.build(cfg, mesh, params, model_cfg, adapters=adapters, adapter_axes=axes)
  del params
  batch = loop.device_batch(_host_batch(cfg, mesh, model_cfg.vocab_size), run.batch_sharding)
  ma = run.train_step.lower(run.state, run.frozen, batch).compile().memory_analysis()
  state, losses = run.state, []
  for _ in range(steps):
    state, metrics = run.train_step(state, run.frozen, batch)
    losses.append(metrics["loss"])
  jax.block_until_ready((state, losses))
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  out = {"measured_peak": max(peaks) if None not in peaks else None,
         "real_step_temp": int(ma.temp_size_in_bytes),
         "losses": [float(x) for x in jax.device_get(losses)]}
  del state, run, batch
  gc.collect()
  return out


def _predicted_vs_measured(name: str, smoke: bool) -> dict:
  from jaxtune.train import abstract_job
  from jaxtune.train import memory
  cfg = _cfg(name, smoke)
  t0 = time.perf_counter()
  p = memory.plan(cfg)
  job = abstract_job.build(cfg)
  row = {"workload": name, "predicted": p["total"], "per_device": p["per_device"],
         "xla": p["xla"], "limit": p["limit"], "verdict": p["verdict"],
         "plan_s": round(time.perf_counter() - t0, 1)}
  row.update(_real_run(cfg, job.model_cfg, job.mesh, steps=3))
  if row["measured_peak"]:
    row["error"] = row["predicted"] / row["measured_peak"] - 1
  return row


def _auto_check(smoke: bool) -> dict:
  """train.micro_batch=auto on 1B LoRA (scanned layers: quick compiles) with a batch of 64
  rows of 2048 tokens and no remat; runs the choice and tries the next larger micro-batch."""
  import jax
  from jaxtune.train import abstract_job
  from jaxtune.train import memory
  cfg = _cfg("1b_lora", smoke, batch_size=8 if smoke else 64)
  model = dataclasses.replace(cfg.model, scan_layers=True, remat="none")
  limit = {"device_memory_gib": 0.004} if smoke else {}
  cfg = dataclasses.replace(cfg, model=model, train=dataclasses.replace(
      cfg.train, micro_batch="auto", **limit))
  p = memory.plan(cfg)
  job = abstract_job.build(cfg)
  out = {"batch_size": cfg.data.batch_size, "chosen": p["micro_batch"],
         "grad_accum": p["grad_accum"], "predicted": p["total"], "limit": p["limit"],
         "tried": p["tried"]}
  run_cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim,
                                                               grad_accum=p["grad_accum"]))
  out["chosen_run"] = _try(run_cfg, job)
  larger = [t for t in memory.micro_batches(cfg, job.mesh) if t > p["micro_batch"]]
  if larger:
    nxt = min(larger)
    big = dataclasses.replace(cfg, optim=dataclasses.replace(
        cfg.optim, grad_accum=cfg.data.batch_size // nxt))
    out["next_larger"] = {"micro_batch": nxt, **_try(big, job)}
  del jax
  return out


def _try(cfg, job) -> dict:
  from launch import bench_workers
  try:
    return {"status": "ok", **_real_run(cfg, job.model_cfg, job.mesh, steps=2)}
  except Exception as e:  # noqa: BLE001  (an out-of-memory is the expected answer)
    gc.collect()
    return {"status": "oom" if bench_workers._is_oom(e) else "error",  # pylint: disable=protected-access
            "error": f"{type(e).__name__}: {e}"[:300]}


CHECKS = (*WORKLOADS, "auto")


def one_check(name: str, smoke: bool) -> dict:
  """One planner check (a WORKLOADS name, or "auto"), in the calling process."""
  import jax
  try:
    row = _auto_check(smoke) if name == "auto" else _predicted_vs_measured(name, smoke)
  except Exception as e:  # noqa: BLE001  (the row says what failed)
    row = {"workload": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:400]}
  return {**row, "device": jax.devices()[0].device_kind}


def plan_checks(run_one, out_path: str) -> dict:
  """Every check, each in a process of its own (`run_one(name)` -> its dict): a device's
  peak_bytes_in_use only grows within a process, so a check run after a bigger one would
  read the bigger one's peak. The results so far are rewritten to out_path after each."""
  import json
  res = {"rows": []}
  for name in CHECKS:
    row = run_one(name)
    res["device"] = row.pop("device", res.get("device", "?"))
    if name == "auto":
      res["auto"] = row
    else:
      res["rows"].append(row)
    with open(out_path, "w") as f:
      json.dump(res, f, indent=1)
  return res


def collect(results: dict, out: str) -> None:
  """Reads the stages' JSON files into `results`."""
  import json
  for name in ("bench_1gpu", "bench_data2", "bench_fsdp2", "plan_checks"):
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
      with open(path) as f:
        data = json.load(f)
      results[name] = data.get("results", data) if name.startswith("bench") else data


def _gib(n) -> str:
  return f"{n / 2**30:.2f}" if n else "-"


def _bench_table(results: dict) -> list[str]:
  rows = {}
  for stage in ("bench_1gpu", "bench_data2", "bench_fsdp2"):
    for r in results.get(stage) or []:
      rows.setdefault(r["workload"], {})[stage] = r
  lines = ["| bench workload | 1 GPU tok/s (peak GiB) | data=2 tok/s (x, peak GiB/GPU) | "
           "fsdp=2 tok/s (x, peak GiB/GPU) |", "|---|---|---|---|"]
  for wl, by in rows.items():
    one = by.get("bench_1gpu", {})
    cells = []
    for stage in ("bench_1gpu", "bench_data2", "bench_fsdp2"):
      r = by.get(stage, {})
      if r.get("status") != "ok":
        cells.append(r.get("status", "-"))
        continue
      x = (f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x, "
           if stage != "bench_1gpu" and one.get("status") == "ok" else "")
      cells.append(f"{r['tokens_per_s']:,.0f} ({x}{_gib(r.get('peak_bytes'))})")
    lines.append(f"| {wl} | " + " | ".join(cells) + " |")
  return lines


def _train_table(results: dict) -> list[str]:
  base = (results.get("train_1gpu") or {}).get("tokens_per_s")
  lines = ["| launch/train.py (sft_chat, packed) | tokens/s | x 1 GPU | MFU |", "|---|---|---|---|"]
  for name, label in (("train_1gpu", "1 GPU, batch 8"), ("train_2gpu", "2 GPUs, 1 process, batch 16"),
                      ("train_2proc", "2 GPUs, 2 processes, batch 16")):
    r = results.get(name) or {}
    t = r.get("tokens_per_s")
    x = f"{t / base:.2f}x" if t and base else "-"
    mfu = r.get("mfu")
    lines.append(f"| {label} | {f'{t:,.0f}' if t else '-'} | {x} | "
                 f"{f'{100 * mfu:.1f}%' if mfu == mfu and mfu else '-'} |")
  a = (results.get("train_2gpu") or {}).get("losses") or {}
  b = (results.get("train_2proc") or {}).get("losses") or {}
  common = sorted(set(a) & set(b), key=int)
  if common:
    diff = max(abs(b[s] - a[s]) / abs(a[s]) for s in common)
    lines.append(f"\n2 processes vs 1 process (2 GPUs): {len(common)} steps, max relative loss "
                 f"difference {diff:.2e}")
  return lines


def _plan_table(results: dict) -> list[str]:
  pc = results.get("plan_checks") or {}
  lines = [f"| planner ({pc.get('device', '?')}) | predicted GiB | measured peak GiB | "
           "error | verdict |", "|---|---|---|---|---|"]
  for r in pc.get("rows", []):
    if "predicted" not in r or "measured_peak" not in r:
      lines.append(f"| {r['workload']} | error: {r.get('error', '')[:80]} | | | |")
      continue
    err = f"{100 * r['error']:+.1f}%" if r.get("error") is not None else "-"
    lines.append(f"| {r['workload']} | {_gib(r['predicted'])} | {_gib(r['measured_peak'])} | "
                 f"{err} | {r['verdict']} |")
  auto = pc.get("auto") or {}
  if "chosen" in auto:
    nxt = auto.get("next_larger", {})
    lines.append(f"\nmicro_batch=auto, batch {auto['batch_size']}: chose {auto['chosen']} "
                 f"(grad_accum {auto['grad_accum']}, predicted {_gib(auto['predicted'])} of "
                 f"{_gib(auto['limit'])} GiB): {auto['chosen_run'].get('status')}"
                 + (f", measured {_gib(auto['chosen_run'].get('measured_peak'))} GiB; next larger "
                    f"{nxt.get('micro_batch')}: {nxt.get('status')}" if nxt else ""))
  elif auto:
    lines.append(f"\nmicro_batch=auto: {auto.get('error', '')[:200]}")
  return lines


def tables(results: dict) -> str:
  stages = " ".join(f"{k}={v['status']}({v.get('wall_s', '-')}s)"
                    for k, v in results.get("stages", {}).items())
  return "\n".join(["stages: " + stages, "", *_bench_table(results), "",
                    *_train_table(results), "", *_plan_table(results)])
