"""method=grpo: group-relative policy optimisation with rollouts from the engine's own sampler.

Each rollout takes P = data.batch_size prompts (prompt-only records: `prompt` string or
messages, optional `answer`), samples G = grpo.num_generations completions each with the
CURRENT trainable params (`jaxtune.sampling`, reading the very arrays the step updates:
LoRA adapters applied unmerged over the frozen, possibly 4-bit base; no weight copy),
scores them (`rewards.py`: built-ins, user functions, or a learned reward model scored
in-engine), turns rewards into group advantages, and yields the rollout batch:

    rollout:  P prompts --sample x G--> P*G completions --rewards--> advantages [P*G]
    batch:    tokens / targets / loss_mask (completion tokens) / segment_ids / positions
              [P*G, T] (T = data.seq_len + grpo.max_new_tokens), advantages [P*G, 1],
              sampler_logps [P*G, T], per-row reward statistics [P*G, 1]

then grpo.num_iterations x grpo.mini_batches clipped policy updates over it (one loop step
each). Old log-probs: by default the trainer's own (with one update per rollout they equal
the current log-probs, so the first ratio is exactly 1; with more, a forward before the
first update); `grpo.old_logps=sampler` uses the sampler's, weighting each token by the
truncated importance ratio min(p_trainer / p_sampler, grpo.tis_cap). The gap
mean |sampler - trainer| is logged either way (`logp_gap`). Reference log-probs (only when
grpo.beta > 0): the base with adapters off for (Q)LoRA (no copy), a frozen copy for full FT.

Exact resume: the sampling key of the rollout made at step s is fold_in(key(seed), s), and
the prompt position is the loader's, saved in every checkpoint; with one update per rollout
every step is a rollout boundary, so a killed run restarted from its last checkpoint
replays the same rollouts. Single process for now (the sampler runs on host prompt lists).
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune import sampling
from jaxtune.methods import base
from jaxtune.methods import grpo_batch
from jaxtune.methods import rewards as rewards_lib
from jaxtune.models import head

_log = logging.getLogger("jaxtune")

LOSS_AGGS = ("token_mean", "seq_mean", "dr_grpo")
KL_ESTIMATORS = ("k1", "k3")
SCALES = ("group", "batch", "none")
OLD_LOGPS = ("trainer", "sampler")


def check(cfg: config_lib.TrainConfig) -> None:
  """ConfigErrors, naming the key, for settings method=grpo cannot run with."""
  g = cfg.grpo
  config_lib.check_choice("grpo.loss_agg", g.loss_agg, LOSS_AGGS)
  config_lib.check_choice("grpo.kl_estimator", g.kl_estimator, KL_ESTIMATORS)
  config_lib.check_choice("grpo.scale_rewards", g.scale_rewards, SCALES)
  config_lib.check_choice("grpo.old_logps", g.old_logps, OLD_LOGPS)
  for key in ("num_generations", "max_new_tokens", "num_iterations", "mini_batches"):
    if getattr(g, key) < 1:
      raise config_lib.ConfigError(f"bad value for grpo.{key}: {getattr(g, key)} (expected >= 1)")
  if g.num_generations < 2 and g.scale_rewards == "group":
    raise config_lib.ConfigError("grpo.num_generations=1 has no group to compare with; use >= 2")
  rows = cfg.data.batch_size * g.num_generations
  if rows % (g.mini_batches * cfg.optim.grad_accum):
    raise config_lib.ConfigError(
        f"bad value for grpo.mini_batches: {g.mini_batches} (data.batch_size x "
        f"grpo.num_generations = {rows} rows must split into mini_batches x optim.grad_accum "
        f"= {g.mini_batches * cfg.optim.grad_accum} equal parts)")
  updates = g.num_iterations * g.mini_batches
  if cfg.checkpoint.every_steps % updates:
    raise config_lib.ConfigError(
        f"bad value for checkpoint.every_steps: {cfg.checkpoint.every_steps} (with "
        f"{updates} updates per rollout, checkpoints must fall on rollout boundaries)")
  if cfg.peft.dropout:
    raise config_lib.ConfigError("peft.dropout applies to method=sft only")
  if not 0 < g.temperature:
    raise config_lib.ConfigError(f"bad value for grpo.temperature: {g.temperature} "
                                 "(expected > 0: GRPO needs sampled completions)")
  if jax.process_count() > 1:
    raise config_lib.ConfigError("method=grpo runs in one process for now (the sampler takes "
                                 "host prompt lists); use one process over all local devices")
  rewards_lib.build(g, g.max_new_tokens)  # reward specs resolve now, not after loading


def make_objective(model_cfg: config_lib.ModelConfig, grpo_cfg: config_lib.GrpoConfig, *,
                   adapters=None, constrain=None, reference: str = "none"):
  """objective(trainable, frozen, batch, rng) -> (loss sum, (weight, metrics)).

  reference: "none" (beta = 0), "frozen" (frozen["ref"]) or "adapters_off" (frozen["base"]).
  The weight is the token count (token_mean) or the row count (seq_mean, dr_grpo), so sums
  over micro-batches divided once equal the loss of the whole batch.
  """
  g = grpo_cfg

  def logps_of(params, batch):
    h, aux = base.hidden(model_cfg, params, batch, constrain, return_aux=True)
    lp = head.token_logprobs(model_cfg, params, h, batch["targets"],
                             constrain=constrain)  # [B, T]
    return lp, h, aux

  def objective(trainable, frozen, batch, rng):
    del rng
    params = base.model_params(trainable, frozen, adapters)
    logps, h, aux = logps_of(params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    adv = batch["advantages"][:, 0]  # [B]
    sampler = batch["sampler_logps"]
    if g.old_logps == "sampler":
      old = sampler
      trainer_old = batch.get("old_logps", jax.lax.stop_gradient(logps))
      weight = jnp.minimum(jnp.exp(trainer_old - sampler), g.tis_cap)  # [B, T]
      adv = adv[:, None] * jax.lax.stop_gradient(jnp.where(mask > 0, weight, 0.0))
    else:
      old = batch.get("old_logps", jax.lax.stop_gradient(logps))
    ref = None
    if reference != "none":
      ref_params = frozen["ref"] if reference == "frozen" else frozen["base"]
      ref = jax.lax.stop_gradient(logps_of(ref_params, batch)[0])
    loss, m = losses.grpo_loss(logps, old, ref, adv, mask, epsilon_low=g.epsilon_low,
                               epsilon_high=g.epsilon_high, beta=g.beta if ref is not None
                               else 0.0, kl_estimator=g.kl_estimator, loss_agg=g.loss_agg,
                               max_tokens=g.max_new_tokens)
    tokens = jnp.sum(mask)
    rows = jnp.asarray(mask.shape[0], jnp.float32)
    weight = tokens if g.loss_agg == "token_mean" else rows
    metrics = {k: (v * tokens, tokens) for k, v in m.items() if k != "loss"}
    gap = jnp.abs(jax.lax.stop_gradient(logps) - sampler) * mask
    metrics["logp_gap"] = (jnp.sum(gap), tokens)
    if model_cfg.logits_chunk <= 0:
      lp = jax.nn.log_softmax(jax.lax.stop_gradient(head.logits(model_cfg, params, h)))
      ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)  # [B, T]
      metrics["entropy"] = (jnp.sum(ent * mask), tokens)
    for k, v in batch.items():
      if k.startswith(grpo_batch.ROW_STATS):
        ok = ~jnp.isnan(v[:, 0])
        metrics[k[len(grpo_batch.ROW_STATS):]] = (jnp.sum(jnp.where(ok, v[:, 0], 0.0)),
                                                  jnp.sum(ok.astype(jnp.float32)))
    aux_sum, aux_metrics = base.moe_aux(model_cfg, aux, weight)  # MoE load balancing
    return loss * weight + aux_sum, (weight, {**metrics, **aux_metrics})

  return objective


def reference_mode(cfg: config_lib.TrainConfig) -> str:
  if cfg.grpo.beta == 0:
    return "none"
  return "adapters_off" if cfg.peft.method != "none" else "frozen"


class Rollouts:
  """The iterator `Grpo.batches` returns: one rollout per `updates` steps, its mini-batches
  queued; reads `run.state` (the loop keeps it current) when it samples."""

  def __init__(self, ctx: base.Context, run, scorer: grpo_batch.Scorer, *, greedy: bool = False):
    self.ctx, self.run, self.scorer, self.greedy = ctx, run, scorer, greedy
    self.cfg = ctx.cfg.grpo
    self.queue: list[dict] = []
    self.last_end = time.perf_counter()

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not self.queue:
      self.queue = self.rollout(next(self.ctx.data.train), int(self.run.state.step))
    return self.queue.pop(0)

  def params(self):
    """The params the model runs with right now (adapters applied, no dropout)."""
    return base.model_params(self.run.state.trainable, self.run.frozen, self.ctx.adapters)

  def _sample(self, repeated: list[list[int]], step: int):
    """(completions, their log-probs, valid [N] bool); padding rows (no prompt) stay empty."""
    g = self.cfg
    valid = np.array([bool(p) for p in repeated])
    key = jax.random.fold_in(jax.random.PRNGKey(self.ctx.cfg.train.seed + 3), step)
    gen = sampling.generate(
        self.ctx.model_cfg, self.params(), [p for p in repeated if p],
        max_new_tokens=g.max_new_tokens, temperature=0.0 if self.greedy else g.temperature,
        top_k=g.top_k, top_p=g.top_p, min_p=g.min_p, key=key)
    tokens, logps = [[] for _ in repeated], [[] for _ in repeated]
    for j, i in enumerate(np.flatnonzero(valid)):
      tokens[i], logps[i] = gen.tokens[j], gen.logprobs[j]
    return tokens, logps, valid

  def rollout(self, prompts: dict, step: int) -> list[dict]:
    g, ctx = self.cfg, self.ctx
    t0 = time.perf_counter()
    update_s = t0 - self.last_end
    n_gen = 1 if self.greedy else g.num_generations
    repeated = [p for p in grpo_batch.prompt_lists(prompts) for _ in range(n_gen)]
    completions, logps, valid = self._sample(repeated, step)
    rollout_s = time.perf_counter() - t0
    reward, each = self.scorer(ctx.tokenizer, repeated, completions,
                               grpo_batch.record_fields(prompts, n_gen))
    batch = grpo_batch.assemble(repeated, completions, logps,
                                seq_len=ctx.cfg.data.seq_len + g.max_new_tokens,
                                pad_id=int(ctx.data.train.pad_id))
    adv, stats = grpo_batch.advantages(reward, n_gen, g.scale_rewards)
    lengths = np.array([len(t) for t in completions], np.float32)
    hit = [len(t) >= g.max_new_tokens and not self.scorer.stopped(t) for t in completions]
    invalid = lambda v: np.where(valid, v, np.nan)  # noqa: E731  padding rows: no statistic
    stats.update(reward=invalid(reward), rollout_s=rollout_s, update_s=update_s,
                 rollout_tokens_per_s=lengths.sum() / max(rollout_s, 1e-9),
                 completion_len=invalid(lengths), completion_len_max=lengths.max(),
                 hit_max_new_tokens=invalid(np.array(hit, np.float32)),
                 **{f"reward/{k}": invalid(v) for k, v in each.items()})
    grpo_batch.add_row_stats(batch, adv, stats)
    if stats["frac_reward_zero_std"] == 1.0 and not self.greedy:
      _log.warning("step %d: every group has equal rewards: the advantages and the policy "
                   "loss are 0 (a harder/easier task, more generations or another reward "
                   "helps)", step + 1)
    self._log_samples(step, repeated, completions, reward)
    self.last_end = time.perf_counter()
    return self._updates(batch)

  def _updates(self, batch: dict) -> list[dict]:
    """The rollout batch as num_iterations x mini_batches update batches; with more than one
    update, the trainer's log-probs before the first update are the old log-probs."""
    g = self.cfg
    if self.greedy:
      return [batch]
    updates = grpo_batch.split(batch, g.mini_batches) * g.num_iterations
    if g.num_iterations > 1 or g.mini_batches > 1:
      old = grpo_batch.trainer_logps(self.ctx, self.params(), batch)
      parts = grpo_batch.split({"old_logps": old}, g.mini_batches) * g.num_iterations
      updates = [{**mb, **part} for mb, part in zip(updates, parts)]
    return updates

  def _log_samples(self, step, prompt_ids, completions, reward):
    g, ctx = self.cfg, self.ctx
    workdir = getattr(ctx, "workdir", "")
    if self.greedy or not workdir or not g.log_samples_every or step % g.log_samples_every:
      return
    tok = ctx.tokenizer
    with open(os.path.join(workdir, "samples.jsonl"), "a") as f:
      for i in range(0, len(completions), g.num_generations)[:4]:
        f.write(json.dumps({"step": step + 1, "prompt": tok.decode(prompt_ids[i]),
                            "completion": tok.decode(completions[i]),
                            "reward": float(reward[i])}) + "\n")


class Grpo(base.Method):
  name = "grpo"
  data_kind = "prompt"

  def check(self, cfg: config_lib.TrainConfig) -> None:
    check(cfg)

  def frozen(self, ctx: base.Context) -> dict:
    if reference_mode(ctx.cfg) == "frozen":
      return {"ref": jax.tree_util.tree_map(lambda x: x.copy(), ctx.params)}
    return {}

  def objective(self, ctx: base.Context) -> base.Objective:
    return make_objective(ctx.model_cfg, ctx.cfg.grpo, adapters=ctx.adapters,
                          constrain=ctx.constrain, reference=reference_mode(ctx.cfg))

  def batches(self, ctx: base.Context, run):
    return Rollouts(ctx, run, grpo_batch.Scorer.build(ctx))

  def eval_batches(self, ctx: base.Context, run):
    """Greedy completions of the held-out prompts, scored, one batch at a time as the
    evaluation asks for them: val_reward is their mean reward."""
    rollouts = Rollouts(ctx, run, grpo_batch.Scorer.build(ctx), greedy=True)
    for prompts in ctx.data.eval:
      yield from rollouts.rollout(prompts, int(run.state.step))


METHOD = Grpo()
