"""method=reward: a scalar reward model (decoder + linear head) trained with Bradley-Terry.

The score of a sequence is the head applied to the final hidden state of its last real
token that is NOT the pad id, which is exactly the token HF's `*ForSequenceClassification`
(num_labels=1) pools after export (`transformers` takes the rightmost input id that is not
`config.pad_token_id`, whatever the attention mask says):

    h = decoder.hidden_states(tokens)                 # [N, T, D]
    last(n) = max{t : segment_ids[n, t] > 0 and tokens[n, t] != pad_id}   (0 if none)
    score = h[n, last(n)] @ head["kernel"]            # [N]; kernel [D, 1], no bias

The pad id is the one the export writes (`export_pad_id`: the tokenizer's pad, else the
model config's, else the data pipeline's padding, which is eos for a tokenizer without a
pad token), and training, `score` and the export all pool with it. With a Llama-3-style
tokenizer (no pad token, so pad = eos = `<|eot_id|>`, which ends every sequence) or a user
setting pad = eos, the pooled token is the one before the trailing eos, in jaxtune as in
`transformers` (and TRL's RewardTrainer, which runs the HF model). The alternative, an
exported pad id that never occurs, would break as soon as HF users pad batches with the
tokenizer's own pad (= eos), so jaxtune follows HF instead.

The head lives in the trainable tree under "score", next to the params (full FT) or the
LoRA adapter tree (LoRA/QLoRA: the head is trained too; the decoder ignores the extra key):

    full FT   trainable = {"embed_tokens": ..., "layers": ..., "norm": ..., "score": {"kernel"}}
    LoRA      trainable = {"layers": {...adapters...}, "score": {"kernel": [D, 1]}}

`score(model_cfg, params, head, tokens, segment_ids)` is the reward function for later
use (e.g. GRPO); `jaxtune.hf.reward` saves/loads the HF sequence-classification format.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune import peft
from jaxtune import sharding
from jaxtune.hf import reward as hf_reward
from jaxtune.methods import base
from jaxtune.methods import pairs
from jaxtune.models import decoder

HEAD = "score"


def init_head(model_cfg: config_lib.ModelConfig, key: jax.Array | None = None, *,
              std: float = 0.0) -> dict:
  """{"kernel": [D, 1]} in the param dtype: zeros by default (every score starts at 0, so
  the first Bradley-Terry loss is exactly log 2), else N(0, std^2) from `key`."""
  d, dtype = model_cfg.hidden_size, decoder.DTYPES[model_cfg.param_dtype]
  if std == 0.0:
    return {"kernel": jnp.zeros((d, 1), dtype)}
  return {"kernel": (std * jax.random.normal(key, (d, 1), jnp.float32)).astype(dtype)}


def head_axes() -> dict:
  """Logical axes of the head: tiny, replicated."""
  return {"kernel": (None, None)}


def pool_index(tokens: jax.Array, segment_ids: jax.Array, pad_id: int) -> jax.Array:
  """[N, T] -> [N] int32: the rightmost real position whose token is not `pad_id` (HF's
  pooled token; with pad_id < 0, the last real token); 0 for a row with none."""
  real = segment_ids > 0
  if pad_id >= 0:
    real = real & (tokens != pad_id)
  return pairs.last_token_index(real.astype(jnp.int32))


def score_from_hidden(head: dict, h: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
                      pad_id: int) -> jax.Array:
  """h [N, T, D], tokens / segment_ids [N, T] -> float32 scores [N] at `pool_index`."""
  last = pool_index(tokens, segment_ids, pad_id)  # [N]
  h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [N, D]
  w = head["kernel"]
  if w.ndim != 2 or w.shape != (h.shape[-1], 1):
    raise ValueError(f"reward head kernel must be [D={h.shape[-1]}, 1], got {w.shape}")
  return jnp.einsum("nd,do->no", h_last.astype(jnp.float32), w.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)[:, 0]


def score(model_cfg: config_lib.ModelConfig, params: dict, head: dict, tokens: jax.Array,
          segment_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
          lora=None, constrain=None, pad_id: int | None = None) -> jax.Array:
  """Reward scores [N] float32 of right-padded sequences tokens [N, T].

  segment_ids [N, T]: 1 on real tokens, 0 on padding (default: every token is real).
  `lora` is None or PEFT adapters (any kind), as in `decoder.forward`. pad_id: the token
  HF skips when pooling (default `model_cfg.pad_token_id`, right for a model loaded with
  `hf.reward.load`; for a model in training pass `export_pad_id(ctx)`).
  """
  if pad_id is None:
    pad_id = model_cfg.pad_token_id
  if segment_ids is None:
    segment_ids = jnp.ones(tokens.shape, jnp.int32)
  if lora is not None:
    params = lora.apply(params)
  h = decoder.hidden_states(model_cfg, params, tokens, positions=positions,
                            segment_ids=segment_ids, constrain=constrain)
  return score_from_hidden(head, h, tokens, segment_ids, pad_id)


def make_objective(model_cfg: config_lib.ModelConfig, method_cfg: config_lib.RewardConfig, *,
                   pad_id: int, adapters=None, constrain=None):
  """objective(trainable, frozen, batch, rng) -> (sum of pair losses, (pairs, metrics)).

  pad_id: the pad id the export writes (`export_pad_id`); scores pool where HF will.
  """

  def objective(trainable, frozen, batch, rng):
    del rng
    if HEAD not in trainable:
      raise ValueError(f"method=reward: the trainable tree has no {HEAD!r} head (keys: "
                       f"{sorted(trainable)})")
    flat = pairs.flatten(batch)  # [2B, T]
    valid = pairs.valid_pairs(batch)  # [B]
    body = {k: v for k, v in trainable.items() if k != HEAD}
    params = base.model_params(body, frozen, adapters)
    h, aux = base.hidden(model_cfg, params, flat, constrain, return_aux=True)
    s = pairs.unflatten(score_from_hidden(trainable[HEAD], h, flat["tokens"],
                                          flat["segment_ids"], pad_id))  # [B, 2]
    margin = None
    if method_cfg.margin:
      if "margin" not in batch:
        raise ValueError("reward.margin=true but the batch has no 'margin' [B] "
                         f"(keys: {sorted(batch)})")
      margin = batch["margin"]

    def one(c, r, m):
      loss, _ = losses.reward_loss(c[None], r[None], margin=None if m is None else m[None])
      return loss

    per_pair = jax.vmap(one, in_axes=(0, 0, None if margin is None else 0))(
        s[:, 0], s[:, 1], margin)  # [B]
    diff = jax.lax.stop_gradient(s[:, 0] - s[:, 1])
    metrics = {"rewards/chosen": jax.lax.stop_gradient(s[:, 0]),
               "rewards/rejected": jax.lax.stop_gradient(s[:, 1]),
               "rewards/accuracy": (diff > 0).astype(jnp.float32),
               "rewards/margin": diff}
    loss_sum = jnp.sum(jnp.where(valid > 0, per_pair, 0.0))
    n = jnp.sum(valid)
    aux_sum, aux_metrics = base.moe_aux(model_cfg, aux, n)  # MoE load balancing
    return loss_sum + aux_sum, (n, {**pairs.summed(metrics, valid), **aux_metrics})

  return objective


def extra_trainable(ctx):
  """({"score": head}, {"score": axes}): the head to train next to params / adapters.

  The head (zeros) is placed on ctx.mesh, replicated.
  """
  head = init_head(ctx.model_cfg)
  head = jax.device_put(head, sharding.replicated(ctx.mesh))
  return {HEAD: head}, {HEAD: head_axes()}


def split_trainable(ctx, trainable: dict):
  """(merged dense params without the head, head) from a trained state's trainable tree."""
  trainable = dict(trainable)
  head = trainable.pop(HEAD)
  if ctx.adapters is None:
    return trainable, head
  body = {k: v for k, v in ctx.params.items() if k != HEAD}
  merged = peft.get(ctx.cfg.peft.method).merge(
      ctx.model_cfg, body, dataclasses.replace(ctx.adapters, params=trainable))
  return merged, head


def export_pad_id(ctx) -> int:
  """The pad id HF will skip to find the last token, and the one training pools with: the
  tokenizer's (what the data was padded with), else the model config's, else the data
  pipeline's (eos without a pad token)."""
  if ctx.tokenizer is not None and ctx.tokenizer.pad_token_id is not None:
    return int(ctx.tokenizer.pad_token_id)
  if ctx.model_cfg.pad_token_id >= 0:
    return ctx.model_cfg.pad_token_id
  return int(ctx.data.train.pad_id)


def export(ctx, state, out_dir: str, meta: dict) -> str:
  """The Method hook: an HF *ForSequenceClassification directory (num_labels=1)."""
  params, head = split_trainable(ctx, state.trainable)
  pad = export_pad_id(ctx)
  metadata = {"data_fingerprint": meta.get("data_fingerprint", ""), "jaxtune_method": "reward",
              "jaxtune_peft": ctx.cfg.peft.method}
  hf_reward.save(ctx.model_cfg, params, head, out_dir, tokenizer=ctx.tokenizer,
                 pad_token_id=pad, metadata=metadata)
  return os.path.abspath(out_dir)


class Reward(base.Method):
  name = "reward"
  data_kind = "preference"

  def check(self, cfg: config_lib.TrainConfig) -> None:
    if cfg.reward.margin:
      raise config_lib.ConfigError(
          "bad value for reward.margin: true (needs a per-pair 'margin' the data pipeline "
          "does not produce yet; use the loss directly: losses.reward_loss(..., margin=))")

  def objective(self, ctx: base.Context) -> base.Objective:
    return make_objective(ctx.model_cfg, ctx.cfg.reward, pad_id=export_pad_id(ctx),
                          adapters=ctx.adapters, constrain=ctx.constrain)

  def extra_trainable(self, ctx: base.Context):
    return extra_trainable(ctx)

  def export(self, ctx: base.Context, state, out_dir: str, meta: dict, *,
             write_adapter: bool = True) -> str:
    del write_adapter  # the head is not a PEFT module: always one merged directory
    return export(ctx, state, out_dir, meta)


METHOD = Reward()
