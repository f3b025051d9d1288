"""The memory planner (train/memory.py): the abstract job is the real one, its bytes add up
to XLA's own, `--plan` reads no weights and no data, and train.micro_batch=auto picks the
largest micro-batch under the limit while keeping the global batch and the losses."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import tiny_test
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.train import loop
from jaxtune.train import abstract_job
from jaxtune.train import memory
from jaxtune.train import setup
from tests import launch_utils as lu

TOKENIZER = os.path.join(lu.ROOT, "jaxtune", "assets", "tokenizer")
TINY = ["--config=configs/tiny_test.py", "--set=train.eval_every=0",
        "--set=checkpoint.export_hf=false"]


def _cfg(*sets: str) -> config_lib.TrainConfig:
  base = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      data=config_lib.DataConfig(seq_len=32, batch_size=8),
      train=config_lib.LoopConfig(max_steps=4, progress=False))
  return config_lib.override(base, list(sets))


def _layout(tree):
  """(shape, dtype, partition spec padded to the rank) per leaf: what placement means."""
  def one(x):
    spec = tuple(x.sharding.spec)
    return tuple(x.shape), str(x.dtype), spec + (None,) * (x.ndim - len(spec))
  return jax.tree_util.tree_map(one, tree)


@pytest.mark.parametrize("sets", [("mesh.fsdp=4", "mesh.data=2"),
                                  ("peft.method=qlora", "peft.quant_group_size=32",
                                   "mesh.fsdp=2", "mesh.data=4"),
                                  ("method=dpo", "peft.method=lora", "mesh.tensor=2")])
def test_abstract_job_is_the_real_job(sets):
  """State, frozen trees and batch of the planner = those setup.prepare builds from real
  weights and data (shapes, dtypes, shardings), and XLA's memory analysis of the real
  compiled step equals the plan's."""
  cfg = _cfg(*sets)
  job = setup.prepare(cfg)
  abstract = abstract_job.build(cfg, mesh=job.run.mesh)
  assert _layout(abstract.state) == _layout(job.run.state)
  assert _layout(abstract.frozen) == _layout(job.run.frozen)
  host = next(iter(job.data.train))
  real_batch = loop.device_batch(host, job.run.batch_sharding)
  assert _layout(abstract.batch) == _layout(real_batch)
  est = memory.estimate(abstract, cfg.optim.grad_accum)
  ma = job.run.train_step.lower(job.run.state, job.run.frozen, real_batch).compile()
  ma = ma.memory_analysis()
  assert est["xla"]["temp"] == ma.temp_size_in_bytes
  assert est["xla"]["argument"] == ma.argument_size_in_bytes
  # The per-leaf accounting covers XLA's argument bytes; XLA leaves out only inputs the
  # step never reads (a batch key), never state.
  pd = est["per_device"]
  state_bytes = pd["params"] + pd["reference"] + pd["optimizer"]
  assert state_bytes <= est["xla"]["argument"] <= state_bytes + pd["batch"] + 12
  # One device's shards of the real arrays, counted from the arrays themselves.
  def shard_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree_util.tree_leaves(tree))
  frozen = dict(job.run.frozen)
  assert pd["params"] == shard_bytes(frozen.pop("base", {})) + shard_bytes(
      job.run.state.trainable)
  assert pd["reference"] == shard_bytes(frozen)
  assert pd["optimizer"] == shard_bytes(job.run.state.opt_state)


def test_plan_bytes_by_hand_and_verdicts():
  """Replicated fp32 full fine-tuning: params = 4 bytes x ModelConfig.num_params (the
  hand-written count), AdamW = 2 x that, batch = 6 int32/f32 arrays of B/8 rows."""
  cfg = _cfg("mesh.data=8", "mesh.fsdp=1", "model.vocab_size=512")
  p = memory.plan(cfg)
  n = dataclasses.replace(cfg.model, vocab_size=p["model"]["vocab"]).num_params()
  pd = p["per_device"]
  assert pd["params"] == 4 * n
  assert 8 * n <= pd["optimizer"] <= 8 * n + 64  # mu, nu (+ counts)
  assert pd["batch"] == 6 * (8 // 8) * 32 * 4
  assert pd["gradients"] == 4 * n
  inputs = pd["params"] + pd["optimizer"] + pd["batch"] + 12  # + step (int32), rng (2 x u32)
  assert p["total"] == inputs + p["xla"]["output"] - p["xla"]["alias"] + p["xla"]["temp"]
  assert p["total"] > pd["params"] + pd["optimizer"] + pd["gradients"]
  assert p["limit"] is None and p["verdict"].startswith("no verdict")  # CPU reports none
  assert (p["micro_batch"], p["grad_accum"], p["batch_size"]) == (8, 1, 8)
  assert memory.verdict(100, 200, 0.1).startswith("fits")
  assert memory.verdict(190, 200, 0.1).startswith("tight")
  assert memory.verdict(201, 200, 0.1).startswith("does not fit")


def test_planner_refusals():
  with pytest.raises(config_lib.ConfigError, match="train.device_memory_gib"):
    memory.plan(_cfg("train.micro_batch=auto"))
  with pytest.raises(config_lib.ConfigError, match="method=distill"):
    memory.plan(_cfg("method=distill", "distill.teacher_path=/nonexistent"))
  with pytest.raises(config_lib.ConfigError, match="train.micro_batch"):
    _cfg("train.micro_batch=3")  # does not divide data.batch_size=8
  with pytest.raises(config_lib.ConfigError, match="even micro-batch 1"):
    memory.plan(_cfg("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1", "train.micro_batch=auto",
                     "train.device_memory_gib=0.0001"))


@pytest.mark.slow
def test_plan_reads_no_weights_or_data_and_auto_keeps_batch_and_losses(tmp_path):
  """--plan on a model dir without weights and a data file of bad records works (neither is
  read); then train.micro_batch=auto with a limit between the planner's own peaks for
  micro-batch 8 and 4 picks 4 (grad_accum 2), and trains the same losses as grad_accum 1."""
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(json.dumps({
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512,
      "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
      "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
      "max_position_embeddings": 2048}))
  bad = tmp_path / "bad.jsonl"
  bad.write_text("{not json\n")
  plan_dir = str(tmp_path / "plan")
  p = lu.run("train.py", *TINY, f"--set=model.hf_path={model_dir}",
             f"--set=data.train_files={bad}", f"--set=data.tokenizer={TOKENIZER}", "--plan",
             f"--workdir={plan_dir}", devices=2)
  assert "no verdict" in p.stdout and "activations" in p.stdout
  saved = json.load(open(os.path.join(plan_dir, "plan.json")))
  assert saved["model"]["layers"] == 2 and saved["devices"] == 2 and saved["limit"] is None
  assert set(saved["per_device"]) == set(memory.plan_lib.CATEGORIES)

  # The limit sits between the planner's peaks for micro-batch 8 and 4 (2 devices, fsdp).
  tiny = config_lib.override(tiny_test.get_config(), ["train.eval_every=0"])
  job = abstract_job.build(tiny, mesh=sharding.make_mesh(tiny.mesh, devices=jax.devices()[:2]))
  peaks = {a: memory.estimate(job, a)["total"] for a in (1, 2)}
  assert peaks[1] > peaks[2]
  limit_gib = (peaks[1] + peaks[2]) / 2 / 2**30
  common = [*TINY, "--set=train.max_steps=4", "--set=optim.warmup_steps=0"]
  ref, auto = str(tmp_path / "ref"), str(tmp_path / "auto")
  lu.run("train.py", *common, f"--workdir={ref}", devices=2)
  out = lu.run("train.py", *common, f"--workdir={auto}", "--set=train.micro_batch=auto",
               f"--set=train.device_memory_gib={limit_gib!r}", "--set=train.memory_margin=0",
               devices=2)
  assert "train.micro_batch=auto: micro-batch 4 x grad_accum 2 = data.batch_size 8" in out.stdout
  chosen = json.load(open(os.path.join(auto, "plan.json")))
  assert (chosen["micro_batch"], chosen["grad_accum"], chosen["batch_size"]) == (4, 2, 8)
  tried = [(t["micro_batch"], t["fits"]) for t in chosen["tried"]]
  assert tried in ([(8, False), (4, True)], [(8, False), (4, True), (2, True)]), tried
  assert chosen["total"] == peaks[2]
  saved_cfg = json.load(open(os.path.join(auto, "config.json")))
  assert saved_cfg["optim"]["grad_accum"] == 2 and saved_cfg["data"]["batch_size"] == 8
  a, b = lu.losses(ref), lu.losses(auto)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


@pytest.mark.parametrize("power", [1.0, 0.8, 1.3])
def test_micro_batch_search_finds_the_largest_that_fits(monkeypatch, power):
  """train.micro_batch=auto's search against a stand-in for the compile (peaks that grow
  with the micro-batch, linearly or not, plus float32 accumulators under accumulation): for
  every limit it returns what a scan of all micro-batches returns (None when none fits,
  having tried the smallest), and with linear activations it settles in at most three
  compiles (the whole batch, the guess, its larger neighbour)."""
  cfg = _cfg("mesh.data=1", "mesh.fsdp=1", "mesh.tensor=-1", "data.batch_size=48",
             "train.micro_batch=auto", "train.device_memory_gib=1")
  job = abstract_job.build(cfg, mesh=sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
  sizes = memory.micro_batches(cfg, job.mesh)
  assert sizes == [48, 24, 16, 12, 8, 6, 4, 3, 2, 1]
  acc = memory.accumulator_bytes(job)
  fixed, per_row = 2.0 * acc, acc / 4  # accumulators the size of 4 rows' activations
  peak = lambda m: fixed + (acc if m < 48 else 0) + per_row * m ** power
  calls = []

  def estimate(job, grad_accum):
    m = 48 // grad_accum
    calls.append(m)
    return {"micro_batch": m, "grad_accum": grad_accum, "total": peak(m),
            "per_device": {"activations": per_row * m ** power}}
  monkeypatch.setattr(memory, "estimate", estimate)
  for limit in sorted({peak(m) + d for m in sizes for d in (-1.0, 0.0, 1.0)}):
    calls.clear()
    est, tried = memory.search(job, limit, 0.0)
    want = next((m for m in sizes if peak(m) <= limit), None)
    assert (est["micro_batch"] if est else None) == want, (limit, calls)
    assert len(calls) == len(set(calls)) and [t["micro_batch"] for t in tried] == sorted(
        calls, reverse=True)
    if want is None:
      assert min(calls) == 1
    if power == 1.0:
      assert len(calls) <= 3, (limit, calls)


REMAT_SETS = ("mesh.data=1", "mesh.fsdp=-1", "model.vocab_size=512", "model.scan_layers=false")


def _auto_remat(limit_bytes: float, *sets: str) -> config_lib.TrainConfig:
  return _cfg(*REMAT_SETS, "model.remat=auto", f"train.device_memory_gib={limit_bytes / 2**30!r}",
              "train.memory_margin=0", *sets)


def test_remat_auto_takes_the_fastest_policy_that_fits(tmp_path, capsys):
  """model.remat=auto (unrolled layers) against each policy's peak, compiled on its own: a
  limit between two peaks takes the first policy under it (none -> dots_no_batch -> full),
  the plan lists the policies tried, and resolve() puts the policy into the run's config.
  Scanned layers never try none (measured slower than dots_no_batch there)."""
  assert memory.remat_choices(_cfg().model) == ("dots_no_batch", "full")  # scanned (default)
  peaks = {r: memory.estimate(abstract_job.build(_cfg(*REMAT_SETS, f"model.remat={r}")), 1)["total"]
           for r in ("none", "dots_no_batch", "full")}
  assert peaks["none"] > peaks["dots_no_batch"] > peaks["full"]

  p = memory.plan(_auto_remat(peaks["none"] + 4096))
  assert p["model"]["remat"] == "none" and p["remat_setting"] == "auto"
  assert [e["remat"] for e in p["remat_tried"]] == ["none"]

  between = (peaks["none"] + peaks["dots_no_batch"]) / 2
  p = memory.plan(_auto_remat(between))
  assert p["model"]["remat"] == "dots_no_batch" and p["total"] == peaks["dots_no_batch"]
  assert [(e["remat"], e["fits"], e["total"]) for e in p["remat_tried"]] == [
      ("none", False, peaks["none"]), ("dots_no_batch", True, peaks["dots_no_batch"])]
  assert p["verdict"].startswith("fits")
  text = memory.plan_lib.report(p)
  assert "remat dots_no_batch (model.remat=auto)" in text
  assert "tried      model.remat=none at micro-batch 8" in text and "-> too big" in text

  p = memory.plan(_auto_remat(peaks["full"] - 4096))  # nothing fits: the least memory, said so
  assert p["model"]["remat"] == "full" and p["verdict"].startswith("does not fit")
  assert [e["fits"] for e in p["remat_tried"]] == [False, False, False]

  cfg = memory.resolve(_auto_remat(between), str(tmp_path / "gpu"))
  assert cfg.model.remat == "dots_no_batch" and cfg.optim.grad_accum == 1
  assert json.load(open(tmp_path / "gpu" / "plan.json"))["model"]["remat"] == "dots_no_batch"
  assert "model.remat=auto: dots_no_batch; predicted peak" in capsys.readouterr().out
  # No device limit (CPU): none, planned against nothing.
  cfg = memory.resolve(_cfg(*REMAT_SETS, "model.remat=auto"), str(tmp_path / "cpu"))
  assert cfg.model.remat == "none" and not os.path.exists(tmp_path / "cpu" / "plan.json")
  assert "model.remat=auto: none (no device memory limit known" in capsys.readouterr().out
  scanned = _cfg("mesh.data=1", "mesh.fsdp=-1", "model.vocab_size=512", "model.remat=auto")
  assert memory.resolve(scanned, str(tmp_path / "cpu2")).model.remat == "dots_no_batch"
  p = memory.plan(dataclasses.replace(scanned, train=dataclasses.replace(
      scanned.train, device_memory_gib=1.0)))
  assert p["model"]["remat"] == "dots_no_batch" and len(p["remat_tried"]) == 1
  with pytest.raises(config_lib.ConfigError, match="model.remat=auto.*method=distill"):
    memory.resolve(_cfg("model.remat=auto", "method=distill", "distill.teacher_path=/nonexistent",
                        "train.device_memory_gib=1"), str(tmp_path / "d"))


def test_remat_auto_with_micro_batch_auto_keeps_the_device_busy(monkeypatch):
  """Both auto: a policy is taken when its micro-batch is the whole batch or holds
  MIN_MICRO_TOKENS tokens per device; otherwise the policy that fits the most rows (the
  least recompute on ties). The searches are stood in for: only the choice is tested here."""
  found = {}  # remat -> the micro-batch its search finds (None: nothing fits)

  def fit(job, limit, margin):
    m = found[job.model_cfg.remat]
    if m is None:
      return None, [{"micro_batch": 1, "grad_accum": 32, "total": 9, "fits": False}]
    est = {"micro_batch": m, "grad_accum": 32 // m, "total": 1, "fits": True}
    return est, [est]
  monkeypatch.setattr(memory, "_fit", fit)
  cfg = _cfg(*REMAT_SETS, "model.remat=auto", "train.micro_batch=auto", "data.batch_size=32",
             "data.seq_len=2048", "train.device_memory_gib=1")
  # 8 batch shards: micro-batch 32 = 4 rows of 2048 per device = 8192 tokens, enough.
  for case, want in [({"none": 32, "dots_no_batch": 32, "full": 32}, "none"),
                     ({"none": 16, "dots_no_batch": 32, "full": 32}, "dots_no_batch"),
                     ({"none": None, "dots_no_batch": 16, "full": 32}, "full")]:
    found.update(case)
    p = memory.plan(cfg)
    assert p["model"]["remat"] == want and p["micro_batch"] == case[want], case
  monkeypatch.setattr(memory, "MIN_MICRO_TOKENS", 10**9)  # never enough: the most rows wins
  found.update({"none": 8, "dots_no_batch": 16, "full": 16})
  p = memory.plan(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=64)))
  assert p["model"]["remat"] == "dots_no_batch" and len(p["remat_tried"]) == 3


def test_the_run_loads_the_step_the_planner_compiled(tmp_path):
  """--compile_cache with model.remat=auto planned against a limit: the planner compiles the
  train step and the run loads that executable, so the cache holds one train-step entry
  (two would mean the run compiled its own). Every compile is cached here (min time 0)."""
  import subprocess
  cache = tmp_path / "xla"
  env = {**lu.env(2), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  p = subprocess.run(lu.cmd("train.py", *TINY, "--set=train.max_steps=2",
                            f"--workdir={tmp_path / 'run'}", f"--compile_cache={cache}",
                            "--set=model.remat=auto", "--set=train.device_memory_gib=4"),
                     env=env, cwd=lu.ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "model.remat=auto: dots_no_batch; predicted peak" in p.stdout
  # the size bound (--compile_cache_max_gib, on by default) stores each entry as
  # KEY-cache beside its KEY-atime
  steps = [f for f in os.listdir(cache) if f.startswith("jit_train_step-")
           and f.endswith("-cache")]
  assert len(steps) == 1, sorted(os.listdir(cache))
  assert len(lu.losses(str(tmp_path / "run"))) == 2


@pytest.mark.parametrize("max_gib", [0.0, 12000 / 2**30])
def test_compile_cache_size_bound(tmp_path, max_gib):
  """--compile_cache_max_gib: with a bound, the least recently used executables are deleted
  beyond it (8 programs of ~3 KB each on CPU against 12,000 bytes: the newest kept, under
  the bound); 0 keeps every one."""
  import subprocess
  import sys
  cache = tmp_path / "xla"
  code = f"""
import sys; sys.path.insert(0, "launch")
import common, jax, jax.numpy as jnp
assert common.compile_cache({str(cache)!r}, max_gib={max_gib!r}) == {str(cache)!r}
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
for i in range(8):
  jax.jit(lambda x, i=i: jnp.sin(x) * i + jnp.cos(x) ** (i + 1))(jnp.ones(16)).block_until_ready()
"""
  p = subprocess.run([sys.executable, "-c", code], env=lu.env(1), cwd=lu.ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  files = {f: os.path.getsize(cache / f) for f in os.listdir(cache)}
  if not max_gib:
    assert len([f for f in files if f.startswith("jit__lambda-")]) == 8, sorted(files)
    return
  kept = {f: n for f, n in files.items() if f.endswith("-cache")}
  assert 1 <= len(kept) < 8 and sum(kept.values()) <= 12000, files


def test_compile_cache_in_a_bucket_is_not_bounded():
  """A cache in a bucket keeps JAX's default, no bound (its eviction would take a lock file
  around every read and write there); a local one gets the bound in bytes."""
  import subprocess
  import sys
  code = """
import sys; sys.path.insert(0, "launch")
import common, jax
common.compile_cache("gs://bucket/xla", max_gib=2.0)
print(jax.config.jax_compilation_cache_max_size)
common.compile_cache("/tmp/jaxtune-unused-cache-dir", max_gib=2.0)
print(jax.config.jax_compilation_cache_max_size)
"""
  p = subprocess.run([sys.executable, "-c", code], env=lu.env(1), cwd=lu.ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert p.stdout.split() == ["-1", str(2 * 2**30)], p.stdout
