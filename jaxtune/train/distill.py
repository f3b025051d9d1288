"""method=distill: a student matches a frozen teacher's next-token distributions on SFT data.

The teacher (method_cfg.teacher_path: an HF directory or hub id whose tokenizer is the
student's; any size) is loaded once into frozen["teacher"], sharded by its OWN logical
axes (`decoder.axes(teacher_cfg)` through the shared rules table), optionally as 4-bit
QArrays (method_cfg.teacher_quant = nf4 | int4, group size peft.quant_group_size). Each
step runs it on the same packed batch, without gradient, next to the student (full or
LoRA/QLoRA):

    loss = alpha * distill_loss(student, teacher, mask; kind, T, beta, top_k)
           + (1 - alpha) * cross_entropy(student, targets, mask)       alpha = distill_alpha

over the SFT loss mask, a token mean (the objective returns token sums, weight = tokens).
kl_to_teacher is reported whatever the kind: KL(teacher || student) at T = 1 over the full
vocabulary (what "held-out KL" means in the tests), also on eval as val_kl_to_teacher.

Or, with method_cfg.teacher_logits_file, no teacher runs at all: its top-k log-probs come
from a file written beforehand by `jaxtune.train.teacher_logits` (keyed by example
content, so packing and shuffling do not matter) and the loss is
`losses.distill_loss_with_teacher_topk`; kl_to_teacher is then the forward KL on the
stored top-k support, and teacher/missing counts loss tokens the file does not cover.

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
from jaxtune import sharding
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.peft import qlora
from jaxtune.train import objectives
from jaxtune.train import teacher_logits

TEACHER = "teacher"
TABLE = "teacher_table"


def check(cfg: config_lib.TrainConfig) -> None:
  """ConfigErrors, naming the key, for settings method=distill cannot run with."""
  mc = cfg.method_cfg
  if not mc.teacher_path and not mc.teacher_logits_file:
    raise config_lib.ConfigError(
        "method=distill needs method_cfg.teacher_path (an HF model directory or hub id that "
        "shares the student's tokenizer) or method_cfg.teacher_logits_file (precomputed "
        "top-k log-probs, see jaxtune/train/teacher_logits.py)")
  if mc.teacher_logits_file and not os.path.exists(mc.teacher_logits_file):
    raise config_lib.ConfigError(f"method_cfg.teacher_logits_file: no such file "
                                 f"{mc.teacher_logits_file}")
  if not 0.0 <= mc.distill_alpha <= 1.0:
    raise config_lib.ConfigError(f"bad value for method_cfg.distill_alpha: {mc.distill_alpha} "
                                 "(expected 0 <= alpha <= 1)")
  if mc.distill_temperature <= 0:
    raise config_lib.ConfigError("bad value for method_cfg.distill_temperature: "
                                 f"{mc.distill_temperature} (expected > 0)")
  if not 0.0 <= mc.distill_beta <= 1.0:
    raise config_lib.ConfigError(f"bad value for method_cfg.distill_beta: {mc.distill_beta} "
                                 "(expected 0 <= beta <= 1)")


def teacher_config(cfg: config_lib.TrainConfig) -> config_lib.ModelConfig:
  """The teacher's architecture from its config.json, with the run's compute options."""
  check(cfg)
  if not cfg.method_cfg.teacher_path:
    raise config_lib.ConfigError("method_cfg.teacher_path is empty: no teacher model to load")
  try:
    model_dir = hf_io.resolve(cfg.method_cfg.teacher_path)
    return hf_io.read_config(model_dir, cfg.model)
  except ValueError as e:
    raise config_lib.ConfigError(f"method_cfg.teacher_path: {e}") from e


def common_vocab(student: config_lib.ModelConfig, teacher: config_lib.ModelConfig,
                 tokenizer=None) -> int:
  """The vocabulary both logits are cut to; it must cover the tokenizer."""
  v = min(student.vocab_size, teacher.vocab_size)
  need = len(tokenizer) if tokenizer is not None else 0
  if v < need:
    raise config_lib.ConfigError(
        f"method_cfg.teacher_path: teacher vocab_size={teacher.vocab_size} and student "
        f"vocab_size={student.vocab_size}; the smaller ({v}) does not cover the tokenizer's "
        f"{need} tokens: the teacher must use the student's tokenizer")
  return v


def load_teacher(cfg: config_lib.TrainConfig, teacher_cfg: config_lib.ModelConfig, mesh):
  """Teacher params on `mesh`, sharded by the teacher's own axes (4-bit if teacher_quant)."""
  path = hf_io.resolve(cfg.method_cfg.teacher_path)
  dtype = jnp.dtype(cfg.model.param_dtype)
  if cfg.method_cfg.teacher_quant != "none":
    _, params = qlora.load_quantized(path, method=cfg.method_cfg.teacher_quant,
                                     group_size=cfg.peft.quant_group_size,
                                     double_quant=cfg.peft.double_quant, dtype=dtype,
                                     mesh=mesh, base=cfg.model)
  else:
    _, params = hf_io.load_hf(path, dtype, base=cfg.model,
                              place=sharding.placer(mesh, decoder.axes(teacher_cfg)))
  return params


def make_objective(model_cfg: config_lib.ModelConfig, teacher_cfg: config_lib.ModelConfig | None,
                   method_cfg: config_lib.MethodConfig, *, vocab: int,
                   lora_scale: float | None = None, constrain=None):
  """objective(trainable, frozen, batch, rng) -> (token sum of the mixed loss, (tokens, metrics)).

  frozen[TEACHER] holds the teacher params (`teacher_cfg`), or, with teacher_cfg=None,
  frozen[TABLE] the precomputed top-k table; `vocab` is the common vocabulary size.
  """
  constrain = constrain or (lambda x, _: x)
  mc = method_cfg
  hp = dict(kind=mc.distill_kind, temperature=mc.distill_temperature, beta=mc.distill_beta)

  def objective(trainable, frozen, batch, rng):
    del rng
    params, h = objectives.forward_hidden(model_cfg, trainable, frozen, batch, lora_scale,
                                          constrain)
    student = decoder.logits_from_hidden(model_cfg, params, h)[..., :vocab]  # [B, T, V]
    mask = batch["loss_mask"].astype(jnp.float32)  # [B, T]
    tokens = jnp.sum(mask)
    scale = jnp.maximum(tokens, 1.0)
    metrics = {}
    if teacher_cfg is None:  # precomputed top-k log-probs, looked up by example content
      lp, ids, found = teacher_logits.lookup(frozen[TABLE], batch)  # [B, T, K] x2, [B, T]
      covered = mask * found
      dist, _ = losses.distill_loss_with_teacher_topk(student, lp, ids, covered, **hp)
      kl, _ = losses.distill_loss_with_teacher_topk(student, lp, ids, covered,
                                                    kind="forward_kl")
      metrics["teacher/missing"] = (tokens - jnp.sum(covered), tokens)
    else:
      teacher_params = frozen[TEACHER]
      th = decoder.hidden_states(teacher_cfg, teacher_params, batch["tokens"],
                                 positions=batch.get("positions"),
                                 segment_ids=batch.get("segment_ids"), constrain=constrain)
      teacher = decoder.logits_from_hidden(teacher_cfg, teacher_params, th)[..., :vocab]
      teacher = jax.lax.stop_gradient(teacher)  # [B, T, V]
      dist, _ = losses.distill_loss(student, teacher, mask, top_k=mc.distill_top_k, **hp)
      if mc.distill_kind == "forward_kl" and mc.distill_temperature == 1.0 and not mc.distill_top_k:
        kl = dist
      else:
        kl, _ = losses.distill_loss(student, teacher, mask, kind="forward_kl")
    ce, _ = losses.cross_entropy_loss(student, batch["targets"], mask)  # token mean
    loss = losses.mix_with_ce(dist, ce, alpha=mc.distill_alpha)
    # Means times the token count are the sums (0 when there are no tokens): exact under
    # gradient accumulation, since the step divides the summed numerators once.
    metrics.update({"kl_to_teacher": (jax.lax.stop_gradient(kl) * scale, tokens),
                    "distill": (jax.lax.stop_gradient(dist) * scale, tokens),
                    "ce": (jax.lax.stop_gradient(ce) * scale, tokens)})
    return loss * scale, (tokens, metrics)

  return objective


def objective(ctx):
  """The Method hook: the distillation objective for the job in `ctx` (a methods.Context)."""
  check(ctx.cfg)
  if ctx.cfg.method_cfg.teacher_logits_file:
    teacher_cfg, vocab = None, ctx.model_cfg.vocab_size
  else:
    teacher_cfg = teacher_config(ctx.cfg)
    vocab = common_vocab(ctx.model_cfg, teacher_cfg, ctx.tokenizer)
  return make_objective(ctx.model_cfg, teacher_cfg, ctx.cfg.method_cfg, vocab=vocab,
                        lora_scale=None if ctx.adapters is None else ctx.adapters.scale,
                        constrain=sharding.constrainer(ctx.mesh))


def frozen(ctx) -> dict:
  """The Method hook: {"teacher": params} or {"teacher_table": top-k table} on ctx.mesh."""
  mc = ctx.cfg.method_cfg
  if mc.teacher_logits_file:
    return {TABLE: teacher_logits.load(mc.teacher_logits_file, ctx.mesh,
                                       vocab_size=ctx.model_cfg.vocab_size,
                                       top_k=mc.distill_top_k)}
  return {TEACHER: load_teacher(ctx.cfg, teacher_config(ctx.cfg), ctx.mesh)}
