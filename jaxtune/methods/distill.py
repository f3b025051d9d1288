"""method=distill: a student matches a frozen teacher's next-token distributions on SFT data.

The teacher (distill.teacher_path: an HF directory or hub id whose tokenizer is the
student's; any size) is loaded once into frozen["teacher"], sharded by its OWN logical
axes (`decoder.axes(teacher_cfg)` through the shared rules table), optionally as 4-bit
QArrays (distill.teacher_quant = nf4 | int4, group size peft.quant_group_size). Each
step runs it on the same packed batch, without gradient, next to the student (full or
LoRA/QLoRA):

    loss = alpha * distill_loss(student, teacher, mask; kind, T, beta, top_k)
           + (1 - alpha) * cross_entropy(student, targets, mask)       alpha = distill.alpha

over the SFT loss mask, a token mean (the objective returns token sums, weight = tokens).
kl_to_teacher is reported whatever the kind: KL(teacher || student) at T = 1 over the full
vocabulary (what "held-out KL" means in the tests), also on eval as val_kl_to_teacher.

Or, with distill.teacher_logits_file, no teacher runs at all: its top-k log-probs come
from a file written beforehand by `jaxtune.train.teacher_logits` (keyed by example
content, so packing and shuffling do not matter) and the loss is
`losses.distill_loss_with_teacher_topk`; kl_to_teacher is then the forward KL on the
stored top-k support, and teacher/missing counts loss tokens the file does not cover.

On-policy (GKD, Agarwal et al. 2024): with distill.on_policy = LAMBDA > 0, a share LAMBDA
of the steps train on the student's own samples of the data's prompts, scored by the teacher
with the same loss (`distill_onpolicy.py`).

Vocabularies: HF checkpoints of one tokenizer often pad the embedding table to different
sizes (e.g. 151936 vs 152064); both logits are cut to the smaller vocabulary, which must
still cover the tokenizer.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune import weights
from jaxtune.hf import io as hf_io
from jaxtune.methods import base
from jaxtune.methods import distill_onpolicy
from jaxtune.methods import teacher_table
from jaxtune.models import head

TEACHER = "teacher"
TABLE = "teacher_table"


KINDS = ("forward_kl", "reverse_kl", "jsd")
TEACHER_QUANT = ("none", "nf4", "int4")


def check(cfg: config_lib.TrainConfig) -> None:
  """ConfigErrors, naming the key, for settings method=distill cannot run with."""
  mc = cfg.distill
  config_lib.check_choice("distill.kind", mc.kind, KINDS)
  config_lib.check_choice("distill.teacher_quant", mc.teacher_quant, TEACHER_QUANT)
  if not mc.teacher_path and not mc.teacher_logits_file:
    raise config_lib.ConfigError(
        "method=distill needs distill.teacher_path (an HF model directory or hub id that "
        "shares the student's tokenizer) or distill.teacher_logits_file (precomputed "
        "top-k log-probs, see launch/teacher_logits.py)")
  if mc.teacher_logits_file and not os.path.exists(mc.teacher_logits_file):
    raise config_lib.ConfigError(f"distill.teacher_logits_file: no such file "
                                 f"{mc.teacher_logits_file}")
  for key, value, low, high in (("alpha", mc.alpha, 0.0, 1.0), ("beta", mc.beta, 0.0, 1.0)):
    if not low <= value <= high:
      raise config_lib.ConfigError(f"bad value for distill.{key}: {value} "
                                   f"(expected {low:g} <= {key} <= {high:g})")
  if mc.temperature <= 0:
    raise config_lib.ConfigError(f"bad value for distill.temperature: {mc.temperature} "
                                 "(expected > 0)")
  if mc.top_k < 0:
    raise config_lib.ConfigError(f"bad value for distill.top_k: {mc.top_k} (expected >= 0)")
  distill_onpolicy.check(cfg)


def teacher_config(cfg: config_lib.TrainConfig) -> config_lib.ModelConfig:
  """The teacher's architecture from its config.json, with the run's compute options."""
  check(cfg)
  if not cfg.distill.teacher_path:
    raise config_lib.ConfigError("distill.teacher_path is empty: no teacher model to load")
  try:
    model_dir = hf_io.resolve(cfg.distill.teacher_path)
    return hf_io.read_config(model_dir, cfg.model)
  except ValueError as e:
    raise config_lib.ConfigError(f"distill.teacher_path: {e}") from e


def common_vocab(student: config_lib.ModelConfig, teacher: config_lib.ModelConfig,
                 tokenizer=None) -> int:
  """The vocabulary both logits are cut to; it must cover the tokenizer."""
  v = min(student.vocab_size, teacher.vocab_size)
  need = len(tokenizer) if tokenizer is not None else 0
  if v < need:
    raise config_lib.ConfigError(
        f"distill.teacher_path: teacher vocab_size={teacher.vocab_size} and student "
        f"vocab_size={student.vocab_size}; the smaller ({v}) does not cover the tokenizer's "
        f"{need} tokens: the teacher must use the student's tokenizer")
  return v


def load_teacher(cfg: config_lib.TrainConfig, mesh):
  """Teacher params on `mesh`, sharded by the teacher's own axes (4-bit if teacher_quant)."""
  mc = cfg.distill
  quant = None
  if mc.teacher_quant != "none":
    quant = weights.Quant(mc.teacher_quant, cfg.peft.quant_group_size, cfg.peft.double_quant)
  return weights.load(mc.teacher_path, mesh=mesh, base=cfg.model, quant=quant).params


def _teacher_logits(teacher_cfg, teacher_params, batch, vocab, constrain):
  th = base.hidden(teacher_cfg, teacher_params, batch, constrain)
  return jax.lax.stop_gradient(head.logits(teacher_cfg, teacher_params, th)[..., :vocab])


def make_objective(model_cfg: config_lib.ModelConfig, teacher_cfg: config_lib.ModelConfig | None,
                   method_cfg: config_lib.DistillConfig, *, vocab: int, adapters=None,
                   constrain=None):
  """objective(trainable, frozen, batch, rng) -> (token sum of the mixed loss, (tokens, metrics)).

  frozen[TEACHER] holds the teacher params (`teacher_cfg`), or, with teacher_cfg=None,
  frozen[TABLE] the precomputed top-k table; `vocab` is the common vocabulary size.
  """
  mc = method_cfg
  hp = dict(kind=mc.kind, temperature=mc.temperature, beta=mc.beta)

  def objective(trainable, frozen, batch, rng):
    del rng
    params = base.model_params(trainable, frozen, adapters)
    h, aux = base.hidden(model_cfg, params, batch, constrain, return_aux=True)
    student = head.logits(model_cfg, params, h)[..., :vocab]  # [B, T, V]
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    tokens = jnp.sum(mask)
    scale = jnp.maximum(tokens, 1.0)
    metrics = {}
    if teacher_cfg is None:  # precomputed top-k log-probs, looked up by example content
      lp, ids, found = teacher_table.lookup(frozen[TABLE], batch)  # [B, T, K] x2, [B, T]
      covered = mask * found
      dist, _ = losses.distill_loss_with_teacher_topk(student, lp, ids, covered, **hp)
      kl, _ = losses.distill_loss_with_teacher_topk(student, lp, ids, covered,
                                                    kind="forward_kl")
      metrics["teacher/missing"] = (tokens - jnp.sum(covered), tokens)
    else:
      teacher = _teacher_logits(teacher_cfg, frozen[TEACHER], batch, vocab, constrain)
      dist, _ = losses.distill_loss(student, teacher, mask, top_k=mc.top_k, **hp)
      if mc.kind == "forward_kl" and mc.temperature == 1.0 and not mc.top_k:
        kl = dist
      else:
        kl, _ = losses.distill_loss(student, teacher, mask, kind="forward_kl")
    ce, _ = losses.cross_entropy_loss(student, batch["targets"], mask)  # token mean
    loss = losses.mix_with_ce(dist, ce, alpha=mc.alpha)
    # Means times the token count are the sums (0 when there are no tokens): exact under
    # gradient accumulation, since the step divides the summed numerators once.
    if distill_onpolicy.ON_POLICY in batch:  # 1 on the batches the student sampled
      flag = batch[distill_onpolicy.ON_POLICY][:, 0]
      metrics["on_policy"] = (jnp.sum(flag), jnp.asarray(flag.shape[0], jnp.float32))
    metrics.update({"kl_to_teacher": (jax.lax.stop_gradient(kl) * scale, tokens),
                    "distill": (jax.lax.stop_gradient(dist) * scale, tokens),
                    "ce": (jax.lax.stop_gradient(ce) * scale, tokens)})
    aux_sum, aux_metrics = base.moe_aux(model_cfg, aux, tokens)  # MoE load balancing
    return loss * scale + aux_sum, (tokens, {**metrics, **aux_metrics})

  return objective


class Distill(base.Method):
  name = "distill"
  data_kind = "sft"

  def check(self, cfg: config_lib.TrainConfig) -> None:
    check(cfg)

  def objective(self, ctx: base.Context) -> base.Objective:
    if ctx.cfg.distill.teacher_logits_file:
      teacher_cfg, vocab = None, ctx.model_cfg.vocab_size
    else:
      teacher_cfg = teacher_config(ctx.cfg)
      vocab = common_vocab(ctx.model_cfg, teacher_cfg, ctx.tokenizer)
    return make_objective(ctx.model_cfg, teacher_cfg, ctx.cfg.distill, vocab=vocab,
                          adapters=ctx.adapters, constrain=ctx.constrain)

  def frozen(self, ctx: base.Context) -> dict:
    """{"teacher": params} or {"teacher_table": top-k table} on ctx.mesh."""
    mc = ctx.cfg.distill
    if mc.teacher_logits_file:
      return {TABLE: teacher_table.load(mc.teacher_logits_file, ctx.mesh,
                                        vocab_size=ctx.model_cfg.vocab_size, top_k=mc.top_k)}
    return {TEACHER: load_teacher(ctx.cfg, ctx.mesh)}

  def batches(self, ctx: base.Context, run):
    """The data batches; with distill.on_policy > 0 some are the student's own samples."""
    if ctx.cfg.distill.on_policy > 0:
      return distill_onpolicy.OnPolicy(ctx, run)
    return ctx.data.train


METHOD = Distill()
