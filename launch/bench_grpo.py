"""GRPO step time of jaxtune against TRL's GRPOTrainer on the same GPU, in one command.

  python launch/bench_grpo.py --out=grpo_1b.json        # the grpo_1b workload (defaults)
  python launch/bench_grpo.py --smoke                   # tiny shapes on CPU (tests)
  python launch/bench.py --workloads=grpo_1b            # the same, through bench.py

Both sides, unless a line says otherwise (the grpo_1b workload of issue 11):
  model      Llama-3.2-1B shape (bench_workers.SHAPES["1b"]), random init, bf16 weights and
             compute; LoRA r16, alpha 32, all 7 projections, no dropout (--method=full: all
             weights). AdamW lr 1e-6, grad-norm clip 1.0.
  rollout    --prompts=32 prompts of --prompt_len=128 uniform random tokens, G=--generations=8
             completions each, exactly --new=256 tokens (early stop off: jaxtune samples with
             no eos id; TRL with min_new_tokens=new), temperature 1, no top-k / top-p.
  tokenizer  a word-level tokenizer built in-process over the shape's vocabulary ("t<i>" is
             token i; 0 = pad, 1 = eos), so a prompt string of 128 words is 128 tokens on both
             sides and completions decode cheaply.
  reward     the share of even token ids in the completion (a function of completion_ids:
             what it scores does not matter for speed, only that groups differ).
  update     one policy update per rollout (num_iterations 1), beta 0 (TRL's default: no
             reference model), so neither side needs an old-log-prob forward; loss token
             mean (jaxtune token_mean, TRL dapo).
  jaxtune    the real path: method=grpo's Rollouts (jaxtune.sampling with the current
             adapters, scorer, group advantages, batch assembly) and setup.build's jitted
             step; model options TUNED below (chunked logits), --jax_grad_accum micro-batches.
  TRL        GRPOTrainer with its default generation backend, transformers `generate`
             (vLLM is not installed on the GPU machine, and TRL's vLLM modes need it: said
             in the table), sdpa attention, gradient checkpointing (how HF fits 256 x 384
             tokens of a 128k vocabulary), per_device_train_batch_size --trl_micro_batch with
             gradient accumulation over the rollout's P x G rows (one generation per step).
Timing: --warmup untimed steps (compiles), then --steps timed ones. Per step: `rollout`
(sampling + rewards + batch: jaxtune's Rollouts call, TRL's _generate_and_score_completions),
of which `generate` (the sampler alone: jaxtune's sampling.generate, TRL's _generate), and
`update` (the rest of the step). Rollout tokens/s = P x G x new / generate seconds. Each side
runs in its own subprocess; the table and --out JSON carry both, their ratio, and the goals of
issue 11 (step >= 4x faster than TRL; rollout >= 60k tokens/s).

trl and datasets are not on the GPU machine: carry them as wheels (docs/BENCHMARKS.md).
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
PAD, EOS = 0, 1
TUNED = dict(remat="full", logits_chunk=4096, scan_layers=False)


# The grpo_1b workload; each is also a flag.
DEFAULTS = dict(method="lora", prompts=32, generations=8, prompt_len=128, new=256, warmup=1,
                steps=3, jax_grad_accum=4, trl_micro_batch=32)
SMOKE = dict(prompts=2, generations=2, prompt_len=8, new=8, warmup=1, steps=1,
             jax_grad_accum=1, trl_micro_batch=4)
HELP = dict(method="lora (r16) | full", prompts="Prompts per rollout (P).",
            generations="Completions per prompt (G).", prompt_len="Prompt tokens.",
            new="Completion tokens (early stop off).", warmup="Untimed steps (compiles).",
            steps="Timed steps.", jax_grad_accum="jaxtune micro-batches per update.",
            trl_micro_batch="TRL per_device_train_batch_size (rows).")


def define_flags() -> None:
  flags.DEFINE_list("frameworks", ["jaxtune", "trl"], "Which sides to run.")
  for name, value in DEFAULTS.items():
    define = flags.DEFINE_string if isinstance(value, str) else flags.DEFINE_integer
    define(name, value, HELP[name])
  flags.DEFINE_bool("smoke", False, "Tiny shape, P=2, G=2, 8+8 tokens, on CPU.")
  flags.DEFINE_integer("run_timeout", 1500, "Seconds before a side's subprocess is killed.")
  flags.DEFINE_string("out", "", "Write the results as JSON here.")
  flags.DEFINE_string("worker", "", "Internal: JSON spec of one run.")


def even_share(prompts, completions, completion_ids, **_):
  """The bench reward: share of even token ids in each completion."""
  del prompts, completions
  return [sum(int(t) % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def word_tokenizer(vocab: int):
  """A fast tokenizer where the word "t<i>" is token i (0 = <pad>, 1 = <eos>)."""
  import tokenizers
  import transformers
  words = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, vocab)}}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)  # joins with " "
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              eos_token="<eos>")


def prompt_ids(spec: dict, vocab: int, step: int):
  import numpy as np
  rng = np.random.default_rng(step)
  return rng.integers(2, vocab, (spec["prompts"], spec["prompt_len"])).astype(np.int32)


def shape_config(spec: dict):
  import dataclasses
  from launch import bench_workers
  cfg = bench_workers.shape_cfg(spec["shape"], {"model": spec["model"], "precision": "bf16"})
  return dataclasses.replace(cfg, eos_token_id=(), pad_token_id=PAD, bos_token_id=-1)


class _Prompts:
  """Stands in for the data loader: P random prompts per rollout, all prompt_len long."""

  def __init__(self, spec: dict, vocab: int):
    import numpy as np
    self.spec, self.vocab, self.step, self.pad_id, self.np = spec, vocab, 0, PAD, np

  def __next__(self):
    ids = prompt_ids(self.spec, self.vocab, self.step)
    self.step += 1
    return {"prompt_tokens": ids, "prompt_mask": self.np.ones_like(ids), "answers": None}


def _jax_worker(spec: dict) -> dict:
  from launch import common
  common.set_xla_flags()
  import types
  import jax
  from jaxtune import config as config_lib
  from jaxtune import sampling
  from jaxtune import sharding
  from jaxtune.methods import base
  from jaxtune.methods import grpo
  from jaxtune.methods import grpo_batch
  from jaxtune.peft import lora
  from jaxtune.train import setup
  from launch import bench_workers
  model_cfg = shape_config(spec)
  p, g = spec["prompts"], spec["generations"]
  cfg = config_lib.TrainConfig(
      method="grpo", model=model_cfg,
      peft=config_lib.PeftConfig(method="none" if spec["method"] == "full" else "lora",
                                 rank=16, alpha=32.0),
      optim=config_lib.OptimConfig(lr=1e-6, schedule="constant", warmup_steps=0,
                                   weight_decay=0.0, clip_norm=1.0,
                                   grad_accum=spec["jax_grad_accum"]),
      data=config_lib.DataConfig(seq_len=spec["prompt_len"], batch_size=p),
      train=config_lib.LoopConfig(max_steps=10_000, seed=0),
      checkpoint=config_lib.CheckpointConfig(every_steps=1),
      grpo=config_lib.GrpoConfig(num_generations=g, max_new_tokens=spec["new"],
                                 temperature=1.0, beta=0.0, loss_agg="token_mean",
                                 reward_fns="launch.bench_grpo:even_share"))
  grpo.check(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  params = bench_workers._lean_init(model_cfg, jax.random.PRNGKey(0), quantize=False)  # noqa: SLF001
  adapters = axes = None
  if spec["method"] != "full":
    adapters = lora.init_from_config(model_cfg, params, cfg.peft, key=jax.random.PRNGKey(2))
    axes = lora.axes(model_cfg, adapters).params
  obj = grpo.make_objective(model_cfg, cfg.grpo, adapters=adapters,
                            constrain=sharding.constrainer(mesh), reference="none")
  run = setup.build(cfg, mesh, params, model_cfg, objective=obj, adapters=adapters,
                    adapter_axes=axes)
  del params
  ctx = base.Context(cfg=cfg, model_cfg=model_cfg, mesh=mesh, params=None,
                     adapters=adapters, tokenizer=word_tokenizer(model_cfg.vocab_size),
                     data=types.SimpleNamespace(train=_Prompts(spec, model_cfg.vocab_size)))
  rollouts = grpo.Rollouts(ctx, run, grpo_batch.Scorer.build(ctx))
  gen_s = []
  real_generate = sampling.generate

  def timed_generate(*a, **kw):
    t = time.perf_counter()
    out = real_generate(*a, **kw)  # returns host lists: already synchronised
    gen_s.append(time.perf_counter() - t)
    return out

  grpo.sampling = types.SimpleNamespace(generate=timed_generate)
  try:
    rows, losses = _jax_steps(spec, run, rollouts, gen_s)
  finally:
    grpo.sampling = sampling
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"rows": rows, "losses": losses, "peak_bytes": stats.get("peak_bytes_in_use"),
          "device": jax.local_devices()[0].device_kind,
          "versions": {"jax": jax.__version__}, "config_extra": json.dumps(spec["model"])}


def _jax_steps(spec: dict, run, rollouts, gen_s: list) -> tuple[list, list]:
  import jax
  from jaxtune.train import loop
  rows, losses = [], []
  for i in range(spec["warmup"] + spec["steps"]):
    t0 = time.perf_counter()
    batch = next(rollouts)
    t1 = time.perf_counter()
    run.state, metrics = run.train_step(run.state, run.frozen,
                                        loop.device_batch(batch, run.batch_sharding))
    jax.block_until_ready((run.state, metrics))
    t2 = time.perf_counter()
    losses.append(float(metrics["loss"]))
    if i >= spec["warmup"]:
      rows.append({"rollout_s": t1 - t0, "generate_s": gen_s[-1], "update_s": t2 - t1})
    gen_lens = batch["loss_mask"].sum(-1)
    assert (gen_lens == spec["new"]).all(), f"completions of {set(gen_lens)} tokens"
  return rows, losses


def run_worker(spec: dict) -> dict:
  """One side, with its status; never raises (a failure is a row that says why)."""
  try:
    from launch import bench_grpo_trl  # pylint: disable=g-import-not-at-top
    fn = _jax_worker if spec["framework"] == "jaxtune" else bench_grpo_trl.run
    out = {**spec, **fn(spec), "status": "ok"}
  except Exception as e:  # noqa: BLE001  one side failing must not lose the other's row
    oom = "out of memory" in str(e).lower() or "RESOURCE_EXHAUSTED" in str(e)
    out = {**spec, "status": "oom" if oom else "error",
           "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]}
  return summarise(out)


def summarise(r: dict) -> dict:
  """Median seconds per phase over the timed steps and rollout tokens/s."""
  import statistics
  if r.get("status") != "ok" or not r.get("rows"):
    return r
  med = {k: statistics.median(row[k] for row in r["rows"])
         for k in ("rollout_s", "generate_s", "update_s")}
  r.update(med, step_s=med["rollout_s"] + med["update_s"])
  r["rollout_tokens_per_s"] = r["prompts"] * r["generations"] * r["new"] / med["generate_s"]
  return r


def _isolated(spec: dict, timeout: int) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "result.json")
    cmd = [sys.executable, os.path.abspath(__file__),
           f"--worker={json.dumps({**spec, 'result_file': path})}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if spec["framework"] != "jaxtune":
      env["JAX_PLATFORMS"] = "cpu"
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True,
                            text=True, check=False)
    except subprocess.TimeoutExpired:
      return {**spec, "status": "timeout", "error": f"killed after {timeout} s"}
    if not os.path.isfile(path):
      return {**spec, "status": "error", "error": (proc.stderr or proc.stdout)[-2000:]}
    with open(path) as f:
      return json.load(f)


def specs(frameworks, *, smoke: bool = False, **kw) -> list[dict]:
  """One spec per side: DEFAULTS updated by kw (the flags), or SMOKE with smoke."""
  w = {**DEFAULTS, **kw, **(SMOKE if smoke else {})}
  base = dict(w, workload=f"grpo_{'tiny' if smoke else '1b'}", shape="tiny" if smoke else "1b",
              smoke=smoke, model={} if smoke else dict(TUNED))
  return [dict(base, framework=fw) for fw in frameworks]


def table(results: list[dict]) -> str:
  """Markdown: one row per side, seconds per phase, tokens/s, and the ratio to TRL."""
  trl_row = next((r for r in results if r["framework"] == "trl" and r["status"] == "ok"), None)
  head = ("workload", "framework", "status", "step s", "rollout s", "generate s", "update s",
          "rollout tok/s", "peak GiB", "step vs TRL", "config")
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    ok = r["status"] == "ok"
    f = lambda k, fmt="{:.2f}": fmt.format(r[k]) if ok else "-"  # noqa: E731
    peak = f"{r['peak_bytes'] / 2**30:.1f}" if ok and r.get("peak_bytes") else "-"
    ratio = f"{trl_row['step_s'] / r['step_s']:.2f}x" if ok and trl_row else "-"
    lines.append("| " + " | ".join([
        r["workload"], r["framework"], r["status"] + (f": {r['error'][:80]}" if not ok else ""),
        f("step_s"), f("rollout_s"), f("generate_s"), f("update_s"),
        f("rollout_tokens_per_s", "{:,.0f}"), peak, ratio, str(r.get("config_extra", ""))]) + " |")
  return "\n".join(lines)


def goals(results: list[dict]) -> list[str]:
  by = {r["framework"]: r for r in results if r["status"] == "ok"}
  if "jaxtune" not in by:
    return ["jaxtune did not run: no verdict"]
  j = by["jaxtune"]
  out = [f"rollout >= 60k tokens/s inside the step: {j['rollout_tokens_per_s']:,.0f} -> "
         f"{'MET' if j['rollout_tokens_per_s'] >= 60e3 else 'NOT MET'}"]
  if "trl" in by:
    ratio = by["trl"]["step_s"] / j["step_s"]
    out.append(f"GRPO step >= 4x faster than TRL GRPOTrainer: {ratio:.2f}x -> "
               f"{'MET' if ratio >= 4 else 'NOT MET'}")
  return out


def run_all(spec_list: list[dict], *, timeout: int, out: str = "") -> list[dict]:
  """Each side in its own subprocess; prints the table and the goals; returns the rows."""
  results = []
  for spec in spec_list:
    print(f"running {spec['workload']} {spec['framework']} ...", file=sys.stderr, flush=True)
    res = summarise(_isolated(spec, timeout))
    print(f"  -> {res['status']} {res.get('error', '')[:300]}", file=sys.stderr, flush=True)
    results.append(res)
    if out:
      with open(out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "argv": sys.argv, "results": results}, f, indent=1)
  print(table(results))
  for line in goals(results):
    print("goal: " + line)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.worker:
    spec = json.loads(FLAGS.worker)
    with open(spec["result_file"], "w") as f:
      json.dump(run_worker(spec), f)
    return
  run_all(specs(FLAGS.frameworks, smoke=FLAGS.smoke, **{k: FLAGS[k].value for k in DEFAULTS}),
          timeout=FLAGS.run_timeout, out=FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
