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


def _torch_bench(tmp_path, name: str, *args: str) -> tuple[list[dict], str]:
  """The torch peer's --smoke rows of tiny full FT and LoRA (global batch 2) and the table;
  a stuck run fails: gloo gives up after 120 s, the bench kills the worker after 300 s."""
  out = tmp_path / f"{name}.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(lu.ROOT, "launch", "bench.py"), "--smoke",
       "--workloads=1b_full,1b_lora", "--batch=4", "--run_timeout=300", f"--out={out}", *args],
      cwd=lu.ROOT, env=lu.env(2), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())["results"], proc.stdout


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
  """The one-process torch peer on the whole global batch, by workload."""
  results, _ = _torch_bench(tmp_path_factory.mktemp("one"), "one", "--noisolate",
                            "--frameworks=torch")
  assert [r["status"] for r in results] == ["ok", "ok"], results
  return {r["workload"]: r for r in results}


def _rel(a: list[float], b: list[float]) -> float:
  return float(np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(b))


# A peer under torchrun against one process on the same global batch (3 AdamW steps, lr
# 1e-5): both compute the same gradients up to bf16 rounding (each rank sums its own row's
# tokens, then the all-reduce / reduce-scatter adds the two halves). AdamW's first moment is
# linear in those gradients: measured 0.2% to 0.5% apart (the `_sketch` estimate), so 5%
# leaves a 10x margin. The update is near lr * sign(gradient) in the first steps, so the few
# elements whose gradient is near zero may step the other way: measured 1.5% to 1.7%, so
# 10%. With the reduction broken (DDP wrap skipped; FSDP's gradient sync turned off) both
# measured 0.85 to 1.27: every rank stepped on its own row alone.
MOMENT_RTOL = 0.05
UPDATE_RTOL = 0.1


@pytest.mark.parametrize("framework,label", [("torch_ddp", "DDP x2"), ("torch_fsdp", "FSDP x2")])
def test_torch_peer_under_torchrun_trains_like_one_process(tmp_path, one_process, framework,
                                                           label):
  """--frameworks=torch_ddp / torch_fsdp with a 2-device mesh: torchrun starts two gloo
  processes (one per device), each trains on its half of the rows; rank 0's row counts the
  global batch's tokens, the one-device peers are skipped for a mesh, and after the steps
  (full FT and LoRA) every rank holds the same trainable params, which moved as one process
  moves them on the whole batch."""
  results, stdout = _torch_bench(tmp_path, framework, f"--frameworks=torch,{framework}",
                                 "--mesh=data=2")
  assert [(r["framework"], r["workload"], r["status"]) for r in results] == [
      (framework, "tiny_full", "ok"), (framework, "tiny_lora", "ok")], results
  assert stdout.count(label) == 2
  for r in results:
    ref = one_process[r["workload"]]
    assert r["ddp"] == 2 and r["batch"] == ref["batch"] == 2
    assert r["tokens_per_step"] == r["batch"] * r["seq"]
    assert all(np.isfinite(r["losses"])) and len(r["losses"]) == 3  # 1 warmup + 2 timed
    # the all-reduce hands every rank the same bits (FSDP: the same gathered params)
    assert r["check"]["replica_diff"] == 0.0, r["workload"]
    moment = _rel(r["check"]["moment"], ref["check"]["moment"])
    update = _rel(r["check"]["update"], ref["check"]["update"])
    assert moment < MOMENT_RTOL and update < UPDATE_RTOL, (r["workload"], moment, update)


def test_table_labels_the_mesh_peer_and_compares_jaxtune_with_it():
  row = dict(workload="tiny_full", seq=32, batch=2, precision="bf16", status="ok",
             peer_ckpt=False, tflops=0.0, mfu=None, peak_bytes=None, model={},
             mesh={"data": 1, "fsdp": 2, "tensor": 1})
  lines = bench.table([
      dict(row, framework="torch_fsdp", variant="peer", ddp=2, shard="fsdp",
           tokens_per_s=100.0),
      dict(row, framework="jaxtune", variant="tuned", tokens_per_s=150.0)]).splitlines()
  assert "FSDP x2 bf16" in lines[2]
  assert [c.strip() for c in lines[3].split("|")][-2:] == ["1.50x", ""]
