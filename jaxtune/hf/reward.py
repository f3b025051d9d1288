"""Reward models in Hugging Face's sequence-classification format, both ways.

A jaxtune reward model is a decoder's params plus a head {"kernel": [D, 1]}
(`jaxtune.train.reward`). In HF it is `<Family>ForSequenceClassification` with
num_labels=1: the decoder's tensors under `model.*` as in the causal-LM table
(`jaxtune.hf.keys`), no `lm_head.weight`, and `score.weight` [1, D] (no bias):

    save(cfg, params, head, out_dir, tokenizer=tok, pad_token_id=0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out_dir)
    cfg, params, head = load(out_dir)        # params without lm_head: hidden states only

HF pools the score at the rightmost input id that is not `pad_token_id` (the attention
mask plays no part), so config.json must carry a pad id. jaxtune pools at the same token
(`jaxtune.methods.reward.pool_index`, in training and in `score`), so the export scores
what training scored for any pad id, including pad = eos (Llama 3, Mistral: the token
before the trailing eos is pooled); `load` keeps the pad id in the returned config, so
`reward.score(cfg, params, head, tokens)` agrees with the HF model it came from.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jaxtune import config as config_lib
from jaxtune import tree
from jaxtune.hf import config as hf_config
from jaxtune.hf import io as hf_io
from jaxtune.hf import keys
from jaxtune.models import families

SCORE_KEY = "score.weight"
LM_HEAD_KEY = "lm_head.weight"


def architecture(family: str) -> str:
  """'LlamaForSequenceClassification' for 'llama', and so on."""
  return families.get(family).seq_cls_architecture


def hf_config_dict(cfg: config_lib.ModelConfig, *, pad_token_id: int,
                   dtype: str = "float32") -> dict:
  """config.json of the classifier: the causal-LM config plus num_labels=1 and a pad id."""
  if pad_token_id is None or pad_token_id < 0:
    raise ValueError("reward model export needs a pad_token_id >= 0: HF's "
                     "*ForSequenceClassification finds the last token through it")
  d = hf_config.to_hf(cfg, dtype=dtype)
  d.update(architectures=[architecture(cfg.family)], pad_token_id=int(pad_token_id),
           num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  return d


def save(cfg: config_lib.ModelConfig, params: dict, head: dict, out_dir: str, *,
         tokenizer=None, pad_token_id: int | None = None, dtype: str | None = None,
         metadata: dict | None = None, max_shard_bytes: int = 5 * 2**30) -> str:
  """Writes an HF directory that AutoModelForSequenceClassification loads (num_labels=1).

  params: dense decoder params (merge LoRA first); lm_head, if any, is not written.
  head: {"kernel": [D, 1]}. pad_token_id: default cfg.pad_token_id, then the tokenizer's.
  All processes must call it (sharded params are gathered); only process 0 writes.
  """
  dtype = dtype or cfg.param_dtype
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id
    if pad_token_id < 0 and tokenizer is not None and tokenizer.pad_token_id is not None:
      pad_token_id = int(tokenizer.pad_token_id)
  np_dtype = hf_io.NP_DTYPES[dtype]
  flat = {}
  for path, x in tree.flatten(params).items():
    if path.startswith("score/"):
      continue
    if not isinstance(x, (jax.Array, np.ndarray)):
      raise ValueError(f"reward save: param {path} is a {type(x).__name__}; dequantise or merge "
                       "it to a dense array first")
    flat[path] = hf_io.to_host(x).astype(np_dtype)
  kernel = hf_io.to_host(head["kernel"])
  if kernel.shape != (cfg.hidden_size, 1):
    raise ValueError(f"reward head kernel has shape {kernel.shape}, expected "
                     f"[hidden_size={cfg.hidden_size}, 1]")
  config = hf_config_dict(cfg, pad_token_id=pad_token_id, dtype=dtype)
  if jax.process_index() != 0:
    return out_dir
  tied = dataclasses.replace(cfg, tie_word_embeddings=True)  # the table's rows, no lm_head
  tensors = keys.to_hf(tied, flat)
  tensors[SCORE_KEY] = np.ascontiguousarray(kernel.T.astype(np_dtype))  # [1, D]
  os.makedirs(out_dir, exist_ok=True)
  hf_io.save_safetensors(tensors, out_dir, max_shard_bytes=max_shard_bytes, metadata=metadata)
  if metadata:
    config["jaxtune"] = metadata
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  if tokenizer is not None:
    hf_io.save_tokenizer(tokenizer, out_dir)  # loadable by every allowed transformers
  return out_dir


def load(model_dir: str, base: config_lib.ModelConfig | None = None):
  """(ModelConfig, params, head) from an HF *ForSequenceClassification dir (num_labels=1).

  params hold no lm_head (a classifier has none): use them for hidden states / `score`.
  Unknown, missing or mis-shaped tensors are errors naming the key and shapes.
  """
  model_dir = hf_io.resolve(model_dir)
  with open(os.path.join(model_dir, "config.json")) as f:
    d = json.load(f)
  labels = d.get("num_labels", len(d.get("id2label") or {}) or None)
  archs = d.get("architectures") or []
  if not any(a.endswith("ForSequenceClassification") for a in archs) or labels != 1:
    raise ValueError(f"{model_dir}: expected a *ForSequenceClassification model with "
                     f"num_labels=1, got architectures={archs}, num_labels={labels}")
  cfg = hf_config.from_hf(d, base, source=os.path.join(model_dir, "config.json"))
  tied = dataclasses.replace(cfg, tie_word_embeddings=True)  # no lm_head row
  tensors = hf_io.Tensors(model_dir)
  shape = tensors.shapes.get(SCORE_KEY)
  if shape != (1, cfg.hidden_size):
    raise ValueError(f"{model_dir}: tensor {SCORE_KEY} has shape {shape}, expected "
                     f"{[1, cfg.hidden_size]}")
  shapes, get = hf_io.tensor_view(cfg, model_dir, tensors, None)
  keys.check_keys(tied, {k: v for k, v in shapes.items() if k != SCORE_KEY}, model_dir)

  np_dtype = hf_io.NP_DTYPES[cfg.param_dtype]
  flat = {p: x.astype(np_dtype) for p, x in keys.to_params(tied, get)}
  params = jax.tree_util.tree_map(np.asarray, tree.unflatten(flat))
  head = {"kernel": np.ascontiguousarray(get(SCORE_KEY).T.astype(np_dtype))}  # [D, 1]
  return cfg, params, head
