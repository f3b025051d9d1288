"""Objectives: what a step differentiates, one per method, with a common signature.

    objective(trainable, frozen, batch, rng) -> (loss_sum, (weight, metrics))

`loss_sum` is a SUM over the micro-batch (of token NLLs, of pair losses, ...) and `weight`
the count it is normalised by (tokens, pairs). The step adds both over micro-batches and
divides once, so gradient accumulation gives exactly the full-batch gradient. `metrics`
maps a name to a (sum, count) pair, reduced the same way.

`trainable` and `frozen` come from `split` below: full fine-tuning trains the params
(frozen = {}); LoRA/QLoRA trains the adapter tree (frozen = {"base": params}); methods add
their frozen extras ("ref", "teacher") next to it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune.models import decoder

Objective = Callable


def model_params(trainable, frozen, lora_scale: float | None):
  """(params, lora) for `decoder.forward` from the two halves of a run's weights."""
  if lora_scale is None:
    return trainable, None
  return frozen["base"], (trainable, lora_scale)


def forward_hidden(model_cfg, trainable, frozen, batch, lora_scale, constrain, *,
                   lora_dropout: float = 0.0, rng=None):
  params, lora = model_params(trainable, frozen, lora_scale)
  lora_tree, scale = lora if lora else (None, 1.0)
  h = decoder.hidden_states(model_cfg, params, batch["tokens"], positions=batch.get("positions"),
                            segment_ids=batch.get("segment_ids"), lora=lora_tree,
                            lora_scale=scale, constrain=constrain, lora_dropout=lora_dropout,
                            dropout_rng=rng)
  return params, h


def sft(model_cfg: config_lib.ModelConfig, *, lora_scale: float | None = None,
        constrain=None, num_sources: int = 0, lora_dropout: float = 0.0) -> Objective:
  """Next-token cross-entropy over the loss mask (token-weighted mean over the batch).

  `lora_dropout` > 0 drops adapter inputs in training steps; the eval step passes rng=None,
  so evaluation runs without dropout.
  """

  def objective(trainable, frozen, batch, rng):
    params, h = forward_hidden(model_cfg, trainable, frozen, batch, lora_scale, constrain,
                               lora_dropout=lora_dropout, rng=rng)
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    tokens = jnp.sum(mask)
    metrics = {}
    if model_cfg.logits_chunk > 0:
      w, transposed = decoder.output_kernel(model_cfg, params)
      mean, _ = losses.chunked_cross_entropy(h, w.astype(h.dtype), batch["targets"], mask,
                                             chunk_size=model_cfg.logits_chunk,
                                             transpose=transposed)
      nll_sum = mean * jnp.maximum(tokens, 1.0)
    else:
      logits = decoder.logits_from_hidden(model_cfg, params, h)  # [B, T, V] f32
      nll = -losses.token_logprobs(logits, batch["targets"]) * mask  # [B, T]
      nll_sum = jnp.sum(nll)
      if num_sources > 1 and "source_ids" in batch:
        src = batch["source_ids"]
        for s in range(num_sources):
          sel = (src == s).astype(jnp.float32) * mask
          metrics[f"loss/source{s}"] = (jnp.sum(nll * sel), jnp.sum(sel))
    metrics["loss"] = (nll_sum, tokens)
    return nll_sum, (tokens, metrics)

  return objective


def split(params, adapters=None):
  """(trainable, frozen): params alone for full FT; adapters over a frozen base for LoRA."""
  if adapters is None:
    return params, {}
  return adapters, {"base": params}


def zero_metrics_like(metrics):
  return jax.tree_util.tree_map(jnp.zeros_like, metrics)
