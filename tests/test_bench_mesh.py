"""launch/bench.py --mesh: the bench's jaxtune runs on a data / fsdp / tensor mesh of local
devices (8 simulated CPU devices here), sharding the weights as the mesh says and computing
the one-device losses (full FT of the tiny shape; LoRA's adapters are placed by setup.build
like every run's)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import bench
from tests import launch_utils as lu

# bf16 weights and matmuls: a sharded matmul sums in another order, so losses agree to about
# one bf16 rounding (2**-8 relative), not to float32 precision.
BF16_RTOL = 2.0**-8


def _bench(tmp_path, mesh: str) -> list[dict]:
  out = tmp_path / f"bench_{mesh or 'one'}.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(lu.ROOT, "launch", "bench.py"), "--smoke", "--noisolate",
       "--frameworks=jaxtune", "--workloads=1b_full", "--batch=4", f"--mesh={mesh}",
       f"--out={out}"], cwd=lu.ROOT, env=lu.env(8), capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())["results"]
  assert [r["status"] for r in results] == ["ok"], results
  if mesh:  # the table's config column names the mesh
    assert f"mesh {mesh}" in proc.stdout
  return results


@pytest.mark.slow
def test_bench_mesh_shards_weights_and_keeps_losses(tmp_path):
  one = {r["workload"]: r for r in _bench(tmp_path, "")}
  for mesh, weight_share in (("data=2", 1.0), ("fsdp=2", 0.5), ("tensor=2", 0.5)):
    for r in _bench(tmp_path, mesh):
      ref = one[r["workload"]]
      assert r["mesh_devices"] == 2 and ref["mesh_devices"] == 1
      # data=2 replicates the weights; fsdp / tensor split every kernel in two (the tiny
      # shape's norms are a rounding error of the total).
      share = r["weights_bytes_device0"] / ref["weights_bytes_device0"]
      assert abs(share - weight_share) < 0.02, (mesh, r["workload"], share)
      np.testing.assert_allclose(r["losses"], ref["losses"], rtol=BF16_RTOL)


def test_parse_mesh():
  assert bench.parse_mesh("") == {}
  assert bench.parse_mesh("fsdp=2") == {"data": 1, "fsdp": 2, "tensor": 1}
  assert bench.parse_mesh("data=2,tensor=2") == {"data": 2, "fsdp": 1, "tensor": 2}
  assert bench.mesh_devices(bench.parse_mesh("data=2,tensor=2")) == 4
  with pytest.raises(Exception, match="--mesh: bad part 'expert=2'"):
    bench.parse_mesh("expert=2")


def test_torch_ddp_peer_runs_two_processes(tmp_path):
  """--frameworks=torch_ddp with a 2-device mesh: torchrun starts two gloo processes (one
  per device), each trains on its half of the rows; rank 0's row counts the global batch's
  tokens, and the one-device peers are skipped for a mesh."""
  out = tmp_path / "ddp.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(lu.ROOT, "launch", "bench.py"), "--smoke",
       "--frameworks=torch,torch_ddp", "--workloads=1b_full", "--batch=4", "--mesh=data=2",
       f"--out={out}"], cwd=lu.ROOT, env=lu.env(2), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(out.read_text())["results"]
  assert [(r["framework"], r["status"]) for r in results] == [("torch_ddp", "ok")], results
  r = results[0]
  assert r["ddp"] == 2 and r["tokens_per_step"] == r["batch"] * r["seq"]  # smoke: batch 2
  assert all(np.isfinite(r["losses"])) and len(r["losses"]) == 3  # 1 warmup + 2 timed
  assert "DDP x2" in proc.stdout
