"""Hyperparameter sweep: optuna trials, each a normal training run in its own workdir.

  python launch/sweep.py --config=configs/lora.py --workdir=sweeps/lr_rank \\
      --space='optim.lr=loguniform(1e-5,1e-3)' --space='peft.rank=choice(8,16,32)' \\
      --trials=12 --metric=val_loss --direction=minimize [--set=train.max_steps=300]

Space kinds: loguniform(LO,HI), uniform(LO,HI), int(LO,HI), logint(LO,HI),
choice(A,B,...); keys are --set keys (`launch/train.py --help_config`). Each trial runs
`launch/train.py --config=... --set=... --set=KEY=VALUE --workdir=WORKDIR/trial_NNNN`; its
value is the metric's last logged value (metrics.jsonl; val_* metrics need held-out data
and train.eval_every > 0); optuna's median pruner stops weak trials at their evals
(--noprune turns it off). Writes WORKDIR/study.db (optuna, SQLite), WORKDIR/sweep.md,
WORKDIR/sweep.png, WORKDIR/best_config.json and WORKDIR/best_overrides.txt. Killed and run
again with the same flags, it runs only the remaining trials (an interrupted trial resumes
from its checkpoint). --parallel=K runs K trials at once on disjoint subsets of the GPUs
(CUDA_VISIBLE_DEVICES; --devices picks the GPUs); on CPU hosts they share the cores; on
TPU hosts run trials one at a time.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import common  # noqa: E402

FLAGS = flags.FLAGS
common.define_config_flags()  # --config and --set: those of every trial
flags.adopt_module_key_flags(common)
flags.DEFINE_multi_string("space", [], "KEY=KIND(ARGS), repeatable: loguniform(LO,HI), "
                          "uniform(LO,HI), int(LO,HI), logint(LO,HI), choice(A,B,...).")
flags.DEFINE_integer("trials", 8, "Trials in the sweep (finished ones count when resuming).")
flags.DEFINE_string("metric", "val_loss", "A metrics.jsonl key: the trial's value is its last "
                    "logged value, and it is reported at every logged step for pruning.")
flags.DEFINE_enum("direction", "minimize", ["minimize", "maximize"], "Optimisation direction.")
flags.DEFINE_string("workdir", "sweeps/default", "Sweep directory: study.db, trial_NNNN/, "
                    "sweep.md, sweep.png, best_config.json. An existing sweep there resumes.")
flags.DEFINE_integer("parallel", 1, "Trials at once, each on its own share of the GPUs.")
flags.DEFINE_list("devices", [], "GPU ids to share out between parallel trials (default: "
                  "all visible).")
flags.DEFINE_bool("prune", True, "Stop trials early with optuna's median pruner.")
flags.DEFINE_integer("seed", 0, "Seed of optuna's TPE sampler.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxtune import sweep
  cfg = common.load_config()  # the trials' shared config, checked as launch/train.py would
  try:
    space = sweep.space.parse_all(FLAGS.space, cfg)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.trials < 1 or FLAGS.parallel < 1:
    raise app.UsageError("--trials and --parallel must be >= 1")
  settings = sweep.runner.Settings(
      workdir=os.path.abspath(FLAGS.workdir), space=space, trials=FLAGS.trials, metric=FLAGS.metric,
      direction=FLAGS.direction, config=FLAGS.config or "", overrides=tuple(FLAGS.set),
      parallel=FLAGS.parallel, devices=tuple(FLAGS.devices), prune=FLAGS.prune,
      seed=FLAGS.seed)
  base = ([f"--config={FLAGS.config}"] if FLAGS.config else []) + [f"--set={o}" for o in FLAGS.set]

  def report(study):
    sweep.report.write(study, space, FLAGS.metric, FLAGS.trials, FLAGS.workdir, base)

  study = sweep.runner.run(settings, on_change=report)
  paths = sweep.report.write(study, space, FLAGS.metric, FLAGS.trials, FLAGS.workdir, base)
  print(f"sweep: {len(sweep.runner.finished(study))} of {FLAGS.trials} trials finished; "
        + ", ".join(f"{k}: {v}" for k, v in paths.items()), flush=True)


if __name__ == "__main__":
  common.run(main)
