"""One process per device group (CPU, gloo collectives, jax.distributed on 127.0.0.1): two
processes with 2 devices each = one process with 4 devices, step by step, and a checkpoint
written by either topology resumes in the other with the same next losses."""

import shutil
import socket
import subprocess

import numpy as np
import pytest

from tests import launch_utils as lu

pytestmark = pytest.mark.slow

COMMON = ["--config=configs/tiny_test.py", "--set=train.max_steps=6",
          "--set=checkpoint.every_steps=3", "--set=mesh.fsdp=2", "--set=mesh.data=2"]


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(*args: str) -> list[tuple[str, str]]:
  """launch/train.py as processes 0 and 1 of one job (2 simulated CPU devices each)."""
  port = _port()
  procs = []
  for pid in range(2):
    full = [*args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={pid}", "--cpu_collectives=gloo"]
    procs.append(subprocess.Popen(lu.cmd("train.py", *full), env=lu.env(2), cwd=lu.ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return outs


def _rewind(src, dst) -> str:
  """A copy of run `src` whose latest checkpoint (step 6) is gone: resuming it re-runs
  steps 4-6 from the step-3 checkpoint."""
  shutil.copytree(src, dst)
  shutil.rmtree(dst / "checkpoints" / "6")
  return str(dst)


def _assert_same_losses(a: dict, b: dict, steps) -> None:
  assert sorted(b) == list(steps), sorted(b)
  np.testing.assert_allclose([b[s] for s in steps], [a[s] for s in steps], rtol=1e-5,
                             atol=1e-6)


def test_two_processes_match_one_process_and_resume_across_topologies(tmp_path):
  one = str(tmp_path / "one")
  lu.run("train.py", *COMMON, f"--workdir={one}", devices=4)

  two = str(tmp_path / "two")
  outs = _two_processes(*COMMON, f"--workdir={two}")
  assert "'processes': 2, 'devices': 4" in outs[0][0]  # only process 0 prints the summary
  assert "summary" not in outs[1][0]
  a, b = lu.losses(one), lu.losses(two)
  assert sorted(a) == list(range(1, 7))
  _assert_same_losses(a, b, range(1, 7))
  va = [m["val_loss"] for m in lu.metrics(one) if "val_loss" in m]
  vb = [m["val_loss"] for m in lu.metrics(two) if "val_loss" in m]
  np.testing.assert_allclose(vb, va, rtol=1e-5)
  # Process 0 wrote the export; the checkpoint was written collectively.
  assert (tmp_path / "two" / "hf" / "model.safetensors").exists()
  assert (tmp_path / "two" / "checkpoints" / "6").is_dir()

  # The two-process checkpoint of step 3 resumes in ONE process on 2 devices (another mesh:
  # mesh.* may change on resume) with the same losses at steps 4-6.
  resumed = _rewind(tmp_path / "two", tmp_path / "two_then_one")
  p = lu.run("train.py", *COMMON, "--set=mesh.data=1", f"--workdir={resumed}", devices=2)
  assert "'resumed_from': 3" in p.stdout and "'processes': 1, 'devices': 2" in p.stdout
  _assert_same_losses(a, lu.losses(resumed), range(1, 7))

  # And the one-process checkpoint resumes in two processes.
  resumed = _rewind(tmp_path / "one", tmp_path / "one_then_two")
  outs = _two_processes(*COMMON, f"--workdir={resumed}")
  assert "'resumed_from': 3" in outs[0][0] and "'processes': 2" in outs[0][0]
  _assert_same_losses(a, lu.losses(resumed), range(1, 7))
