"""Training throughput of jaxtune against PyTorch + transformers + peft, side by side.

An engine that is correct but slower than the PyTorch stack gives users no reason to switch,
so this runs both on the same model shape, sequence length, batch, precision, LoRA targets
and optimizer, in one command, and prints one table (docs/BENCHMARKS.md has the numbers):

  python launch/bench.py --workloads=1b_full,1b_lora,1b_qlora --seq_lens=2048 --out=b.json
  python launch/bench.py --workloads=8b_lora,8b_qlora --seq_lens=4096
  python launch/bench.py --smoke          # tiny shapes on CPU: what tests/test_bench.py runs

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
(workload, framework) runs in its own subprocess, so memory never leaks between rows.
"""

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["1b_full", "1b_lora", "1b_qlora"],
                  "SHAPE_METHOD names: shapes 1b | 8b (tiny under --smoke), methods full | "
                  "lora | qlora.")
flags.DEFINE_list("seq_lens", ["2048"], "Sequence lengths.")
flags.DEFINE_integer("batch", 4, "Rows per step.")
flags.DEFINE_list("frameworks", ["torch", "jaxtune"], "Which sides to run.")
flags.DEFINE_enum("precision", "bf16", ["bf16", "mixed"], "See the module docstring.")
flags.DEFINE_integer("warmup", 3, "Untimed steps (the first one compiles).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_enum("peer_ckpt", "auto", ["auto", "on", "off"],
                  "Gradient checkpointing for the peer; auto = PEER_CKPT by shape.")
flags.DEFINE_string("jax_variants", "", "Extra jaxtune runs, ';'-separated NAME:k=v,k=v with "
                    "ModelConfig keys (remat, logits_chunk, attention, scan_layers), lib=DIR "
                    "(import jaxtune from DIR), noflags=1 (skip set_xla_flags), and last xla=+F+F "
                    "(add XLA flags). Empty: one run with TUNED.")
flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU, 1 warmup + 2 timed steps.")
flags.DEFINE_bool("isolate", True, "One subprocess per (workload, framework).")
flags.DEFINE_integer("run_timeout", 900, "Seconds before an isolated run is killed.")
flags.DEFINE_string("out", "", "Write all results as JSON here (rewritten after each run).")
flags.DEFINE_string("log_file", "", "Append every worker's output here.")
flags.DEFINE_string("profile_dir", "", "jaxtune: trace 2 more steps with jax.profiler, put the "
                    "top GPU kernels in the results and the optimised HLO text in this folder.")
flags.DEFINE_string("worker", "", "Internal: JSON spec of one run.")

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
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                 rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048,
                 rope=dict(_LLAMA3_ROPE, factor=32.0, original_max_position_embeddings=1024)),
}
# jaxtune model options per (shape, method), chosen by measurement (docs/BENCHMARKS.md).
TUNED = {
    ("1b", "full"): dict(remat="none", logits_chunk=4096, scan_layers=False),
    ("1b", "lora"): dict(remat="none", logits_chunk=4096, scan_layers=False),
    ("1b", "qlora"): dict(remat="none", logits_chunk=4096, scan_layers=False),
    ("8b", "lora"): dict(remat="full", logits_chunk=4096),
    ("8b", "qlora"): dict(remat="full", logits_chunk=4096),
    ("tiny", "full"): dict(remat="none", logits_chunk=24, scan_layers=False),
    ("tiny", "lora"): dict(remat="full", logits_chunk=0),
    ("tiny", "qlora"): dict(remat="none", logits_chunk=24),
}
PEER_CKPT = {"1b": False, "8b": True, "tiny": False}
LORA = dict(rank=16, alpha=32.0)
METHOD_NAMES = {"full": "full FT", "lora": "LoRA r16", "qlora": "QLoRA nf4"}


def _shape_cfg(shape: str, spec: dict):
  """jaxtune ModelConfig for a shape + the run's compute options."""
  from jaxtune import config as config_lib
  s = dict(SHAPES[shape])
  rope = config_lib.RopeScaling(**s.pop("rope"))
  opts = dict(spec["model"])
  return config_lib.ModelConfig(
      family="llama", rope_scaling=rope, dtype="bfloat16",
      param_dtype="bfloat16" if spec["precision"] == "bf16" else "float32", **s, **opts)


def _batch(spec: dict, vocab: int):
  import numpy as np
  rng = np.random.default_rng(0)
  b, t = spec["batch"], spec["seq"]
  seq = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
  return {"tokens": seq[:, :-1], "targets": seq[:, 1:],
          "loss_mask": np.ones((b, t), np.float32)}


def _lean_init(model_cfg, key, *, quantize: bool):
  """Random params like decoder.init, built one layer at a time so that setup's transient
  memory stays far below training's (jax cannot reset its peak counter); projections come
  out as NF4 QArrays directly when `quantize`, so no dense copy of the base ever exists."""
  import re
  import jax
  import jax.numpy as jnp
  from jaxtune import quant
  from jaxtune import tree
  from jaxtune.models import decoder
  from jaxtune.peft import qlora
  dtype = decoder.DTYPES[model_cfg.param_dtype]
  flat = {}
  for i, (path, shape) in enumerate(sorted(decoder.shapes(model_cfg).items())):
    k = jax.random.fold_in(key, i)
    if path.endswith(("scale", "bias")):
      flat[path] = jnp.ones(shape, dtype) if path.endswith("scale") else jnp.zeros(shape, dtype)
      continue
    std = 0.02 if path.endswith("embedding") else shape[-2] ** -0.5
    q = quantize and re.fullmatch(qlora.PROJECTIONS, path) is not None

    def one(k, shape=shape, std=std, q=q):
      w = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
      return quant.quantize_array(w, "nf4", 64) if q else w

    if path.startswith("layers/"):
      keys = jax.random.split(k, shape[0])
      flat[path] = jax.jit(lambda ks, one=one, s=shape[1:]: jax.lax.map(
          lambda kk: one(kk, s), ks))(keys)
    else:
      flat[path] = jax.jit(one)(k)
  return tree.unflatten(flat)


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
  from jaxtune.train import setup
  model_cfg = _shape_cfg(spec["shape"], spec)
  method = spec["method"]
  cfg = config_lib.TrainConfig(
      model=model_cfg,
      peft=config_lib.PeftConfig(method="none" if method == "full" else method,
                                 rank=LORA["rank"], alpha=LORA["alpha"]),
      optim=config_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0,
                                   weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0),
      train=config_lib.LoopConfig(max_steps=10_000))
  mesh = sharding.make_mesh(cfg.mesh)
  params = _lean_init(model_cfg, jax.random.PRNGKey(0), quantize=method == "qlora")
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
  batch = setup.global_batch(_batch(spec, model_cfg.vocab_size), run.batch_sharding)
  if jax.default_backend() == "gpu":
    text = run.train_step.lower(run.state, run.frozen, batch).as_text()
    out["cudnn_attention_calls"] = text.count("__cudnn$fmha")
  state, losses = run.state, []
  t0 = time.perf_counter()
  for i in range(spec["warmup"]):
    state, metrics = run.train_step(state, run.frozen, batch)
    if i == 0:
      jax.block_until_ready(metrics)
      out["first_step_s"] = time.perf_counter() - t0
    losses.append(metrics["loss"])
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    state, metrics = run.train_step(state, run.frozen, batch)
    losses.append(metrics["loss"])
  jax.block_until_ready((state, metrics))
  out["step_s"] = (time.perf_counter() - t0) / spec["steps"]
  out["losses"] = [float(x) for x in jax.device_get(losses)]
  if spec.get("profile_dir"):
    out["profile"] = _profile(spec, run, state, batch)
  stats = jax.local_devices()[0].memory_stats() or {}
  out["peak_bytes"] = stats.get("peak_bytes_in_use")
  out["device"] = jax.local_devices()[0].device_kind
  out["versions"] = {"jax": jax.__version__}
  return out


def _profile(spec: dict, run, state, batch, steps: int = 2) -> dict:
  """GPU time per step by kernel (top 30) and by trace line, from a jax.profiler trace."""
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
  for e in events:
    if e.get("ph") != "X" or "GPU" not in procs.get(e["pid"], ""):
      continue
    line = threads.get((e["pid"], e.get("tid")), "?")
    lines[line] += e.get("dur", 0) / 1e3 / steps
    if line.startswith("Stream"):
      kernels[e["name"][:90]] += e.get("dur", 0) / 1e3 / steps
  return {"ms_per_step_by_line": dict(lines.most_common(12)),
          "top_kernels_ms_per_step": kernels.most_common(30)}


def _torch_worker(spec: dict) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # jaxtune.hf.config imports jax: keep it off
  import torch
  import transformers
  import peft
  from jaxtune.hf import config as hf_config
  dev = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
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
  model_cfg = _shape_cfg(spec["shape"], spec)
  dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
  hf = transformers.LlamaConfig(**{k: v for k, v in hf_config.to_hf(model_cfg).items()
                                   if k not in ("torch_dtype", "dtype", "architectures")})
  hf.use_cache = False
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa",
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
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          fused=dev == "cuda")
  batch = _batch(spec, model_cfg.vocab_size)
  tokens = torch.as_tensor(batch["tokens"], dtype=torch.long, device=dev)
  model.train()
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=dev == "cuda")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  if dev == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  out, losses = {"config_extra": f"ckpt={'on' if ckpt else 'off'}"}, []
  t0 = time.perf_counter()
  for i in range(spec["warmup"]):
    losses.append(step())
    if i == 0:
      sync()
      out["first_step_s"] = time.perf_counter() - t0
  sync()
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    losses.append(step())
  sync()
  out["step_s"] = (time.perf_counter() - t0) / spec["steps"]
  out["losses"] = [float(x) for x in losses]
  out["peak_bytes"] = torch.cuda.max_memory_allocated() if dev == "cuda" else None
  out["device"] = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
  out["versions"] = versions
  return out


def _is_oom(e: BaseException) -> bool:
  text = f"{type(e).__name__} {e}"
  return any(s in text for s in ("RESOURCE_EXHAUSTED", "OutOfMemory", "out of memory",
                                 "Out of memory"))


def run_worker(spec: dict) -> dict:
  """Runs one (workload, framework) in this process; never raises."""
  t0 = time.perf_counter()
  try:
    fn = _jax_worker if spec["framework"] == "jaxtune" else _torch_worker
    res = {"status": "ok", **fn(spec)}
  except Exception as e:  # noqa: BLE001 (a row of the table says what failed)
    res = {"status": "oom" if _is_oom(e) else "error", "error": f"{type(e).__name__}: {e}"[:600]}
    traceback.print_exc()
  res["wall_s"] = time.perf_counter() - t0
  return {**{k: v for k, v in spec.items() if k != "result_file"}, **res}


def _isolated(spec: dict) -> dict:
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__),
           "--worker=" + json.dumps({**spec, "result_file": path})]
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                            timeout=FLAGS.run_timeout)
      log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      log, code = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT", "timeout"
    if FLAGS.log_file:
      with open(FLAGS.log_file, "a") as f:
        f.write(f"==== {spec['workload']} seq={spec['seq']} {spec['framework']} "
                f"{spec.get('variant', '')} rc={code}\n{log}\n")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  return {**spec, "status": "error", "error": f"worker exit {code}: {log[-400:]}"}


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
  seqs = [32] if FLAGS.smoke and FLAGS.seq_lens == ["2048"] else [int(s) for s in FLAGS.seq_lens]
  batch = 2 if FLAGS.smoke and FLAGS.batch == 4 else FLAGS.batch
  specs = []
  for seq in seqs:
    for wl in FLAGS.workloads:
      shape, method = wl.split("_")
      shape = "tiny" if FLAGS.smoke else shape
      base = dict(workload=f"{shape}_{method}", shape=shape, method=method, seq=seq,
                  batch=batch, precision=FLAGS.precision, smoke=FLAGS.smoke,
                  warmup=1 if FLAGS.smoke else FLAGS.warmup,
                  steps=2 if FLAGS.smoke else FLAGS.steps)
      for fw in FLAGS.frameworks:
        if fw == "torch":
          ckpt = {"on": True, "off": False}.get(FLAGS.peer_ckpt, PEER_CKPT[shape])
          specs.append(dict(base, framework="torch", variant="peer", peer_ckpt=ckpt, model={}))
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


def _derive(r: dict) -> dict:
  """Adds tokens/s, TFLOP/s, MFU from step_s and train/flops.py."""
  from jaxtune.train import flops
  if r.get("status") != "ok":
    return r
  model_cfg = _shape_cfg(r["shape"], r)
  tokens = r["batch"] * r["seq"]
  fpt = flops.train_flops_per_token(model_cfg, r["seq"], peft=r["method"] != "full")
  r["tokens_per_s"] = tokens / r["step_s"]
  r["tflops"] = fpt * r["tokens_per_s"] / 1e12
  peak = next((v for k, v in flops.PEAK_FLOPS.items() if k.lower() in r["device"].lower()), None)
  r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
  return r


def _config_str(r: dict) -> str:
  prec = "bf16" if r["precision"] == "bf16" else "fp32 master+bf16"
  if r["framework"] == "torch":
    return f"{prec} sdpa ckpt={'on' if r['peer_ckpt'] else 'off'}"
  m = r["model"]
  attn = m.get("attention", "auto")
  if attn == "auto" and r.get("cudnn_attention_calls") is not None:
    attn = "cudnn" if r["cudnn_attention_calls"] else "xla"
  extra = "".join(f" {k}={r[k]}" for k in ("lib", "noflags", "xla") if r.get(k))
  name = "" if r.get("variant") in ("tuned", None) else f"[{r['variant']}] "
  return (f"{name}{prec} attn={attn} remat={m.get('remat')} ce_chunk={m.get('logits_chunk')}"
          f"{'' if m.get('scan_layers', True) else ' unrolled'}{extra}")


def table(results: list[dict]) -> str:
  """The printed table: one row per run, the ratio against the peer's row of the same
  workload and sequence length."""
  peer = {(r["workload"], r["seq"]): r for r in results
          if r["framework"] == "torch" and r.get("status") == "ok"}
  head = ("workload", "seq", "framework", "config", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
          "vs peer")
  rows = [head]
  for r in results:
    shape, method = r["workload"].split("_")
    ok = r.get("status") == "ok"
    p = peer.get((r["workload"], r["seq"]))
    ratio = (f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x"
             if ok and p and r["framework"] != "torch" else "")
    rows.append((
        f"{shape} {METHOD_NAMES[method]}", str(r["seq"]), r["framework"],
        _config_str(r) if ok else f"{r.get('status')}: {r.get('error', '')[:60]}",
        f"{r['tokens_per_s']:,.0f}" if ok else "-",
        f"{r['tflops']:.1f}" if ok else "-",
        f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") else "-",
        f"{r['peak_bytes'] / 2**30:.1f}" if ok and r.get("peak_bytes") else "-",
        ratio))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
  """The issue's goals, checked against these results (only those the run covers)."""
  ok = {(r["workload"], r["seq"], r["framework"]): r for r in results
        if r.get("status") == "ok" and r.get("variant") in ("tuned", "peer")}
  anyr = {(r["workload"], r["seq"], r["framework"]): r for r in results
          if r.get("variant") in ("tuned", "peer")}
  out = []
  for (wl, seq, fw), r in sorted(ok.items()):
    if fw != "jaxtune":
      continue
    shape, method = wl.split("_")
    p = ok.get((wl, seq, "torch"))
    ratio = r["tokens_per_s"] / p["tokens_per_s"] if p else None
    rtxt = f"{ratio:.2f}x peer" if ratio else "no peer"
    if method == "full" and shape == "1b":
      met = ratio is not None and ratio >= 1.3 and (r.get("mfu") or 0) >= 0.5
      out.append(f"1B full FT seq {seq}: {rtxt}, MFU {100 * (r.get('mfu') or 0):.1f}% "
                 f"(goal >= 1.3x and >= 50%): {'MET' if met else 'not met'}")
    if method == "lora" and shape == "1b":
      out.append(f"1B LoRA seq {seq}: {rtxt} (goal >= 2x): "
                 f"{'MET' if ratio and ratio >= 2 else 'not met'}")
    if method == "qlora":
      own = ok.get((f"{shape}_lora", seq, "jaxtune"))
      bpp = r.get("base_bytes_per_param", {})
      if own:
        q = r["tokens_per_s"] / own["tokens_per_s"]
        out.append(f"{shape} QLoRA seq {seq}: {q:.2f}x own LoRA (goal >= 0.85x): "
                   f"{'MET' if q >= 0.85 else 'not met'}")
      if bpp:
        out.append(f"{shape} QLoRA base bytes/param: projections {bpp['projections']:.4f}, "
                   f"whole base incl. bf16 embeddings {bpp['whole_base']:.3f} (goal <= 0.55)")
    if shape == "8b" and seq >= 4096:
      pr = anyr.get((wl, seq, "torch"), {})
      mem = r.get("peak_bytes")
      if pr.get("status") == "ok" and mem and pr.get("peak_bytes"):
        met = mem <= pr["peak_bytes"]
        out.append(f"8B {METHOD_NAMES[method]} seq {seq}: fits, peak {mem / 2**30:.1f} GiB vs "
                   f"peer {pr['peak_bytes'] / 2**30:.1f} GiB: {'MET' if met else 'not met'}")
      else:
        out.append(f"8B {METHOD_NAMES[method]} seq {seq}: fits (peer: {pr.get('status')})")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    spec = json.loads(FLAGS.worker)
    res = run_worker(spec)
    with open(spec["result_file"], "w") as f:
      json.dump(res, f)
    return
  results = []
  for spec in _specs():
    print(f"running {spec['workload']} seq={spec['seq']} {spec['framework']} "
          f"{spec['variant']} ...", file=sys.stderr, flush=True)
    res = _derive(_isolated(spec) if FLAGS.isolate else run_worker(spec))
    print(f"  -> {res.get('status')} {res.get('tokens_per_s', 0):,.0f} tokens/s "
          f"{res.get('error', '')[:200]}", file=sys.stderr, flush=True)
    results.append(res)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "argv": sys.argv, "results": results}, f, indent=1)
  print(table(results))
  for line in goals(results):
    print("goal: " + line)


if __name__ == "__main__":
  app.run(main)
