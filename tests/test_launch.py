"""The train and convert launchers end to end: metrics, checkpoints, exports, resume, errors."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import jaxtune
from jaxtune import checkpoint as checkpoint_lib
from jaxtune import weights
from tests import hf_models
from tests import launch_utils as lu

TINY = "--config=configs/tiny_test.py"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("run"))
  lu.run("train.py", TINY, f"--workdir={wd}")
  return wd


def test_run_writes_metrics_checkpoints_and_hf_export(trained):
  rows = lu.metrics(trained)
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == list(range(1, 13))
  for r in rows:
    if "loss" in r:  # step 1 includes compilation: no throughput reported for it
      assert {"grad_norm", "lr"} | ({"tokens_per_s"} if r["step"] > 1 else set()) <= set(r), r
  vals = [r["val_loss"] for r in rows if "val_loss" in r]
  assert len(vals) == 2 and vals[1] < vals[0]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert losses[-1] < losses[0] - 0.2
  kept = sorted(int(s) for s in os.listdir(os.path.join(trained, "checkpoints")) if s.isdigit())
  assert kept == [8, 12]  # keep=2
  assert any(f.startswith("events") for f in os.listdir(os.path.join(trained, "tb")))
  # The export loads in transformers and gives jaxtune's logits for the trained params.
  hf_dir = os.path.join(trained, "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  assert tok.chat_template
  w = weights.load(trained)
  cfg, params = w.model_cfg, w.params
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 21)).astype(np.int32)
  np.testing.assert_allclose(hf_models.logits(model, tokens),
                             np.asarray(jaxtune.forward(cfg, params, tokens)), atol=1e-4)


def test_convert_checkpoint_to_hf_matches_run_export(trained, tmp_path):
  lu.run("convert.py", f"--from_checkpoint={trained}", f"--to_hf={tmp_path}/hf")
  a = safetensors.numpy.load_file(os.path.join(trained, "hf", "model.safetensors"))
  b = safetensors.numpy.load_file(os.path.join(tmp_path, "hf", "model.safetensors"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_convert_hf_round_trip_is_exact(tmp_path):
  model = hf_models.make("qwen2")
  model.save_pretrained(tmp_path / "src")
  lu.run("convert.py", f"--from_hf={tmp_path}/src", f"--out={tmp_path}/ckpt")
  lu.run("convert.py", f"--from_checkpoint={tmp_path}/ckpt", f"--to_hf={tmp_path}/back")
  a = safetensors.numpy.load_file(tmp_path / "src" / "model.safetensors")
  b = safetensors.numpy.load_file(tmp_path / "back" / "model.safetensors")
  a.pop("lm_head.weight", None)  # tied
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("flag,message", [
    ("--set=optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("--set=train.max_steps=ten", "bad value for train.max_steps: 'ten' is not a int"),
    ("--set=peft.method=lorax", "bad value for peft.method: 'lorax'"),
])
def test_bad_overrides_are_one_line_errors(flag, message, tmp_path):
  p = lu.run("train.py", TINY, f"--workdir={tmp_path}", flag, check=False)
  assert p.returncode == 2
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, p.stderr[-2000:]


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
  """Kill -9 mid-run after a checkpoint; the same command resumes to the same losses."""
  steps = "--set=train.max_steps=40"
  ref = str(tmp_path / "ref")
  lu.run("train.py", TINY, f"--workdir={ref}", steps, "--set=checkpoint.export_hf=false")
  wd = str(tmp_path / "killed")
  args = [TINY, f"--workdir={wd}", steps, "--set=checkpoint.export_hf=false"]
  proc = subprocess.Popen(lu.cmd("train.py", *args), env=lu.env(), cwd=lu.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(wd, "checkpoints", "8")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(ckpt)
  done = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
  assert max(done) < 40, "the run finished before it was killed"
  p = lu.run("train.py", *args)
  assert "resumed_from" in p.stdout and "'resumed_from': 0" not in p.stdout
  a, b = lu.losses(ref), lu.losses(wd)
  assert sorted(a) == sorted(b) == list(range(1, 41))
  np.testing.assert_allclose([b[s] for s in range(1, 41)], [a[s] for s in range(1, 41)],
                             rtol=0, atol=1e-6)


def test_early_stopping_on_val_loss(tmp_path):
  """lr=0 keeps val_loss flat: with patience 1 the run stops at the second eval (step 4)."""
  wd = str(tmp_path / "es")
  p = lu.run("train.py", TINY, f"--workdir={wd}", "--set=optim.lr=0",
             "--set=train.eval_every=2", "--set=train.early_stopping_patience=1")
  assert "early stopping at step 4" in p.stderr + p.stdout
  assert "HF export of step 2" in p.stdout and "'exported_step': 2" in p.stdout  # the best
  assert max(lu.losses(wd)) and sorted(lu.losses(wd)) == [1, 2, 3, 4]
  vals = [m["val_loss"] for m in lu.metrics(wd) if "val_loss" in m]
  assert len(vals) == 2 and vals[0] == vals[1]
  assert os.path.isdir(os.path.join(wd, "checkpoints", "4"))
  assert os.path.isfile(os.path.join(wd, "hf", "model.safetensors"))


def test_lora_reward_model_run_and_convert_agree(tmp_path):
  """LoRA + trainable score head via the launcher; convert --merge_lora = the run's export."""
  wd = str(tmp_path / "rm")
  lu.run("train.py", "--config=configs/reward.py:lora", f"--workdir={wd}",
         "--set=train.max_steps=2", "--set=train.eval_every=2", "--set=train.progress=false")
  lu.run("convert.py", f"--from_checkpoint={wd}", f"--to_hf={tmp_path}/out", "--merge_lora")
  a = safetensors.numpy.load_file(os.path.join(wd, "hf", "model.safetensors"))
  b = safetensors.numpy.load_file(os.path.join(tmp_path, "out", "model.safetensors"))
  assert "score.weight" in a and sorted(a) == sorted(b)
  assert np.abs(a["score.weight"]).max() > 0  # the head was trained (it starts at zero)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_rerun_after_early_stop_does_not_train_on(tmp_path):
  wd = str(tmp_path / "es2")
  args = [TINY, f"--workdir={wd}", "--set=optim.lr=0", "--set=train.eval_every=2",
          "--set=train.early_stopping_patience=1", "--set=checkpoint.export_hf=false"]
  lu.run("train.py", *args)
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "lo')  # a line torn by a kill mid-write must not block the resume
  p = lu.run("train.py", *args)
  assert "'step': 4" in p.stdout
  assert sorted(lu.losses(wd)) == [1, 2, 3, 4]
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())[-1] == 4


def test_resume_with_a_changed_setting_is_refused_in_seconds(tmp_path):
  """A LoRA workdir re-run with another peft.alpha / peft.rank / model.num_layers exits 2
  with one line naming the key, before any data or weights are read; raising
  train.max_steps (a safe key) resumes."""
  wd = str(tmp_path / "lora")
  base = [TINY, f"--workdir={wd}", "--set=peft.method=lora", "--set=train.eval_every=0",
          "--set=checkpoint.export_hf=false"]
  lu.run("train.py", *base, "--set=train.max_steps=4")
  for flag, named in [("--set=peft.alpha=64", "peft.alpha 16.0 -> 64.0"),
                      ("--set=peft.rank=4", "peft.rank 8 -> 4"),
                      ("--set=model.num_layers=3", "model.num_layers 2 -> 3")]:
    t = time.time()
    p = lu.run("train.py", *base, "--set=train.max_steps=4", flag, check=False)
    elapsed = time.time() - t
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot resume") and named in lines[-1], p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "examples from" not in p.stderr + p.stdout
    print(f"{flag}: refused in {elapsed:.1f}s (process start included)")
    assert elapsed < 60
  p = lu.run("train.py", *base, "--set=train.max_steps=6")
  assert "'resumed_from': 4" in p.stdout and "'status': 'completed'" in p.stdout


def test_diverging_run_stops_after_max_skipped_and_exits_4(tmp_path):
  """lr=1e30 blows the weights up after the first update: every later step's loss is not
  finite, its update is skipped, and after 3 in a row the run stops with exit status 4."""
  wd = str(tmp_path / "nan")
  p = lu.run("train.py", TINY, f"--workdir={wd}", "--set=optim.lr=1e30",
             "--set=optim.warmup_steps=0", "--set=train.max_skipped=3",
             "--set=checkpoint.every_steps=1", "--set=train.eval_every=0", check=False)
  assert p.returncode == 4, p.stderr[-3000:]
  assert "consecutive steps" in p.stdout and "train.max_skipped=3" in p.stdout, p.stdout
  rows = [m for m in lu.metrics(wd) if "loss" in m]
  assert np.isfinite(rows[0]["loss"]) and [r["skipped_steps"] for r in rows][-1] == 3
  last = max(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  trainable, _ = checkpoint_lib.read(wd, last)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(trainable))
  assert not os.path.exists(os.path.join(wd, "hf"))
