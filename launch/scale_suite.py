"""Scale-out measurements on one host with 2 GPUs, in one command: what issue 15 asks for.

  python launch/scale_suite.py --out=DIR            # 2x H200, about 9 minutes
  python launch/scale_suite.py --out=DIR --smoke    # tiny shapes on CPU (8 simulated devices)

Stages (each in its own subprocess, so memory never leaks between them; a stage that would
start after --budget_s is skipped and says so), in this order:

  GPU 0: bench_1gpu   launch/bench.py 1B full FT and LoRA (jaxtune, seq 2048, batch 4);
         train_1gpu   launch/train.py, sft_chat recipe at the Llama-3.2-1B shape (random
                      init, the bundled chat sample packed into 2048-token rows), batch 8;
  GPU 1, meanwhile: plan_checks   `memory.plan` of 1B full FT, 1B LoRA and 8B QLoRA (seq
                      4096), then the same step run for real (weights made one param at a
                      time, so setup adds no peak) and its peak_bytes_in_use: predicted vs
                      measured, each check in a process of its own (the peak counter never
                      resets within one); then train.micro_batch=auto on 1B LoRA with 64 rows of 2048
                      tokens: the chosen micro-batch runs, and the next larger one is tried;
  both GPUs: train_2gpu   launch/train.py on 2 GPUs in one process, batch 16;
             bench_data2  the bench with --mesh=data=2, batch 8 (4 per GPU);
             train_2proc  launch/train.py as 2 processes (one per GPU, jax.distributed on
                          127.0.0.1), batch 16; its losses are compared with train_2gpu's;
             bench_fsdp2  the bench with --mesh=fsdp=2, batch 8.
launch/train.py tokens/s is the median of metrics.jsonl's tokens_per_s after step 3. All
stages share one compilation cache (/tmp/jaxtune_scale_cache: XLA's autotuning results too).

Writes DIR/scale.json (every number) and DIR/scale.md (the tables), DIR/log.txt (every
subprocess's output). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 etc. are kept as the
machine sets them, and set if missing).
"""

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import scale_checks  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "scale_out", "Directory for scale.json, scale.md and log.txt.")
flags.DEFINE_bool("smoke", False, "Tiny shapes on CPU with simulated devices.")
flags.DEFINE_integer("budget_s", 470, "Skip stages that would start after this many seconds "
                     "(a stage already running may take a minute or two more).")
flags.DEFINE_integer("train_steps", 10, "launch/train.py steps per run.")
flags.DEFINE_list("stages", [], "Run only these stages (names as in the list above; "
                  "train_2proc runs both processes); default: all.")
flags.DEFINE_string("worker", "", "Internal: run one planner check (JSON spec).")

CACHE_DIR = "/tmp/jaxtune_scale_cache"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
LLAMA_1B = ["model.family=llama", "model.vocab_size=128256", "model.hidden_size=2048",
            "model.intermediate_size=8192", "model.num_layers=16", "model.num_heads=32",
            "model.num_kv_heads=8", "model.head_dim=64", "model.tie_word_embeddings=true",
            "model.rope_theta=500000", "model.rms_norm_eps=1e-5"]
TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16"]


def _env(gpus: str | None = None, cpu_devices: int = 0) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
  # One compilation cache for every stage: XLA's GPU autotuning results are shared too, so
  # a fusion tuned on one GPU is not tuned again for the 2-GPU runs of the same per-device
  # shapes (the compiles of the 1B unrolled layers are most of each stage's time).
  env.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE_DIR)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  for k, v in NO_MULTICAST.items():
    env.setdefault(k, v)
  if gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = gpus
  if cpu_devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={cpu_devices}"
    env["JAX_PLATFORMS"] = "cpu"
  return env


class Suite:
  """Runs stages, logs their output, keeps the results."""

  def __init__(self, out: str, smoke: bool, budget_s: int):
    self.out, self.smoke, self.budget = out, smoke, budget_s
    self.t0 = time.monotonic()
    self.results: dict = {"smoke": smoke, "stages": {}}
    os.makedirs(out, exist_ok=True)

  def left(self) -> float:
    return self.budget - (time.monotonic() - self.t0)

  def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen | None:
    if FLAGS.stages and not name.startswith(tuple(FLAGS.stages)):
      return None
    if self.left() <= 0:
      self.results["stages"][name] = {"status": "skipped (budget)"}
      return None
    log = open(os.path.join(self.out, f"log_{name}.txt"), "w")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    proc.name, proc.log, proc.t0 = name, log, time.monotonic()
    return proc

  def wait(self, proc: subprocess.Popen | None) -> bool:
    if proc is None:
      return False
    try:
      code = proc.wait(timeout=max(self.left() + 60, 30))
    except subprocess.TimeoutExpired:
      proc.kill()
      code = "timeout"
    proc.log.close()
    self.results["stages"][proc.name] = {"status": "ok" if code == 0 else f"exit {code}",
                                         "wall_s": round(time.monotonic() - proc.t0, 1)}
    with open(os.path.join(self.out, f"log_{proc.name}.txt")) as f:
      tail = f.read()[-3000:]
    if code != 0:
      self.results["stages"][proc.name]["tail"] = tail
    self.save()
    return code == 0

  def save(self) -> None:
    with open(os.path.join(self.out, "scale.json"), "w") as f:
      json.dump(self.results, f, indent=1)


def _bench_cmd(suite: Suite, name: str, mesh: str, batch: int) -> list[str]:
  cmd = [sys.executable, os.path.join(ROOT, "launch", "bench.py"),
         "--workloads=1b_full,1b_lora", "--frameworks=jaxtune", f"--batch={batch}",
         f"--mesh={mesh}", f"--out={os.path.join(suite.out, name + '.json')}"]
  return cmd + (["--smoke", "--noisolate"] if suite.smoke else
                ["--seq_lens=2048", "--warmup=2", "--steps=6", "--run_timeout=300"])


def _train_cmd(suite: Suite, workdir: str, batch: int, extra=()) -> list[str]:
  shape = TINY + ["data.seq_len=128"] if suite.smoke else LLAMA_1B
  sets = ["model.hf_path=", *shape, f"data.batch_size={batch}",
          f"train.max_steps={FLAGS.train_steps}", "train.eval_every=0", "train.log_every=1",
          "train.progress=false", "checkpoint.every_steps=100000", "checkpoint.export_hf=false",
          "checkpoint.async_save=false"]
  return [sys.executable, os.path.join(ROOT, "launch", "train.py"),
          "--config=configs/sft_chat.py", f"--workdir={workdir}",
          *[f"--set={s}" for s in sets], *extra]


def _fresh(workdir: str) -> str:
  """An empty workdir: a checkpoint or metrics file left by an earlier suite run would be
  resumed from (or refused) and its losses read as this run's."""
  shutil.rmtree(workdir, ignore_errors=True)
  return workdir


def _train_stats(workdir: str) -> dict:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  rows = [json.loads(l) for l in open(path) if l.strip()]
  # The last row's rate is the whole timing window's (every step after the compiling one).
  rated = [r for r in rows if "tokens_per_s" in r]
  return {"tokens_per_s": rated[-1]["tokens_per_s"] if rated else None,
          "mfu": rated[-1].get("mfu", float("nan")) if rated else float("nan"),
          "losses": {r["step"]: r["loss"] for r in rows if "loss" in r}}


def _stage_one_gpu(suite: Suite) -> None:
  """GPU 0: bench on one GPU, then train.py on one GPU; GPU 1: the planner checks."""
  cpu = 8 if suite.smoke else 0
  gpu0 = _env("0", cpu)
  plan_proc = suite.start("plan_checks", [sys.executable, os.path.abspath(__file__),
                                           "--worker=" + json.dumps({"smoke": suite.smoke,
                                                                     "out": suite.out})],
                          _env("1", 1 if cpu else 0))
  suite.wait(suite.start("bench_1gpu", _bench_cmd(suite, "bench_1gpu", "",
                                                  2 if suite.smoke else 4), gpu0))
  wd = _fresh(os.path.join(suite.out, "train_1gpu"))
  suite.wait(suite.start("train_1gpu", _train_cmd(suite, wd, 8), _env("0", 1 if cpu else 0)))
  suite.results["train_1gpu"] = _train_stats(wd)
  suite.wait(plan_proc)


def _stage_two_gpus(suite: Suite) -> None:
  cpu = 2 if suite.smoke else 0
  both = _env(None, cpu)
  wd = _fresh(os.path.join(suite.out, "train_2gpu"))
  suite.wait(suite.start("train_2gpu", _train_cmd(suite, wd, 16), both))
  suite.results["train_2gpu"] = _train_stats(wd)
  suite.wait(suite.start("bench_data2", _bench_cmd(suite, "bench_data2", "data=2",
                                                   4 if suite.smoke else 8), both))
  wd2 = _fresh(os.path.join(suite.out, "train_2proc"))
  port = 29500 + os.getpid() % 1000
  procs = []
  for pid in range(2):
    extra = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={pid}"]
    env = _env(str(pid), 1 if suite.smoke else 0)
    if suite.smoke:
      extra.append("--cpu_collectives=gloo")
    procs.append(suite.start(f"train_2proc_{pid}", _train_cmd(suite, wd2, 16, extra), env))
  for p in procs:
    suite.wait(p)
  suite.results["train_2proc"] = _train_stats(wd2)
  suite.wait(suite.start("bench_fsdp2", _bench_cmd(suite, "bench_fsdp2", "fsdp=2",
                                                   4 if suite.smoke else 8), both))


def main(argv):
  del argv
  if FLAGS.worker:
    spec = json.loads(FLAGS.worker)
    if "check" in spec:  # one planner check, in this process
      with open(spec["row_out"], "w") as f:
        json.dump(scale_checks.one_check(spec["check"], spec["smoke"]), f)
      return

    def run_one(name):
      row_out = os.path.join(spec["out"], f"plan_{name}.json")
      subprocess.run([sys.executable, os.path.abspath(__file__), "--worker=" + json.dumps(
          dict(spec, check=name, row_out=row_out))], check=False, env=os.environ)
      if not os.path.exists(row_out):
        return {"workload": name, "status": "error", "error": "the check's process wrote "
                "nothing (crashed or was killed: see log_plan_checks.txt)"}
      with open(row_out) as f:
        return json.load(f)

    scale_checks.plan_checks(run_one, os.path.join(spec["out"], "plan_checks.json"))
    return
  suite = Suite(FLAGS.out, FLAGS.smoke, FLAGS.budget_s)
  _stage_one_gpu(suite)
  _stage_two_gpus(suite)
  scale_checks.collect(suite.results, suite.out)
  suite.save()
  text = scale_checks.tables(suite.results)
  with open(os.path.join(suite.out, "scale.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
