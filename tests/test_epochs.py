"""train.epochs: the run's length from the data (hand-counted rows, the loader's own
iteration), and a launched streamed run killed and resumed ends where an in-memory one does,
with the same losses."""

import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib
from tests import launch_utils as lu

CHAT = tokenizer_lib.sample_path("chat")
TEXT = tokenizer_lib.sample_path("text")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def test_unpacked_epochs_are_examples_over_batch_size(tok):
  """One row per example without packing: E epochs = ceil(E * examples / batch_size)."""
  ds = pipeline.build(config.DataConfig(train_files=CHAT, batch_size=4, pack=False), tok)
  n = ds.stats["train"]["examples"]
  assert ds.stats["rows_per_epoch"] == n
  for epochs in (1, 2.5, 0.25, 3):
    assert ds.train.steps_for_epochs(epochs) == math.ceil(epochs * n / 4), epochs
  with pytest.raises(ValueError, match="train.epochs=0"):
    ds.train.steps_for_epochs(0)


def test_epoch_steps_match_the_loaders_iteration(tok):
  """Packed mixture (epochs differ in rows): after steps_for_epochs(E) batches the loader
  has just finished epoch E, and one batch fewer it has not."""
  cfg = config.DataConfig(train_files=f"{CHAT},{TEXT}", weights="3,1", batch_size=5,
                          seq_len=96, seed=2)
  ds = pipeline.build(cfg, tok)
  positions = [ds.train.state()]
  for _ in range(4 * -(-ds.stats["rows_per_epoch"] // 5) + 20):
    next(ds.train)
    positions.append(ds.train.state())
  fresh = pipeline.build(cfg, tok).train
  for epochs in (1, 2, 3):
    steps = fresh.steps_for_epochs(epochs)
    assert positions[steps]["epoch"] >= epochs > positions[steps - 1]["epoch"], epochs
  # 1.5 epochs: all of epoch 0 and half of epoch 1's rows (its own row count).
  other = pipeline.build(cfg, tok).train
  other.restore(next(p for p in positions if p["epoch"] == 1))
  half = 0.5 * other.rows_in_epoch()
  assert other.rows_in_epoch() != ds.stats["rows_per_epoch"]  # packing differs per epoch
  covered = lambda p: p["epoch"] >= 2 or (p["epoch"] == 1 and p["index"] >= half)  # noqa
  steps = fresh.steps_for_epochs(1.5)
  assert covered(positions[steps]) and not covered(positions[steps - 1])


@pytest.mark.slow
def test_streamed_epochs_run_killed_and_resumed_matches_in_memory(tmp_path, tok):
  tiny = "--config=configs/tiny_test.py"
  common = [tiny, "--set=train.epochs=1.5", "--set=checkpoint.export_hf=false",
            "--set=train.eval_every=0"]
  data = config.DataConfig(seq_len=64, batch_size=8)  # configs/tiny_test.py's data section
  steps = pipeline.build(data, tok).train.steps_for_epochs(1.5)
  assert steps >= 6
  ref = str(tmp_path / "memory")
  p = lu.run("train.py", *common, f"--workdir={ref}")
  assert f"train.epochs=1.5: {steps} steps" in p.stdout + p.stderr
  wd = str(tmp_path / "streamed")
  args = [*common, f"--workdir={wd}", "--set=data.streaming=true",
          f"--set=data.cache_dir={tmp_path / 'cache'}"]
  proc = subprocess.Popen(lu.cmd("train.py", *args), env=lu.env(), cwd=lu.ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(wd, "checkpoints", "4")
  deadline = time.time() + 300
  while not os.path.isdir(ckpt) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(ckpt)
  lu.run("train.py", *args)
  a, b = lu.losses(ref), lu.losses(wd)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=0, atol=1e-6)
  last = [m for m in lu.metrics(wd) if m.get("step") == steps][-1]
  assert 1.5 <= last["epoch"] < 1.5 + 8 / pipeline.build(data, tok).stats["rows_per_epoch"]
