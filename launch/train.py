"""Train (full fine-tuning, LoRA/QLoRA, SFT/DPO/reward/distillation) from a recipe.

  python launch/train.py                                    # the built-in default job
  python launch/train.py --config=configs/sft_chat.py --workdir=runs/x \\
      --set=model.hf_path=meta-llama/Llama-3.2-1B --set=train.max_steps=1000
  python launch/train.py --help_config                      # every --set key, documented
  python launch/train.py --config=... --set=... --print_config   # the resolved config
  python launch/train.py --config=... --set=... --dry_run        # check data, plan, exit
  python launch/train.py --config=... --set=... --plan           # memory per device, exit

Writes WORKDIR/metrics.jsonl, TensorBoard events under WORKDIR/tb, orbax checkpoints under
WORKDIR/checkpoints and, at the end, an HF export in WORKDIR/hf. Re-running the same command
resumes from the latest complete checkpoint; a changed setting that alters the run (model,
PEFT, method, data, ...) is refused unless named in --allow_changed.

Exit status: 0 the run reached train.max_steps or stopped early; 2 a config / data error
(one line on stderr); 3 interrupted (SIGTERM, Ctrl-C: a checkpoint was saved unless Ctrl-C
was pressed twice; re-run the command to resume); 4 stopped after train.max_skipped
consecutive non-finite steps.
"""

import os
import shlex
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
flags.DEFINE_list("allow_changed", [], "Config keys or sections (e.g. peft.alpha,data) whose "
                  "change since the workdir's checkpoint is accepted on resume (recorded in "
                  "the checkpoint meta); other meaning-changing changes are refused.")

flags.DEFINE_bool("help_config", False, "List every --set key with its type, default and "
                  "doc, then exit.")
flags.DEFINE_bool("print_config", False, "Print the resolved config (recipe + --set, paths "
                  "made absolute) as JSON, then exit.")
flags.DEFINE_bool("dry_run", False, "Check the config, read and encode the data (template "
                  "check included), print the plan (model size, trainable params, tokens per "
                  "step, steps, epochs, memory), then exit without training.")
flags.DEFINE_bool("plan", False, "Compile the train step ahead of time with abstract arrays "
                  "(no weights loaded, no data read) on the configured mesh and print, per "
                  "device, params, optimizer state, gradients, activations and the total "
                  "against the device's memory (train.device_memory_gib; CPU: none), with a "
                  "verdict; with train.micro_batch=auto, the micro-batch it picks. Writes "
                  "WORKDIR/plan.json, then exits.")

EXIT_STATUS = {"completed": 0, "early_stopped": 0, "interrupted": 3, "diverged": 4}


def _stderr_once(msg: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.help_config or FLAGS.print_config or FLAGS.dry_run or FLAGS.plan:
    return _inspect()
  again = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
  try:
    common.setup_runtime()
    cfg = common.load_config()
    from jaxtune.train import loop  # after jax.distributed.initialize
    summary = loop.train(cfg, FLAGS.workdir, allow_changed=tuple(FLAGS.allow_changed))
  except KeyboardInterrupt:
    _stderr_once(f"interrupted: exited without saving; to resume from the latest "
                 f"checkpoint (if any), run: {again}")
    sys.exit(EXIT_STATUS["interrupted"])
  common.print_once(f"summary: {summary}")
  if summary.get("eval_summary"):  # the final evaluation's one line, last
    common.print_once(summary["eval_summary"])
  if summary["status"] == "interrupted":
    _stderr_once(f"to resume, run: {again}")
  sys.exit(EXIT_STATUS[summary["status"]])


def _inspect() -> None:
  """--help_config / --print_config / --dry_run / --plan: say what a run would do, train
  nothing."""
  from jaxtune import config as config_lib
  if FLAGS.help_config:
    print(config_lib.help_text())
    return
  cfg = common.load_config()
  if FLAGS.print_config:
    print(config_lib.to_json(cfg))
    return
  common.setup_runtime()
  from jaxtune.train import plan  # after jax.distributed.initialize
  if FLAGS.plan:
    from jaxtune.train import memory  # pylint: disable=g-import-not-at-top
    p = memory.plan(cfg)
    common.print_once(plan.report(p) + f"\n  plan written to {plan.write(p, FLAGS.workdir)}")
    return
  common.print_once(plan.dry_run(cfg))


if __name__ == "__main__":
  common.run(main)
