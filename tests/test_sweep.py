"""launch/sweep.py: the space, the trial runner (pruning, resume after a kill), the report."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from jaxtune import config as config_lib  # noqa: E402
from jaxtune.sweep import report  # noqa: E402
from jaxtune.sweep import runner  # noqa: E402
from jaxtune.sweep import space  # noqa: E402
from tests import launch_utils  # noqa: E402

D = optuna.distributions


def test_space_flags_become_optuna_distributions():
  cfg = config_lib.TrainConfig()
  got = space.parse_all(["optim.lr=loguniform(1e-5,1e-3)", "peft.rank=choice(8,16,32)",
                         "peft.dropout=uniform(0,0.2)", "data.batch_size=int(2,8)",
                         "peft.alpha=logint(4,64)", "optim.schedule=choice(cosine,linear)"],
                        cfg)
  assert got == {"optim.lr": D.FloatDistribution(1e-5, 1e-3, log=True),
                 "peft.rank": D.CategoricalDistribution((8, 16, 32)),
                 "peft.dropout": D.FloatDistribution(0.0, 0.2),
                 "data.batch_size": D.IntDistribution(2, 8),
                 "peft.alpha": D.IntDistribution(4, 64, log=True),
                 "optim.schedule": D.CategoricalDistribution(("cosine", "linear"))}
  assert space.set_value(1e-4) == "0.0001" and space.set_value(True) == "true"


@pytest.mark.parametrize("spec, message", [
    ("peft.lora_rank=choice(8,16)", r"peft\.lora_rank=choice\(8,16\).*unknown config key"),
    ("peft.rank=uniform(1.5,3)", r"peft\.rank=uniform\(1\.5,3\)"),
    ("optim.lr=loguniform(0,1e-3)", r"needs LOW > 0"),
    ("optim.lr=loguniform(1e-3,1e-5)", r"LOW < HIGH"),
    ("optim.lr=gaussian(0,1)", r"unknown kind 'gaussian'"),
    ("optim.lr", r"expected KEY=KIND\(ARGS\)"),
])
def test_bad_space_flags_are_refused_naming_the_flag(spec, message):
  with pytest.raises(ValueError, match=message):
    space.parse_all([spec], config_lib.TrainConfig())


def test_parallel_trials_get_disjoint_gpu_subsets(monkeypatch):
  assert runner.device_groups(2, ("0", "1", "2", "3")) == [("0", "1"), ("2", "3")]
  assert runner.device_groups(3, ("0", "1", "2", "3")) == [("0",), ("1",), ("2",)]
  with pytest.raises(ValueError, match="--parallel=5: only 4 GPUs"):
    runner.device_groups(5, ("0", "1", "2", "3"))
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
  assert runner.device_groups(2) == [("4",), ("6",)]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  assert runner.device_groups(2) == [(), ()]  # no GPUs: CPU trials share the host


def test_a_trial_is_a_train_run_with_the_sampled_values_set(tmp_path):
  s = runner.Settings(workdir=str(tmp_path), space={}, trials=1, config="configs/lora.py",
                      overrides=("train.max_steps=9",))
  cmd = runner.command(s, {"optim.lr": 1e-4, "peft.rank": 8}, str(tmp_path / "trial_0000"))
  assert cmd[1] == os.path.join(launch_utils.ROOT, "launch", "train.py")
  assert cmd[2:] == [f"--workdir={tmp_path / 'trial_0000'}", "--config=configs/lora.py",
                     "--set=train.max_steps=9", "--set=optim.lr=0.0001", "--set=peft.rank=8"]


def _study_with_trials():
  study = optuna.create_study(direction="minimize")
  dists = {"optim.lr": D.FloatDistribution(1e-5, 1e-3, log=True),
           "peft.rank": D.CategoricalDistribution((8, 16))}
  for lr, rank, value in ((1e-4, 8, 2.5), (3e-4, 16, 1.75), (1e-5, 8, 3.0)):
    study.add_trial(optuna.trial.create_trial(params={"optim.lr": lr, "peft.rank": rank},
                                              distributions=dists, value=value,
                                              user_attrs={"steps": 10}))
  study.add_trial(optuna.trial.create_trial(
      params={"optim.lr": 1e-3, "peft.rank": 16}, distributions=dists,
      state=optuna.trial.TrialState.PRUNED, intermediate_values={2: 4.5, 4: 4.0}))
  return study, dists


def test_report_table_plot_and_best_config(tmp_path):
  import matplotlib.image
  study, dists = _study_with_trials()
  paths = report.write(study, dists, "val_loss", 4, str(tmp_path), ["--set=peft.method=lora"])
  table = open(paths["table"]).read()
  rows = [l for l in table.splitlines() if l.startswith("| ") and not l.startswith("| trial")]
  # complete trials best first (optuna's own best trial first), then the pruned one
  assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 0", "| 2", "| 3"]
  assert study.best_trial.number == 1
  assert rows[0].split(" | ")[1:4] == ["complete (best)", "1.75", "0.0003"]
  assert rows[3].split(" | ")[1:3] == ["pruned", "4"]  # its last reported value
  assert ("python launch/train.py --set=peft.method=lora --set=optim.lr=0.0003 "
          "--set=peft.rank=16") in table
  assert open(paths["best_overrides"]).read() == "--set=optim.lr=0.0003\n--set=peft.rank=16\n"
  assert json.load(open(paths["best_config"])) == {"optim.lr": 3e-4, "peft.rank": 16}
  image = matplotlib.image.imread(paths["plot"])
  assert image.ndim == 3 and image.shape[1] > image.shape[0] > 100  # two panels side by side


# A stand-in for launch/train.py (the runner's scheduling, pruning and resume, in seconds):
# logs val_loss = |log10(lr) + 4| + 1/step at steps 1..4, resuming after its last row, and
# records each start in starts.txt.
_FAKE_TRAIN = textwrap.dedent("""
    import json, math, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--workdir"))
    sets = dict(a[len("--set="):].split("=", 1) for a in sys.argv[1:] if a.startswith("--set="))
    wd = args["workdir"]
    path = os.path.join(wd, "metrics.jsonl")
    done = sum(1 for _ in open(path)) if os.path.exists(path) else 0
    with open(os.path.join(os.path.dirname(wd), "starts.txt"), "a") as f:
      f.write(f"{os.path.basename(wd)} {done}\\n")
    lr = float(sets["optim.lr"])
    t0 = time.time()
    for step in range(done + 1, 5):
      time.sleep(float(sets.get("sleep", "0.05")))
      with open(path, "a") as f:
        f.write(json.dumps({"step": step, "val_loss": abs(math.log10(lr) + 4) + 1 / step}) + "\\n")
    with open(os.path.join(os.path.dirname(wd), "spans.txt"), "a") as f:
      f.write(f"{t0} {time.time()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')}\\n")
""")


def _settings(tmp_path, trials, **kw):
  script = tmp_path / "fake_train.py"
  script.write_text(_FAKE_TRAIN)
  dists = {"optim.lr": D.FloatDistribution(1e-6, 1e-2, log=True)}
  return runner.Settings(workdir=str(tmp_path / "sweep"), space=dists, trials=trials,
                         train_script=str(script), poll_s=0.05, **kw)


def test_runner_prunes_on_the_metric_and_counts_finished_trials(tmp_path):
  s = _settings(tmp_path, 6)
  study = runner.run(s)
  states = [t.state.name for t in study.trials]
  assert len(runner.finished(study)) == 6 and set(states) <= {"COMPLETE", "PRUNED"}
  for t in study.trials:
    lr = t.params["optim.lr"]
    rows = [json.loads(l) for l in open(os.path.join(t.user_attrs["workdir"], "metrics.jsonl"))]
    assert t.intermediate_values == {r["step"]: r["val_loss"] for r in rows}
    if t.state.name == "COMPLETE":
      assert t.value == pytest.approx(abs(np.log10(lr) + 4) + 1 / 4)
  # the median pruner's rule, checked by hand: a pruned trial was worse than the median of
  # the earlier trials at the step where it stopped
  for t in study.trials:
    if t.state.name == "PRUNED":
      step = max(t.intermediate_values)
      earlier = [u.intermediate_values[step] for u in study.trials[:t.number]
                 if step in u.intermediate_values and u.state.name != "RUNNING"]
      assert t.intermediate_values[step] > np.median(earlier)
  again = runner.run(s)  # nothing left to run
  assert len(again.trials) == 6


def test_a_killed_sweep_resumes_its_interrupted_trial_and_runs_only_the_rest(tmp_path):
  s = _settings(tmp_path, 4, prune=False, overrides=("sleep=0.15",))
  # The sweep in a forked process (nothing to import again), killed like any process.
  proc = multiprocessing.get_context("fork").Process(target=runner.run, args=(s,))
  proc.start()
  starts = tmp_path / "sweep" / "starts.txt"
  deadline = time.time() + 120
  rows = tmp_path / "sweep" / "trial_0002" / "metrics.jsonl"
  while not (rows.exists() and rows.read_text().count("\n") >= 1):  # trial 2 part-way
    assert time.time() < deadline and proc.is_alive()
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.join()
  time.sleep(0.6)  # the trial died with the sweep (parent-death signal): no more rows
  rows_before = open(tmp_path / "sweep" / "trial_0002" / "metrics.jsonl").read()
  time.sleep(0.6)
  assert open(tmp_path / "sweep" / "trial_0002" / "metrics.jsonl").read() == rows_before
  first = starts.read_text().splitlines()
  assert first[:3] == ["trial_0000 0", "trial_0001 0", "trial_0002 0"]

  study = runner.run(s)
  later = starts.read_text().splitlines()[len(first):]
  done_before = len(rows_before.splitlines())
  assert 0 < done_before < 4
  # the interrupted trial resumed in its own workdir after its last row, then the last one
  assert later == [f"trial_0002 {done_before}", "trial_0004 0"]
  counted = runner.finished(study)
  assert len(counted) == 4 and all(t.state.name == "COMPLETE" for t in counted)
  resumed = next(t for t in counted if t.user_attrs.get("resumes") == 2)
  assert resumed.params == study.trials[2].params
  rows = [json.loads(l) for l in open(tmp_path / "sweep" / "trial_0002" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sweep_of_the_default_job_killed_and_resumed(tmp_path):
  """The issue's check: 4 short trials of the default job write sweep.md, a plot and the
  best config; killed after 2 trials and restarted, the sweep runs only the rest."""
  out = tmp_path / "sweep"
  args = [f"--workdir={out}", "--trials=4", "--metric=val_loss", "--direction=minimize",
          "--space=optim.lr=loguniform(1e-4,1e-2)", "--space=peft.rank=choice(4,8)",
          "--set=peft.method=lora", "--set=train.max_steps=4", "--set=train.eval_every=2",
          "--set=data.seq_len=64", "--set=eval.final=false", "--set=train.progress=false",
          "--set=checkpoint.export_hf=false", "--set=eval.overfit_evals=0"]
  proc = subprocess.Popen(launch_utils.cmd("sweep.py", *args), env=launch_utils.env(),
                          cwd=launch_utils.ROOT, stdout=subprocess.PIPE, text=True)
  finished = []
  for line in proc.stdout:
    if line.startswith("trial ") and ": start" not in line:
      finished.append(line)
    if len(finished) == 2:
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  p = launch_utils.run("sweep.py", *args, timeout=900)
  starts = [l for l in p.stdout.splitlines() if ": start" in l]
  assert len(starts) == 2, p.stdout  # only the remaining trials
  study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out}/study.db")
  counted = runner.finished(study)
  assert len(counted) == 4 and {t.state.name for t in counted} <= {"COMPLETE", "PRUNED"}
  table = (out / "sweep.md").read_text()
  for t in counted:
    assert f"| {t.number} | {t.state.name.lower()}" in table
  assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  best = study.best_trial
  cfg = json.loads((out / "best_config.json").read_text())
  assert cfg["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
  assert cfg["peft"]["rank"] == best.params["peft.rank"] and cfg["peft"]["method"] == "lora"
  rows = launch_utils.metrics(best.user_attrs["workdir"])
  assert best.value == [r["val_loss"] for r in rows if "val_loss" in r][-1]


def test_parallel_trials_run_at_once_on_disjoint_devices(tmp_path):
  s = _settings(tmp_path, 4, prune=False, parallel=2, devices=("0", "1"),
                overrides=("sleep=0.3",))
  study = runner.run(s)
  assert len(runner.finished(study)) == 4
  spans = [l.split() for l in (tmp_path / "sweep" / "spans.txt").read_text().splitlines()]
  assert sorted(d for _, _, d in spans) == ["0", "0", "1", "1"]
  overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:]
                 if float(a[0]) < float(b[1]) and float(b[0]) < float(a[1])]
  assert overlapping  # two trials ran at the same time ...
  assert all(a[2] != b[2] for a, b in overlapping)  # ... never on the same device
