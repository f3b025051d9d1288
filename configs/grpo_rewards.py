"""Example GRPO reward functions (TRL's signature), used by configs/grpo.py and its tests.

    func(prompts: list[str], completions: list[str], **fields) -> list[float | None]

Point `grpo.reward_fns` at any such function: `--set=grpo.reward_fns=configs/grpo_rewards.py:
letter_share`. `fields` holds the records' other columns (`answer` and any other), each repeated per
completion, and `completion_ids`.
"""


def letter_share(prompts, completions, **fields):
  """The share of the completion's characters that are the letter 'e' (0 for an empty one):
  learnable by a random-init model, so a few dozen GRPO steps visibly raise it."""
  del prompts, fields
  return [c.count("e") / len(c) if c else 0.0 for c in completions]
