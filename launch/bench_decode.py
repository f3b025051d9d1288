"""Decode throughput of jaxtune's sampler against `transformers` generate, for launch/bench.py.

  python launch/bench.py --workloads=decode_1b            # batches 64 and 256 (--decode_batches)
  python launch/bench.py --workloads=decode_8b --decode_batches=64
  python launch/bench.py --smoke --workloads=decode_1b     # tiny shape on CPU (tests)

Every side runs the same model shape (bench_workers.SHAPES, random init, bf16 weights and
compute), the same batch of uniform random prompts of `prompt` tokens, and samples `new`
tokens per row at temperature 1 with no top-k / top-p and early stopping off (no eos), so
every row produces exactly `new` tokens. Sides:

  jaxtune              `jaxtune.sampling.run_rows` (what `jaxtune.generate` runs): jitted
                       prefill, then the `lax.while_loop` decode over the donated KV cache;
                       layers unrolled (scan_layers=False), attention=auto (Pallas flash
                       kernel for the padded prefill on GPU, the cache attention in XLA)
  hf dynamic           `model.generate(do_sample=True, temperature=1, top_k=0)`, sdpa,
                       DynamicCache (the default)
  hf static+compile    the same with cache_implementation="static", which makes generate
                       torch.compile the decoding forward (mode "reduce-overhead": CUDA
                       graphs); on CPU (smoke) there is no compile, only the static cache

Timing: one untimed call (compiles), then `repeats` timed calls between device syncs; the
median is reported. Tokens/s = batch * new / seconds per call, prefill included on every
side (the whole generate call). Peak memory: jax peak_bytes_in_use of the worker process,
torch max_memory_allocated. Roofline: each decode step must read every weight once
(matmul params x 2 bytes; embedding lookups are negligible) and the KV cache of the average
context (prompt + new/2 tokens): 2 * layers * batch * kv_heads * head_dim * 2 bytes per
token; at 4.8 TB/s (H200) that bounds tokens/s at batch / (bytes / 4.8e12).
"""

import json
import os
import statistics
import tempfile
import time

from launch import bench_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HBM_BYTES_PER_S = 4.8e12  # H200
FRAMEWORKS = ("jaxtune", "hf_dynamic", "hf_static_compile")
NAMES = {"jaxtune": "jaxtune", "hf_dynamic": "hf dynamic", "hf_static_compile": "hf static+compile"}


def specs(workloads, *, batches, prompt, new, repeats, smoke, profile_dir="",
          jax_attention=("auto",)) -> list[dict]:
  """Runs in order: jaxtune (one per attention setting; the first is profiled), then the
  static+compile peer, then the dynamic one."""
  out = []
  for wl in workloads:
    shape = "tiny" if smoke else wl.split("_", 1)[1]
    base = dict(kind="decode", workload=wl, shape=shape, batch_sizes=list(batches),
                prompt=prompt, new=new, repeats=repeats, smoke=smoke, precision="bf16")
    for i, attn in enumerate(jax_attention):
      out.append(dict(base, framework="jaxtune", variant=attn, selfcheck=i == 0,
                      profile_dir=profile_dir if i == 0 else "",
                      model=dict(scan_layers=False, attention=attn)))
    for fw in ("hf_static_compile", "hf_dynamic"):
      out.append(dict(base, framework=fw, variant="peer", profile_dir="", model={}))
  return out


def roofline(model_cfg, batch: int, prompt: int, new: int) -> dict:
  """Bytes one decode step must read and the tokens/s that bounds (see the docstring)."""
  from jaxtune.train import flops
  weights = 2 * flops.matmul_params(model_cfg)
  kv = (2 * model_cfg.num_layers * batch * model_cfg.num_kv_heads * model_cfg.head_dim * 2
        * (prompt + new // 2))
  return {"weight_bytes": weights, "kv_bytes": kv,
          "tokens_per_s": batch * HBM_BYTES_PER_S / (weights + kv)}


def _prompts(batch: int, prompt: int, vocab: int):
  import numpy as np
  return np.random.default_rng(batch).integers(0, vocab, (batch, prompt)).astype(np.int64)


def _jax_worker(spec: dict) -> dict:
  from launch import common
  common.set_xla_flags()
  import jax
  from jaxtune import sampling
  from jaxtune.sampling import engine
  model_cfg = bench_workers.shape_cfg(spec["shape"], spec)
  params = bench_workers._lean_init(model_cfg, jax.random.PRNGKey(0), quantize=False)  # noqa: SLF001
  out = {"measured": {}}
  for batch in spec["batch_sizes"]:
    prompts = _prompts(batch, spec["prompt"], model_cfg.vocab_size).tolist()
    rows = sampling.api.rows_for(prompts, max_new_tokens=spec["new"], temperature=1.0,
                                 key=jax.random.PRNGKey(1))

    def call(rows=rows):
      return next(sampling.run_rows(model_cfg, params, rows, eos_ids=()))

    t0 = time.perf_counter()
    gen = call()
    first = time.perf_counter() - t0
    if batch == min(spec["batch_sizes"]):
      first_prompts, first_gen = prompts, gen
    made = sum(len(t) for t in gen.tokens)
    if made != batch * spec["new"]:
      raise RuntimeError(f"generated {made} tokens, expected {batch * spec['new']}")
    times = []
    for _ in range(spec["repeats"]):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
    # The device alone: prefill + decode, no host-side list building; the fused-projection
    # decision as api.run_rows makes it (after the prefill, which allocates the cache).
    plan = engine.make_plan(model_cfg, rows, num_eos=0)
    dev = []
    for _ in range(spec["repeats"]):
      t0 = time.perf_counter()
      st = engine.start(model_cfg, params, plan, rows, ())
      st = engine.advance(model_cfg, params, engine.fit_fuse(model_cfg, params, plan), st,
                          plan.new)
      jax.block_until_ready(st["tokens"])
      dev.append(time.perf_counter() - t0)
    out["measured"][str(batch)] = {"call_s": statistics.median(times), "first_call_s": first,
                                   "device_s": statistics.median(dev), "tokens": made}
    if spec.get("profile_dir") and batch == max(spec["batch_sizes"]):
      out["profile"] = _profile(spec, call)
  stats = jax.local_devices()[0].memory_stats() or {}
  out["peak_bytes"] = stats.get("peak_bytes_in_use")
  if spec.get("selfcheck"):
    out["selfcheck"] = _selfcheck(model_cfg, params, spec, first_prompts, first_gen)
  out["device"] = jax.local_devices()[0].device_kind
  out["versions"] = {"jax": jax.__version__}
  return out


def _selfcheck(model_cfg, params, spec: dict, prompts, gen, rows: int = 4) -> dict:
  """The sampler's log-probs of its first rows against the plain forward (no cache) over
  prompt + tokens, in the benchmark's dtype: the cached path on this device computes the
  model's function. Returns the absolute differences."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxtune.models import decoder
  seq = jnp.asarray([p + t for p, t in zip(prompts[:rows], gen.tokens[:rows])], jnp.int32)
  logp = jax.nn.log_softmax(decoder.forward(model_cfg, params, seq), axis=-1)  # [R, T, V]
  p = spec["prompt"]
  want = np.take_along_axis(np.asarray(logp[:, p - 1:-1]), np.asarray(seq[:, p:, None]),
                            axis=-1)[..., 0]
  diff = np.abs(want - np.asarray(gen.logprobs[:rows]))
  return {"max_abs_logprob_diff": float(diff.max()), "mean_abs_logprob_diff": float(diff.mean()),
          "mean_logprob": float(np.mean(gen.logprobs[:rows]))}


def _profile(spec: dict, call) -> dict:
  """GPU time of one call by kernel (top 25), from a jax.profiler trace."""
  import collections
  import glob
  import gzip
  import jax
  os.makedirs(spec["profile_dir"], exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      call()
    path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  kernels, lines, busy = collections.Counter(), collections.Counter(), []
  for e in events:
    if e.get("ph") != "X" or "GPU" not in procs.get(e["pid"], ""):
      continue
    line = threads.get((e["pid"], e.get("tid")), "?")
    lines[line] += e.get("dur", 0) / 1e3
    if line.startswith("Stream"):
      kernels[e["name"][:90]] += e.get("dur", 0) / 1e3
      busy.append((e["ts"], e["ts"] + e.get("dur", 0)))
  span = (max(b for _, b in busy) - min(a for a, _ in busy)) / 1e3 if busy else None
  return {"ms_by_line": dict(lines.most_common(8)), "stream_span_ms": span,
          "kernel_ms_total": sum(kernels.values()),
          "top_kernels_ms": kernels.most_common(25)}


def _torch_worker(spec: dict) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jaxtune.hf.config imports jax: keep it off
  import torch
  import transformers
  from jaxtune.hf import config as hf_config
  dev = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
  model_cfg = bench_workers.shape_cfg(spec["shape"], spec)
  hf = transformers.LlamaConfig(**{k: v for k, v in hf_config.to_hf(model_cfg).items()
                                   if k not in ("torch_dtype", "dtype", "architectures")})
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa",  # noqa: SLF001
                                                       dtype=torch.bfloat16).eval()
  kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=spec["new"],
            pad_token_id=0, eos_token_id=None)
  if spec["framework"] == "hf_static_compile":
    kw["cache_implementation"] = "static"
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  out = {"measured": {}, "versions": {"torch": torch.__version__,
                                     "transformers": transformers.__version__},
         "compiled": dev == "cuda" and spec["framework"] == "hf_static_compile"}
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
  for batch in spec["batch_sizes"]:
    ids = torch.as_tensor(_prompts(batch, spec["prompt"], model_cfg.vocab_size), device=dev)
    mask = torch.ones_like(ids)

    def call(ids=ids, mask=mask):
      with torch.inference_mode():
        res = model.generate(input_ids=ids, attention_mask=mask, **kw)
      sync()
      return res

    t0 = time.perf_counter()
    res = call()
    first = time.perf_counter() - t0
    if tuple(res.shape) != (batch, spec["prompt"] + spec["new"]):
      raise RuntimeError(f"generate returned {tuple(res.shape)}")
    if out["compiled"]:
      call()  # reduce-overhead records its CUDA graphs on the first calls
    times = []
    for _ in range(spec["repeats"]):
      t0 = time.perf_counter()
      call()
      times.append(time.perf_counter() - t0)
    out["measured"][str(batch)] = {"call_s": statistics.median(times), "first_call_s": first,
                                   "tokens": batch * spec["new"]}
  out["peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  out["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  return out


def run_worker(spec: dict) -> dict:
  """One side of a decode workload in this process; never raises."""
  return bench_workers.guarded(
      spec, _jax_worker if spec["framework"] == "jaxtune" else _torch_worker)


def run_isolated(spec: dict, timeout: float, log_file: str = "") -> dict:
  """run_worker in a fresh `bench.py --worker` process (its own GPU memory), with a timeout."""
  return bench_workers.isolated(os.path.join(ROOT, "launch", "bench.py"), spec, timeout,
                                log_file=log_file,
                                header=f"decode {spec['workload']} {spec['framework']}")


def rows(results: list[dict]) -> list[dict]:
  """One row per (workload, batch, framework): tokens/s, the roofline fraction, and the ratio
  to the hf static+compile row of the same workload and batch."""
  out = []
  for r in results:
    cfg = bench_workers.shape_cfg(r["shape"], r)
    for b in r["batch_sizes"]:
      m = (r.get("measured") or {}).get(str(b))
      roof = roofline(cfg, b, r["prompt"], r["new"])
      row = dict(workload=r["workload"], batch=b, framework=r["framework"],
                 variant=r.get("variant"),
                 status=r.get("status") if m else (r.get("status") or "error"),
                 error=r.get("error", ""), peak_bytes=r.get("peak_bytes"),
                 roofline_tokens_per_s=roof["tokens_per_s"], compiled=r.get("compiled"))
      if m:
        row["tokens_per_s"] = m["tokens"] / m["call_s"]
        row["device_tokens_per_s"] = m["tokens"] / m["device_s"] if m.get("device_s") else None
        row["roofline_fraction"] = row["tokens_per_s"] / roof["tokens_per_s"]
      out.append(row)
  peers = {(x["workload"], x["batch"]): x for x in out
           if x["framework"] == "hf_static_compile" and x.get("tokens_per_s")}
  for x in out:
    p = peers.get((x["workload"], x["batch"]))
    if p and x.get("tokens_per_s") and x["framework"] != "hf_static_compile":
      x["vs_static_compile"] = x["tokens_per_s"] / p["tokens_per_s"]
  return out


HEADER = ("workload", "batch", "framework", "tokens/s", "device-only tokens/s", "roofline",
          "peak GiB", "vs hf static+compile")


def table(results: list[dict]) -> str:
  lines = [HEADER]
  for x in rows(results):
    ok = x.get("tokens_per_s") is not None
    name = NAMES[x["framework"]]
    if x["framework"] == "jaxtune":
      name += f" attn={x['variant']}"
    if x["framework"] == "hf_static_compile" and x.get("compiled") is False:
      name = "hf static (no compile)"
    lines.append((
        x["workload"], str(x["batch"]), name,
        f"{x['tokens_per_s']:,.0f}" if ok else f"{x['status']}: {x['error'][:50]}",
        f"{x['device_tokens_per_s']:,.0f}" if ok and x.get("device_tokens_per_s") else "-",
        f"{100 * x['roofline_fraction']:.1f}%" if ok else "-",
        f"{x['peak_bytes'] / 2**30:.1f}" if ok and x.get("peak_bytes") else "-",
        f"{x['vs_static_compile']:.2f}x" if x.get("vs_static_compile") else ""))
  widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
  text = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
  text.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(text)


def goals(results: list[dict]) -> list[str]:
  """The issue's decode goals (1B shape), checked against the first jaxtune run (the default
  attention setting; further settings are comparisons)."""
  out = []
  first = next((r.get("variant") for r in results if r["framework"] == "jaxtune"), None)
  for x in rows(results):
    if (x["framework"] != "jaxtune" or x["workload"] != "decode_1b"
        or not x.get("tokens_per_s") or x["variant"] != first):
      continue
    ratio = x.get("vs_static_compile")
    rtxt = f"{ratio:.3f}x hf static+compile" if ratio else "no peer"
    if x["batch"] == 256:
      met = x["tokens_per_s"] >= 80_000 and (ratio or 0) >= 4
      out.append(f"decode 1B batch 256: {x['tokens_per_s']:,.0f} tokens/s "
                 f"({100 * x['roofline_fraction']:.1f}% of roofline), {rtxt} "
                 f"(goal >= 80k and >= 4x): {'MET' if met else 'not met'}")
    if x["batch"] == 64:
      out.append(f"decode 1B batch 64: {x['tokens_per_s']:,.0f} tokens/s, {rtxt} "
                 f"(goal >= 3x): {'MET' if (ratio or 0) >= 3 else 'not met'}")
  return out
