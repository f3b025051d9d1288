"""The config sections of the training methods (`--set=dpo.beta=0.2`): one frozen dataclass
per method, part of `config.TrainConfig` (and re-exported by `jaxtune.config`). The allowed
values of each option are owned by the method's module (`jaxtune/methods/NAME.py`), which
checks them in `Method.check` before any data or weights are touched. The comment after a
field is its doc (`--help_config`).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """method=dpo: DPO-family preference losses (see jaxtune/methods/dpo.py)."""
  loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust | simpo | orpo
  beta: float = 0.1  # strength of the KL anchor to the reference
  label_smoothing: float = 0.0  # conservative DPO / robust: assumed label noise
  simpo_gamma: float = 0.5  # simpo: target reward margin
  reference: str = "frozen"  # frozen | adapters_off | precomputed
  # ORPO's NLL term: token = mean over every chosen token of the batch, prompt included
  # (TRL's ORPOTrainer, the ORPO reference code); sequence = mean over pairs of each chosen
  # response's mean NLL (jaxtune before this option).
  orpo_nll: str = "token"  # token | sequence


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """method=reward: a Bradley-Terry scalar reward model (see jaxtune/methods/reward.py)."""
  margin: bool = False  # subtract a per-pair margin from the score difference


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """method=distill: a student matching a frozen teacher (see jaxtune/methods/distill.py)."""
  kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
  temperature: float = 1.0  # softmax temperature of student and teacher
  beta: float = 0.5  # JSD mixing weight
  alpha: float = 1.0  # weight of the distillation term vs. cross-entropy
  top_k: int = 0  # 0 = full vocabulary; k = the teacher's top-k logits only
  teacher_path: str = ""  # teacher: HF dir, hub id or run dir (same tokenizer)
  teacher_logits_file: str = ""  # precomputed teacher top-k (launch/teacher_logits.py)
  teacher_quant: str = "none"  # none | nf4 | int4
  on_policy: float = 0.0  # GKD's lambda: share of steps on the student's samples (pack=false)
  max_new_tokens: int = 64  # on-policy: sampled response length limit
  sample_temperature: float = 1.0  # on-policy: sampling temperature


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
  """method=grpo: group-relative policy optimisation with rollouts from the engine's own
  sampler (see jaxtune/methods/grpo.py). data.batch_size prompts per rollout."""
  num_generations: int = 4  # completions sampled per prompt (G)
  max_new_tokens: int = 32  # completion length limit
  temperature: float = 1.0  # sampling temperature
  top_k: int = 0  # sampling: keep the k most likely tokens; 0 = off
  top_p: float = 1.0  # sampling: nucleus probability; 1 = off
  min_p: float = 0.0  # sampling: drop tokens below min_p * the top probability; 0 = off
  beta: float = 0.04  # KL penalty to the reference (0: no reference is kept)
  epsilon_low: float = 0.2  # PPO clip below: ratio >= 1 - epsilon_low
  epsilon_high: float = 0.2  # PPO clip above: ratio <= 1 + epsilon_high (DAPO clip-higher)
  kl_estimator: str = "k3"  # k1 | k3
  loss_agg: str = "token_mean"  # token_mean | seq_mean | dr_grpo
  scale_rewards: str = "group"  # group | batch | none: what the advantage is divided by
  num_iterations: int = 1  # policy updates per rollout batch
  mini_batches: int = 1  # the rollout batch is split into this many updates per iteration
  old_logps: str = "trainer"  # trainer | sampler (with truncated importance sampling)
  tis_cap: float = 2.0  # cap of the sampler/trainer importance weight (old_logps=sampler)
  reward_fns: str = ""  # builtin:NAME | path/file.py:func | package.module:func, comma-separated
  reward_weights: str = ""  # one weight per reward function (default 1 each)
  reward_model: str = ""  # an HF *ForSequenceClassification dir (method=reward export)
  format_regex: str = ""  # for builtin:format
  overlong_buffer: int = 16  # for builtin:overlong (DAPO's soft length penalty)
  log_samples_every: int = 10  # steps between prompt/completion/reward rows in samples.jsonl
