"""What the loop reports and keeps: parameter counts and epochs, per-source losses named by
file, TensorBoard purged past a resume, tensorboardX optional, tokens/s never overstated,
and the best checkpoint (early stopping / checkpoint.keep_best) kept and exported."""

import dataclasses
import json
import logging
import os
import struct
import sys
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import jaxtune
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import weights
from jaxtune.data import loader as loader_lib
from jaxtune.train import loop
from jaxtune.train import metrics as metrics_lib


def _text_file(path, n, seed, words=("alpha", "beta", "gamma", "delta", "eps")):
  rng = np.random.RandomState(seed)
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"text": " ".join(rng.choice(words, 8))}) + "\n")
  return path


def tiny_cfg(train_files: str, *, peft="none", **train) -> config_lib.TrainConfig:
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                   num_heads=4, num_kv_heads=2, head_dim=8),
      peft=config_lib.PeftConfig(method=peft, rank=4),
      optim=config_lib.OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant"),
      data=config_lib.DataConfig(train_files=train_files, seq_len=64, batch_size=8,
                                 pack=False, eval_fraction=0.2),
      train=config_lib.LoopConfig(max_steps=6, eval_every=0, progress=False),
      checkpoint=config_lib.CheckpointConfig(every_steps=100, async_save=False,
                                             export_hf=False))
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


@pytest.fixture(scope="module")
def two_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("src")
  return (_text_file(str(d / "first.jsonl"), 40, 0),
          _text_file(str(d / "second.jsonl"), 40, 1, words=("one", "two", "three")))


def test_start_line_params_epoch_and_sources_named_by_file(two_files, tmp_path, capsys):
  wd = str(tmp_path / "run")
  summary = loop.train(tiny_cfg(",".join(two_files), peft="lora"), wd)
  model = config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2,
                                 num_heads=4, num_kv_heads=2, head_dim=8,
                                 vocab_size=len(data_lib.load_tokenizer("")))
  d, f, q, kv, layers, r = 32, 64, 32, 16, 2, 4
  # LoRA on all 7 projections: r * (in + out) per layer and kernel.
  lora = layers * r * ((d + q) + (d + kv) * 2 + (q + d) + (d + f) * 2 + (f + d))
  assert summary["trainable_params"] == lora
  assert summary["params"] == model.num_params() + lora
  out = capsys.readouterr().out
  assert f"params: {model.num_params() + lora:,} total, {lora:,} trainable" in out
  got = rows(wd)
  n_rows = 64  # 80 short records, 20% of each file held out, one example per row (no packing)
  np.testing.assert_allclose([r["epoch"] for r in got], [8 * s / n_rows for s in range(1, 7)])
  assert {"loss/first.jsonl", "loss/second.jsonl"} <= set(got[-1]), got[-1]
  assert not any(k.startswith("loss/source") for k in got[-1])


def test_source_labels_keep_names_unique():
  assert metrics_lib.source_labels(["d/a.jsonl", "e/b.jsonl"]) == ["a.jsonl", "b.jsonl"]
  assert metrics_lib.source_labels(["d/a.jsonl", "e/a.jsonl"]) == ["d/a.jsonl", "e/a.jsonl"]
  assert metrics_lib.rename_sources({"val_loss/source1": 2.0, "loss": 1.0},
                                    ["x/a.jsonl", "y/b.jsonl"]) == {"val_loss/b.jsonl": 2.0,
                                                                    "loss": 1.0}


def test_tokens_per_s_is_never_overstated(two_files, tmp_path, monkeypatch):
  """A slow host (0.2 s per batch) bounds the true rate: tokens / 0.2 s per step. The last
  step used to be timed without its batch's preparation (flushed at once)."""
  real_next, seen = loader_lib.Loader.__next__, []

  def slow(self):
    time.sleep(0.2)
    batch = real_next(self)
    seen.append(int(np.count_nonzero(batch["segment_ids"])))
    return batch

  monkeypatch.setattr(loader_lib.Loader, "__next__", slow)
  wd = str(tmp_path / "run")
  loop.train(tiny_cfg(two_files[0], max_steps=6, eval_every=3,
                      eval_batches=1), wd)
  rates = {r["step"]: r["tokens_per_s"] for r in rows(wd) if "tokens_per_s" in r}
  assert sorted(rates) == [2, 3, 4, 5, 6]
  bound = max(seen) / 0.2
  assert all(v <= bound for v in rates.values()), (rates, bound)


def test_first_step_execution_is_not_counted(two_files, tmp_path, monkeypatch):
  """The first (compiling) step is dispatched asynchronously; its execution (1 s here, a
  host callback) must finish before the timing window opens, or every logged rate divides
  the counted tokens by one extra step time (the launcher then read 0.86x its real speed)."""
  import jax
  from jaxtune.train import setup

  def sleep(x):
    time.sleep(1.0)
    return x

  slow = jax.jit(lambda m: jax.tree.map(
      lambda a: jax.pure_callback(sleep, jax.ShapeDtypeStruct(a.shape, a.dtype), a), m))
  real_jit, calls = setup.jit_train_step, []

  def jit_train_step(*args, **kwargs):
    step = real_jit(*args, **kwargs)

    def wrapped(state, frozen, batch):
      state, metrics = step(state, frozen, batch)
      calls.append(1)
      return state, slow(metrics) if len(calls) == 1 else metrics
    return wrapped

  monkeypatch.setattr(setup, "jit_train_step", jit_train_step)
  wd = str(tmp_path / "run")
  t0 = time.perf_counter()
  loop.train(tiny_cfg(two_files[0], max_steps=3, eval_every=0), wd)
  assert time.perf_counter() - t0 > 1.0  # the slow first step did run
  got = [r for r in rows(wd) if "tokens_per_s" in r]
  assert [r["step"] for r in got] == [2, 3]
  tokens = got[-1]["tokens_per_s"]  # tokens of steps 2-3 over their window: well under 1 s
  per_step = 2 * tiny_cfg(two_files[0]).data.batch_size * tiny_cfg(two_files[0]).data.seq_len
  assert tokens > 2 * per_step, got  # with step 1 in the window: <= per_step / 1 s


def _events(tb_dir):
  """(file, event) in file order, parsed from TFRecord files."""
  out = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[i + 12:i + 12 + n])
      out.append((name, ev))
      i += 12 + n + 4
  return out


def _visible_loss_steps(tb_dir):
  """Steps of the 'loss' scalar as TensorBoard shows them: a SessionLog START at step P
  hides every earlier event with step >= P (tensorboardX purge_step)."""
  steps = []
  for _, ev in _events(tb_dir):
    if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
      steps = [s for s in steps if s < ev.step]
    for v in ev.summary.value:
      if v.tag == "loss":
        steps.append(ev.step)
  return steps


def test_tensorboard_is_purged_past_the_resume_step(tmp_path):
  wd = str(tmp_path)
  w = metrics_lib.MetricsWriter(wd, 0)
  for s in range(1, 9):  # a run killed after step 8, last checkpoint at 4
    w.write(s, {"loss": 1.0})
  w.close()
  time.sleep(1.1)  # event files are named by the second they were opened
  w = metrics_lib.MetricsWriter(wd, 4)
  for s in range(5, 9):
    w.write(s, {"loss": 2.0})
  w.close()
  assert sorted(_visible_loss_steps(os.path.join(wd, "tb"))) == list(range(1, 9))
  assert [r["step"] for r in rows(wd)] == list(range(1, 9))


def test_without_tensorboardx_metrics_still_go_to_jsonl_with_one_warning(tmp_path, monkeypatch,
                                                                         caplog):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
  monkeypatch.setattr(metrics_lib, "_warned", set())
  with caplog.at_level(logging.WARNING, logger="jaxtune"):
    for run in ("a", "b"):
      w = metrics_lib.MetricsWriter(str(tmp_path / run), 0)
      w.write(1, {"loss": 3.0})
      w.close()
  hints = [r for r in caplog.records if "tensorboardX is not installed" in r.getMessage()]
  assert len(hints) == 1 and "pip install tensorboardX" in hints[0].getMessage()
  assert rows(str(tmp_path / "b")) == [{"step": 1, "loss": 3.0}]
  assert not os.path.exists(tmp_path / "a" / "tb")


@pytest.mark.parametrize("mode", ["early_stopping", "keep_best"])
def test_best_checkpoint_survives_rotation_and_is_exported(mode, two_files, tmp_path,
                                                           monkeypatch, capsys):
  """Scripted val_loss 5, 4, 4.5, 4.6 at steps 2, 4, 6, 8: the best is step 4. keep=1 would
  have deleted it; it is kept, exported (not the last step), and named in the summary."""
  vals = iter([5.0, 4.0, 4.5, 4.6])
  monkeypatch.setattr(loop, "evaluate", lambda *a: {"val_loss": next(vals)})
  train = dict(max_steps=8, eval_every=2)
  if mode == "early_stopping":
    train["early_stopping_patience"] = 2
  cfg = tiny_cfg(two_files[0], **train)
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(
      cfg.checkpoint, every_steps=1, keep=1, export_hf=True,
      keep_best="val_loss" if mode == "keep_best" else ""))
  wd = str(tmp_path / mode)
  summary = loop.train(cfg, wd)
  assert summary["status"] == ("early_stopped" if mode == "early_stopping" else "completed")
  assert summary["step"] == 8 and summary["exported_step"] == 4 == summary["best_step"]
  assert f"HF export of step 4 (best val_loss=4.0000) in {wd}/hf" in capsys.readouterr().out
  kept = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert kept == [4, 8]
  _, exported = jaxtune.load_hf(os.path.join(wd, "hf"))
  best, last = weights.load(wd, step=4).params, weights.load(wd, step=8).params
  for path in ("embed_tokens/embedding",):
    a = np.asarray(exported["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(a, np.asarray(best["embed_tokens"]["embedding"]), path)
    assert not np.array_equal(a, np.asarray(last["embed_tokens"]["embedding"]))
