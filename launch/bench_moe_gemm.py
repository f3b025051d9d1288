"""The MoE layer's expert matmuls alone, on one GPU: each grouped-matmul implementation of
`models/moe.py` at a model's expert shapes, checked against float32 and timed.

For the gate|up and down products of one MoE layer (Qwen3-30B-A3B by default: D 2048, F 768,
128 experts, top 8; 2048 tokens) with the group sizes a random router gives, it times:

  dense     one plain [M, in] @ [in, out] GEMM of the same rows (the ceiling)
  blocked   moe.grouped_blocks (per-block weight copies), forward and forward+backward
  ragged    jax.lax.ragged_dot (XLA's own), forward
  mgpu      grouped_gemm.ragged_dot (JAX's Mosaic GPU kernels) at each tile setting of
            --sweep: forward, dx (weight read transposed), dw (transposed kernel)

and the largest error of each against float32 (groups of zero rows included). Prints a table;
--out writes it as JSON.

  python launch/bench_moe_gemm.py --out=moe_gemm.json
"""

import functools
import itertools
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 2048, "Tokens routed (batch * seq).")
flags.DEFINE_integer("hidden", 2048, "D.")
flags.DEFINE_integer("expert_width", 768, "F of one expert.")
flags.DEFINE_integer("experts", 128, "E.")
flags.DEFINE_integer("top_k", 8, "Experts per token.")
flags.DEFINE_integer("iters", 20, "Timed calls per entry.")
flags.DEFINE_bool("sweep", True, "Try several tile settings for the mgpu kernels.")
flags.DEFINE_string("out", "", "Write the rows as JSON here.")


def _time(fn, *args) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(FLAGS.iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / FLAGS.iters * 1e3


def group_sizes(key, tokens: int, experts: int, k: int):
  """A random router's top-k counts per expert, with two experts given no rows."""
  import jax
  import jax.numpy as jnp
  logits = jax.random.normal(key, (tokens, experts))
  logits = logits.at[:, :2].set(-1e9)  # groups of zero rows must work too
  _, top = jax.lax.top_k(logits, k)
  return jnp.bincount(top.reshape(-1), length=experts).astype(jnp.int32)


def _err(y, ref) -> float:
  import jax.numpy as jnp
  return float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))


def configs():
  if not FLAGS.sweep:
    from jaxtune.models import grouped_gemm
    return [dict(grouped_gemm.FWD)]
  out = []
  for bm, bn, steps, gbn in itertools.product((64, 128), (128, 256), (2, 4), (1, 2)):
    out.append(dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=steps,
                    grid_block_n=gbn))
  return out


def bench_shape(name: str, n_in: int, n_out: int, gs, rows: list) -> None:
  import jax
  import jax.numpy as jnp
  from jaxtune.models import grouped_gemm, moe
  m, e = int(gs.sum()), gs.shape[0]
  kx, kw, kd = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (m, n_in), jnp.bfloat16)
  w = (jax.random.normal(kw, (e, n_in, n_out), jnp.float32) / n_in ** 0.5).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (m, n_out), jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  ref = jax.jit(lambda x, w: jax.lax.ragged_dot(f32(x), f32(w), gs))(x, w)
  ref_dx = jax.jit(lambda dy, w: jax.lax.ragged_dot(f32(dy), jnp.swapaxes(f32(w), 1, 2), gs))(dy, w)
  ref_dw = jax.jit(lambda x, dy: jax.grad(
      lambda w: jnp.sum(jax.lax.ragged_dot(f32(x), w, gs) * f32(dy)))(f32(w)))(x, dy)
  flops = 2 * m * n_in * n_out

  def row(impl, part, ms, err=None, **kw):
    rows.append(dict(shape=name, impl=impl, part=part, ms=round(ms, 4),
                     tflops=round(flops / ms / 1e9, 1), err=err, **kw))
    print(f"{name:8s} {impl:8s} {part:6s} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s "
          f"err={err} {kw or ''}", flush=True)

  dense = jax.jit(lambda x, w0: x @ w0)
  row("dense", "fwd", _time(dense, x, w[0]))
  blocked = jax.jit(lambda x, w: moe.grouped_blocks(x, w, gs))
  row("blocked", "fwd", _time(blocked, x, w), _err(blocked(x, w), ref))
  vjp_b = jax.jit(lambda x, w, dy: jax.vjp(lambda x: moe.grouped_blocks(x, w, gs), x)[1](dy))
  row("blocked", "dx", _time(vjp_b, x, w, dy), _err(vjp_b(x, w, dy)[0], ref_dx))
  ragged = jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, gs))
  row("ragged", "fwd", _time(ragged, x, w), _err(ragged(x, w), ref))
  for cfg in configs():
    tag = "m{block_m} n{block_n} s{max_concurrent_steps} g{grid_block_n}".format(**cfg)
    try:
      fwd = jax.jit(functools.partial(grouped_gemm._fwd_kernel, cfg=cfg))
      row("mgpu", "fwd", _time(fwd, x, w, gs), _err(fwd(x, w, gs), ref), cfg=tag)
      dxk = jax.jit(functools.partial(grouped_gemm._fwd_kernel, transpose_rhs=True, cfg=cfg))
      row("mgpu", "dx", _time(dxk, dy, w, gs), _err(dxk(dy, w, gs), ref_dx), cfg=tag)
      dwk = jax.jit(functools.partial(grouped_gemm._dw_kernel, cfg=cfg))
      row("mgpu", "dw", _time(dwk, x, dy, gs), _err(dwk(x, dy, gs), ref_dw), cfg=tag)
    except Exception as exc:  # noqa: BLE001  (a setting that does not fit: next one)
      print(f"{name} mgpu {tag}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
  vjp = jax.jit(lambda x, w, dy: jax.vjp(grouped_gemm.ragged_dot, x, w, gs)[1](dy)[:2])
  try:
    dx, dw = vjp(x, w, dy)
    row("mgpu", "vjp", _time(vjp, x, w, dy), max(_err(dx, ref_dx), _err(dw, ref_dw)),
        cfg="grouped_gemm defaults")
  except Exception as exc:  # noqa: BLE001  (no Hopper GPU: the other rows still print)
    print(f"{name} mgpu vjp: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


def main(_):
  import jax
  from jaxtune.models import grouped_gemm
  print(jax.devices(), "available:", grouped_gemm.available(), flush=True)
  gs = group_sizes(jax.random.key(0), FLAGS.tokens, FLAGS.experts, FLAGS.top_k)
  rows: list = []
  d, f = FLAGS.hidden, FLAGS.expert_width
  bench_shape("gate_up", d, 2 * f, gs, rows)
  bench_shape("down", f, d, gs, rows)
  if FLAGS.out:
    with open(FLAGS.out, "w") as fh:
      json.dump({"rows": rows, "group_sizes": [int(g) for g in gs]}, fh, indent=1)


if __name__ == "__main__":
  app.run(main)
