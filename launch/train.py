"""Train (full fine-tuning, LoRA/QLoRA, SFT/DPO/reward/distillation) from a recipe.

  python launch/train.py                                    # the built-in default job
  python launch/train.py --config=configs/sft_chat.py --workdir=runs/x \
      --set=model.hf_path=meta-llama/Llama-3.2-1B --set=train.max_steps=1000

Writes WORKDIR/metrics.jsonl, TensorBoard events under WORKDIR/tb, orbax checkpoints under
WORKDIR/checkpoints and, at the end, an HF export in WORKDIR/hf. Re-running the same command
resumes from the latest complete checkpoint.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import common  # noqa: E402

FLAGS = flags.FLAGS
common.define_config_flags()
flags.adopt_module_key_flags(common)
flags.DEFINE_string("workdir", "runs/default", "Run directory: metrics, checkpoints, HF export. "
                    "An existing run there is resumed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  cfg = common.load_config()
  from jaxtune.train import loop  # after jax.distributed.initialize
  summary = loop.train(cfg, FLAGS.workdir)
  common.print_once(f"summary: {summary}")


if __name__ == "__main__":
  common.run(main)
