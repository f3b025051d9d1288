"""Precompute top-k teacher log-probs for method=distill (distill.teacher_logits_file).

When the teacher is too large to run next to the student, run it once, offline, over every
train and eval example of a distill recipe and keep its K most likely next tokens per
position (file format: jaxtune/methods/teacher_table.py):

  python launch/teacher_logits.py --config=configs/distill.py:TEACHER_DIR \
      --top_k=32 --out=teacher_top32.safetensors [--set=key=value ...]
  python launch/train.py --config=configs/distill.py \
      --set=distill.teacher_logits_file=teacher_top32.safetensors

Examples are keyed by their content, so the file fits any packing, shuffling, mixture or
resume point of the training run. Single process.
"""

import dataclasses
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import safetensors.numpy  # noqa: E402

from jaxtune import data as data_lib  # noqa: E402
from jaxtune import sharding  # noqa: E402
from jaxtune.data import encode  # noqa: E402
from jaxtune.data import packing  # noqa: E402
from jaxtune.hf import io as hf_io  # noqa: E402
from jaxtune.methods import content_keys  # noqa: E402
from jaxtune.methods import distill  # noqa: E402
from jaxtune.methods import teacher_table  # noqa: E402
from jaxtune.models import decoder  # noqa: E402
from jaxtune.models import head  # noqa: E402
from launch import common  # noqa: E402

FLAGS = flags.FLAGS
common.define_config_flags()
flags.adopt_module_key_flags(common)
flags.DEFINE_string("out", None, "The .safetensors file to write.")
flags.DEFINE_integer("top_k", 32, "Teacher tokens kept per position.")
flags.DEFINE_integer("batch_size", 0, "Examples per teacher forward (default: data.batch_size).")

_log = logging.getLogger("jaxtune")


def _example_ids(ds) -> list[np.ndarray]:
  """Token ids of every train example and every eval example (split from packed rows)."""
  out = [np.asarray(r.seqs[0].ids, np.int32) for r in content_keys.train_examples(ds.train)]
  for batch in ds.eval:
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
      out += [tokens[seg == s] for s in np.unique(seg[seg > 0])]
  return out


def write(cfg, out_path: str, *, top_k: int, batch_size: int = 0) -> dict:
  """Runs the teacher (distill.teacher_path) over cfg's data; writes `out_path`."""
  if jax.process_count() != 1:
    raise NotImplementedError("teacher_logits.write runs in a single process")
  cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill,
                                                            teacher_logits_file=""))
  teacher_cfg = distill.teacher_config(cfg)
  tok = data_lib.tokenizer_from_config(cfg)
  vocab = distill.common_vocab(teacher_cfg, teacher_cfg, tok)
  if not 0 < top_k <= vocab:
    raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
  ds = data_lib.build(cfg.data, tok, kind="sft")
  mesh = sharding.make_mesh(cfg.mesh)
  params = distill.load_teacher(cfg, mesh)
  seqs = _example_ids(ds)
  t, bs = cfg.data.seq_len, batch_size or cfg.data.batch_size

  @jax.jit
  def run(params, batch):
    h = decoder.hidden_states(teacher_cfg, params, batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
    logits = head.logits(teacher_cfg, params, h)[..., :vocab]
    lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32)), top_k)
    keys = content_keys.segment_keys(batch["tokens"], batch["segment_ids"],
                                     batch["positions"])[:, 1]  # [B, 2]: segment 1
    return keys, lp, ids

  batch_sh = sharding.batch_sharding(mesh)
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(  # noqa: E731
      mesh, jax.sharding.PartitionSpec(batch_sh.spec[0], *([None] * (x.ndim - 1)))))
  by_key: dict = {}
  for b in range(0, len(seqs), bs):
    chunk = seqs[b:b + bs]
    rows = [[(encode.Encoded(s, np.zeros(len(s), bool)), 0)] for s in chunk]
    rows += [[] for _ in range(bs - len(rows))]
    host = packing.assemble(rows, t)
    keys, lp, ids = run(params, {k: put(host[k]) for k in ("tokens", "segment_ids",
                                                            "positions")})
    keys, lp, ids = hf_io.to_host(keys), hf_io.to_host(lp), hf_io.to_host(ids)
    for i, s in enumerate(chunk):
      by_key.setdefault(tuple(int(x) for x in keys[i]), (lp[i, :len(s)], ids[i, :len(s)]))
  order = sorted(by_key)  # (k1, k2) order, as content_keys.find searches it
  content_keys.sort_table(np.array(order, np.uint32))  # checks first-hash collisions
  lengths = np.array([len(by_key[k][0]) for k in order], np.int32)
  arrays = {"keys": np.array(order, np.uint32).reshape(-1, 2), "lengths": lengths,
            "offsets": (np.cumsum(lengths) - lengths).astype(np.int32),
            "logprobs": np.concatenate([by_key[k][0] for k in order]).astype(np.float32),
            "ids": np.concatenate([by_key[k][1] for k in order]).astype(np.int32)}
  meta = {"format": teacher_table.FORMAT, "top_k": str(top_k), "vocab_size": str(vocab),
          "teacher": cfg.distill.teacher_path, "data_fingerprint": ds.fingerprint}
  safetensors.numpy.save_file(arrays, out_path, metadata=meta)
  _log.info("teacher top-%d log-probs of %d examples (%d positions) -> %s", top_k, len(order),
            int(lengths.sum()), out_path)
  return {"examples": len(order), "positions": int(lengths.sum()), "path": out_path}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  common.setup_runtime()
  cfg = common.load_config()
  print(json.dumps(write(cfg, FLAGS.out, top_k=FLAGS.top_k, batch_size=FLAGS.batch_size)))


if __name__ == "__main__":
  common.run(main)
