"""Two processes (CPU, gloo collectives, 2 devices each) = one process with 4 devices."""

import socket
import subprocess

import numpy as np
import pytest

from tests import launch_utils as lu

pytestmark = pytest.mark.slow


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  common = ["--config=configs/tiny_test.py", "--set=train.max_steps=6",
            "--set=checkpoint.every_steps=3", "--set=mesh.fsdp=2", "--set=mesh.data=2"]
  one = str(tmp_path / "one")
  lu.run("train.py", *common, f"--workdir={one}", devices=4)

  two = str(tmp_path / "two")
  port = _port()
  procs = []
  for pid in range(2):
    args = [*common, f"--workdir={two}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={pid}", "--cpu_collectives=gloo"]
    procs.append(subprocess.Popen(lu.cmd("train.py", *args), env=lu.env(2), cwd=lu.ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "'processes': 2, 'devices': 4" in outs[0][0]  # only process 0 prints the summary
  assert "summary" not in outs[1][0]
  a, b = lu.losses(one), lu.losses(two)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5, atol=1e-6)
  va = [m["val_loss"] for m in lu.metrics(one) if "val_loss" in m]
  vb = [m["val_loss"] for m in lu.metrics(two) if "val_loss" in m]
  np.testing.assert_allclose(vb, va, rtol=1e-5)
  # Process 0 wrote the export; the checkpoint was written collectively.
  assert (tmp_path / "two" / "hf" / "model.safetensors").exists()
  assert (tmp_path / "two" / "checkpoints" / "6").is_dir()
