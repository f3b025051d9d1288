"""The two sides of launch/bench.py: one timed run of jaxtune or of the PyTorch peer.

`run_worker(spec)` builds the model of `spec` (shape, method, seq, batch, precision, the
jaxtune model options), runs warmup + timed steps and returns a dict of raw measurements
(step time, losses, peak device memory, versions); bench.py turns those into the table.
Kept apart from the command line so that tests can import both halves without absl flags.
Heavy imports (jax, torch) happen inside the functions: a torch worker never loads jax's GPU
backend and a jax worker never imports torch.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch import bench_chat  # noqa: E402  (no heavy imports at module level)
from launch import bench_ddp  # noqa: E402

_LLAMA3_ROPE = dict(kind="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
               num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
               rope=dict(_LLAMA3_ROPE, factor=32.0)),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
               num_heads=32, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072,
               rope=dict(_LLAMA3_ROPE, factor=8.0)),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                 rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
                 rope=dict(_LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=1024)),
}
LORA = dict(rank=16, alpha=32.0)


def shape_cfg(shape: str, spec: dict):
  """jaxtune ModelConfig for a shape + the run's compute options."""
  from jaxtune import config as config_lib
  s = dict(SHAPES[shape])
  rope = config_lib.RopeScaling(**s.pop("rope"))
  opts = dict(spec["model"])
  return config_lib.ModelConfig(
      family="llama", rope_scaling=rope, dtype="bfloat16",
      param_dtype="bfloat16" if spec["precision"] == "bf16" else "float32", **s, **opts)


def make_batch(spec: dict, vocab: int):
  import numpy as np
  rng = np.random.default_rng(0)
  b, t = spec["batch"], spec["seq"]
  seq = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  return {"tokens": seq[:, :-1], "targets": seq[:, 1:],
          "loss_mask": np.ones((b, t), np.float32)}


def _lean_init(model_cfg, key, *, quantize: bool, mesh=None):
  """Random params like decoder.init, built one layer at a time so that setup's transient
  memory stays far below training's (jax cannot reset its peak counter); projections come
  out as NF4 QArrays directly when `quantize`, so no dense copy of the base ever exists.
  With `mesh`, each param moves to its shards (logical axes) as soon as it is made."""
  import re
  import jax
  import jax.numpy as jnp
  from jaxtune import quant
  from jaxtune import tree
  from jaxtune.models import decoder
  from jaxtune.peft import qlora
  dtype = decoder.DTYPES[model_cfg.param_dtype]
  place = _placer(model_cfg, mesh)
  flat = {}
  for i, (path, shape) in enumerate(sorted(decoder.shapes(model_cfg).items())):
    k = jax.random.fold_in(key, i)
    if path.endswith(("scale", "bias")):
      flat[path] = place(path, jnp.ones(shape, dtype) if path.endswith("scale")
                         else jnp.zeros(shape, dtype))
      continue
    std = 0.02 if path.endswith("embedding") else shape[-2] ** -0.5
    q = quantize and re.fullmatch(qlora.PROJECTIONS, path) is not None

    def one(k, shape=shape, std=std, q=q):
      w = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
      return quant.quantize_array(w, "nf4", 64) if q else w

    if path.startswith("layers/"):
      keys = jax.random.split(k, shape[0])
      flat[path] = place(path, jax.jit(lambda ks, one=one, s=shape[1:]: jax.lax.map(
          lambda kk: one(kk, s), ks))(keys))
    else:
      flat[path] = place(path, jax.jit(one)(k))
  return tree.unflatten(flat)


def _placer(model_cfg, mesh):
  """place(path, leaf) -> the leaf on `mesh`, sharded by its logical axes (a QArray's
  children by the kernel's); identity without a mesh."""
  import jax
  from jaxtune import quant
  from jaxtune import sharding
  from jaxtune import tree
  from jaxtune.models import decoder
  if mesh is None:
    return lambda path, x: x
  axes = tree.flatten(decoder.axes(model_cfg))

  def place(path, x):
    ax = quant.axes_for(x, axes[path]) if isinstance(x, quant.QArray) else axes[path]
    return jax.device_put(x, sharding.tree_shardings(mesh, ax, x))

  return place


def _jax_worker(spec: dict) -> dict:
  if spec.get("lib"):
    sys.path.insert(0, os.path.join(ROOT, spec["lib"]))
  from launch import common
  if spec.get("xla"):  # before set_xla_flags, which leaves flags already set alone
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " +
                               " ".join(f for f in spec["xla"].split("+") if f)).strip()
  if not spec.get("noflags"):
    common.set_xla_flags()
  import jax
  from jaxtune import config as config_lib
  from jaxtune import quant
  from jaxtune import sharding
  from jaxtune.peft import lora
  from jaxtune.train import loop
  from jaxtune.train import setup
  model_cfg = shape_cfg(spec["shape"], spec)
  method = spec["method"]
  cfg = config_lib.TrainConfig(
      model=model_cfg,
      peft=config_lib.PeftConfig(method="none" if method == "full" else method,
                                 rank=LORA["rank"], alpha=LORA["alpha"]),
      optim=config_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0,
                                   weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0),
      train=config_lib.LoopConfig(max_steps=10_000))
  # spec["mesh"] (bench --mesh): {data, fsdp, tensor} over that many local devices; else one.
  mesh_cfg = config_lib.MeshConfig(**spec["mesh"]) if spec.get("mesh") else cfg.mesh
  n_dev = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor if spec.get("mesh") else 1
  mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:n_dev])
  params = _lean_init(model_cfg, jax.random.PRNGKey(0), quantize=method == "qlora",
                      mesh=mesh if n_dev > 1 else None)
  out = {}
  adapters = adapter_axes = None
  if method != "full":
    adapters = lora.init_from_config(model_cfg, params, cfg.peft, key=jax.random.PRNGKey(2))
    adapter_axes = lora.axes(model_cfg, adapters).params
  if method == "qlora":
    qbytes, qparams = quant.num_bytes(params)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    out["base_bytes_per_param"] = {"projections": qbytes / qparams,
                                   "whole_base": total / model_cfg.num_params()}
  run = setup.build(cfg, mesh, params, model_cfg, adapters=adapters, adapter_axes=adapter_axes)
  del params
  out["mesh_devices"] = n_dev
  out["weights_bytes_device0"] = sum(  # the model's weights (LoRA: the frozen base) it holds
      s.data.nbytes for x in jax.tree.leaves(run.frozen.get("base", run.state.trainable))
      for s in x.addressable_shards if s.device == mesh.devices.flat[0])
  host = bench_chat.host_batches(spec, model_cfg.vocab_size)
  fixed = spec.get("data", "synthetic") != "chat"  # synthetic rows: one batch, placed once
  batch = loop.device_batch(next(host), run.batch_sharding)
  if jax.default_backend() == "gpu":
    text = run.train_step.lower(run.state, run.frozen, batch).as_text()
    out["cudnn_attention_calls"] = text.count("__cudnn$fmha")
    out["pallas_attention_calls"] = text.count("__gpu$xla.gpu.triton")
  state, losses = run.state, []
  t0 = time.perf_counter()
  for i in range(spec["warmup"]):
    state, metrics = run.train_step(state, run.frozen, batch)
    if i == 0:
      jax.block_until_ready(metrics)
      out["first_step_s"] = time.perf_counter() - t0
    losses.append(metrics["loss"])
  jax.block_until_ready((state, metrics))
  tokens = 0
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    hb = None
    if not fixed:  # the loop's path: next host batch from the pipeline, placed, stepped
      hb = next(host)
      batch = loop.device_batch(hb, run.batch_sharding)
    tokens += bench_chat.real_tokens(hb) if hb is not None else spec["batch"] * spec["seq"]
    state, metrics = run.train_step(state, run.frozen, batch)
    losses.append(metrics["loss"])
  jax.block_until_ready((state, metrics))
  out["step_s"] = (time.perf_counter() - t0) / spec["steps"]
  out["tokens_per_step"] = tokens / spec["steps"]
  out["losses"] = [float(x) for x in jax.device_get(losses)]
  if spec.get("profile_dir"):
    out["profile"] = _profile(spec, run, state, batch)
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in mesh.devices.flat]
  out["peak_bytes"] = max(peaks) if None not in peaks else None  # the fullest device
  out["device"] = jax.local_devices()[0].device_kind
  out["versions"] = {"jax": jax.__version__}
  return out


def _profile(spec: dict, run, state, batch, steps: int = 2) -> dict:
  """GPU time per step by kernel (top 80) and by trace line, from a jax.profiler trace."""
  import collections
  import glob
  import gzip
  import jax
  tag = f"{spec['workload']}_{spec['seq']}_{spec['variant']}"
  os.makedirs(spec["profile_dir"], exist_ok=True)
  with open(os.path.join(spec["profile_dir"], f"hlo_{tag}.txt"), "w") as f:
    f.write(run.train_step.lower(state, run.frozen, batch).compile().as_text())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = run.train_step(state, run.frozen, batch)
      jax.block_until_ready((state, metrics))
    path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  lines, kernels = collections.Counter(), collections.Counter()
  spans = collections.defaultdict(list)  # (start, end) of each stream's kernels, in us
  for e in events:
    if e.get("ph") != "X" or "GPU" not in procs.get(e["pid"], ""):
      continue
    spans[(e["pid"], e.get("tid"))].append((e["ts"], e["ts"] + e.get("dur", 0)))
    # one line per GPU and stream: with a mesh, each GPU's busy time shows apart
    line = f'{procs[e["pid"]][:24]} {threads.get((e["pid"], e.get("tid")), "?")}'
    lines[line] += e.get("dur", 0) / 1e3 / steps
    if "Stream" in line:
      kernels[e["name"][:90]] += e.get("dur", 0) / 1e3 / steps / len(run.mesh.devices.flat)
  kinds = collections.Counter()
  for name, ms in kernels.items():
    kinds[kernel_kind(name)] += ms
  return {"ms_per_step_by_line": dict(lines.most_common(16)),
          "idle": _idle(spans, steps),
          "ms_per_step_per_gpu_by_kind": dict(kinds.most_common()),
          "top_kernels_ms_per_step_per_gpu": kernels.most_common(80)}


def _idle(spans: dict, steps: int) -> dict:
  """The busiest stream's idle time between its kernels, per step: the whole (ms) and
  the part in gaps of at least 100 us (waits on the host, not launch latency)."""
  if not spans:
    return {}  # no GPU in the trace (a CPU smoke run)
  ivs = sorted(max(spans.values(), key=lambda v: sum(b - a for a, b in v)))
  gaps = [b[0] - a[1] for a, b in zip(ivs, ivs[1:]) if b[0] > a[1]]
  return {"kernels_per_step": len(ivs) / steps,
          "span_ms_per_step": (ivs[-1][1] - ivs[0][0]) / 1e3 / steps,
          "idle_ms_per_step": sum(gaps) / 1e3 / steps,
          "idle_ms_in_gaps_over_100us": sum(g for g in gaps if g >= 100) / 1e3 / steps,
          "largest_gaps_us": sorted(gaps)[-5:]}


KINDS = (("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
         ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "dot")),
         ("collective", ("nccl", "all_reduce", "all_gather", "reduce_scatter")),
         ("copy", ("memcpy", "memset", "copy", "transpose", "dynamic_update_slice")))


def kernel_kind(name: str) -> str:
  """A profiler kernel name's kind (attention, gemm, collective, copy, else 'fusion': XLA's
  elementwise and reduction kernels), by the names cuDNN, cuBLAS, XLA and NCCL give them."""
  low = name.lower()
  return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "fusion")


def _torch_worker(spec: dict) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jaxtune.hf.config imports jax: keep it off
  import torch
  import transformers
  import peft
  from jaxtune.hf import config as hf_config
  dev = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
  rank, world = bench_ddp.setup(spec, dev)  # (0, 1) unless under torchrun
  method = spec["method"]
  versions = {"torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__}
  if method == "qlora":
    try:
      import bitsandbytes as bnb
      versions["bitsandbytes"] = bnb.__version__
    except Exception as e:  # noqa: BLE001 (ImportError, or a CUDA library that fails to load)
      return {"status": "unavailable", "error": f"bitsandbytes: {type(e).__name__}: {e}"[:300],
              "versions": versions}
  model_cfg = shape_cfg(spec["shape"], spec)
  dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
  hf = transformers.LlamaConfig(**{k: v for k, v in hf_config.to_hf(model_cfg).items()
                                   if k not in ("torch_dtype", "dtype", "architectures")})
  hf.use_cache = False
  torch.manual_seed(0)
  compiled = spec["framework"] == "torch_compile"
  packed = spec.get("data", "synthetic") != "synthetic"
  attn = "flex_attention" if compiled and packed else "sdpa"
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation=attn,
                                                       dtype=dtype)
  if method == "qlora":
    for layer in model.model.layers:
      for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                            (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
          old = getattr(parent, name)
          new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False,
                                  compute_dtype=torch.bfloat16, compress_statistics=False,
                                  quant_type="nf4", device="meta")
          new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, blocksize=64,
                                         compress_statistics=False, quant_type="nf4").to(dev)
          setattr(parent, name, new)
          del old
  ckpt = spec["peer_ckpt"]
  if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if method != "full":
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj"], task_type="CAUSAL_LM"))
  model = bench_ddp.wrap(model, dev, spec)  # torch_ddp / torch_fsdp under torchrun
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          fused=dev == "cuda")
  init = bench_ddp.snapshot(params, spec)  # --smoke: the params before training, for check
  host = bench_chat.host_batches(spec, model_cfg.vocab_size)
  inputs = bench_chat.torch_inputs(bench_ddp.rows(next(host), rank, world), dev, attn)
  model.train()
  if compiled:  # default mode, the whole model as one graph where it can
    model = torch.compile(model)
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
      if packed:
        loss = bench_chat.torch_loss(model, inputs)
      else:
        ids = inputs["input_ids"]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=dev == "cuda")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  if dev == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  out, losses = {"config_extra": f"ckpt={'on' if ckpt else 'off'} attn={attn}"}, []
  t0 = time.perf_counter()
  for i in range(spec["warmup"]):
    losses.append(step())
    if i == 0:
      sync()
      out["first_step_s"] = time.perf_counter() - t0
  sync()
  fresh = spec.get("data", "synthetic") == "chat"  # a new pipeline batch per step
  tokens = 0
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    if fresh:
      hb = next(host)
      inputs = bench_chat.torch_inputs(bench_ddp.rows(hb, rank, world), dev, attn)
    tokens += bench_chat.real_tokens(hb) if fresh else spec["batch"] * spec["seq"]
    losses.append(step())
  sync()
  out["step_s"] = (time.perf_counter() - t0) / spec["steps"]
  out["tokens_per_step"] = tokens / spec["steps"]
  out["losses"] = [float(x) for x in losses]
  out["peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  out["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  out["versions"] = versions
  bench_ddp.finish(spec, out, params, opt, init)  # --smoke: adds out['check']
  return out


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory",
                                 "Out of memory"))


def guarded(spec: dict, fn) -> dict:
  """fn(spec) in this process as a row of the table: status ok, oom or error (with the
  exception), wall_s; never raises, so one failing side never loses the other's row."""
  t0 = time.perf_counter()
  try:
    res = {"status": "ok", **fn(spec)}
  except Exception as e:  # noqa: BLE001 (a row of the table says what failed)
    res = {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:600]}
    traceback.print_exc()
  res["wall_s"] = time.perf_counter() - t0
  return {**{k: v for k, v in spec.items() if k != "result_file"}, **res}


def isolated(script: str, spec: dict, timeout: float, *, log_file: str = "",
             header: str = "") -> dict:
  """`python SCRIPT --worker=SPEC` in a fresh process (its own device memory, so no run's
  buffers leak into the next row), killed after `timeout` s: the row the worker wrote, or a
  timeout / oom / error row with the end of its log. log_file: every worker's output is
  appended there under a '==== header rc=...' line."""
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    arg = "--worker=" + json.dumps({**spec, "result_file": path})
    cmd = bench_ddp.command(script, spec, arg) if spec.get("ddp") else [sys.executable, script,
                                                                          arg]
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
      log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      log, code = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout:.0f} s", "timeout"
    if log_file:
      with open(log_file, "a") as f:
        f.write(f"==== {header} rc={code}\n{log}\n")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  oom = "out of memory" in log.lower() or "RESOURCE_EXHAUSTED" in log
  status = "timeout" if code == "timeout" else "oom" if oom else "error"
  return {**spec, "status": status, "error": f"worker exit {code}: {log[-400:]}"}


def run_worker(spec: dict) -> dict:
  """Runs one (workload, framework) in this process; never raises."""
  return guarded(spec, _jax_worker if spec["framework"] == "jaxtune" else _torch_worker)
