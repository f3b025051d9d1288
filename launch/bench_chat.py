"""Batches for launch/bench.py's data workloads, and the PyTorch peer's view of them.

The synthetic rows of the bench (uniform random tokens, loss on every position, no segment
ids) are not what users train on. These workloads are (`bench.py --workloads=1b_full_chat`):

  chat  the real launch/train.py data pipeline (`jaxtune.data.build` with configs/sft_chat.py's
        data section: chat template, loss on assistant turns only, packed rows with segment
        ids and restarting positions) at the bench's seq and batch, on the bundled chat
        sample written CHAT_COPIES times into one file; a new host batch every step, as the
        loop does. tokens/s counts real (non-padding) tokens only. The copies: the sample
        alone (400 examples) packs into ~13 rows an epoch, and the packer closes its open
        rows at every epoch's end, so about 5% of its rows are padding where a dataset of
        realistic size (thousands of examples) loses well under 1%.
  seg   synthetic full rows carrying the segment ids and positions the pipeline attaches to
        unpacked rows (one example per row): what 'packed within 5% of unpacked' compares
        against, and the check that unpacked rows do not pay for segment ids.

The peer gets the very same host batches: tokens, positions, the loss mask, and the packed
rows' document mask, as a [B, 1, T, T] boolean mask for sdpa (eager) or a flex_attention
BlockMask (compiled).
"""

import dataclasses
import itertools
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_KINDS = ("synthetic", "seg", "chat")
CHAT_COPIES = 25  # the bundled chat sample, 25 times over: 10,000 examples


def chat_file(directory: str, copies: int = CHAT_COPIES) -> str:
  """The bundled chat sample written `copies` times into DIRECTORY/chat_xN.jsonl."""
  from jaxtune.data import tokenizer_lib
  path = os.path.join(directory, f"chat_x{copies}.jsonl")
  with open(tokenizer_lib.sample_path("chat")) as f:
    text = f.read()
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
  with os.fdopen(fd, "w") as f:  # whole or not at all: concurrent benches share the name
    f.write(text * copies)
  os.replace(tmp, path)
  return path


def data_config(spec: dict, train_files: str = ""):
  """configs/sft_chat.py's data section at the bench's seq_len and batch."""
  sys.path.insert(0, ROOT)
  from configs import sft_chat
  return dataclasses.replace(sft_chat.get_config("").data, seq_len=spec["seq"],
                             batch_size=spec["batch"], eval_fraction=0.0, eval_files="",
                             train_files=train_files)


def host_batches(spec: dict, vocab: int):
  """Infinite iterator of host (numpy) batches for `spec['data']`."""
  import numpy as np
  kind = spec.get("data", "synthetic")
  b, t = spec["batch"], spec["seq"]
  if kind in ("synthetic", "seg"):
    from launch import bench_workers  # lazy: it imports this module
    batch = bench_workers.make_batch(spec, vocab)
    if kind == "seg":
      batch["segment_ids"] = np.ones((b, t), np.int32)
      batch["positions"] = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    return itertools.repeat(batch)
  from jaxtune import data as data_lib
  tok = data_lib.load_tokenizer("")
  if len(tok) > vocab:
    raise ValueError(f"bundled tokenizer has {len(tok)} tokens, model vocab {vocab}")
  path = chat_file(tempfile.gettempdir(), spec.get("copies", CHAT_COPIES))  # rewritten each time
  ds = data_lib.build(data_config(spec, path), tok, kind="sft")
  return iter(ds.train)


def real_tokens(batch: dict) -> int:
  """Non-padding tokens of a host batch (segment id != 0), else every token."""
  import numpy as np
  seg = batch.get("segment_ids")
  return int(np.count_nonzero(seg)) if seg is not None else int(batch["tokens"].size)


def torch_inputs(batch: dict, dev: str, attn: str) -> dict:
  """The peer's forward arguments and loss targets for one host batch.

  attn 'sdpa': a boolean [B, 1, T, T] mask (causal and same segment; padding attends
  padding) when the batch has segment ids, else HF's own causal mask; 'flex_attention': a
  BlockMask with the same document-causal rule (torch.nn.attention.flex_attention)."""
  import torch
  out = {"input_ids": torch.as_tensor(batch["tokens"], dtype=torch.long, device=dev),
         "targets": torch.as_tensor(batch["targets"], dtype=torch.long, device=dev),
         "loss_mask": torch.as_tensor(batch["loss_mask"], dtype=torch.float32, device=dev)}
  seg = batch.get("segment_ids")
  if seg is None:
    return out
  seg_t = torch.as_tensor(seg, dtype=torch.int32, device=dev)
  out["position_ids"] = torch.as_tensor(batch["positions"], dtype=torch.long, device=dev)
  b, t = seg.shape
  if attn == "flex_attention":
    from torch.nn.attention import flex_attention as fa

    def document_causal(bi, h, q, k):
      return (k <= q) & (seg_t[bi, q] == seg_t[bi, k])

    out["attention_mask"] = fa.create_block_mask(document_causal, b, None, t, t, device=dev)
  else:
    idx = torch.arange(t, device=dev)
    causal = idx[None, :] <= idx[:, None]
    out["attention_mask"] = (causal[None] & (seg_t[:, :, None] == seg_t[:, None, :]))[:, None]
  return out


def torch_loss(model, inputs: dict):
  """Mean next-token cross-entropy over the loss mask, float32 (as jaxtune's SFT loss)."""
  import torch
  kw = {k: inputs[k] for k in ("input_ids", "position_ids", "attention_mask") if k in inputs}
  logits = model(**kw, use_cache=False).logits
  nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                          inputs["targets"].flatten(), reduction="none")
  mask = inputs["loss_mask"].flatten()
  return (nll * mask).sum() / mask.sum().clamp(min=1.0)
