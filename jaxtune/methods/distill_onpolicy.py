"""On-policy distillation (GKD, Agarwal et al. 2024): the student learns on its OWN samples.

With `distill.on_policy = LAMBDA` > 0, every step draws u ~ U(0, 1) from fold_in(seed, step);
when u < LAMBDA the step's batch is rebuilt from the student's samples, else it is the data
batch as it is (supervised KD). An on-policy batch keeps each data row's prompt and replaces
its response:

    data row        [prompt ............ | response (loss tokens)]         one example per row
    on-policy row   [prompt ............ | student sample, <= distill.max_new_tokens,
                                           loss tokens, cut to fit data.seq_len]

The prompt is everything before the row's LAST run of loss tokens (the final assistant turn
of a chat, the completion of a prompt/completion record); the sample comes from
`jaxtune.sampling` with the CURRENT student params (the arrays the step trains: LoRA
adapters unmerged over the frozen base, no copy) at `distill.sample_temperature`, key
fold_in(seed, step), so a resumed run replays the same samples. The row is laid out by
`data.packing.assemble`, so it has the data batch's keys and shapes and the step compiles
once. The objective does not change: the teacher scores the very tokens the student sampled
and the loss is `distill.kind` (forward/reverse KL or JSD) over the sampled tokens, i.e.
GKD's on-policy term. `on_policy` [B, 1] (1 on sampled batches) is added to every batch so
the logged `on_policy` metric says which steps sampled.

Requires data.pack=false (one example per row: nothing in a row is dropped), distill.alpha=1
(a sample has no ground-truth targets to mix cross-entropy with) and an in-step teacher (a
precomputed top-k file cannot score new samples).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxtune import config as config_lib
from jaxtune import sampling
from jaxtune.data import encode
from jaxtune.data import packing
from jaxtune.methods import base

ON_POLICY = "on_policy"
SEED_OFFSET = 5  # key stream of its own (GRPO uses seed + 3)


def check(cfg: config_lib.TrainConfig) -> None:
  """ConfigErrors, naming the key, for on-policy settings that cannot run."""
  mc = cfg.distill
  if not 0.0 <= mc.on_policy <= 1.0:
    raise config_lib.ConfigError(f"bad value for distill.on_policy: {mc.on_policy} (expected "
                                 "0 <= on_policy <= 1: the share of batches the student samples)")
  if mc.on_policy == 0:
    return
  if mc.max_new_tokens < 1:
    raise config_lib.ConfigError(f"bad value for distill.max_new_tokens: {mc.max_new_tokens} "
                                 "(expected >= 1)")
  if mc.sample_temperature <= 0:
    raise config_lib.ConfigError(f"bad value for distill.sample_temperature: "
                                 f"{mc.sample_temperature} (expected > 0)")
  if mc.teacher_logits_file:
    raise config_lib.ConfigError("distill.on_policy > 0 needs the teacher in the step "
                                 "(distill.teacher_path): a precomputed distill.teacher_logits_"
                                 "file cannot score the student's new samples")
  if mc.alpha != 1.0:
    raise config_lib.ConfigError(f"distill.on_policy > 0 needs distill.alpha=1 (got "
                                 f"{mc.alpha}): the student's samples have no ground-truth "
                                 "targets to mix cross-entropy with")
  if cfg.data.pack:
    raise config_lib.ConfigError("distill.on_policy > 0 needs data.pack=false (one example "
                                 "per row, so each row's prompt is resampled and none is lost)")
  if jax.process_count() > 1:
    raise config_lib.ConfigError("distill.on_policy > 0 runs in one process for now (the "
                                 "sampler takes host prompt lists)")


def split_prompts(batch: dict) -> list[tuple[list[int], int] | None]:
  """Per row (prompt token ids, source id), or None for a row with no loss tokens.

  The prompt ends just before the last run of loss tokens: loss_mask[i] = 1 means token i+1
  is trained, so with the run starting at position s the prompt is tokens[:s + 1].
  """
  out = []
  for b in range(batch["tokens"].shape[0]):
    idx = np.flatnonzero(batch["loss_mask"][b] > 0)
    if not len(idx):
      out.append(None)
      continue
    gaps = np.flatnonzero(np.diff(idx) > 1)
    s = int(idx[gaps[-1] + 1] if len(gaps) else idx[0])
    out.append((batch["tokens"][b, :s + 1].tolist(), int(batch["source_ids"][b, s])))
  return out


def student_batch(model_cfg, params, batch: dict, key, *, max_new_tokens: int,
                  temperature: float, seq_len: int, pad_id: int) -> dict:
  """`batch` with each row's response replaced by a sample of `params` (module docstring)."""
  rows = split_prompts(batch)
  prompts = [r[0] for r in rows if r is not None]
  completions = iter([])
  if prompts:
    completions = iter(sampling.generate(model_cfg, params, prompts,
                                         max_new_tokens=max_new_tokens,
                                         temperature=temperature, key=key).tokens)
  packed = []
  for row in rows:
    if row is None:
      packed.append([])
      continue
    prompt, source = row
    completion = list(next(completions))[:seq_len - len(prompt)]
    ids = np.asarray(prompt + completion, np.int32)
    train = np.r_[np.zeros(len(prompt), bool), np.ones(len(completion), bool)]
    packed.append([(encode.Encoded(ids, train), source)])
  out = packing.assemble(packed, seq_len, pad_id)
  missing = set(batch) - set(out) - {ON_POLICY}
  if missing:
    raise ValueError(f"on-policy batch: data batch keys {sorted(missing)} are not rebuilt")
  return out


class OnPolicy:
  """The iterator `Distill.batches` returns with distill.on_policy > 0: the data batches,
  each replaced with probability on_policy by the student's samples (reads `run.state`)."""

  def __init__(self, ctx: base.Context, run):
    self.ctx, self.run = ctx, run
    self.cfg = ctx.cfg.distill

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.ctx.data.train)  # consumed either way: the loader position stays exact
    step = int(self.run.state.step)
    key = jax.random.fold_in(jax.random.PRNGKey(self.ctx.cfg.train.seed + SEED_OFFSET), step)
    sample = float(jax.random.uniform(jax.random.fold_in(key, 0))) < self.cfg.on_policy
    if sample:
      params = base.model_params(self.run.state.trainable, self.run.frozen, self.ctx.adapters)
      batch = student_batch(self.ctx.model_cfg, params, batch, jax.random.fold_in(key, 1),
                            max_new_tokens=self.cfg.max_new_tokens,
                            temperature=self.cfg.sample_temperature,
                            seq_len=self.ctx.cfg.data.seq_len,
                            pad_id=int(self.ctx.data.train.pad_id))
    n = batch["tokens"].shape[0]
    return {**batch, ON_POLICY: np.full((n, 1), float(sample), np.float32)}
