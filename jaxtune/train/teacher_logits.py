"""Precomputed top-k teacher log-probs for method=distill (method_cfg.teacher_logits_file).

When the teacher is too large to run next to the student, run it once, offline, over every
train and eval example and keep its K most likely next tokens per position:

    python -m jaxtune.train.teacher_logits --config=configs/distill.py:TEACHER_DIR \
        --top_k=32 --out=teacher_top32.safetensors [--set=key=value ...]
    python launch/train.py --config=configs/distill.py \
        --set=method_cfg.teacher_logits_file=teacher_top32.safetensors

File (safetensors; metadata format=jaxtune-teacher-topk-v1, top_k, vocab_size, teacher):

    keys      uint32  [N, 2]  two 32-bit polynomial hashes of an example's token ids
    offsets   int32   [N]     its first row in logprobs / ids
    lengths   int32   [N]     its number of tokens
    logprobs  float32 [M, K]  log-softmax of the teacher's logits (T = 1), top K, descending
    ids       int32   [M, K]  their token ids; example n, position p is row offsets[n] + p

Examples are keyed by CONTENT, not by order: the teacher's logits depend on the token ids
only, so the file is valid whatever the packing, shuffling, mixture weights, resume point
or process count. In the step (`lookup`), each packed segment is hashed the same way
(`content_keys.segment_keys`) and found by binary search (`content_keys.find`); unknown
segments are masked out and counted in teacher/missing.
The whole table is replicated on every device: it suits datasets whose M * K * 8 bytes fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.data import encode
from jaxtune.data import packing
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.train import content_keys

FORMAT = "jaxtune-teacher-topk-v1"
_log = logging.getLogger("jaxtune")


def lookup(table: dict, batch: dict):
  """(logprobs [B, T, K], ids [B, T, K], found [B, T] bool) for a packed SFT batch."""
  tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  example, slot_found = content_keys.find(
      table["keys"], content_keys.segment_keys(tokens, seg, pos))  # [B, T+1] x2
  ex = jnp.take_along_axis(example, seg, axis=1)  # [B, T]: each token's example
  found = jnp.take_along_axis(slot_found, seg, axis=1) & (seg > 0)
  found &= pos < table["lengths"][ex]
  row = jnp.where(found, table["offsets"][ex] + pos, 0)  # [B, T]
  return table["logprobs"][row], table["ids"][row], found


def load(path: str, mesh, *, vocab_size: int, top_k: int = 0) -> dict:
  """The file as a replicated device table; checks format, vocabulary and top_k."""
  with safetensors.safe_open(path, framework="np") as f:
    meta = f.metadata() or {}
    arrays = {k: f.get_tensor(k) for k in ("keys", "offsets", "lengths", "logprobs", "ids")}
  if meta.get("format") != FORMAT:
    raise config_lib.ConfigError(f"method_cfg.teacher_logits_file: {path} is not a {FORMAT} "
                                 f"file (metadata {meta})")
  k = arrays["ids"].shape[1]
  if top_k > k:
    raise config_lib.ConfigError(f"method_cfg.distill_top_k={top_k} but {path} holds only the "
                                 f"top {k} teacher tokens")
  if top_k:
    arrays["logprobs"], arrays["ids"] = arrays["logprobs"][:, :top_k], arrays["ids"][:, :top_k]
  if arrays["ids"].size and int(arrays["ids"].max()) >= vocab_size:
    raise config_lib.ConfigError(f"method_cfg.teacher_logits_file: token id "
                                 f"{int(arrays['ids'].max())} >= the student's vocab_size "
                                 f"{vocab_size}")
  repl = sharding.replicated(mesh)
  return {name: jax.make_array_from_callback(x.shape, repl, lambda idx, x=x: x[idx])
          for name, x in arrays.items()}


def _example_ids(ds) -> list[np.ndarray]:
  """Token ids of every train example and every eval example (split from packed rows)."""
  out = [np.asarray(r.seqs[0].ids, np.int32) for r in content_keys.train_examples(ds.train)]
  for batch in ds.eval:
    for tokens, seg in zip(batch["tokens"], batch["segment_ids"]):
      out += [tokens[seg == s] for s in np.unique(seg[seg > 0])]
  return out


def write(cfg: config_lib.TrainConfig, out_path: str, *, top_k: int,
          batch_size: int = 0) -> dict:
  """Runs the teacher (method_cfg.teacher_path) over cfg's data; writes `out_path`."""
  from jaxtune import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxtune.train import distill  # pylint: disable=g-import-not-at-top
  if jax.process_count() != 1:
    raise NotImplementedError("teacher_logits.write runs in a single process")
  cfg = dataclasses.replace(cfg, method_cfg=dataclasses.replace(cfg.method_cfg,
                                                                teacher_logits_file=""))
  teacher_cfg = distill.teacher_config(cfg)
  tok = data_lib.tokenizer_from_config(cfg)
  vocab = distill.common_vocab(teacher_cfg, teacher_cfg, tok)
  if not 0 < top_k <= vocab:
    raise ValueError(f"top_k must be in [1, {vocab}], got {top_k}")
  ds = data_lib.build(cfg.data, tok, kind="sft")
  mesh = sharding.make_mesh(cfg.mesh)
  params = distill.load_teacher(cfg, teacher_cfg, mesh)
  seqs = _example_ids(ds)
  t, bs = cfg.data.seq_len, batch_size or cfg.data.batch_size

  @jax.jit
  def run(params, batch):
    h = decoder.hidden_states(teacher_cfg, params, batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])
    logits = decoder.logits_from_hidden(teacher_cfg, params, h)[..., :vocab]
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
  meta = {"format": FORMAT, "top_k": str(top_k), "vocab_size": str(vocab),
          "teacher": cfg.method_cfg.teacher_path, "data_fingerprint": ds.fingerprint}
  safetensors.numpy.save_file(arrays, out_path, metadata=meta)
  _log.info("teacher top-%d log-probs of %d examples (%d positions) -> %s", top_k, len(order),
            int(lengths.sum()), out_path)
  return {"examples": len(order), "positions": int(lengths.sum()), "path": out_path}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/NAME.py[:ARG] (a distill recipe)")
  p.add_argument("--set", action="append", default=[], help="key=value override")
  p.add_argument("--out", required=True, help="the .safetensors file to write")
  p.add_argument("--top_k", type=int, default=32)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  path, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("jaxtune_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.override(module.get_config(arg or None), args.set)
  print(json.dumps(write(cfg, args.out, top_k=args.top_k)))


if __name__ == "__main__":
  main()
