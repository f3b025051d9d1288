"""Runs a sweep's trials: each a normal `launch/train.py` run in its own workdir.

    SWEEP/study.db          optuna's SQLite storage: a killed sweep, run again, continues
    SWEEP/trial_0003/       trial 3's workdir (metrics.jsonl, checkpoints, config.json)
    SWEEP/trial_0003/train.log

A trial's value is its metric (`val_loss` by default: any key of metrics.jsonl) at the
last row that has it. While it runs, every logged value of the metric is reported to
optuna at its step; when optuna's median pruner says so, the trial gets SIGTERM (it saves a
checkpoint and exits) and is marked pruned. Trials run one after another on the host's
devices, or `parallel` at once, each on its own subset of the GPUs (CUDA_VISIBLE_DEVICES).
Trials are killed with the sweep (Linux parent-death signal), so nothing trains orphaned.

Resuming: trials that finished (complete, pruned, or failed with an error) count towards
`trials`; a trial that was running when the sweep was killed is run again with the same
parameters in the same workdir, so it resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from jaxtune import cli
from jaxtune.sweep import space as space_lib

_log = logging.getLogger("jaxtune")
DONE_STATES = ("COMPLETE", "PRUNED")


@dataclasses.dataclass(frozen=True)
class Settings:
  workdir: str  # the sweep directory
  space: dict  # {key: optuna distribution}
  trials: int
  metric: str = "val_loss"
  direction: str = "minimize"
  config: str = ""  # --config of every trial
  overrides: tuple = ()  # --set of every trial
  parallel: int = 1
  devices: tuple = ()  # GPU ids to share out ("" = all visible)
  prune: bool = True
  seed: int = 0
  poll_s: float = 0.5
  train_script: str = ""  # default: launch/train.py (the checkout's, or the installed one)


def open_study(s: Settings):
  import optuna  # pylint: disable=g-import-not-at-top
  os.makedirs(s.workdir, exist_ok=True)
  storage = f"sqlite:///{os.path.abspath(os.path.join(s.workdir, 'study.db'))}"
  pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0) if s.prune
            else optuna.pruners.NopPruner())
  study = optuna.create_study(storage=storage, study_name="sweep", load_if_exists=True,
                              direction=s.direction,
                              sampler=optuna.samplers.TPESampler(seed=s.seed),
                              pruner=pruner)
  if study.direction.name.lower() != s.direction:
    raise ValueError(f"{s.workdir}: the sweep there was made with "
                     f"--direction={study.direction.name.lower()}; use another --workdir")
  saved = study.user_attrs.get("metric")
  if saved and saved != s.metric:
    raise ValueError(f"{s.workdir}: the sweep there optimises {saved}, not --metric="
                     f"{s.metric}; use another --workdir")
  study.set_user_attr("metric", s.metric)
  return study


def finished(study) -> list:
  """Trials that count towards --trials: complete, pruned, or failed with an error."""
  return [t for t in study.trials if t.state.name in DONE_STATES
          or (t.state.name == "FAIL" and "error" in t.user_attrs)]


def requeue_interrupted(study) -> int:
  """Trials left RUNNING by a killed sweep: closed, and queued again with the same
  params and workdir (so they resume from their checkpoint). Returns how many."""
  import optuna  # pylint: disable=g-import-not-at-top
  stale = [t for t in study.trials if t.state.name == "RUNNING"]
  for t in stale:
    study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(t.params, user_attrs={"workdir": t.user_attrs.get("workdir", ""),
                                              "resumes": t.number})
  return len(stale)


def device_groups(parallel: int, devices=()) -> list[tuple[str, ...]]:
  """`parallel` disjoint GPU subsets of equal size from `devices` (default: the visible
  GPUs); [()] * parallel when there are no GPUs (CPU trials share the host)."""
  ids = list(devices) or _visible_gpus()
  if not ids:
    return [()] * parallel
  if parallel > len(ids):
    raise ValueError(f"--parallel={parallel}: only {len(ids)} GPUs ({','.join(ids)}) to "
                     "share out; at most one trial per GPU")
  per = len(ids) // parallel
  return [tuple(ids[i * per:(i + 1) * per]) for i in range(parallel)]


def _visible_gpus() -> list[str]:
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env is not None:
    return [d for d in env.split(",") if d.strip() and d.strip() != "-1"]
  if not shutil.which("nvidia-smi"):
    return []
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith("GPU ")]


def command(s: Settings, params: dict, workdir: str) -> list[str]:
  script = s.train_script or str(cli.launcher("train"))  # the checkout's or the wheel's
  args = [sys.executable, script, f"--workdir={workdir}"]
  if s.config:
    args.append(f"--config={s.config}")
  args += [f"--set={o}" for o in s.overrides]
  args += [f"--set={k}={space_lib.set_value(v)}" for k, v in params.items()]
  return args


def _die_with_parent() -> None:
  """In the child: SIGKILL when the sweep dies (Linux prctl PR_SET_PDEATHSIG)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
  except (OSError, AttributeError):
    pass


class Active:
  """One running trial: its process, workdir and how far its metrics.jsonl was read."""

  def __init__(self, s: Settings, trial, group: tuple[str, ...]):
    self.trial, self.group, self.s = trial, group, s
    self.workdir = trial.user_attrs.get("workdir") or os.path.join(
        s.workdir, f"trial_{trial.number:04d}")
    trial.set_user_attr("workdir", self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    env = dict(os.environ)
    if group:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
    self.log = open(os.path.join(self.workdir, "train.log"), "a", encoding="utf-8")
    self.proc = subprocess.Popen(command(s, trial.params, self.workdir), env=env, cwd=os.getcwd(),
                                 stdout=self.log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
    self.offset, self.last, self.pruned = 0, None, False

  def poll_metrics(self) -> None:
    """Reports each new value of the metric; SIGTERM when the pruner says so."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not os.path.exists(path):
      return
    if os.path.getsize(path) < self.offset:  # a resumed run dropped rows past its checkpoint
      self.offset = 0
    with open(path, "rb") as f:
      f.seek(self.offset)
      data = f.read()
    lines = data.split(b"\n")
    self.offset += len(data) - len(lines[-1])  # a torn last line waits for the next poll
    for line in lines[:-1]:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if self.s.metric in row:
        self.last = (int(row["step"]), float(row[self.s.metric]))
        self.trial.report(self.last[1], self.last[0])
        if not self.pruned and self.trial.should_prune():
          self.pruned = True
          self.proc.send_signal(signal.SIGTERM)  # saves a checkpoint and exits

  def finish(self, study) -> str:
    """Tells optuna how the trial ended; returns the state's name."""
    import optuna  # pylint: disable=g-import-not-at-top
    self.log.close()
    self.poll_metrics()
    code = self.proc.returncode
    if self.pruned and code != 0:  # stopped by the pruner (a run that ended anyway: complete)
      study.tell(self.trial, state=optuna.trial.TrialState.PRUNED)
      return "PRUNED"
    if code == 0 and self.last is not None:
      self.trial.set_user_attr("steps", self.last[0])
      study.tell(self.trial, self.last[1])
      return "COMPLETE"
    error = (f"train.py exited {code}" if code else f"no {self.s.metric} in metrics.jsonl "
             "(is train.eval_every > 0 and is there held-out data?)")
    self.trial.set_user_attr("error", f"{error}; see {self.log.name}")
    study.tell(self.trial, state=optuna.trial.TrialState.FAIL)
    return "FAIL"


def run(s: Settings, on_change=None) -> object:
  """Runs the sweep's remaining trials; returns the optuna study. `on_change(study)` is
  called after every finished trial (the report)."""
  study = open_study(s)
  requeued = requeue_interrupted(study)
  if requeued:
    _log.warning("%d trial(s) interrupted by a killed sweep run again (resuming their "
                 "checkpoints)", requeued)
  groups = device_groups(s.parallel, s.devices)
  free, active = list(groups), {}
  while True:
    while free and len(finished(study)) + len(active) < s.trials:
      trial = study.ask(s.space)
      group = free.pop(0)
      active[trial.number] = Active(s, trial, group)
      print(f"trial {trial.number}: start {trial.params}"
            + (f" on GPUs {','.join(group)}" if group else ""), flush=True)
    if not active:
      break
    time.sleep(s.poll_s)
    for number, a in list(active.items()):
      a.poll_metrics()
      if a.proc.poll() is not None:
        state = a.finish(study)
        print(f"trial {number}: {state.lower()}"
              + (f" {s.metric}={a.last[1]:.6g} at step {a.last[0]}" if a.last else ""),
              flush=True)
        free.append(a.group)
        del active[number]
        if on_change:
          on_change(study)
  return study
