"""The `Method` protocol: how a training method plugs into the generic engine.

A method (sft, dpo, reward, distill; grpo next) is one module in this package holding one
`Method` subclass. The engine (`jaxtune/train/`) calls its hooks in this order:

    check(cfg)                      before any data or weights are touched: bad options fail
                                    in seconds, naming the key and the allowed values
    frozen(ctx) -> dict             extra frozen trees: a reference model, a teacher, a table
    extra_trainable(ctx)            method-owned leaves trained next to the params / adapters
                                    (the reward head), or None
    objective(ctx) -> objective     pure and jittable:
                                    objective(trainable, frozen, batch, rng)
                                      -> (loss_sum, (weight, {name: (sum, count)}))
    batches(ctx, run) -> iterator   host batches for each step; default: the data loader.
                                    `run.state` is the current TrainState when a batch is
                                    asked for (a rollout method samples with it)
    eval_batches(ctx, run) -> list  host batches for an evaluation; default: the held-out
                                    data (a rollout method scores greedy completions)
    export(ctx, state, out_dir, meta, write_adapter=True) -> str
                                    default: HF model (+ PEFT adapter)

`Context` is what the hooks see. `model_params` is the one place where the trainable tree,
the frozen base and the PEFT adapters become the params the model runs with.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

from jaxtune import config as config_lib
from jaxtune import peft
from jaxtune import sharding
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder

Objective = Callable  # (trainable, frozen, batch, rng) -> (loss_sum, (weight, metrics))


@dataclasses.dataclass
class Context:
  """A prepared job as the method hooks see it (built by `train.setup.prepare`)."""
  cfg: config_lib.TrainConfig
  model_cfg: config_lib.ModelConfig
  mesh: Any
  params: Any  # the base params on the mesh (4-bit projections for QLoRA)
  adapters: Any  # the PEFT adapters template (static fields) or None for full fine-tuning
  tokenizer: Any
  data: Any  # data.Datasets, or None outside training (convert)
  workdir: str = ""  # the run's directory (set by the loop): method artefacts go there

  @property
  def constrain(self):
    return sharding.constrainer(self.mesh)


class Method:
  """Defaults for every hook; a method overrides what it needs."""
  name: str = ""
  data_kind: str = "sft"  # what the data pipeline yields: 'sft' | 'preference' | 'prompt'

  def check(self, cfg: config_lib.TrainConfig) -> None:
    """Raises config.ConfigError naming the key for options this method cannot run with."""
    del cfg

  def frozen(self, ctx: Context) -> dict:
    del ctx
    return {}

  def extra_trainable(self, ctx: Context):
    """({name: tree}, {name: logical-axes tree}) placed on ctx.mesh, or None."""
    del ctx
    return None

  def objective(self, ctx: Context) -> Objective:
    raise NotImplementedError

  def batches(self, ctx: Context, run) -> Iterator[dict]:
    """This process's host batches, one per step (default: the resumable data loader)."""
    del run
    return ctx.data.train

  def eval_batches(self, ctx: Context, run) -> list:
    """Host batches of one evaluation (default: the held-out data, every example once)."""
    del run
    return ctx.data.eval

  def export(self, ctx: Context, state, out_dir: str, meta: dict, *,
             write_adapter: bool = True) -> str:
    """The trained model in HF format (and, for PEFT runs, the adapter next to it unless
    write_adapter=False)."""
    return export_model(ctx, state.trainable, out_dir, meta, write_adapter=write_adapter)


def model_params(trainable, frozen: dict, adapters, rng=None):
  """The params the model runs with: the trainable tree itself (full fine-tuning), or the
  frozen base with the adapters (`adapters` template, leaves from `trainable`) applied as
  wrapped kernel leaves. `rng` (training steps only) drives adapter dropout."""
  if adapters is None:
    return trainable
  return dataclasses.replace(adapters, params=trainable).apply(frozen["base"], rng=rng)


def hidden(model_cfg, params, batch: dict, constrain=None, *, return_aux: bool = False):
  """Final-normed hidden states [B, T, D] of a packed batch; with return_aux, (h, aux) where
  aux["moe_aux_loss"] is the MoE load-balancing loss (`moe_aux` adds it to an objective)."""
  return decoder.hidden_states(model_cfg, params, batch["tokens"],
                               positions=batch.get("positions"),
                               segment_ids=batch.get("segment_ids"), constrain=constrain,
                               return_aux=return_aux)


def moe_aux(model_cfg, aux: dict, weight) -> tuple[Any, dict]:
  """(term to add to an objective's sum, metrics) for the MoE load-balancing loss.

  The objective's sum is divided by `weight` (tokens, pairs, ...), so the term is
  router_aux_loss_coef * aux * weight: the loss becomes mean + coef * aux, as in
  transformers' *ForCausalLM. Logged as `moe_aux_loss` (the aux value, unscaled). Dense
  models: (0, {}).
  """
  if not model_cfg.num_experts:
    return 0.0, {}
  a = aux["moe_aux_loss"]
  coef = max(model_cfg.router_aux_loss_coef, 0.0)
  return coef * a * weight, {"moe_aux_loss": (a * weight, weight)}


def export_model(ctx: Context, trainable, out_dir: str, meta: dict, *,
                 write_adapter: bool = True) -> str:
  """HF export of the trained model to out_dir (PEFT adapters merged into the base) and, for
  PEFT runs, the adapter in PEFT format to out_dir + "_adapter"."""
  metadata = {"data_fingerprint": meta.get("data_fingerprint", ""),
              "jaxtune_method": ctx.cfg.method, "jaxtune_peft": ctx.cfg.peft.method}
  params = trainable
  if ctx.adapters is not None:
    method = peft.get(ctx.cfg.peft.method)
    adapters = dataclasses.replace(ctx.adapters, params=trainable)
    if write_adapter:
      method.save(ctx.model_cfg, adapters, out_dir.rstrip("/") + "_adapter",
                  base_model_name_or_path=ctx.cfg.model.hf_path)
      if not getattr(method, "mergeable", True):  # prompt tuning: the adapter is the export
        return os.path.abspath(out_dir.rstrip("/") + "_adapter")
    params = method.merge(ctx.model_cfg, ctx.params, adapters)
  hf_io.save_hf(ctx.model_cfg, params, out_dir, tokenizer=ctx.tokenizer, metadata=metadata,
                dtype=ctx.model_cfg.param_dtype)
  return os.path.abspath(out_dir)
