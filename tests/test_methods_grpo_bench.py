"""launch/bench_grpo.py: the jaxtune side runs its real GRPO path at smoke size (every
completion exactly `new` tokens, as the workload promises), and the summary, ratio and goal
verdicts follow from the measurements (hand-computed). TRL's side runs only where trl is
installed and the smoke is asked for (the GPU command in docs/BENCHMARKS.md)."""

import pytest

from launch import bench_grpo


def test_jaxtune_side_runs_at_smoke_size():
  spec = bench_grpo.specs(["jaxtune"], smoke=True)[0]
  res = bench_grpo.run_worker(spec)
  assert res["status"] == "ok", res.get("traceback", res.get("error"))
  assert len(res["rows"]) == spec["steps"] and len(res["losses"]) == spec["warmup"] + 1
  # tokens/s is P x G x new over the median generate seconds (one timed step here)
  want = 2 * 2 * 8 / res["rows"][0]["generate_s"]
  assert res["rollout_tokens_per_s"] == pytest.approx(want)
  assert res["step_s"] == pytest.approx(res["rows"][0]["rollout_s"] + res["rows"][0]["update_s"])
  from jaxtune.methods import grpo
  from jaxtune import sampling
  assert grpo.sampling is sampling  # the timing wrapper is removed again


def test_summary_table_and_goals_by_hand():
  rows = [{"rollout_s": r, "generate_s": g, "update_s": u}
          for r, g, u in ((2.0, 1.0, 1.0), (4.0, 2.0, 3.0), (3.0, 1.5, 2.0))]
  base = dict(workload="grpo_1b", prompts=32, generations=8, new=256, status="ok",
              peak_bytes=2**31)
  jax_row = bench_grpo.summarise(dict(base, framework="jaxtune", rows=rows))
  # medians: rollout 3.0, generate 1.5, update 2.0 -> step 5.0; 32*8*256 / 1.5 tokens/s
  assert (jax_row["rollout_s"], jax_row["generate_s"], jax_row["update_s"]) == (3.0, 1.5, 2.0)
  assert jax_row["step_s"] == 5.0
  assert jax_row["rollout_tokens_per_s"] == pytest.approx(65536 / 1.5)
  trl_row = bench_grpo.summarise(dict(base, framework="trl", rows=[
      {"rollout_s": 15.0, "generate_s": 14.0, "update_s": 6.0}]))
  text = bench_grpo.table([jax_row, trl_row])
  assert "| grpo_1b | jaxtune | ok | 5.00 | 3.00 | 1.50 | 2.00 | 43,691 | 2.0 | 4.20x |" in text
  assert bench_grpo.goals([jax_row, trl_row]) == [
      "rollout >= 60k tokens/s inside the step: 43,691 -> NOT MET",
      "GRPO step >= 4x faster than TRL GRPOTrainer: 4.20x -> MET"]
  failed = dict(base, framework="trl", status="oom", error="CUDA out of memory")
  assert "| trl | oom: CUDA out of memory |" in bench_grpo.table([jax_row, failed])
  assert len(bench_grpo.goals([jax_row, failed])) == 1
