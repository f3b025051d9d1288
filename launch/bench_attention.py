"""Attention kernel candidates for packed rows, timed forward + backward on one device.

Why: the data pipeline always attaches segment ids, and packed rows need them; which kernel
serves them decides launch/train.py's speed (issue 18). Every candidate is checked against
the XLA reference on the same rows before it is timed, and the table says so.

  python launch/bench_attention.py --out=DIR            # GPU: Llama-3.2-1B attention shape
  python launch/bench_attention.py --smoke --out=DIR    # CPU: tiny, interpreted kernels

Candidates (each a row): 'xla' (materialised mask), 'cudnn_nosegments' (cuDNN causal with no
segment ids: the speed to match), 'auto_unpacked' (attention='auto' given segment ids of
unpacked rows: the run-time check then cuDNN), 'pallas_packed' (Triton flash kernel with
segment ids), 'auto_packed' (attention='auto' on packed rows), 'cudnn_packed_M' (cuDNN's
packed layout via jax._src, M runs per row at most); '*_short': chat-like rows of many short
examples (about 20 runs a row). Writes DIR/attention.json.
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_integer("batch", 8, "Rows.")
  flags.DEFINE_integer("seq", 2048, "Tokens per row.")
  flags.DEFINE_integer("heads", 32, "Query heads.")
  flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
  flags.DEFINE_integer("head_dim", 64, "Head dim.")
  flags.DEFINE_integer("iters", 20, "Timed calls (median of 3 rounds).")
  flags.DEFINE_bool("smoke", False, "Tiny shapes, 1 iteration (CPU, interpreted kernels).")
  flags.DEFINE_string("out", "", "Folder for attention.json.")


def packed_segments(batch: int, seq: int, seed: int = 0, lo: int = 64, hi: int = 1024):
  """Rows filled with examples of uniform random length in [lo, hi), ids 1, 2, ..., the
  tail that no whole example fits into left as padding (id 0), as data/packing.py does."""
  import numpy as np
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, seq), np.int32)
  for r in range(batch):
    o, i = 0, 1
    while True:
      n = int(rng.integers(lo, hi))
      if o + n > seq:
        break
      seg[r, o:o + n], o, i = i, o + n, i + 1
  return seg


def _timed(fn, args, iters: int) -> float:
  import jax
  out = fn(*args)
  jax.block_until_ready(out)
  rounds = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    rounds.append((time.perf_counter() - t0) / iters)
  return sorted(rounds)[1]


def candidates(scale: float):
  """name -> (fn(q, k, v, seg) -> o, which segment ids it gets)."""
  import functools
  from jaxtune.models import attention as A

  def att(impl, seg_kind):
    return (lambda q, k, v, s: A.attention(q, k, v, segment_ids=s, impl=impl)), seg_kind

  out = {
      "xla_packed": att("xla", "packed"),
      "cudnn_nosegments": ((lambda q, k, v, s: A.attention(q, k, v, segment_ids=None,
                                                           impl="cudnn")), "none"),
      "auto_unpacked": att("auto", "unpacked"),
      "pallas_packed": att("pallas", "packed"),
      "auto_packed": att("auto", "packed"),
  }
  for m in (16, 32):
    out[f"cudnn_packed_{m}"] = (functools.partial(_cudnn_packed, scale=scale, m=m), "packed")
  # Chat-like rows: many short examples (about 20 runs a row).
  out["pallas_short"] = att("pallas", "short")
  out["auto_short"] = att("auto", "short")
  for m in (32, 64, 128):
    out[f"cudnn_packed_{m}_short"] = (functools.partial(_cudnn_packed, scale=scale, m=m),
                                      "short")
  return out


def _cudnn_packed(q, k, v, s, *, scale, m):
  from jaxtune.models import attention as A
  return A.cudnn_packed_attention(q, k, v, s, scale=scale, max_runs=m)


def _grad_err(fn, qkv, f32, seg, ref_seg, w, keep) -> float:
  """max over dq, dk, dv of max |g - g_ref| / max |g_ref|, for the loss sum(o * w) over real
  tokens (padding outputs may differ by design); the reference is XLA in float32."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxtune.models import attention as A
  wk = w * jnp.asarray(keep, w.dtype)[:, :, None, None]

  def grads(f, args, s):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum((f(q, k, v, s) * wk.astype(q.dtype))
                                                    .astype(jnp.float32)),
                            argnums=(0, 1, 2)))(*args)

  ref = grads(lambda q, k, v, s: A.attention(q, k, v, segment_ids=s, impl="xla"), f32, ref_seg)
  got = grads(fn, qkv, seg)
  return max(float(np.max(np.abs(np.asarray(g, np.float32) - np.asarray(r)))
                   / np.max(np.abs(np.asarray(r)))) for g, r in zip(got, ref))


def run(batch, seq, heads, kv_heads, head_dim, iters, smoke) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxtune.models import attention as A
  dt = jnp.float32 if smoke else jnp.bfloat16
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (batch, seq, heads, head_dim), dt)
  k = jax.random.normal(ks[1], (batch, seq, kv_heads, head_dim), dt)
  v = jax.random.normal(ks[2], (batch, seq, kv_heads, head_dim), dt)
  w = jax.random.normal(ks[3], q.shape, dt)
  lo, hi = (8, 64) if smoke else (64, 1024)
  segs = {"packed": jnp.asarray(packed_segments(batch, seq, lo=lo, hi=hi)),
          "short": jnp.asarray(packed_segments(batch, seq, lo=lo // 4, hi=hi // 5)),
          "unpacked": jnp.ones((batch, seq), jnp.int32), "none": None}
  runs = {k: int(np.max(A.run_count(v))) for k, v in segs.items() if v is not None}
  scale = head_dim ** -0.5
  rows = []
  for name, (fn, kind) in candidates(scale).items():
    seg = segs[kind]
    ref_seg = segs["unpacked"] if kind == "none" else seg
    row = {"name": name, "segments": kind, "max_runs_per_row": runs.get(kind, 1)}
    try:
      loss = jax.jit(jax.value_and_grad(
          lambda q, k, v, s, fn=fn: jnp.sum((fn(q, k, v, s) * w).astype(jnp.float32)),
          argnums=(0, 1, 2)))
      got = jax.jit(fn)(q, k, v, seg)
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      ref = A.attention(*f32, segment_ids=ref_seg, impl="xla")
      keep = np.asarray(seg) != 0 if kind in ("packed", "short") else np.ones(q.shape[:2], bool)
      row["max_abs_err_vs_xla"] = float(np.max(np.abs(
          np.asarray(got, np.float32) - np.asarray(ref, np.float32))[keep]))
      row["max_rel_grad_err_vs_xla"] = _grad_err(fn, (q, k, v), f32, seg, ref_seg, w, keep)
      row["fwd_bwd_ms"] = 1e3 * _timed(loss, (q, k, v, seg), iters)
      row["fwd_ms"] = 1e3 * _timed(jax.jit(fn), (q, k, v, seg), iters)
      row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 (a candidate that fails says why in its row)
      row.update(status="error", error=f"{type(e).__name__}: {e}"[:400])
    rows.append(row)
    print(json.dumps(row), flush=True)
  return {"shape": dict(batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, dtype=str(jnp.dtype(dt))),
          "device": jax.devices()[0].device_kind,
          "jax": jax.__version__, "rows": rows}


def main(argv):
  del argv
  if FLAGS.smoke:
    res = run(2, 128, 4, 2, 16, 1, True)
  else:
    res = run(FLAGS.batch, FLAGS.seq, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim,
              FLAGS.iters, False)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "attention.json"), "w") as f:
      json.dump(res, f, indent=1)
  for r in res["rows"]:
    print(f"{r['name']:>20} {r.get('fwd_bwd_ms', float('nan')):8.3f} ms fwd+bwd  "
          f"{r.get('fwd_ms', float('nan')):8.3f} ms fwd  err {r.get('max_abs_err_vs_xla')}"
          f"  grad rel err {r.get('max_rel_grad_err_vs_xla')}"
          f"  {r.get('error', '')[:120]}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
