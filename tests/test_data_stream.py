"""Streamed data (data.streaming): the in-memory path's batches, bounded memory, exact resume
after SIGKILL, and disjoint per-process shares. References: the in-memory pipeline (every
record in memory, the pre-existing path) and measured resident memory."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxtune import config
from jaxtune.data import errors
from jaxtune.data import global_batch
from jaxtune.data import pipeline
from jaxtune.data import stream
from jaxtune.data import tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAT = tokenizer_lib.sample_path("chat")
TEXT = tokenizer_lib.sample_path("text")


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load("")


@pytest.fixture
def small_pieces(monkeypatch):
  """Pieces of 7 records and a seek mark every 5: every build crosses pieces and marks."""
  monkeypatch.setattr(stream, "PIECE", 7)
  monkeypatch.setattr(stream, "MARK", 5)


def _env():
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _digests(loader, n):
  return [global_batch.digest(next(loader)) for _ in range(n)]


def _jsonl(path, records, bad_lines=()):
  with open(path, "w") as f:
    for i, r in enumerate(records):
      f.write(("{not json" if i in bad_lines else json.dumps(r)) + "\n")
      if i % 9 == 4:
        f.write("\n")  # blank lines are skipped, not records, and keep line numbers honest
  return str(path)


def _instructions(n):
  return [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}" * (1 + i % 4)}
          for i in range(n)]


def _same(a, b, n):
  """Same batches for n steps, same eval batches, same stats (but the cache report)."""
  assert _digests(a.train, n) == _digests(b.train, n)
  assert len(a.eval) == len(b.eval)
  assert [global_batch.digest(x) for x in a.eval] == [global_batch.digest(x) for x in b.eval]
  sa, sb = dict(a.stats), dict(b.stats)
  sa.pop("cache", None), sb.pop("cache", None)
  assert sa == sb
  assert (a.source_names, a.eval_source_names) == (b.source_names, b.eval_source_names)
  assert a.fingerprint == b.fingerprint


def _cases(tmp):
  os.makedirs(tmp / "dir", exist_ok=True)
  _jsonl(tmp / "dir" / "a.jsonl", _instructions(23))
  _jsonl(tmp / "dir" / "b.jsonl", _instructions(31)[5:])
  bad = _jsonl(tmp / "bad.jsonl", _instructions(30), bad_lines=(3, 17))
  with open(tmp / "arr.json", "w") as f:
    json.dump(_instructions(19), f)
  with open(tmp / "t.csv", "w", newline="") as f:
    csv.writer(f).writerows([["instruction", "output"]] + [
        [r["instruction"], r["output"]] for r in _instructions(25)])
  return {
      "chat": (config.DataConfig(train_files=CHAT, batch_size=4, seq_len=128), "sft"),
      "text_windows": (config.DataConfig(train_files=TEXT, batch_size=4, seq_len=48), "sft"),
      "mixture_dir_skip": (config.DataConfig(
          train_files=f"{CHAT},{tmp / 'dir'},{bad}", weights="2,1,1", on_bad_record="skip",
          batch_size=6, seq_len=96, seed=4), "sft"),
      "eval_files_unpacked": (config.DataConfig(
          train_files=str(tmp / "dir"), eval_files=bad, on_bad_record="skip", pack=False,
          batch_size=4, seq_len=64), "sft"),
      "json_and_csv": (config.DataConfig(train_files=f"{tmp / 'arr.json'},{tmp / 't.csv'}",
                                         batch_size=4, seq_len=64), "sft"),
      "preference": (config.DataConfig(batch_size=4, seq_len=128), "preference"),
      "prompt": (config.DataConfig(batch_size=4, seq_len=64), "prompt"),
  }


@pytest.mark.parametrize("case", ["chat", "text_windows", "mixture_dir_skip",
                                  "eval_files_unpacked", "json_and_csv", "preference",
                                  "prompt"])
def test_streamed_batches_equal_the_in_memory_ones(tmp_path, tok, small_pieces, case):
  cfg, kind = _cases(tmp_path)[case]
  memory = pipeline.build(cfg, tok, kind=kind)
  streamed = pipeline.build(dataclasses.replace(cfg, streaming=True,
                                                cache_dir=str(tmp_path / "cache")), tok, kind=kind)
  assert [c["hit"] for c in streamed.stats["cache"]] == [False] * len(streamed.stats["cache"])
  per_epoch = -(-memory.stats["rows_per_epoch"] // cfg.batch_size)
  _same(memory, streamed, 2 * per_epoch + 1)  # two epochs and a bit
  if case == "mixture_dir_skip":
    skipped = streamed.stats["train"]["sources"][2]["skipped"]
    assert skipped == {"malformed_json": 2}  # counted per source, as in memory
  if kind == "sft":
    batch = next(streamed.train)
    assert set(np.unique(batch["source_ids"])) <= set(range(-1, len(streamed.source_names)))


def test_streamed_bad_record_error_names_file_and_line(tmp_path, tok, small_pieces):
  recs = _instructions(40)
  recs[33] = {"output": "an answer to no instruction"}
  path = _jsonl(tmp_path / "x.jsonl", recs)
  cfg = config.DataConfig(train_files=path, format="instruction", batch_size=2, seq_len=64)
  with pytest.raises(errors.DataError) as memory:
    pipeline.build(cfg, tok)
  with pytest.raises(errors.DataError) as streamed:
    pipeline.build(dataclasses.replace(cfg, cache_dir=str(tmp_path / "c")), tok)
  assert str(streamed.value) == str(memory.value)
  line = 34 + sum(i % 9 == 4 for i in range(33))  # record 33, after the blank lines
  assert str(memory.value).startswith(f"{path}:{line}: field 'instruction': is missing")
  assert not any(n.startswith("shard-") and "tmp" not in n
                 for _, _, names in os.walk(tmp_path / "c") for n in names)


_CHILD = """
import json, os, resource, sys
from jaxtune import config
from jaxtune.data import pipeline, tokenizer_lib
path, cache, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = tokenizer_lib.load("")
kw = dict(seq_len=1024, batch_size=4, eval_fraction=0.0, streaming=True, cache_dir=cache)
pipeline.build(config.DataConfig(train_files=tokenizer_lib.sample_path("text"), **kw), tok)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, after a warm-up build
ds = pipeline.build(config.DataConfig(train_files=path, **kw), tok)
tokens = sum(int((next(ds.train)["segment_ids"] > 0).sum()) for _ in range(steps))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth": (peak - base) * 1024, "tokens": tokens,
                  "examples": ds.stats["train"]["examples"]}))
"""


@pytest.mark.slow
def test_streamed_resident_memory_stays_under_a_cap_4x_smaller_than_the_corpus(tmp_path):
  cap = 8 << 20  # bytes of resident-memory growth allowed for build + batches
  rng = np.random.default_rng(0)
  words = np.array("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split())
  path = tmp_path / "corpus.jsonl"
  with open(path, "w") as f:
    while f.tell() < 4 * cap:
      f.write(json.dumps({"text": " ".join(rng.choice(words, rng.integers(200, 450)))}) + "\n")
  p = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "c"), "300"],
                     env=_env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert os.path.getsize(path) >= 4 * cap
  assert out["examples"] > 30000 and out["tokens"] > 300 * 4 * 400  # it read the corpus
  assert out["growth"] < cap, f"peak resident memory grew {out['growth'] / 2**20:.1f} MiB"


_RESUME_CHILD = """
import json, os, sys, time
from jaxtune import config
from jaxtune.data import global_batch, pipeline, tokenizer_lib
log, cache, saved = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = config.DataConfig(train_files=tokenizer_lib.sample_path("chat"), batch_size=8, seq_len=128,
                        eval_fraction=0.0, seed=11, streaming=True, cache_dir=cache)
ds = pipeline.build(cfg, tokenizer_lib.load(""))
if saved:
  ds.train.restore(json.loads(saved))
with open(log, "a") as f:
  for _ in range(int(sys.argv[4])):
    d = global_batch.digest(next(ds.train))
    f.write(json.dumps({"digest": d, "state": ds.train.state()}) + "\\n")
    f.flush()
    os.fsync(f.fileno())
    time.sleep(0.005)
"""


def test_streamed_resume_after_sigkill_gives_the_same_batches(tmp_path, tok):
  log, cache = tmp_path / "states.jsonl", str(tmp_path / "cache")
  proc = subprocess.Popen([sys.executable, "-c", _RESUME_CHILD, str(log), cache, "", "100000"],
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while time.time() < deadline:
    if log.exists() and log.read_text().count("\n") >= 30:
      break
    if proc.poll() is not None:
      pytest.fail(f"child exited: {proc.stderr.read().decode()[-2000:]}")
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  lines = [json.loads(x) for x in log.read_text().split("\n")[:-1]]  # complete lines only
  assert len(lines) >= 30 and lines[-1]["state"]["epoch"] >= 1
  log2 = tmp_path / "resumed.jsonl"
  subprocess.run([sys.executable, "-c", _RESUME_CHILD, str(log2), cache,
                  json.dumps(lines[-1]["state"]), "12"], env=_env(), check=True, timeout=240)
  resumed = [json.loads(x)["digest"] for x in log2.read_text().splitlines()]
  cfg = config.DataConfig(train_files=CHAT, batch_size=8, seq_len=128, eval_fraction=0.0,
                          seed=11)
  ref = _digests(pipeline.build(cfg, tok).train, len(lines) + 12)  # in memory, uninterrupted
  assert [x["digest"] for x in lines] == ref[:len(lines)]
  assert resumed == ref[len(lines):]


_SHARE_CHILD = """
import json, sys
from jaxtune import config
from jaxtune.data import global_batch, pipeline, stream, tokenizer_lib
index, cache, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
stream.PIECE = 16
ranges = []
read_range = stream.read_range
def logged(src, marks, start, stop):
  ranges.append((src.name, start, stop))
  return read_range(src, marks, start, stop)
stream.read_range = logged
cfg = config.DataConfig(train_files=path, batch_size=8, seq_len=96, cache_dir=cache)
ds = pipeline.build(cfg, tokenizer_lib.load(""), process_index=index, process_count=2)
batches = [next(ds.train) for _ in range(6)]
print(json.dumps({"ranges": ranges, "batches": [{k: v.tolist() for k, v in b.items()}
                                                for b in batches]}))
"""


def test_two_processes_read_disjoint_shares_that_cover_the_data(tmp_path, tok):
  path = _jsonl(tmp_path / "d.jsonl", _instructions(150))
  cache = str(tmp_path / "shared_cache")
  procs = [subprocess.Popen([sys.executable, "-c", _SHARE_CHILD, str(i), cache, path],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  n = 150
  read = [sorted((a, b) for _, a, b in o["ranges"]) for o in outs]
  assert read[0][0][0] == 0 and read[0][-1][1] == n // 2  # process 0: records [0, 75)
  assert read[1][0][0] == n // 2 and read[1][-1][1] == n  # process 1: records [75, 150)
  for r in read:  # contiguous pieces, each record read once
    assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
  # Together their rows are the global batches a single in-memory process builds.
  whole = pipeline.build(config.DataConfig(train_files=path, batch_size=8, seq_len=96), tok)
  for step in range(6):
    ref = next(whole.train)
    for key, value in ref.items():
      got = np.concatenate([np.asarray(o["batches"][step][key]) for o in outs])
      np.testing.assert_array_equal(got, value, err_msg=f"step {step} {key}")
