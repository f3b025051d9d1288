"""method=dpo: DPO-family preference training on (chosen, rejected) pairs.

The objective runs chosen and rejected through ONE policy forward ([B, 2, T] -> [2B, T]),
sums each response's token log-probs over its loss mask (the prompt is never counted),
and feeds them to the pure losses of `jaxtune.losses` (dpo.loss_type):

    sigmoid | hinge | robust    summed log-probs, policy vs reference   (DPO, SLiC, rDPO)
    ipo                         length-AVERAGED log-probs vs reference  (as TRL runs IPO)
    simpo | orpo                length-averaged, reference-free

The reference log-probs (dpo.reference) come from:

    frozen        a copy of the initial weights, frozen["ref"] (full fine-tuning default)
    adapters_off  the LoRA/QLoRA base with the adapters switched off: frozen["base"], no
                  second copy (with PEFT, "frozen" means this too: B = 0 at init, so the
                  initial model IS the base)
    precomputed   one pass over every train and eval pair before training, stored as a
                  table frozen["ref_table"] keyed by a 64-bit hash of each pair's tokens and
                  loss mask (`content_keys`); the step looks its pairs up (binary search),
                  so no reference forward per step and no copy of the weights; pairs not
                  in the table are counted in ref/missing (see `precompute`)

ORPO's NLL term (dpo.orpo_nll): `token` (default) is TRL's ORPOTrainer and the ORPO
reference code: the mean NLL over every next-token target of the chosen sequences of the
batch, prompt included (TRL: "computed over the full prompt and response"); `sequence` is
the mean over pairs of each chosen response's mean NLL (loss-mask tokens only). With
gradient accumulation the token mean is taken per micro-batch and the micro-batches are
weighted by their pairs, as TRL averages its micro-batch losses.

The objective returns sums over the valid pairs of the micro-batch, weight = their number,
and metrics rewards/{chosen,rejected,accuracy,margin} and logps/{chosen,rejected}.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import losses
from jaxtune import sharding
from jaxtune.data import packing
from jaxtune.hf import io as hf_io
from jaxtune.methods import base
from jaxtune.methods import content_keys
from jaxtune.methods import pairs
from jaxtune.models import head

_log = logging.getLogger("jaxtune")

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
REFERENCES = ("frozen", "adapters_off", "precomputed")
ORPO_NLL = ("token", "sequence")


def reference_mode(cfg: config_lib.TrainConfig) -> str:
  """'none' (reference-free loss) | 'frozen' | 'adapters_off' | 'precomputed'."""
  mc = cfg.dpo
  config_lib.check_choice("dpo.loss_type", mc.loss_type, LOSS_TYPES)
  config_lib.check_choice("dpo.reference", mc.reference, REFERENCES)
  config_lib.check_choice("dpo.orpo_nll", mc.orpo_nll, ORPO_NLL)
  if mc.loss_type in REFERENCE_FREE:
    return "none"
  peft = cfg.peft.method != "none"
  if mc.reference == "adapters_off" and not peft:
    raise config_lib.ConfigError(
        "dpo.reference=adapters_off needs peft.method=lora or qlora (full fine-tuning "
        "has no adapters to switch off); use dpo.reference=frozen or precomputed")
  if mc.reference == "frozen" and peft:
    return "adapters_off"  # the same model without a copy: adapters start at B = 0
  return mc.reference


def pair_losses(method_cfg: config_lib.DpoConfig, pol_sum, pol_avg, ref_sum, ref_avg,
                orpo_nll=None):
  """Per-pair losses [B] and metrics {name: [B]} from [B, 2] log-probs (0 = chosen).

  The library losses average over their batch; vmapping them over single pairs gives the
  per-pair terms, so padding pairs can be weighted out and micro-batches summed exactly.
  orpo_nll [B]: ORPO's per-pair NLL term (default: minus the chosen average log-prob, the
  `sequence` convention; see `orpo_token_nll` for TRL's).
  """
  mc = method_cfg
  if orpo_nll is None:
    orpo_nll = -pol_avg[:, 0]

  def one(ps, pa, rs, ra, nll):  # each [2], nll []
    lt = mc.loss_type
    if lt == "simpo":
      loss, m = losses.simpo_loss(pa[:1], pa[1:], beta=mc.beta, gamma=mc.simpo_gamma,
                                  label_smoothing=mc.label_smoothing)
    elif lt == "orpo":
      loss, m = losses.orpo_loss(pa[:1], pa[1:], nll[None], beta=mc.beta)
    elif lt == "ipo":
      loss, m = losses.dpo_loss(pa[:1], pa[1:], ra[:1], ra[1:], beta=mc.beta, loss_type="ipo")
    else:
      loss, m = losses.dpo_loss(ps[:1], ps[1:], rs[:1], rs[1:], beta=mc.beta, loss_type=lt,
                                label_smoothing=mc.label_smoothing)
    m = {k: v for k, v in m.items() if k != "loss"}
    return loss, m

  return jax.vmap(one)(pol_sum, pol_avg, ref_sum, ref_avg, orpo_nll)


def orpo_token_nll(token_lp: jax.Array, flat: dict, valid: jax.Array) -> jax.Array:
  """[B] per-pair terms whose mean over the valid pairs is TRL's ORPO NLL: minus the mean
  token log-prob over every next-token target of the chosen sequences (prompt included).

  token_lp [2B, T]; a position t is a target when t and t + 1 are in the same segment
  (the last token of a sequence predicts nothing), so a chosen sequence of n tokens has
  n - 1 targets, as in TRL's shifted labels masked by the attention mask.
  """
  seg = flat["segment_ids"]  # [2B, T]
  nxt = jnp.pad(seg[:, 1:], ((0, 0), (0, 1)))  # [2B, T]
  real = ((seg > 0) & (nxt == seg)).astype(jnp.float32)
  real = pairs.unflatten(real)[:, 0] * valid[:, None]  # [B, T] chosen rows of valid pairs
  lp = pairs.unflatten(token_lp)[:, 0]  # [B, T]
  nll = -jnp.sum(jnp.where(real > 0, lp, 0.0), axis=-1)  # [B]
  return nll * jnp.sum(valid) / jnp.maximum(jnp.sum(real), 1.0)


def pair_keys(batch: dict) -> jax.Array:
  """[B, 2] uint32 content keys of each pair's tokens and loss masks (see content_keys)."""
  tokens = batch["tokens"].astype(jnp.uint32)  # [B, 2, T]
  mask = (batch["loss_mask"] > 0).astype(jnp.uint32)
  v = jnp.where(batch["segment_ids"] > 0, (tokens + 1) * 2 + mask, 0)  # [B, 2, T]
  return content_keys.row_keys(v.reshape(v.shape[0], -1))


def lookup(table: dict, batch: dict):
  """Reference (sum [B, 2], avg [B, 2], found [B]) from a precomputed table."""
  idx, found = content_keys.find(table["keys"], pair_keys(batch))  # [B]
  logps = table["logps"][idx]  # [B, 2 (chosen/rejected), 2 (sum/avg)]
  return logps[..., 0], logps[..., 1], found


def _reference_hidden(model_cfg, params, flat, constrain):
  return jax.lax.stop_gradient(base.hidden(model_cfg, params, flat, constrain))


def sequence_logprobs(model_cfg, params, h, flat, *, with_tokens: bool = False,
                      constrain=None):
  """([B, 2] summed, [B, 2] averaged) response log-probs from hidden states [2B, T, D]
  (and the token log-probs [2B, T] with `with_tokens`)."""
  lp = head.token_logprobs(model_cfg, params, h, flat["targets"],
                           constrain=constrain)  # [2B, T]
  total, avg = pairs.sequence_logprobs(lp, flat["loss_mask"])  # [2B], [2B]
  out = pairs.unflatten(total), pairs.unflatten(avg)
  return (*out, lp) if with_tokens else out


def make_objective(model_cfg: config_lib.ModelConfig, method_cfg: config_lib.DpoConfig,
                   mode: str, *, adapters=None, constrain=None):
  """objective(trainable, frozen, batch, rng) -> (sum of pair losses, (pairs, metrics))."""

  def objective(trainable, frozen, batch, rng):
    del rng
    flat = pairs.flatten(batch)  # [2B, T] each
    valid = pairs.valid_pairs(batch)  # [B]
    params = base.model_params(trainable, frozen, adapters)
    h, aux = base.hidden(model_cfg, params, flat, constrain, return_aux=True)
    pol_sum, pol_avg, lp = sequence_logprobs(model_cfg, params, h, flat, with_tokens=True,
                                             constrain=constrain)  # [B, 2], [2B, T]
    extra = {}
    if mode == "none":
      ref_sum = ref_avg = jnp.zeros_like(pol_sum)
    elif mode == "precomputed":
      ref_sum, ref_avg, found = lookup(frozen["ref_table"], batch)
      extra["ref/missing"] = 1.0 - found.astype(jnp.float32)
    else:
      ref_params = frozen["ref"] if mode == "frozen" else frozen["base"]
      h_ref = _reference_hidden(model_cfg, ref_params, flat, constrain)
      ref_sum, ref_avg = jax.lax.stop_gradient(
          sequence_logprobs(model_cfg, ref_params, h_ref, flat, constrain=constrain))
    nll = None
    if method_cfg.loss_type == "orpo" and method_cfg.orpo_nll == "token":
      nll = orpo_token_nll(lp, flat, valid)
    per_pair, metrics = pair_losses(method_cfg, pol_sum, pol_avg, ref_sum, ref_avg, nll)
    loss_sum = jnp.sum(jnp.where(valid > 0, per_pair, 0.0))
    metrics = dict(metrics)
    metrics["logps/chosen"] = jax.lax.stop_gradient(pol_sum[:, 0])
    metrics["logps/rejected"] = jax.lax.stop_gradient(pol_sum[:, 1])
    metrics.update(extra)
    n = jnp.sum(valid)
    aux_sum, aux_metrics = base.moe_aux(model_cfg, aux, n)  # MoE load balancing
    return loss_sum + aux_sum, (n, {**pairs.summed(metrics, valid), **aux_metrics})

  return objective


def frozen_trees(ctx: base.Context) -> dict:
  """The reference's frozen tree ({"ref"}, {"ref_table"} or nothing)."""
  mode = reference_mode(ctx.cfg)
  if mode == "frozen":
    # A real copy: the policy's buffers are donated to (and overwritten by) every step.
    return {"ref": jax.tree_util.tree_map(lambda x: x.copy(), ctx.params)}
  if mode == "precomputed":
    return {"ref_table": precompute(ctx)}
  return {}


def _global_batches(ctx):
  """This process's share of [B, 2, T] batches covering every train pair, then the eval ones."""
  loader = ctx.data.train
  bs, local = ctx.cfg.data.batch_size, loader.local_batch_size
  start = loader.process_index * local
  rows = [(r.seqs, 0) for r in content_keys.train_examples(loader)]
  rows += [None] * (-len(rows) % bs)
  for b in range(0, len(rows), bs):
    yield packing.assemble_pairs(rows[b + start:b + start + local], loader.seq_len, loader.pad_id)
  yield from ctx.data.eval


def precompute(ctx) -> dict:
  """The reference table: {"keys": uint32 [N, 2], "logps": float32 [N, 2, 2]} on ctx.mesh.

  logps[n, c] = (sum, average) of the reference's response log-probs, c = 0 chosen,
  1 rejected. The reference is the initial model (with PEFT: the base, adapters off).
  """
  model_cfg, constrain = ctx.model_cfg, ctx.constrain

  @jax.jit
  def table_rows(params, batch):
    flat = pairs.flatten(batch)
    h = _reference_hidden(model_cfg, params, flat, constrain)
    total, avg = sequence_logprobs(model_cfg, params, h, flat,
                                   constrain=constrain)  # [B, 2]
    return pair_keys(batch), jnp.stack([total, avg], axis=-1), pairs.valid_pairs(batch)

  batch_sh = sharding.batch_sharding(ctx.mesh)
  keys, logps = [], []
  for host in _global_batches(ctx):
    k, lp, valid = table_rows(ctx.params, data_lib.to_global(host, batch_sh))
    valid = hf_io.to_host(valid) > 0
    keys.append(hf_io.to_host(k)[valid])
    logps.append(hf_io.to_host(lp)[valid])
  keys, logps = np.concatenate(keys), np.concatenate(logps).astype(np.float32)
  order = content_keys.sort_table(keys)  # sorted by key; a repeated pair is stored once
  keys, logps = keys[order], logps[order]
  _log.info("dpo: precomputed reference log-probs of %d pairs", len(keys))
  repl = sharding.replicated(ctx.mesh)
  put = lambda x: jax.make_array_from_callback(x.shape, repl, lambda idx: x[idx])  # noqa: E731
  return {"keys": put(keys), "logps": put(logps)}


class Dpo(base.Method):
  name = "dpo"
  data_kind = "preference"

  def check(self, cfg: config_lib.TrainConfig) -> None:
    reference_mode(cfg)

  def frozen(self, ctx: base.Context) -> dict:
    return frozen_trees(ctx)

  def objective(self, ctx: base.Context) -> base.Objective:
    return make_objective(ctx.model_cfg, ctx.cfg.dpo, reference_mode(ctx.cfg),
                          adapters=ctx.adapters, constrain=ctx.constrain)


METHOD = Dpo()
