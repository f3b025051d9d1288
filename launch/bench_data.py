r"""Data pipeline throughput: reading, rendering, tokenizing and packing, in memory vs streamed.

    python launch/bench_data.py --make_corpus=/tmp/c.jsonl --records=20000 --format=chat
    python launch/bench_data.py --data=/tmp/c.jsonl --mode=memory --out=/tmp/bench
    python launch/bench_data.py --data=/tmp/c.jsonl --mode=stream --cache_dir=/tmp/cache \
        [--workers=2] --out=/tmp/bench     # cold: the cache dir is emptied first
    python launch/bench_data.py --data=/tmp/c.jsonl --mode=warm --cache_dir=/tmp/cache

Each run builds the data (`jaxtune.data.build` with the bundled tokenizer, or --tokenizer)
and assembles every batch of one epoch, then prints one JSON line (and appends it to
OUT/data_bench.jsonl): records, examples, tokens, seconds to build, seconds for the
epoch's batches, records/s and tokens/s over both (wall clock, and per CPU second of this
process: steadier on a shared machine; worker processes' CPU is not in it), and the
process's peak resident memory.
`warm` reuses the cache a previous `stream` run wrote (no tokenizer call).
"""

import json
import os
import resource
import shutil
import time

from absl import app
from absl import flags

from jaxtune import config
from jaxtune.data import pipeline
from jaxtune.data import tokenizer_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("data", "", "JSONL corpus to read")
flags.DEFINE_enum("mode", "memory", ["memory", "stream", "warm"], "in memory, streamed "
                  "into an emptied cache (cold), or streamed from the cache (warm)")
flags.DEFINE_string("cache_dir", "/tmp/jaxtune_bench_cache", "tokenized cache (stream/warm)")
flags.DEFINE_integer("workers", 0, "grain worker processes that tokenize (stream)")
flags.DEFINE_integer("seq_len", 512, "data.seq_len")
flags.DEFINE_integer("batch_size", 16, "data.batch_size")
flags.DEFINE_string("tokenizer", "", "tokenizer dir or hub id; '' = the bundled one")
flags.DEFINE_string("out", "", "directory to append data_bench.jsonl to")
flags.DEFINE_string("make_corpus", "", "write a deterministic corpus here and exit")
flags.DEFINE_integer("records", 20000, "records of --make_corpus")
flags.DEFINE_enum("format", "chat", ["chat", "text"], "records of --make_corpus")

_WORDS = ("the a model data train token batch pack stream cache shard epoch loss mask turn "
          "user assistant system answer question reason step value grid river stone").split()


def make_corpus(path: str, records: int, fmt: str) -> None:
  """Records of 20-220 words (chat: a user turn and an assistant turn), seeded."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  words = np.array(_WORDS)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(records):
      text = lambda: " ".join(rng.choice(words, int(rng.integers(10, 110))))  # noqa: E731
      if fmt == "text":
        rec = {"text": text() + " " + text()}
      else:
        rec = {"messages": [{"role": "user", "content": text()},
                            {"role": "assistant", "content": text()}]}
      f.write(json.dumps(rec) + "\n")


def main(argv):
  del argv
  if FLAGS.make_corpus:
    make_corpus(FLAGS.make_corpus, FLAGS.records, FLAGS.format)
    return
  tok = tokenizer_lib.load(FLAGS.tokenizer)
  streamed = FLAGS.mode != "memory"
  if FLAGS.mode == "stream":
    shutil.rmtree(FLAGS.cache_dir, ignore_errors=True)
  cfg = config.DataConfig(train_files=os.path.abspath(FLAGS.data), eval_fraction=0.0,
                          seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size,
                          streaming=streamed, cache_dir=FLAGS.cache_dir if streamed else "",
                          workers=FLAGS.workers)
  t0, c0 = time.perf_counter(), time.process_time()
  ds = pipeline.build(cfg, tok)
  t1 = time.perf_counter()
  steps = -(-ds.stats["rows_per_epoch"] // FLAGS.batch_size)
  tokens = sum(int((next(ds.train)["segment_ids"] > 0).sum()) for _ in range(steps))
  t2, cpu = time.perf_counter(), time.process_time() - c0
  train = ds.stats["train"]
  row = {"mode": FLAGS.mode, "workers": FLAGS.workers, "records": train["records"],
         "examples": train["examples"], "tokens": train["tokens"], "batched_tokens": tokens,
         "build_s": round(t1 - t0, 3), "batches_s": round(t2 - t1, 3),
         "records_per_s": round(train["records"] / (t2 - t0), 1),
         "tokens_per_s": round(train["tokens"] / (t2 - t0), 1), "cpu_s": round(cpu, 3),
         "records_per_cpu_s": round(train["records"] / cpu, 1),
         "tokens_per_cpu_s": round(train["tokens"] / cpu, 1),
         "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
         "cache_hit": [c["hit"] for c in ds.stats.get("cache", [])]}
  print(json.dumps(row))
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "data_bench.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
