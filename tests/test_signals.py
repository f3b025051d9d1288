"""Signals: SIGINT saves like SIGTERM, without a traceback, and an interrupted run exits 3
with the command that resumes it; only a run that reached its end (or stopped early)
exits 0; a second Ctrl-C exits at once."""

import os
import signal
import subprocess
import time

import pytest

from jaxtune.train import stop as stop_lib
from tests import launch_utils as lu

TINY = "--config=configs/tiny_test.py"


def test_first_signal_requests_a_stop_and_a_second_ctrl_c_raises():
  with stop_lib.Stop() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating itself: still saving
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def _interrupt(wd: str, sig: int, *extra: str):
  """Starts a long run, sends `sig` once 3 steps are logged; returns (proc, stdout, stderr)."""
  args = [TINY, f"--workdir={wd}", "--set=train.max_steps=500", "--set=train.eval_every=0",
          "--set=checkpoint.every_steps=1000", *extra]
  proc = subprocess.Popen(lu.cmd("train.py", *args), env=lu.env(), cwd=lu.ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  path, deadline = os.path.join(wd, "metrics.jsonl"), time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and len(lu.metrics(wd)) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=300)
  return proc, out, err


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, id="SIGINT"),
                                 pytest.param(signal.SIGTERM, id="SIGTERM")])
def test_signal_saves_exits_3_and_the_same_command_resumes(sig, tmp_path):
  wd = str(tmp_path / "run")
  proc, out, err = _interrupt(wd, sig)
  assert proc.returncode == 3, err[-3000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
  steps = [int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 500  # saved where it stopped, not at 1000
  assert f"interrupted at step {steps[0]}" in out and "'status': 'interrupted'" in out
  assert "to resume, run: " in err and f"--workdir={wd}" in err
  assert not os.path.exists(os.path.join(wd, "hf"))  # no export of an unfinished run
  if sig == signal.SIGTERM:
    return
  # Re-running resumes from that step; reaching max_steps exits 0.
  p = lu.run("train.py", TINY, f"--workdir={wd}", f"--set=train.max_steps={steps[0] + 2}",
             "--set=train.eval_every=0", "--set=checkpoint.every_steps=1000")
  assert f"'resumed_from': {steps[0]}" in p.stdout and "'status': 'completed'" in p.stdout
  assert sorted(lu.losses(wd)) == list(range(1, steps[0] + 3))
