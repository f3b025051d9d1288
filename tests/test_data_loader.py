"""Iteration: determinism, exact resume (also after SIGKILL), mixtures, multi-host shares."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import global_batch
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib

CHAT = tokenizer_lib.sample_path("chat")
TEXT = tokenizer_lib.sample_path("text")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


def _digests(loader, n):
  return [global_batch.digest(next(loader)) for _ in range(n)]


def _example_keys(batch):
  """The examples of an SFT batch, as bytes of their tokens, in row order."""
  keys = []
  for b in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][b]
    keys += [batch["tokens"][b][seg == s].tobytes() for s in range(1, seg.max() + 1)]
  return keys


CASES = {
    "packed": (config.DataConfig(batch_size=16, seq_len=128, eval_fraction=0.0), "sft"),
    "mixture": (config.DataConfig(train_files=f"{CHAT},{TEXT}", weights="0.7,0.3",
                                  batch_size=12, eval_fraction=0.0, seed=3), "sft"),
    "preference": (config.DataConfig(batch_size=32, eval_fraction=0.0), "preference"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_restored_loader_continues_with_the_same_batches_across_epochs(tok, case):
  cfg, kind = CASES[case]
  ds = pipeline.build(cfg, tok, kind=kind)
  per_epoch = -(-ds.stats["rows_per_epoch"] // cfg.batch_size)
  n, m = per_epoch + 3, 2 * per_epoch + 1  # the state is in epoch 1; m crosses two more
  _digests(ds.train, n)
  state = json.loads(json.dumps(ds.train.state()))  # what a checkpoint stores
  assert state["epoch"] == 1 and state["batches"] == n
  expected = _digests(ds.train, m)
  assert ds.train.epoch >= 3
  fresh = pipeline.build(cfg, tok, kind=kind).train
  fresh.restore(state)
  assert _digests(fresh, m) == expected
  # Restoring an earlier state on the same loader rewinds it too.
  ds.train.restore(state)
  assert _digests(ds.train, 2) == expected[:2]


def test_resume_after_sigkill_continues_exactly(tmp_path, tok):
  """A process checkpointing the loader state every batch is killed; resume from its last."""
  log = tmp_path / "states.jsonl"
  script = textwrap.dedent(f"""
      import json, os, sys, time
      from jaxtune import config
      from jaxtune.data import global_batch, pipeline, tokenizer_lib
      cfg = config.DataConfig(batch_size=8, eval_fraction=0.0, seed=11)
      ds = pipeline.build(cfg, tokenizer_lib.load(""))
      with open({str(log)!r}, "a") as f:
        while True:
          d = global_batch.digest(next(ds.train))
          f.write(json.dumps({{"digest": d, "state": ds.train.state()}}) + "\\n")
          f.flush()
          os.fsync(f.fileno())
          time.sleep(0.005)
      """)
  proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while time.time() < deadline:
    if log.exists() and log.read_text().count("\n") >= 40:
      break
    if proc.poll() is not None:
      pytest.fail(f"child exited: {proc.stderr.read().decode()[-2000:]}")
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  lines = [json.loads(x) for x in log.read_text().split("\n")[:-1]]  # complete lines only
  assert len(lines) >= 40
  saved = lines[-1]["state"]
  assert saved["epoch"] >= 1  # 40 batches of 8 rows pass the first epoch
  cfg = config.DataConfig(batch_size=8, eval_fraction=0.0, seed=11)
  reference = pipeline.build(cfg, tok).train
  ref = _digests(reference, len(lines) + 10)
  assert [x["digest"] for x in lines] == ref[:len(lines)]  # the killed run was on track
  resumed = pipeline.build(cfg, tok).train
  resumed.restore(saved)
  assert _digests(resumed, 10) == ref[len(lines):]


def test_deterministic_for_a_seed_and_reshuffled_per_epoch(tok):
  cfg = config.DataConfig(batch_size=16, eval_fraction=0.0, seed=5)
  a = pipeline.build(cfg, tok)
  b = pipeline.build(cfg, tok)
  c = pipeline.build(dataclasses.replace(cfg, seed=6), tok)
  assert _digests(a.train, 8) == _digests(b.train, 8)
  assert _digests(c.train, 8) != _digests(pipeline.build(cfg, tok).train, 8)
  # Every example once per epoch, in a different order each epoch.
  loader = pipeline.build(dataclasses.replace(cfg, batch_size=1), tok).train
  epochs = {0: [], 1: []}
  while loader.epoch < 2:
    e = loader.epoch  # with one row per batch, a batch never spans two epochs
    epochs[e] += _example_keys(next(loader))
  epoch0, epoch1 = epochs[0], epochs[1]
  assert len(epoch0) == a.stats["train"]["examples"]
  assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_mixture_hits_its_weights_within_sampling_error(tok):
  cfg = config.DataConfig(train_files=f"{CHAT},{TEXT}", weights="3,1", batch_size=100,
                          pack=False, eval_fraction=0.0, seed=1)
  ds = pipeline.build(cfg, tok)
  assert ds.source_names == (CHAT, TEXT)
  sources = np.concatenate([next(ds.train)["source_ids"][:, 0] for _ in range(20)])
  n, p = len(sources), 0.75
  assert n == 2000 and set(np.unique(sources)) == {0, 1}
  sigma = np.sqrt(n * p * (1 - p))
  assert abs((sources == 0).sum() - n * p) < 4 * sigma
  # Per-source ids reach every token of a packed batch too (for per-source loss).
  packed = next(pipeline.build(dataclasses.replace(cfg, pack=True), tok).train)
  assert ((packed["source_ids"] >= 0) == (packed["segment_ids"] > 0)).all()
  assert [e["weight"] for e in ds.stats["train"]["sources"]] == [0.75, 0.25]


def test_unweighted_sources_each_appear_once_per_epoch(tok):
  cfg = config.DataConfig(train_files=f"{CHAT},{TEXT}", batch_size=1, pack=False,
                          eval_fraction=0.0)
  ds = pipeline.build(cfg, tok)
  n = ds.stats["train"]["examples"]
  src = np.array([next(ds.train)["source_ids"][0, 0] for _ in range(n)])
  counts = [e["examples"] for e in ds.stats["train"]["sources"]]
  assert np.bincount(src).tolist() == counts


@pytest.mark.parametrize("kind", ["sft", "prompt"])
def test_process_shares_are_disjoint_and_cover_the_global_batch(tok, kind):
  cfg = config.DataConfig(batch_size=16, eval_fraction=0.1)
  whole = pipeline.build(cfg, tok, kind=kind)
  shares = [pipeline.build(cfg, tok, kind=kind, process_index=p, process_count=4)
            for p in range(4)]
  key = "tokens" if kind == "sft" else "prompt_tokens"
  for step in range(5):
    full = next(whole.train)
    parts = [next(s.train) for s in shares]
    assert all(p[key].shape[0] == 4 for p in parts)
    for k, v in full.items():
      if isinstance(v, np.ndarray):
        assert (np.concatenate([p[k] for p in parts]) == v).all(), (step, k)
  if kind == "sft":
    seen = [set(_example_keys(p)) for p in parts]
    assert all(not (seen[i] & seen[j]) for i in range(4) for j in range(i + 1, 4))
  for full, *parts in zip(whole.eval, *(s.eval for s in shares)):
    assert (np.concatenate([p[key] for p in parts]) == full[key]).all()
  # A state saved by one process resumes the same global stream on one process.
  state = shares[0].train.state()
  single = pipeline.build(cfg, tok, kind=kind)
  single.train.restore(state)
  assert global_batch.digest(next(single.train)) == global_batch.digest(next(whole.train))


def test_batch_size_must_divide_among_processes(tok):
  with pytest.raises(ValueError, match="batch_size=10 is not divisible by the 4 processes"):
    pipeline.build(config.DataConfig(batch_size=10), tok, process_index=0, process_count=4)


def test_restore_refuses_a_state_from_other_data(tok):
  a = pipeline.build(config.DataConfig(batch_size=8), tok)
  b = pipeline.build(config.DataConfig(batch_size=8, seq_len=64), tok)
  with pytest.raises(ValueError, match="data files, tokenizer or data settings changed"):
    b.train.restore(a.train.state())
  for _ in range(3):
    next(a.train)
  b.train.restore(a.train.state(), strict=False)  # adopts the position anyway
  assert b.train.state()["batches"] == a.train.state()["batches"] == 3
  assert b.train.epoch == a.train.epoch


def test_to_global_builds_sharded_global_arrays(tok):
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = len(jax.devices())
  for kind in ("sft", "preference"):
    batch = next(pipeline.build(config.DataConfig(batch_size=n), tok, kind=kind).train)
    arrays = global_batch.to_global(batch, sharding)
    for k, v in batch.items():
      assert arrays[k].shape == v.shape and arrays[k].dtype == v.dtype
      assert (np.asarray(arrays[k]) == v).all()
      assert len(arrays[k].sharding.device_set) == n
