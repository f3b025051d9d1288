"""The precomputed top-k teacher table of method=distill (distill.teacher_logits_file).

When the teacher is too large to run next to the student, `launch/teacher_logits.py` runs it
once, offline, over every train and eval example and keeps its K most likely next tokens
per position in a safetensors file (metadata format=jaxtune-teacher-topk-v1, top_k,
vocab_size, teacher):

    keys      uint32  [N, 2]  two 32-bit polynomial hashes of an example's token ids
    offsets   int32   [N]     its first row in logprobs / ids
    lengths   int32   [N]     its number of tokens
    logprobs  float32 [M, K]  log-softmax of the teacher's logits (T = 1), top K, descending
    ids       int32   [M, K]  their token ids; example n, position p is row offsets[n] + p

Examples are keyed by CONTENT, not by order: the teacher's logits depend on the token ids
only, so the file is valid whatever the packing, shuffling, mixture weights, resume point
or process count. In the step (`lookup`), each packed segment is hashed the same way
(`content_keys.segment_keys`) and found by binary search (`content_keys.find`); unknown
segments are masked out and counted in teacher/missing. The whole table is replicated on
every device: it suits datasets whose M * K * 8 bytes fit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import safetensors

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.methods import content_keys

FORMAT = "jaxtune-teacher-topk-v1"


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
    raise config_lib.ConfigError(f"distill.teacher_logits_file: {path} is not a {FORMAT} "
                                 f"file (metadata {meta})")
  k = arrays["ids"].shape[1]
  if top_k > k:
    raise config_lib.ConfigError(f"distill.top_k={top_k} but {path} holds only the "
                                 f"top {k} teacher tokens")
  if top_k:
    arrays["logprobs"], arrays["ids"] = arrays["logprobs"][:, :top_k], arrays["ids"][:, :top_k]
  if arrays["ids"].size and int(arrays["ids"].max()) >= vocab_size:
    raise config_lib.ConfigError(f"distill.teacher_logits_file: token id "
                                 f"{int(arrays['ids'].max())} >= the student's vocab_size "
                                 f"{vocab_size}")
  repl = sharding.replicated(mesh)
  return {name: jax.make_array_from_callback(x.shape, repl, lambda idx, x=x: x[idx])
          for name, x in arrays.items()}
