"""Training throughput of the PEFT methods beyond LoRA, jaxtune against peft, on one GPU.

DoRA, IA3 and prompt tuning cost differently per step than LoRA (DoRA recomputes its weight
norms every step; peft's DoRA materialises W + BA for that). This runs each method's real
jaxtune train step (`setup.build`, as launch/bench.py does for LoRA) and the same method in
PyTorch + transformers + peft, on the Llama-3.2-1B shape of launch/bench_workers.py, bf16,
and prints one table (tokens/s counts the real tokens; prompt tuning adds its 20 virtual
tokens to every row on both sides, prefix tuning 20 keys and values per layer,
LLaMA-Adapter 10 adaption prompts in every layer):

  python launch/bench_peft.py --frameworks=jaxtune,torch      # all methods, both sides
  python launch/bench_peft.py --smoke     # tiny shapes on CPU

Each (method, framework) runs in its own process, so memory never leaks between rows.
Settings both sides share: launch/bench.py's docstring (AdamW, lr 1e-5, clip 1.0, batch 4,
LoRA/DoRA rank 16 alpha 32 on all 7 projections; IA3 on k, v, down_proj; 20 virtual tokens).
"""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import bench  # noqa: E402
from launch import bench_workers  # noqa: E402

FLAGS = flags.FLAGS
VIRTUAL = 20
TUNED_1B = bench.TUNED[("1b", "lora")]


def _jax_step(spec: dict):
  from launch import common
  common.set_xla_flags()
  import jax
  from jaxtune import config as config_lib
  from jaxtune import peft
  from jaxtune import sharding
  from jaxtune.train import loop
  from jaxtune.train import setup
  model_cfg = bench_workers.shape_cfg(spec["shape"], spec)
  cfg = config_lib.TrainConfig(
      model=model_cfg,
      peft=config_lib.PeftConfig(method=spec["method"], rank=16, alpha=32.0,
                                 num_virtual_tokens=VIRTUAL, prompt_init="sample_vocab",
                                 adapter_len=10, adapter_layers=0),
      optim=config_lib.OptimConfig(lr=1e-5, schedule="constant", warmup_steps=0,
                                   weight_decay=0.0, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0),
      train=config_lib.LoopConfig(max_steps=10_000))
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  params = bench_workers._lean_init(model_cfg, jax.random.PRNGKey(0), quantize=False)
  method = peft.get(spec["method"])
  adapters = method.init(model_cfg, params, cfg.peft, jax.random.PRNGKey(2))
  run = setup.build(cfg, mesh, params, model_cfg, adapters=adapters,
                    adapter_axes=method.axes(model_cfg, adapters).params)
  del params
  batch = loop.device_batch(bench_workers.make_batch(spec, model_cfg.vocab_size),
                            run.batch_sharding)
  trainable = sum(x.size for x in jax.tree.leaves(adapters.params))
  state = {"s": run.state}

  def step():
    state["s"], metrics = run.train_step(state["s"], run.frozen, batch)
    return metrics["loss"]

  def peak():
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

  return step, jax.block_until_ready, trainable, peak, {"jax": jax.__version__}


def _torch_step(spec: dict):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import peft
  import torch
  import transformers
  from jaxtune.hf import config as hf_config
  dev = "cuda" if torch.cuda.is_available() and not spec["smoke"] else "cpu"
  model_cfg = bench_workers.shape_cfg(spec["shape"], spec)
  hf = transformers.LlamaConfig(**{k: v for k, v in hf_config.to_hf(model_cfg).items()
                                   if k not in ("torch_dtype", "dtype", "architectures")})
  hf.use_cache = False
  torch.manual_seed(0)
  with torch.device(dev):
    model = transformers.LlamaForCausalLM._from_config(hf, attn_implementation="sdpa",
                                                       dtype=torch.bfloat16)
  all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  pc = {"lora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=all7,
                                        task_type="CAUSAL_LM"),
        "dora": lambda: peft.LoraConfig(r=16, lora_alpha=32, target_modules=all7,
                                        use_dora=True, task_type="CAUSAL_LM"),
        "ia3": lambda: peft.IA3Config(task_type="CAUSAL_LM"),
        "prompt_tuning": lambda: peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL),
        "llama_adapter": lambda: peft.AdaptionPromptConfig(
            task_type="CAUSAL_LM", adapter_len=10, adapter_layers=model_cfg.num_layers),
        }[spec["method"]]()
  model = peft.get_peft_model(model, pc)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                          fused=dev == "cuda")
  tokens = torch.as_tensor(bench_workers.make_batch(spec, model_cfg.vocab_size)["tokens"],
                           dtype=torch.long, device=dev)
  model.train()
  if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def step():
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=dev == "cuda")
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  peak = (lambda: torch.cuda.max_memory_allocated()) if dev == "cuda" else (lambda: None)
  return step, sync, sum(p.numel() for p in params), peak, {"torch": torch.__version__,
                                                            "peft": peft.__version__}


def worker(spec: dict) -> dict:
  """One (method, framework): warmup + timed steps; tokens/s of the real tokens."""
  step, sync, trainable, peak, versions = (_jax_step if spec["framework"] == "jaxtune"
                                           else _torch_step)(spec)
  losses = []
  for _ in range(spec["warmup"]):
    losses.append(step())
  sync(losses[-1])
  t0 = time.perf_counter()
  for _ in range(spec["steps"]):
    losses.append(step())
  sync(losses[-1])
  dt = (time.perf_counter() - t0) / spec["steps"]
  return {**spec, "status": "ok", "step_s": dt, "tokens_per_s": spec["batch"] * spec["seq"] / dt,
          "trainable": int(trainable), "peak_gib": (peak() or 0) / 2**30,
          "losses": [float(x) for x in losses], "versions": versions}


def main(argv):
  del argv
  if FLAGS.worker:
    spec = json.loads(FLAGS.worker)
    try:
      res = worker(spec)
    except Exception as e:  # noqa: BLE001 (the row says what failed)
      res = {**spec, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
    print("RESULT " + json.dumps(res), flush=True)
    return
  smoke = FLAGS.smoke
  rows = []
  for method in FLAGS.methods:
    for fw in FLAGS.frameworks:
      spec = dict(method=method, framework=fw, shape="tiny" if smoke else "1b",
                  seq=32 if smoke else FLAGS.seq, batch=2 if smoke else FLAGS.batch,
                  precision="bf16", smoke=smoke, warmup=1 if smoke else 3,
                  steps=2 if smoke else FLAGS.steps,
                  model=dict(remat="full", logits_chunk=0) if smoke else TUNED_1B)
      p = subprocess.run([sys.executable, os.path.abspath(__file__),
                          "--worker=" + json.dumps(spec)], capture_output=True, text=True,
                         timeout=900)
      res = [json.loads(l[7:]) for l in p.stdout.splitlines() if l.startswith("RESULT ")]
      res = res[0] if res else {**spec, "status": "error", "error": p.stderr[-500:]}
      rows.append(res)
      print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
  print("| method | framework | trainable | tokens/s | step ms | peak GiB | vs peft "
        "| vs own LoRA |")
  print("|---|---|---|---|---|---|---|---|")
  ok = {(r["method"], r["framework"]): r for r in rows if r["status"] == "ok"}
  for r in rows:
    if r["status"] != "ok":
      print(f"| {r['method']} | {r['framework']} | {r['status']}: {r.get('error', '')[:80]} |")
      continue
    peer = ok.get((r["method"], "torch"))
    own = ok.get(("lora", r["framework"]))
    vs = (f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if peer and r["framework"] !=
          "torch" else "")
    lo = f"{r['tokens_per_s'] / own['tokens_per_s']:.2f}x" if own else ""
    print(f"| {r['method']} | {r['framework']} | {r['trainable']:,} | {r['tokens_per_s']:,.0f} | "
          f"{1e3 * r['step_s']:.1f} | {r['peak_gib']:.1f} | {vs} | {lo} |")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  flags.DEFINE_list("methods", ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning",
                               "llama_adapter"], "PEFT methods.")
  flags.DEFINE_list("frameworks", ["jaxtune", "torch"], "Which sides to run.")
  flags.DEFINE_integer("seq", 2048, "Real tokens per row.")
  flags.DEFINE_integer("batch", 4, "Rows per step.")
  flags.DEFINE_integer("steps", 10, "Timed steps (after 3 warmup steps).")
  flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU.")
  flags.DEFINE_string("out", "", "Write the results as JSON here.")
  flags.DEFINE_string("worker", "", "Internal: JSON spec of one run.")
  app.run(main)
