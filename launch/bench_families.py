"""Training throughput of the newer families, jaxtune against transformers (+ peft), one table.

  python launch/bench_families.py --out_dir=bench_out                # both workloads, H200
  python launch/bench_families.py --workloads=qwen3moe_30b_lora --layers=24 --out_dir=o
  python launch/bench_families.py --smoke --out_dir=o                # tiny shapes on CPU

Workloads (random init, uniform random tokens, loss on every position):
  qwen3moe_30b_lora  Qwen3-30B-A3B's config.json (48 layers, hidden 2048, 128 experts, top-8,
                     expert width 768, 32/4 heads, head_dim 128, vocab 151936), bf16, LoRA
                     r16 alpha 32 on q/k/v/o and on the experts (jaxtune: per-expert factors
                     of gate_up_proj / down_proj; peer: peft's target_parameters, the same
                     adapters), batch 1 x seq 2048 by default. --layers=N keeps the first N
                     layers when the full model does not fit; the table says so.
  gemma2_2b_full     Gemma-2-2B's config.json (26 layers, hidden 2304, 8/4 heads, head_dim
                     256, vocab 256000, soft-caps, alternating 4096-token windows), bf16 full
                     fine-tuning, batch 4 x seq 2048 by default.
Both sides build the model from the same config.json dict: jaxtune through the family
registry (`hf.config.from_hf`), transformers through `AutoConfig.for_model`. Optimizer,
precision, timing and MFU follow launch/bench.py (AdamW lr 1e-5, betas 0.9/0.95, eps 1e-8,
clip 1.0; bf16 weights, compute and moments; adapters fp32; 4N (LoRA) or 6N (full) +
attention FLOPs per token from train/flops.py, N counting the k active experts, against
flops.PEAK_FLOPS). The peer runs eager PyTorch with transformers' default experts kernel
(grouped_mm on GPU; --peer_experts=eager for its Python loop) and attention (sdpa; Gemma 2:
eager, the implementation that applies its attention soft-cap), gradient checkpointing per
--peer_ckpt. Each (workload, framework) runs in its own subprocess; a run that fails says
why in its row ('oom' for out of memory). Results: OUT_DIR/bench_families.json and
OUT_DIR/bench_families.txt (the printed table).
"""

import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import bench_workers  # noqa: E402

FLAGS = flags.FLAGS

QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
    num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
    rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
    router_aux_loss_coef=0.001, use_sliding_window=False, attention_bias=False)
GEMMA2_2B = dict(
    model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
    num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    bos_token_id=2, eos_token_id=1, pad_token_id=0)
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
WORKLOADS = {
    "qwen3moe_30b_lora": dict(
        config=QWEN3_30B_A3B, method="lora", batch=1, peer_attn="sdpa", peer_ckpt=True,
        smoke=dict(QWEN3_30B_A3B, **TINY, intermediate_size=96, moe_intermediate_size=32,
                   num_experts=8, num_experts_per_tok=2),
        model=dict(remat="full", logits_chunk=2048),
        # Both grouped-matmul implementations (models/moe.py): XLA's ragged_dot, which
        # backends without a grouped kernel expand densely, and the blocked one.
        jax_variants=({"moe_impl": "ragged"}, {"moe_impl": "blocked"})),
    "gemma2_2b_full": dict(
        config=GEMMA2_2B, method="full", batch=4, peer_attn="eager", peer_ckpt=False,
        smoke=dict(GEMMA2_2B, **TINY, intermediate_size=128, sliding_window=16,
                   query_pre_attn_scalar=16),
        # No remat and unrolled layers, as the peer runs without checkpointing: 1.43x the
        # peer against 1.17x with full remat (12 layers, one H200; docs/BENCHMARKS.md).
        model=dict(remat="none", logits_chunk=2048, scan_layers=False)),
}
LORA = dict(rank=16, alpha=32.0)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
JAX_LORA_TARGETS = r"layers/self_attn/(q|k|v|o)_proj/kernel|layers/mlp/experts/\w+/kernel"


def define_flags() -> None:
  flags.DEFINE_list("workloads", list(WORKLOADS), f"Any of {', '.join(WORKLOADS)}.")
  flags.DEFINE_list("frameworks", ["torch", "jaxtune"], "torch (transformers + peft), jaxtune.")
  flags.DEFINE_integer("seq", 2048, "Sequence length (smoke: 32).")
  flags.DEFINE_integer("batch", 0, "Rows per step; 0 = the workload's (smoke: 2).")
  flags.DEFINE_integer("layers", 0, "Keep the first N layers (0 = all): when a model with its "
                       "adapters and activations does not fit; shown in the table.")
  flags.DEFINE_integer("warmup", 3, "Untimed steps (the first one compiles).")
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_enum("peer_ckpt", "auto", ["auto", "on", "off"],
                    "Peer gradient checkpointing; auto = the workload's (on for the MoE).")
  flags.DEFINE_string("peer_experts", "", "transformers experts_implementation for the "
                      "peer ('' = its default: grouped_mm on GPU; eager = the Python loop).")
  flags.DEFINE_string("jax_model", "", "Extra jaxtune ModelConfig options, k=v,k=v (remat, "
                      "logits_chunk, scan_layers, attention) over the workload's.")
  flags.DEFINE_string("profile_dir", "", "jaxtune rows: write the compiled HLO there and add "
                      "GPU time per step by kernel (a jax.profiler trace of 2 steps) to the row.")
  flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU, 1 warmup + 2 timed steps.")
  flags.DEFINE_integer("run_timeout", 1800, "Seconds before a run is killed.")
  flags.DEFINE_string("out_dir", "", "Write bench_families.json and .txt here.")
  flags.DEFINE_list("merge", [], "Print (and with --out_dir write) one table from these "
                    "bench_families.json files instead of running (runs split over several "
                    "commands keep their 'vs peer' column).")
  flags.DEFINE_string("worker", "", "Internal: JSON spec of one run.")


def hf_config(spec: dict) -> dict:
  """The config.json dict of a run: the workload's (or its smoke shape), layers cut."""
  wl = WORKLOADS[spec["workload"]]
  d = dict(wl["smoke"] if spec["smoke"] else wl["config"])
  if spec.get("layers"):
    d["num_hidden_layers"] = min(spec["layers"], d["num_hidden_layers"])
  return d


def model_cfg(spec: dict):
  """The jaxtune ModelConfig, through the families registry (config.json -> family)."""
  from jaxtune import config as config_lib
  from jaxtune.hf import config as hf_config_lib
  base = config_lib.ModelConfig(dtype="bfloat16", param_dtype="bfloat16", **spec["model"])
  return hf_config_lib.from_hf(hf_config(spec), base, source=spec["workload"])


def _jax_worker(spec: dict) -> dict:
  from launch import common
  common.set_xla_flags()
  import jax
  from jaxtune import config as config_lib
  from jaxtune import sharding
  from jaxtune.peft import lora
  from jaxtune.train import loop
  from jaxtune.train import setup
  mc = model_cfg(spec)
  method = WORKLOADS[spec["workload"]]["method"]
  cfg = config_lib.TrainConfig(
      model=mc, peft=config_lib.PeftConfig(
          method="none" if method == "full" else method, rank=LORA["rank"],
          alpha=LORA["alpha"], targets=JAX_LORA_TARGETS),
      optim=config_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0,
                                   weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0),
      train=config_lib.LoopConfig(max_steps=10_000))
  mesh = sharding.make_mesh(config_lib.MeshConfig(), devices=jax.devices()[:1])
  params = bench_workers._lean_init(mc, jax.random.PRNGKey(0), quantize=False)  # noqa: SLF001
  adapters = adapter_axes = None
  if method != "full":
    adapters = lora.init_from_config(mc, params, cfg.peft, key=jax.random.PRNGKey(2))
    adapter_axes = lora.axes(mc, adapters).params
  run = setup.build(cfg, mesh, params, mc, adapters=adapters, adapter_axes=adapter_axes)
  del params
  batch = loop.device_batch(bench_workers.make_batch(spec, mc.vocab_size), run.batch_sharding)
  state, losses, out = run.state, [], {}

  def step(state):
    state, metrics = run.train_step(state, run.frozen, batch)
    losses.append(metrics["loss"])
    return state, metrics

  t0 = time.perf_counter()
  for i in range(spec["warmup"]):
    state, metrics = step(state)
    if i == 0:
      jax.block_until_ready(metrics)
      out["first_step_s"] = time.perf_counter() - t0
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    state, metrics = step(state)
  jax.block_until_ready((state, metrics))
  out["step_s"] = (time.perf_counter() - t0) / spec["steps"]
  out["losses"] = [float(x) for x in jax.device_get(losses)]
  if "moe_aux_loss" in metrics:
    out["moe_aux_loss"] = float(metrics["moe_aux_loss"])
  if spec.get("profile_dir"):  # GPU time by kernel of 2 more steps (bench_workers._profile)
    tag = "_".join(f"{k}-{v}" for k, v in spec["model"].items() if k == "moe_impl") or "default"
    out["profile"] = bench_workers._profile(  # noqa: SLF001
        dict(spec, variant=tag), run, state, batch)
  out["peak_bytes"] = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
  out["device"] = jax.local_devices()[0].device_kind
  out["config_extra"] = ",".join(f"{k}={v}" for k, v in spec["model"].items())
  out["versions"] = {"jax": jax.__version__}
  return out


def _torch_worker(spec: dict) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import peft
  import torch
  import transformers
  dev = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
  wl = WORKLOADS[spec["workload"]]
  d = hf_config(spec)
  hf = transformers.AutoConfig.for_model(**d)
  hf.use_cache = False
  kw = dict(attn_implementation=wl["peer_attn"], dtype=torch.bfloat16)
  if spec.get("peer_experts"):
    kw["experts_implementation"] = spec["peer_experts"]
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.AutoModelForCausalLM.from_config(hf, **kw)
  if spec["peer_ckpt"]:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  if wl["method"] != "full":
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0, bias="none",
        target_modules=list(ATTN), target_parameters=EXPERT_PARAMS, task_type="CAUSAL_LM"))
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          fused=dev == "cuda")
  ids = torch.as_tensor(bench_workers.make_batch(spec, d["vocab_size"])["tokens"],
                        dtype=torch.long, device=dev)
  model.train()
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def step():
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
      loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=dev == "cuda")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  if dev == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  experts = getattr(model.config, "_experts_implementation_internal", None)
  experts = f"experts={experts}," if "num_experts" in d else ""
  out, losses = {"config_extra": f"attn={wl['peer_attn']},{experts}"
                                 f"ckpt={'on' if spec['peer_ckpt'] else 'off'}"}, []
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
  out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__}
  return out


def run_worker(spec: dict) -> dict:
  """One (workload, framework) in this process; never raises ('oom' / 'error' rows)."""
  return bench_workers.guarded(
      spec, _jax_worker if spec["framework"] == "jaxtune" else _torch_worker)


def _isolated(spec: dict) -> dict:
  return bench_workers.isolated(os.path.abspath(__file__), spec, FLAGS.run_timeout)


def _derive(r: dict) -> dict:
  """tokens/s, TFLOP/s and MFU (train/flops.py; MoE: k active experts) of an ok row."""
  from jaxtune.train import flops
  if r.get("status") != "ok":
    return r
  mc = model_cfg(r)
  fpt = flops.train_flops_per_token(mc, r["seq"],
                                    peft=WORKLOADS[r["workload"]]["method"] != "full")
  r["tokens_per_s"] = r["batch"] * r["seq"] / r["step_s"]
  r["tflops"] = fpt * r["tokens_per_s"] / 1e12
  peak = next((v for k, v in flops.PEAK_FLOPS.items() if k.lower() in r["device"].lower()), None)
  r["mfu"] = r["tflops"] * 1e12 / peak if peak else None
  return r


def table(results: list[dict]) -> str:
  """One row per run; 'vs peer' = jaxtune tokens/s over the torch row of its workload."""
  peer = {r["workload"]: r for r in results if r["framework"] == "torch" and r["status"] == "ok"}
  head = ("workload", "layers", "seq x batch", "framework", "config", "tokens/s", "TFLOP/s",
          "MFU", "peak GiB", "loss[0]", "vs peer")
  rows = [head]
  for r in results:
    ok = r.get("status") == "ok"
    full = WORKLOADS[r["workload"]]["smoke" if r["smoke"] else "config"]["num_hidden_layers"]
    n = hf_config(r)["num_hidden_layers"]
    p = peer.get(r["workload"])
    rows.append((
        r["workload"], f"{n}/{full}" + (" (cut to fit)" if n < full else ""),
        f"{r['seq']} x {r['batch']}", r["framework"],
        r.get("config_extra", "") if ok else f"{r['status']}: {r.get('error', '')[:70]}",
        f"{r['tokens_per_s']:,.0f}" if ok else "-", f"{r['tflops']:.1f}" if ok else "-",
        f"{100 * r['mfu']:.1f}%" if ok and r.get("mfu") else "-",
        f"{r['peak_bytes'] / 2**30:.1f}" if ok and r.get("peak_bytes") else "-",
        f"{r['losses'][0]:.3f}" if ok else "-",
        f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x"
        if ok and p and r["framework"] == "jaxtune" else ""))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def specs() -> list[dict]:
  out = []
  for wl in FLAGS.workloads:
    if wl not in WORKLOADS:
      raise app.UsageError(f"--workloads: unknown {wl!r} (expected one of "
                           f"{', '.join(WORKLOADS)})")
    w = WORKLOADS[wl]
    model = dict(w["model"])
    for part in filter(None, FLAGS.jax_model.split(",")):
      k, _, v = part.partition("=")
      model[k] = int(v) if v.isdigit() else {"true": True, "false": False}.get(v, v)
    if FLAGS.smoke:
      model["logits_chunk"] = 16
    base = dict(workload=wl, smoke=FLAGS.smoke, seq=32 if FLAGS.smoke else FLAGS.seq,
                batch=FLAGS.batch or (2 if FLAGS.smoke else w["batch"]), layers=FLAGS.layers,
                warmup=1 if FLAGS.smoke else FLAGS.warmup,
                steps=2 if FLAGS.smoke else FLAGS.steps, model=model,
                profile_dir=FLAGS.profile_dir)
    ckpt = {"on": True, "off": False}.get(FLAGS.peer_ckpt, w["peer_ckpt"])
    for fw in FLAGS.frameworks:
      if fw == "torch":
        out.append(dict(base, framework=fw, peer_ckpt=ckpt, peer_experts=FLAGS.peer_experts))
        continue
      seen = []
      for variant in w.get("jax_variants", ({},)):
        m = {**variant, **model}  # --jax_model wins over the variants: no duplicate rows
        if m not in seen:
          seen.append(m)
          out.append(dict(base, framework=fw, peer_ckpt=ckpt, model=m))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    spec = json.loads(FLAGS.worker)
    with open(spec["result_file"], "w") as f:
      json.dump(run_worker(spec), f)
    return
  results = []
  for path in FLAGS.merge:
    with open(path) as f:
      results += json.load(f)["results"]
  for spec in [] if FLAGS.merge else specs():
    print(f"running {spec['workload']} {spec['framework']} ...", file=sys.stderr, flush=True)
    res = _derive(_isolated(spec))
    print(f"  -> {res.get('status')} {res.get('tokens_per_s', 0):,.0f} tokens/s "
          f"{res.get('error', '')[:300]}", file=sys.stderr, flush=True)
    results.append(res)
    if FLAGS.out_dir:
      os.makedirs(FLAGS.out_dir, exist_ok=True)
      with open(os.path.join(FLAGS.out_dir, "bench_families.json"), "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "argv": sys.argv, "results": results}, f, indent=1)
  text = table(results)
  print(text)
  if FLAGS.out_dir:
    with open(os.path.join(FLAGS.out_dir, "bench_families.txt"), "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
