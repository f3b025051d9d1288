"""Pure loss functions of arrays: SFT, DPO family, reward model, distillation, GRPO.

Each takes arrays (logits, log-probs, masks, advantages) plus keyword-only
hyperparameters and returns `(loss, metrics)` with float32 scalars (the log-prob and
advantage helpers return arrays). No model, config or trainer is imported here.
"""

from jaxtune.losses.distill import distill_loss
from jaxtune.losses.distill import distill_loss_with_teacher_topk
from jaxtune.losses.distill import mix_with_ce
from jaxtune.losses.dpo import dpo_loss
from jaxtune.losses.dpo import orpo_loss
from jaxtune.losses.dpo import simpo_loss
from jaxtune.losses.grpo import group_advantages
from jaxtune.losses.grpo import grpo_loss
from jaxtune.losses.reward import reward_loss
from jaxtune.losses.chunked import chunked_cross_entropy
from jaxtune.losses.chunked import chunked_token_logprobs
from jaxtune.losses.sft import cross_entropy_loss
from jaxtune.losses.sft import masked_mean
from jaxtune.losses.sft import masked_sum
from jaxtune.losses.sft import sequence_logprobs
from jaxtune.losses.sft import token_logprobs
