"""Training throughput of jaxtune against PyTorch + transformers + peft, side by side.

An engine that is correct but slower than the PyTorch stack gives users no reason to switch,
so this runs both on the same model shape, sequence length, batch, precision, LoRA targets
and optimizer, in one command, and prints one table (docs/BENCHMARKS.md has the numbers):

  python launch/bench.py --workloads=1b_full,1b_lora,1b_qlora --seq_lens=2048 --out=b.json
  python launch/bench.py --workloads=8b_lora,8b_qlora --seq_lens=4096
  python launch/bench.py --smoke          # tiny shapes on CPU: what tests/test_bench.py runs
  python launch/bench.py --workloads=decode_1b   # sampling: see launch/bench_decode.py
  python launch/bench.py --workloads=1b_full,1b_full_seg,1b_full_chat,1b_lora,1b_lora_chat \
      --frameworks=torch,torch_compile,jaxtune --batch=8    # launcher's data path, peers

Workloads are SHAPE_METHOD[_DATA]; DATA (launch/bench_chat.py) is absent for the synthetic
rows below, 'seg' for the same rows carrying the segment ids and positions the data pipeline
attaches to unpacked rows, 'chat' for the real launch/train.py pipeline (bundled chat sample,
packed, loss on assistant turns, a new batch every step); tokens/s then counts real
(non-padding) tokens. Frameworks: jaxtune, torch (eager), torch_compile (torch.compile,
default mode; on seg/chat rows with flex_attention document masking, eager uses sdpa with
the same block-diagonal mask); with a --mesh of several devices, torch_ddp and torch_fsdp
(the eager peer under torchrun, DDP or FSDP2 over those devices: launch/bench_ddp.py).

Both sides, unless a line says otherwise:
  model      Llama-3.2-1B shape (hidden 2048, 16 layers, 32/8 heads, mlp 8192, vocab 128256,
             tied) or Llama-3.1-8B shape (4096, 32 layers, 32/8 heads, 14336, untied);
             random init, uniform random tokens, loss on every position.
  precision  --precision=bf16 (default): bf16 weights, bf16 compute, AdamW moments in the
             weights' dtype; LoRA adapters and their moments fp32 (peft's default
             autocast_adapter_dtype; jaxtune's lora.init default). --precision=mixed: fp32
             master weights, bf16 compute (jaxtune model.param_dtype=float32; torch.autocast).
  optimizer  AdamW, lr 1e-5 constant, betas (0.9, 0.95), eps 1e-8, no weight decay, global
             grad-norm clip 1.0 (jaxtune: train/optim.py; torch: fused AdamW, clip_grad_norm_).
  LoRA       rank 16, alpha 32, all 7 projections, no dropout. QLoRA: NF4, blocks of 64,
             bf16 compute (jaxtune bf16 scales; bitsandbytes fp32 absmax, no double quant).
  jaxtune    the real training path: setup.build's jitted step (donated state, no host sync
             inside), with the per-workload model options of TUNED (attention=auto is cuDNN
             flash attention for bf16 on GPU; the table says whether it was in the program).
  peer       transformers LlamaForCausalLM, attn_implementation="sdpa", eager, under
             torch.autocast(bf16), labels=input_ids (HF shifts them); gradient checkpointing
             (non-reentrant) where PEER_CKPT says so, since it is how HF fits such a run.
FLOPs per token are train/flops.py's (6N + attention for full FT, 4N + attention for
(Q)LoRA, causal attention, remat not counted); MFU is against flops.PEAK_FLOPS (989 TFLOP/s
dense bf16 on H100/H200). Peak memory: jax peak_bytes_in_use over the whole worker process
(setup included: jax has no reset), torch max_memory_allocated from the first step on. Each
(workload, framework) runs in its own subprocess (launch/bench_workers.py does the run), so
memory never leaks between rows. A peer that cannot run says why in its row (bitsandbytes
missing: 'unavailable'; out of memory: 'oom').
"""

import datetime
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import bench_chat  # noqa: E402
from launch import bench_ddp  # noqa: E402
from launch import bench_decode  # noqa: E402
from launch import bench_goals  # noqa: E402
from launch import bench_workers  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line; defined by __main__ only, so tests import this module flag-free."""
  flags.DEFINE_list("workloads", ["1b_full", "1b_lora", "1b_qlora"],
                    "SHAPE_METHOD[_DATA] names: shapes 1b | 8b (tiny under --smoke), methods "
                    "full | lora | qlora, DATA seg | chat (see above); or decode_1b | decode_8b "
                    "(sampling, bench_decode.py); or grpo_1b (GRPO vs TRL, bench_grpo.py, "
                    "its defaults; that file's flags set the rest).")
  flags.DEFINE_list("decode_batches", ["64", "256"], "decode_*: batch sizes (smoke: 2,4).")
  flags.DEFINE_integer("decode_prompt", 128, "decode_*: prompt tokens per row (smoke: 8).")
  flags.DEFINE_integer("decode_new", 256, "decode_*: sampled tokens per row (smoke: 8).")
  flags.DEFINE_integer("decode_repeats", 3, "decode_*: timed calls per batch (median).")
  flags.DEFINE_list("decode_attention", ["auto"], "decode_*: jaxtune runs, one per "
                    "model.attention value (auto | xla | pallas).")
  flags.DEFINE_integer("budget_s", 0, "Stop starting runs after this many seconds (0 = no "
                       "limit); each isolated run's timeout is cut to what is left.")
  flags.DEFINE_list("seq_lens", ["2048"], "Sequence lengths.")
  flags.DEFINE_integer("batch", 4, "Rows per step (the global batch, split over the mesh's "
                       "data x fsdp devices).")
  flags.DEFINE_string("mesh", "", "jaxtune device mesh, e.g. data=2 | fsdp=2 | tensor=2 | "
                      "data=2,fsdp=2 (axes left out are 1): runs on that many local devices. "
                      "Empty: one device. torch and torch_compile run on one device only, so "
                      "they are skipped when the mesh has more; torch_ddp and torch_fsdp "
                      "run only then.")
  flags.DEFINE_list("frameworks", ["torch", "jaxtune"], "Which sides to run: torch (eager), "
                    "torch_compile, torch_ddp (eager, DistributedDataParallel over the "
                    "--mesh's device count, under torchrun), torch_fsdp (the same with FSDP2 "
                    "fully_shard), jaxtune.")
  flags.DEFINE_enum("precision", "bf16", ["bf16", "mixed"], "See the module docstring.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps (the first one compiles).")
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_enum("peer_ckpt", "auto", ["auto", "on", "off"],
                    "Gradient checkpointing for the peer; auto = PEER_CKPT by shape.")
  flags.DEFINE_string("jax_variants", "", "Extra jaxtune runs, ';'-separated NAME:k=v,k=v with "
                      "ModelConfig keys (remat, logits_chunk, attention, scan_layers), lib=DIR "
                      "(import jaxtune from DIR), noflags=1 (skip set_xla_flags), and last "
                      "xla=+F+F (add XLA flags). Empty: one run with TUNED.")
  flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU, 1 warmup + 2 timed steps.")
  flags.DEFINE_bool("isolate", True, "One subprocess per (workload, framework).")
  flags.DEFINE_integer("run_timeout", 900, "Seconds before an isolated run is killed.")
  flags.DEFINE_string("out", "", "Write all results as JSON here (rewritten after each run).")
  flags.DEFINE_string("log_file", "", "Append every worker's output here.")
  flags.DEFINE_string("profile_dir", "", "jaxtune: trace 2 more steps with jax.profiler, put "
                      "the top GPU kernels in the results and the optimised HLO in this folder.")
  flags.DEFINE_string("worker", "", "Internal: JSON spec of one run.")


# jaxtune model options per (shape, method), chosen by measurement (docs/BENCHMARKS.md).
_1B = dict(remat="none", logits_chunk=4096, logits_dtype="compute", scan_layers=False)
_8B = dict(remat="full", logits_chunk=4096, logits_dtype="compute")
TUNED = {
    ("1b", "full"): _1B,
    ("1b", "lora"): _1B,
    ("1b", "qlora"): _1B,
    ("8b", "full"): _8B,  # unmeasured: the 8-GPU commands
    ("8b", "lora"): _8B,
    ("8b", "qlora"): _8B,
    ("tiny", "full"): dict(remat="none", logits_chunk=24, scan_layers=False),
    ("tiny", "lora"): dict(remat="full", logits_chunk=0),
    ("tiny", "qlora"): dict(remat="none", logits_chunk=24),
}
PEER_CKPT = {"1b": False, "8b": True, "tiny": False}
METHOD_NAMES = {"full": "full FT", "lora": "LoRA r16", "qlora": "QLoRA nf4"}


def _isolated(spec: dict) -> dict:
  return bench_workers.isolated(
      os.path.abspath(__file__), spec, FLAGS.run_timeout, log_file=FLAGS.log_file,
      header=f"{spec['workload']} seq={spec['seq']} {spec['framework']} {spec.get('variant', '')}")


def _specs() -> list[dict]:
  variants = [("tuned", {})]
  if FLAGS.jax_variants:
    variants = []
    for item in FLAGS.jax_variants.split(";"):
      name, _, body = item.strip().partition(":")
      body, _, xla = body.partition("xla=")  # xla= comes last: its flags may hold , and =
      kv = dict(p.split("=", 1) for p in body.split(",") if p.strip())
      if xla:
        kv["xla"] = xla
      variants.append((name, kv))
  mesh = parse_mesh(FLAGS.mesh)
  seqs = [32] if FLAGS.smoke and FLAGS.seq_lens == ["2048"] else [int(s) for s in FLAGS.seq_lens]
  batch = 2 if FLAGS.smoke and FLAGS.batch == 4 else FLAGS.batch
  specs = []
  for seq in seqs:
    for wl in FLAGS.workloads:
      shape, method, data = parse_workload(wl)
      shape = "tiny" if FLAGS.smoke else shape
      name = "_".join([shape, method] + ([data] if data != "synthetic" else []))
      base = dict(workload=name, shape=shape, method=method, data=data, seq=seq,
                  batch=batch, precision=FLAGS.precision, smoke=FLAGS.smoke, mesh=mesh,
                  warmup=1 if FLAGS.smoke else FLAGS.warmup,
                  steps=2 if FLAGS.smoke else FLAGS.steps)
      for fw in FLAGS.frameworks:
        if fw in ("torch", "torch_compile") and mesh_devices(mesh) > 1:
          continue  # one-device peers: no row to compare a mesh run with
        if fw in bench_ddp.SHARDS:  # the peer on the mesh's devices: DDP or FSDP2
          if mesh_devices(mesh) > 1:
            ckpt = {"on": True, "off": False}.get(FLAGS.peer_ckpt, PEER_CKPT[shape])
            specs.append(dict(base, framework=fw, variant="peer", peer_ckpt=ckpt, model={},
                              ddp=mesh_devices(mesh), shard=bench_ddp.SHARDS[fw]))
          continue
        if fw in ("torch", "torch_compile"):
          ckpt = {"on": True, "off": False}.get(FLAGS.peer_ckpt, PEER_CKPT[shape])
          specs.append(dict(base, framework=fw, variant="peer", peer_ckpt=ckpt, model={}))
          continue
        for name, kv in variants:
          model = dict(TUNED[(shape, method)], attention="auto")
          extra = {}
          for k, v in kv.items():
            if k in ("lib", "noflags", "xla"):
              extra[k] = v
            else:
              model[k] = int(v) if v.isdigit() else {"true": True, "false": False}.get(v, v)
          specs.append(dict(base, framework="jaxtune", variant=name, model=model,
                            profile_dir=FLAGS.profile_dir, **extra))
  return specs


def parse_workload(wl: str) -> tuple[str, str, str]:
  """'1b_full' -> ('1b', 'full', 'synthetic'); '1b_lora_chat' -> ('1b', 'lora', 'chat')."""
  parts = wl.split("_")
  data = parts[2] if len(parts) == 3 else "synthetic"
  if len(parts) not in (2, 3) or parts[1] not in METHOD_NAMES or data not in bench_chat.DATA_KINDS:
    raise app.UsageError(f"--workloads: bad name {wl!r} (expected SHAPE_METHOD[_DATA], METHOD "
                         f"one of {', '.join(METHOD_NAMES)}, DATA seg or chat)")
  return parts[0], parts[1], data


def _derive(r: dict) -> dict:
  """Adds tokens/s (real tokens: the worker's tokens_per_step), TFLOP/s, MFU from step_s and
  train/flops.py."""
  from jaxtune.train import flops
  if r.get("status") != "ok":
    return r
  model_cfg = bench_workers.shape_cfg(r["shape"], r)
  tokens = r.get("tokens_per_step") or r["batch"] * r["seq"]
  fpt = flops.train_flops_per_token(model_cfg, r["seq"], peft=r["method"] != "full")
  r["tokens_per_s"] = tokens / r["step_s"]
  r["tflops"] = fpt * r["tokens_per_s"] / 1e12
  peak = next((v for k, v in flops.PEAK_FLOPS.items() if k.lower() in r["device"].lower()), None)
  r["mfu"] = r["tflops"] * 1e12 / (peak * mesh_devices(r.get("mesh"))) if peak else None
  return r


def parse_mesh(text: str) -> dict:
  """'data=2' -> {'data': 2, 'fsdp': 1, 'tensor': 1}; '' -> {} (one device)."""
  if not text.strip():
    return {}
  out = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in text.split(","):
    key, _, value = part.partition("=")
    if key.strip() not in out or not value.strip().isdigit() or int(value) < 1:
      raise app.UsageError(f"--mesh: bad part {part!r} (expected data=N, fsdp=N or tensor=N, "
                           "comma-separated)")
    out[key.strip()] = int(value)
  return out


def mesh_devices(mesh: dict | None) -> int:
  return int(math.prod(mesh.values())) if mesh else 1


def _config_str(r: dict) -> str:
  prec = "bf16" if r["precision"] == "bf16" else "fp32 master+bf16"
  if r["framework"] != "jaxtune":
    attn = (r.get("config_extra") or "attn=sdpa").split("attn=")[-1]
    comp = {"torch_compile": "compiled ", "torch_ddp": f"DDP x{r.get('ddp')} ",
            "torch_fsdp": f"FSDP x{r.get('ddp')} "}.get(r["framework"], "")
    return f"{comp}{prec} {attn} ckpt={'on' if r['peer_ckpt'] else 'off'}"
  m = r["model"]
  attn = m.get("attention", "auto")
  if attn == "auto" and r.get("cudnn_attention_calls") is not None:
    kernels = [n for n, k in (("cudnn", "cudnn_attention_calls"),
                              ("pallas", "pallas_attention_calls")) if r.get(k)]
    attn = "+".join(kernels) or "xla"
  extra = "".join(f" {k}={r[k]}" for k in ("lib", "noflags", "xla") if r.get(k))
  name = "" if r.get("variant") in ("tuned", None) else f"[{r['variant']}] "
  if mesh_devices(r.get("mesh")) > 1:
    name += "mesh " + ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) + " "
  logits = " logits=compute" if m.get("logits_dtype") == "compute" else ""
  return (f"{name}{prec} attn={attn} remat={m.get('remat')} ce_chunk={m.get('logits_chunk')}"
          f"{logits}{'' if m.get('scan_layers', True) else ' unrolled'}{extra}")


def peer_row(results: list[dict], r: dict, fw: str) -> dict | None:
  """The row `r` is compared with: framework `fw` (torch | torch_compile), or on a mesh its
  DDP / FSDP2 run, of the same workload and sequence length. When both of those ran, the
  one that shards like `r`: FSDP2 for a mesh with fsdp > 1, DDP otherwise."""
  rows = {p["framework"]: p for p in results
          if p["framework"] in (fw, fw + "_ddp", fw + "_fsdp") and p.get("status") == "ok"
          and (p["workload"], p["seq"]) == (r["workload"], r["seq"])}
  if fw in rows:
    return rows[fw]
  fsdp = (r.get("mesh") or {}).get("fsdp", 1) > 1
  order = (fw + "_fsdp", fw + "_ddp") if fsdp else (fw + "_ddp", fw + "_fsdp")
  return next((rows[f] for f in order if f in rows), None)


def table(results: list[dict]) -> str:
  """The printed table: one row per run, the ratio against the peer's row of the same
  workload and sequence length."""
  head = ("workload", "seq", "framework", "config", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
          "vs peer", "vs compiled")
  rows = [head]
  for r in results:
    shape, method, data = parse_workload(r["workload"])
    ok = r.get("status") == "ok"
    ratios = []
    for fw in ("torch", "torch_compile"):
      p = peer_row(results, r, fw)
      ratios.append(f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x"
                    if ok and p and r["framework"] == "jaxtune" else "")
    label = f"{shape} {METHOD_NAMES[method]}" + ("" if data == "synthetic" else f" {data}")
    rows.append((
        label, str(r["seq"]), r["framework"],
        _config_str(r) if ok else f"{r.get('status')}: {r.get('error', '')[:60]}",
        f"{r['tokens_per_s']:,.0f}" if ok else "-",
        f"{r['tflops']:.1f}" if ok else "-",
        f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") else "-",
        f"{r['peak_bytes'] / 2**30:.1f}" if ok and r.get("peak_bytes") else "-",
        *ratios))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


goals = bench_goals.goals  # tests and callers: bench.goals(results)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    spec = json.loads(FLAGS.worker)
    worker = bench_decode if spec.get("kind") == "decode" else bench_workers
    res = worker.run_worker(spec)
    if not spec.get("ddp") or bench_ddp.rank() == 0:  # under torchrun: rank 0 reports
      with open(spec["result_file"], "w") as f:
        json.dump(res, f)
    return
  t_start = time.monotonic()
  decode = [w for w in FLAGS.workloads if w.startswith("decode_")]
  grpo = [w for w in FLAGS.workloads if w.startswith("grpo_")]
  FLAGS.workloads = [w for w in FLAGS.workloads if not w.startswith(("decode_", "grpo_"))]
  results = []
  for spec in _specs() if FLAGS.workloads else []:
    print(f"running {spec['workload']} seq={spec['seq']} {spec['framework']} "
          f"{spec['variant']} ...", file=sys.stderr, flush=True)
    res = _derive(_isolated(spec) if FLAGS.isolate else bench_workers.run_worker(spec))
    print(f"  -> {res.get('status')} {res.get('tokens_per_s', 0):,.0f} tokens/s "
          f"{res.get('error', '')[:200]}", file=sys.stderr, flush=True)
    results.append(res)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "argv": sys.argv, "results": results}, f, indent=1)
  if results:
    print(table(results))
    for line in bench_goals.goals(results):
      print("goal: " + line)
  if decode:
    _decode(decode, t_start, results)
  if grpo:
    from launch import bench_grpo  # pylint: disable=g-import-not-at-top
    bench_grpo.run_all(bench_grpo.specs(["jaxtune", "trl"], smoke=FLAGS.smoke),
                       timeout=FLAGS.run_timeout,
                       out=FLAGS.out and FLAGS.out.replace(".json", "") + "_grpo.json")


def _decode(workloads: list[str], t_start: float, train_results: list[dict]) -> None:
  """The decode workloads (bench_decode.py): run, print the table and the goals."""
  smoke = FLAGS.smoke
  default = FLAGS["decode_batches"].default
  batches = [2, 4] if smoke and FLAGS.decode_batches == default else [
      int(b) for b in FLAGS.decode_batches]
  specs = bench_decode.specs(
      workloads, batches=batches, prompt=8 if smoke else FLAGS.decode_prompt,
      new=8 if smoke else FLAGS.decode_new, repeats=1 if smoke else FLAGS.decode_repeats,
      smoke=smoke, profile_dir=FLAGS.profile_dir, jax_attention=FLAGS.decode_attention)
  results = []
  for spec in specs:
    left = FLAGS.budget_s - (time.monotonic() - t_start) if FLAGS.budget_s else None
    if left is not None and left < 20:
      results.append({**spec, "status": "skipped", "error": "--budget_s spent"})
      continue
    print(f"running {spec['workload']} {spec['framework']} batches {spec['batch_sizes']} ...",
          file=sys.stderr, flush=True)
    timeout = min(FLAGS.run_timeout, left) if left is not None else FLAGS.run_timeout
    res = (bench_decode.run_isolated(spec, timeout, FLAGS.log_file) if FLAGS.isolate
           else bench_decode.run_worker(spec))
    print(f"  -> {res.get('status')} {res.get('error', '')[:200]}", file=sys.stderr, flush=True)
    results.append(res)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "argv": sys.argv, "results": train_results, "decode_results": results,
                   "decode_rows": bench_decode.rows(results)}, f, indent=1)
  print(bench_decode.table(results))
  for line in bench_decode.goals(results):
    print("goal: " + line)


if __name__ == "__main__":
  define_flags()
  app.run(main)
