"""Tests for launch/bench.py: the CPU smoke run, the FLOP formulas, the table and the goals.

The benchmark's numbers come from a GPU (docs/BENCHMARKS.md); what CI can check is that the
harness runs both sides on the same tiny model and prints the table it promises, that the
FLOP counts behind TFLOP/s and MFU are the formulas of train/flops.py evaluated right, and
that ratios and goal verdicts follow from the measurements. No timing is asserted.
"""

import json
import math
import os
import subprocess
import sys
import types

import pytest

from jaxtune.train import flops
from launch import bench
from launch import bench_decode
from launch import bench_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ["workload", "seq", "framework", "config", "tokens/s", "TFLOP/s", "MFU", "peak GiB",
          "vs peer", "vs compiled"]


def _cfg(shape):
  return bench_workers.shape_cfg(shape, {"model": {}, "precision": "bf16"})


def test_flops_match_hand_computed_values():
  """Hand-computed (N = layer kernels + output projection; attention 6 * L * T * H * Dh):

  Llama-3.2-1B shape, T = 2048: per layer 2048*2048*2 (q, o) + 2048*512*2 (k, v)
  + 3*2048*8192 (mlp) = 8,388,608 + 2,097,152 + 50,331,648 = 60,817,408; times 16 layers =
  973,078,528; + 2048*128256 = 262,668,288 (tied output projection) -> N = 1,235,746,816.
  Attention 6*16*2048*32*64 = 402,653,184. Full FT 6N + attn = 7,817,134,080; LoRA
  4N + attn = 5,345,640,448.
  Llama-3.1-8B shape, T = 4096: per layer 4096*4096*2 + 4096*1024*2 + 3*4096*14336 =
  33,554,432 + 8,388,608 + 176,160,768 = 218,103,808; times 32 = 6,979,321,856; + 4096*128256
  = 525,336,576 -> N = 7,504,658,432. Attention 6*32*4096*32*128 = 3,221,225,472; LoRA
  4N + attn = 33,239,859,200.
  Tiny smoke shape, T = 32: per layer 64*64*2 + 64*32*2 + 3*64*128 = 36,864; times 2 =
  73,728; + 64*512 = 32,768 -> N = 106,496 (vocab 512: the bundled tokenizer's, for the
  chat rows); attention 6*2*32*4*16 = 24,576; full 663,552.
  """
  one_b, eight_b, tiny = _cfg("1b"), _cfg("8b"), _cfg("tiny")
  assert flops.matmul_params(one_b) == 1_235_746_816
  assert flops.attention_flops_per_token(one_b, 2048) == 402_653_184
  assert flops.train_flops_per_token(one_b, 2048, peft=False) == 7_817_134_080
  assert flops.train_flops_per_token(one_b, 2048, peft=True) == 5_345_640_448
  assert flops.matmul_params(eight_b) == 7_504_658_432
  assert flops.attention_flops_per_token(eight_b, 4096) == 3_221_225_472
  assert flops.train_flops_per_token(eight_b, 4096, peft=True) == 33_239_859_200
  assert flops.matmul_params(tiny) == 106_496
  assert flops.train_flops_per_token(tiny, 32, peft=False) == 663_552
  # The non-embedding count differs from the model's own param count only by the norms and
  # the input embedding (tied: the table is counted once, as the output projection).
  assert one_b.num_params() - flops.matmul_params(one_b) == 16 * 2 * 2048 + 2048
  assert flops.peak_flops(types.SimpleNamespace(device_kind="NVIDIA H200")) == 989e12
  assert flops.peak_flops(types.SimpleNamespace(device_kind="cpu")) is None


def _result(workload, framework, tokens_per_s, *, seq=2048, variant=None, mfu=None, peak=None,
            status="ok", **extra):
  shape, method, data = bench.parse_workload(workload)
  r = dict(workload=workload, shape=shape, method=method, data=data, seq=seq, batch=4,
           framework=framework, precision="bf16", status=status, peer_ckpt=False,
           variant=variant or ("tuned" if framework == "jaxtune" else "peer"),
           model={"remat": "none", "logits_chunk": 4096})
  if status == "ok":
    r.update(tokens_per_s=tokens_per_s, tflops=1.0, mfu=mfu, peak_bytes=peak, **extra)
  return r


def test_table_ratios_and_goal_verdicts():
  """Ratios by hand: 160/100 = 1.60, 160/110 = 1.45, 190/140 = 1.36, 145/150 = 0.97 (packed
  chat over the unpacked rows with segment ids), 171/190 = 0.90 (QLoRA over its own LoRA)."""
  gib = 2 ** 30
  results = [
      _result("1b_full", "torch", 100.0, mfu=0.4, peak=30 * gib),
      _result("1b_full", "torch_compile", 110.0),
      _result("1b_full", "jaxtune", 160.0, mfu=0.56, peak=20 * gib),
      _result("1b_lora", "torch", 100.0),
      _result("1b_lora", "torch_compile", 140.0),
      _result("1b_lora", "jaxtune", 190.0),
      _result("1b_full_seg", "jaxtune", 150.0, mfu=0.52),
      _result("1b_full_chat", "torch", 100.0),
      _result("1b_full_chat", "jaxtune", 145.0, mfu=0.50),
      _result("1b_qlora", "torch", 0, status="unavailable"),
      _result("1b_qlora", "jaxtune", 171.0),
      _result("8b_lora", "torch", 0, seq=4096, status="oom"),
      _result("8b_lora", "jaxtune", 10.0, seq=4096, peak=24 * gib),
      _result("8b_qlora", "torch", 5.0, seq=4096, peak=30 * gib),
      _result("8b_qlora", "jaxtune", 9.0, seq=4096, peak=15 * gib),
  ]
  lines = bench.table(results).splitlines()
  assert [c.strip() for c in lines[0].split("|")] == HEADER
  rows = [[c.strip() for c in line.split("|")] for line in lines[2:]]
  assert len(rows) == len(results)
  by_key = {(r[0], r[2]): r for r in rows}
  assert by_key[("1b full FT", "jaxtune")][-2:] == ["1.60x", "1.45x"]
  assert by_key[("1b full FT", "jaxtune")][6] == "56.0%"
  assert by_key[("1b full FT", "torch")][7] == "30.0"
  assert by_key[("1b full FT", "torch_compile")][-2:] == ["", ""]  # peers get no ratio
  assert by_key[("1b LoRA r16", "jaxtune")][-2:] == ["1.90x", "1.36x"]
  assert by_key[("1b full FT chat", "jaxtune")][-2:] == ["1.45x", ""]
  assert by_key[("1b QLoRA nf4", "torch")][3].startswith("unavailable")
  assert by_key[("1b QLoRA nf4", "jaxtune")][-2:] == ["", ""]  # no peer to compare with
  verdicts = bench.goals(results)
  assert ("1B full FT seq 2048: 1.60x eager (goal >= 1.5x), 1.45x compiled (goal >= 1.2x), "
          "MFU 56.0% (goal >= 55%): MET") in verdicts
  assert ("1B LoRA r16 seq 2048: 1.90x eager (goal >= 2.0x), 1.36x compiled (goal >= 1.5x): "
          "not met") in verdicts
  assert ("1B full FT chat seq 2048: 1.45x eager (goal >= 1.4x), MFU 50.0% (goal >= 55%), "
          "0.97x unpacked (seg) (goal >= 0.95x): not met") in verdicts
  assert "1B QLoRA nf4 seq 2048: 0.90x own LoRA (goal >= 0.95x): not met" in verdicts
  assert "8B QLoRA nf4 seq 4096: peak 15.0 GiB, peer 30.0 GiB (goal < 16 GiB): MET" in verdicts
  assert "8B LoRA r16 seq 4096: peak 24.0 GiB, peer: oom" in verdicts


def test_a_mesh_row_is_compared_with_the_peer_that_shards_like_it():
  """torch_ddp and torch_fsdp both ran: an fsdp=2 row takes FSDP2 (200/100 = 2.00x), a
  data=2 row DDP (200/160 = 1.25x), whatever their order in the results."""
  rows = [_result("1b_full", "jaxtune", 200.0, mesh=mesh, variant=name)
          for name, mesh in (("f", {"data": 1, "fsdp": 2, "tensor": 1}),
                             ("d", {"data": 2, "fsdp": 1, "tensor": 1}))]
  for peers in ([_result("1b_full", "torch_fsdp", 100.0), _result("1b_full", "torch_ddp", 160.0)],
                [_result("1b_full", "torch_ddp", 160.0), _result("1b_full", "torch_fsdp", 100.0)]):
    results = peers + rows
    assert bench.peer_row(results, rows[0], "torch")["framework"] == "torch_fsdp"
    assert bench.peer_row(results, rows[1], "torch")["framework"] == "torch_ddp"
    assert bench.peer_row(results, rows[0], "torch_compile") is None
    got = [[c.strip() for c in line.split("|")] for line in bench.table(results).splitlines()[2:]]
    assert [r[-2] for r in got if r[2] == "jaxtune"] == ["2.00x", "1.25x"]


def test_profile_kernel_kinds_and_idle_time():
  """The profile's kinds from kernel names the H200 trace gives (cuBLAS nvjet, XLA's Triton
  GEMM fusions, cuDNN attention, XLA loop/reduce fusions, NCCL), and the busiest stream's
  idle time from hand-placed kernels."""
  kinds = {"nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": "gemm", "gemm_fusion_dot_282": "gemm",
           "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention",
           "loop_multiply_fusion_31": "fusion", "input_reduce_fusion_1": "fusion",
           "ncclDevKernel_AllGather_RING_LL": "collective", "MemcpyD2D": "copy"}
  assert {k: bench_workers.kernel_kind(k) for k in kinds} == kinds
  # stream 1: kernels [0, 10), [12, 20), [220, 230) us over 2 steps; stream 2 busy less
  spans = {(1, 1): [(12, 20), (0, 10), (220, 230)], (1, 2): [(0, 5)]}
  idle = bench_workers._idle(spans, steps=2)
  assert idle["kernels_per_step"] == 1.5 and idle["span_ms_per_step"] == 0.115
  assert idle["idle_ms_per_step"] == pytest.approx((2 + 200) / 1e3 / 2)
  assert idle["idle_ms_in_gaps_over_100us"] == pytest.approx(200 / 1e3 / 2)
  assert bench_workers._idle({}, steps=2) == {}


def test_workload_names():
  assert bench.parse_workload("1b_full") == ("1b", "full", "synthetic")
  assert bench.parse_workload("8b_lora_chat") == ("8b", "lora", "chat")
  for bad in ("1b", "1b_dpo", "1b_full_packed", "1b_full_chat_x"):
    with pytest.raises(bench.app.UsageError, match="SHAPE_METHOD"):
      bench.parse_workload(bad)


@pytest.mark.slow
def test_smoke_run_prints_the_table_for_both_frameworks(tmp_path):
  """--smoke runs full FT, LoRA and QLoRA of the tiny shape through jaxtune's jitted train
  step and through transformers + peft, and prints one row per (workload, framework)."""
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--smoke",
                         "--noisolate", f"--out={out}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("workload"))
  assert [c.strip() for c in lines[head].split("|")] == HEADER
  rows = [[c.strip() for c in line.split("|")] for line in lines[head + 2:head + 8]]
  assert {(r[0], r[2]) for r in rows} == {(f"tiny {m}", fw) for m in bench.METHOD_NAMES.values()
                                          for fw in ("torch", "jaxtune")}
  for r in rows:
    if r[2] == "jaxtune":
      assert float(r[4].replace(",", "")) > 0, r
      assert "attn=auto" in r[3] and "bf16" in r[3], r

  results = json.loads(out.read_text())["results"]
  assert len(results) == 6
  for r in results:
    if r["framework"] == "jaxtune":
      assert r["status"] == "ok", r
    if r["status"] == "ok":
      # Same tiny vocabulary (512) on both sides: a random model starts near ln(512).
      assert abs(r["losses"][0] - math.log(512)) < 0.25, r
      assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
      assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_s"])
    else:  # no bitsandbytes (QLoRA peer) or no torch here: a row that says so
      assert r["framework"] == "torch" and r["status"] in ("unavailable", "error"), r
  qlora = next(r for r in results if r["framework"] == "jaxtune" and r["method"] == "qlora")
  assert qlora["base_bytes_per_param"]["projections"] == 0.53125  # 4 bits + bf16 scale per 64


DECODE_HEADER = ["workload", "batch", "framework", "tokens/s", "device-only tokens/s",
                 "roofline", "peak GiB", "vs hf static+compile"]


def _decode_result(framework, tokens_per_s, *, variant=None, batches=(64, 256), status="ok"):
  r = dict(kind="decode", workload="decode_1b", shape="1b", framework=framework,
           variant=variant or ("auto" if framework == "jaxtune" else "peer"),
           batch_sizes=list(batches), prompt=128, new=256, model={}, precision="bf16",
           status=status, peak_bytes=10 * 2**30,
           compiled=True if framework == "hf_static_compile" else None)
  if status == "ok":
    r["measured"] = {str(b): {"call_s": b * 256 / t, "tokens": b * 256}
                     for b, t in zip(batches, tokens_per_s)}
  return r


def test_decode_roofline_table_and_goals():
  """Roofline, hand-computed for the Llama-3.2-1B shape, prompt 128 + 256 new tokens.
  Weights: 2 bytes * 1,235,746,816 matmul params = 2,471,493,632 bytes per step. KV cache at
  the average context, 128 + 256 / 2 = 256 tokens: 2 (k, v) * 16 layers * 8 kv heads * 64
  * 2 bytes * 256 tokens = 4,194,304 bytes per row: 2,147,483,648 at batch 256 and
  536,870,912 at batch 64. Tokens/s at 4.8e12 B/s: 256 * 4.8e12 / 4,618,977,280 = 266,033
  and 64 * 4.8e12 / 3,008,364,544 = 102,115. The ratio column and the goal verdicts follow
  from the measured tokens/s; the goals judge the first (default) attention setting.
  """
  cfg = bench_workers.shape_cfg("1b", {"model": {}, "precision": "bf16"})
  r256 = bench_decode.roofline(cfg, 256, 128, 256)
  assert r256["weight_bytes"] == 2_471_493_632 and r256["kv_bytes"] == 2_147_483_648
  assert r256["tokens_per_s"] == pytest.approx(266_033, abs=1)
  r64 = bench_decode.roofline(cfg, 64, 128, 256)
  assert r64["kv_bytes"] == 536_870_912
  assert r64["tokens_per_s"] == pytest.approx(102_115, abs=1)

  results = [_decode_result("jaxtune", (39_000, 84_000)),
             _decode_result("jaxtune", (30_000, 60_000), variant="xla"),
             _decode_result("hf_static_compile", (13_000, 21_000)),
             _decode_result("hf_dynamic", (0, 0), status="error")]
  lines = bench_decode.table(results).splitlines()
  assert [c.strip() for c in lines[0].split("|")] == DECODE_HEADER
  rows = {(r[1], r[2]): r for r in ([c.strip() for c in l.split("|")] for l in lines[2:])}
  assert rows[("256", "jaxtune attn=auto")][3] == "84,000"
  assert rows[("256", "jaxtune attn=auto")][5] == f"{100 * 84_000 / 266_033.4:.1f}%"
  assert rows[("256", "jaxtune attn=auto")][7] == "4.00x"
  assert rows[("64", "jaxtune attn=xla")][7] == f"{30 / 13:.2f}x"
  assert rows[("64", "hf dynamic")][3].startswith("error")
  verdicts = "\n".join(bench_decode.goals(results))
  assert "decode 1B batch 256: 84,000 tokens/s (31.6% of roofline), 4.000x hf static+compile " \
         "(goal >= 80k and >= 4x): MET" in verdicts
  assert "decode 1B batch 64: 39,000 tokens/s, 3.000x hf static+compile (goal >= 3x): MET" \
         in verdicts
  assert "60,000" not in verdicts  # the goals judge the default (first) attention setting


@pytest.mark.slow
def test_decode_smoke_run_prints_the_table_for_every_side(tmp_path):
  """--smoke --workloads=decode_1b: jaxtune's sampler and transformers generate (dynamic and
  static cache) on the tiny shape on CPU, every row generating all 8 tokens; the sampler's
  log-probs agree with the plain forward (bf16)."""
  out = tmp_path / "decode.json"
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--smoke",
                         "--workloads=decode_1b", "--noisolate", f"--out={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("workload"))
  assert [c.strip() for c in lines[head].split("|")] == DECODE_HEADER
  rows = [[c.strip() for c in line.split("|")] for line in lines[head + 2:head + 8]]
  assert {(r[1], r[2]) for r in rows} == {(b, f) for b in ("2", "4") for f in (
      "jaxtune attn=auto", "hf dynamic", "hf static (no compile)")}
  results = json.loads(out.read_text())["decode_results"]
  for r in results:
    assert r["status"] == "ok", r
    assert {b: m["tokens"] for b, m in r["measured"].items()} == {"2": 16, "4": 32}
  jax_run = next(r for r in results if r["framework"] == "jaxtune")
  assert jax_run["selfcheck"]["max_abs_logprob_diff"] < 0.05


def test_chat_rows_are_the_pipelines_and_the_peer_scores_them_like_jaxtune(tmp_path):
  """The chat workload's rows are packed pipeline rows, and the PyTorch peer's view of them
  (the sdpa block-diagonal mask, positions, loss mask) gives the loss that jaxtune's model
  computes on the same weights: both sides train on the same function of the same tokens.
  The flex_attention document mask (the compiled peer's) gives the same forward loss."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  import jaxtune
  from jaxtune.models import decoder
  from jaxtune.models import head
  from launch import bench_chat
  from tests import hf_models

  spec = {"data": "chat", "seq": 128, "batch": 2, "copies": 1}  # the sample itself
  batch = next(bench_chat.host_batches(spec, 512))
  seg = batch["segment_ids"]
  assert (seg.max(axis=1) >= 2).all()  # packed: several examples per row
  assert 0 < bench_chat.real_tokens(batch) == np.count_nonzero(seg) <= seg.size
  assert 0 < batch["loss_mask"].sum() < np.count_nonzero(seg)  # assistant turns only

  model = hf_models.make("llama2", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2)
  model.save_pretrained(tmp_path, safe_serialization=True)
  cfg, params = jaxtune.load_hf(str(tmp_path))
  h = decoder.hidden_states(cfg, params, jnp.asarray(batch["tokens"]),
                            positions=jnp.asarray(batch["positions"]),
                            segment_ids=jnp.asarray(seg))
  logp = np.asarray(jax.nn.log_softmax(head.logits(cfg, params, h), axis=-1), np.float64)
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  ref = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
  with torch.no_grad():
    inputs = bench_chat.torch_inputs(batch, "cpu", "sdpa")
    sdpa = bench_chat.torch_loss(model, inputs)
    # Plain causal over the whole row (no mask, positions 0..T-1; transformers would infer
    # the packing from restarting position_ids alone) reads across examples:
    leaky = bench_chat.torch_loss(model, {k: v for k, v in inputs.items()
                                          if k not in ("attention_mask", "position_ids")})
    model.config._attn_implementation = "flex_attention"
    flex = bench_chat.torch_loss(model, bench_chat.torch_inputs(batch, "cpu", "flex_attention"))
  assert float(sdpa) == pytest.approx(ref, rel=1e-5)
  # packing matters on these rows: far more than the 1e-5 the masked sides agree within
  # (a random model's loss moves little: 6.2665 against 6.2697 here)
  assert abs(float(leaky) - ref) > 20 * 1e-5 * ref
  assert float(flex) == pytest.approx(ref, rel=1e-5)
