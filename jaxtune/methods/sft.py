"""method=sft: next-token cross-entropy over the loss mask (full FT, continued pre-training,
instruction / chat SFT, LoRA and QLoRA).

The objective returns the SUM of token NLLs over the micro-batch and the token count as its
weight; the step adds both over micro-batches and divides once, so gradient accumulation
gives exactly the full-batch gradient. With a data mixture, per-source losses are reported
as loss/source{i} (unchunked output head only). LoRA dropout (`peft.dropout`) applies in
training steps: the eval step passes rng=None.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune.methods import base
from jaxtune.models import head


def make_objective(model_cfg: config_lib.ModelConfig, *, adapters=None, constrain=None,
                   num_sources: int = 0) -> base.Objective:
  """objective(trainable, frozen, batch, rng) -> (token NLL sum, (tokens, metrics))."""

  def objective(trainable, frozen, batch, rng):
    params = base.model_params(trainable, frozen, adapters, rng)
    h, aux = base.hidden(model_cfg, params, batch, constrain, return_aux=True)
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    tokens = jnp.sum(mask)
    nll_sum, nll = head.nll_sum(model_cfg, params, h, batch["targets"], mask,
                                constrain=constrain)
    aux_sum, aux_metrics = base.moe_aux(model_cfg, aux, tokens)  # MoE load balancing
    metrics = {"loss": (nll_sum, tokens), **aux_metrics}
    if nll is not None and num_sources > 1 and "source_ids" in batch:
      src = batch["source_ids"]
      for s in range(num_sources):
        sel = (src == s).astype(jnp.float32) * mask
        metrics[f"loss/source{s}"] = (jnp.sum(nll * sel), jnp.sum(sel))
    return nll_sum + aux_sum, (tokens, metrics)

  return objective


class Sft(base.Method):
  name = "sft"
  data_kind = "sft"

  def objective(self, ctx: base.Context) -> base.Objective:
    return make_objective(ctx.model_cfg, adapters=ctx.adapters, constrain=ctx.constrain,
                          num_sources=len(ctx.data.source_names))


METHOD = Sft()
