"""GRPO on the bundled arithmetic prompts with a tiny random-init model: the whole rollout loop
(sample G completions per prompt with the current params, score, group advantages, clipped
policy update, KL to the reference) in a few CPU minutes.

  python launch/train.py --config=configs/grpo.py --workdir=runs/grpo
  python launch/train.py --config=configs/grpo.py:lora --workdir=runs/grpo_lora

Rewards here: configs/grpo_rewards.py:letter_share (the share of 'e' characters: learnable
from scratch, so the logged `reward` visibly rises). For a real run, start from an instruct
model and use a verifiable reward:
  --set=model.hf_path=DIR_OR_ID --set=grpo.reward_fns=builtin:math_answer
  --set=grpo.max_new_tokens=256 --set=grpo.num_generations=8 --set=optim.lr=1e-6
or a reward model trained with method=reward: --set=grpo.reward_model=runs/reward/hf.
metrics.jsonl logs loss, reward, reward/<fn>, reward_std, frac_reward_zero_std, kl,
clip_ratio/*, logp_gap, entropy, completion_len, rollout_tokens_per_s; samples.jsonl holds
a few prompts with their completions and rewards every grpo.log_samples_every steps.
"""

import os

from jaxtune import config

REWARDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpo_rewards.py")


def get_config(arg=None):
  peft = "lora" if arg == "lora" else "none"
  if arg not in (None, "", "lora"):
    raise ValueError(f"configs/grpo.py: unknown argument {arg!r} (expected nothing or 'lora')")
  return config.TrainConfig(
      method="grpo",
      model=config.ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=4, num_kv_heads=2, head_dim=16),
      peft=config.PeftConfig(method=peft, rank=8, alpha=16.0),
      optim=config.OptimConfig(lr=6e-3 if peft == "none" else 2e-2, warmup_steps=2,
                               schedule="constant"),
      data=config.DataConfig(train_files="", format="prompt", seq_len=48, batch_size=8),
      train=config.LoopConfig(max_steps=30, eval_every=15, eval_batches=1, progress=False),
      checkpoint=config.CheckpointConfig(every_steps=10, keep=2),
      grpo=config.GrpoConfig(num_generations=4, max_new_tokens=12, temperature=1.0, beta=0.04,
                             reward_fns=f"{REWARDS}:letter_share", log_samples_every=5),
  )
