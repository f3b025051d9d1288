"""The MoE layer's row permutations and the choice of grouped-matmul kernel.

The Mosaic GPU kernels themselves (`models/grouped_gemm.py`) run only on a Hopper GPU: their
numbers are checked there against float32 `jax.lax.ragged_dot` by launch/bench_moe_gemm.py
(docs/BENCHMARKS.md), and the test at the end runs where such a GPU is present.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune.models import grouped_gemm
from jaxtune.models import moe


def _perm(n, seed):
  order = np.random.default_rng(seed).permutation(n)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(n)
  return jnp.asarray(order), jnp.asarray(inverse)


def test_permute_rows_values_and_gradient_equal_take():
  """A permutation, and a padding map (rows read once, some output rows empty): values and
  the gradient (gathered back, not scatter-added) equal jnp.take's autodiff."""
  x = jax.random.normal(jax.random.key(0), (6, 3))
  order, inverse = _perm(6, 1)
  dy = jax.random.normal(jax.random.key(1), (6, 3))
  np.testing.assert_array_equal(moe.permute_rows(x, order, inverse), x[np.asarray(order)])
  got = jax.vjp(lambda x: moe.permute_rows(x, order, inverse), x)[1](dy)[0]
  want = jax.vjp(lambda x: jnp.take(x, order, axis=0), x)[1](dy)[0]
  np.testing.assert_allclose(got, want, rtol=0, atol=0)
  # padding: 6 rows into 9 slots (slots 2, 5, 8 empty)
  dest = jnp.asarray([0, 1, 3, 4, 6, 7])
  src = jnp.asarray([0, 1, -1, 2, 3, -1, 4, 5, -1])
  xp = moe.permute_rows(x, src, dest)
  np.testing.assert_array_equal(np.asarray(xp)[[2, 5, 8]], 0)
  np.testing.assert_array_equal(np.asarray(xp)[np.asarray(dest)], x)
  dyp = jax.random.normal(jax.random.key(2), (9, 3))
  got = jax.vjp(lambda x: moe.permute_rows(x, src, dest), x)[1](dyp)[0]
  np.testing.assert_array_equal(got, np.asarray(dyp)[np.asarray(dest)])
  back = jax.vjp(lambda p: moe.permute_rows(p, dest, src), xp)[1](dy)[0]  # unpad's transpose
  want = jnp.zeros((9, 3)).at[dest].add(dy)
  np.testing.assert_array_equal(back, want)


def test_blocked_matmul_with_gathers_equals_ragged_dot_and_its_gradients():
  """grouped_blocks (pad by gather, unpad by gather, both transposed as gathers) against
  jax.lax.ragged_dot, with an expert that gets no rows, float32."""
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  sizes = jnp.asarray([5, 0, 9, 2], jnp.int32)
  x = jax.random.normal(k1, (16, 8))
  w = jax.random.normal(k2, (4, 8, 6))
  dy = jax.random.normal(k3, (16, 6))
  f = lambda x, w: moe.grouped_blocks(x, w, sizes, block=4)  # noqa: E731
  g = lambda x, w: jax.lax.ragged_dot(x, w, sizes)  # noqa: E731
  np.testing.assert_allclose(f(x, w), g(x, w), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.vjp(f, x, w)[1](dy), jax.vjp(g, x, w)[1](dy)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_kernel_choice_off_hopper():
  """Off a Hopper GPU: 'auto' keeps the portable kernels, a forced 'mgpu' (a config saved on
  a Hopper GPU) runs what 'auto' picks there, and the tile check refuses a LoRA factor's
  rank."""
  if grouped_gemm.available():
    pytest.skip("a Hopper GPU is present")
  assert moe.resolve_impl("auto") == ("blocked" if jax.default_backend() == "gpu" else "ragged")
  assert moe.resolve_impl("mgpu") == moe.resolve_impl("auto")  # with a warning
  x = jnp.zeros((32, 2048), jnp.bfloat16)
  assert grouped_gemm.fits(x, jnp.zeros((8, 2048, 1536), jnp.bfloat16))  # Qwen3 gate|up
  assert grouped_gemm.fits(jnp.zeros((32, 768), jnp.bfloat16),
                           jnp.zeros((8, 768, 2048), jnp.bfloat16))  # Qwen3 down
  assert not grouped_gemm.fits(x, jnp.zeros((8, 2048, 16), jnp.bfloat16))  # LoRA A (rank 16)
  assert not grouped_gemm.fits(x.astype(jnp.float32), jnp.zeros((8, 2048, 1536)))  # fp32


def test_mgpu_routing_and_vjp_with_stand_in_kernels(monkeypatch):
  """moe.mlp with moe_impl='mgpu', the Mosaic kernels replaced by lax.ragged_dot stand-ins
  (the custom VJP, `fits` and the routing are this code's): values and gradients equal the
  blocked matmul's; the weight-gradient kernel runs for trained experts only (frozen under
  LoRA). (That a LoRA factor's rank does not fit a tile is `fits`' check, tested above.)"""
  calls = {"fwd": 0, "dx": 0, "dw": 0}

  def fwd(x, w, gs, transpose_rhs=False, cfg=None):
    calls["dx" if transpose_rhs else "fwd"] += 1
    return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose_rhs else w, gs)

  def dw(x, dy, gs, cfg=None):
    calls["dw"] += 1
    return jax.grad(lambda w: jnp.sum(jax.lax.ragged_dot(x, w, gs).astype(jnp.float32) *
                                      dy.astype(jnp.float32)))(
        jnp.zeros((gs.shape[0], x.shape[1], dy.shape[1]), x.dtype))

  monkeypatch.setattr(grouped_gemm, "_fwd_kernel", fwd)
  monkeypatch.setattr(grouped_gemm, "_dw_kernel", dw)
  monkeypatch.setattr(grouped_gemm, "available", lambda: True)
  cfg = config_lib.ModelConfig(hidden_size=256, num_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=256, norm_topk_prob=True)
  ks = jax.random.split(jax.random.key(6), 4)
  bf = lambda k, s: (jax.random.normal(k, s) / 16).astype(jnp.bfloat16)  # noqa: E731
  p = {"gate": {"kernel": bf(ks[0], (256, 4))},
       "experts": {"gate_up_proj": {"kernel": bf(ks[1], (4, 256, 512))},
                   "down_proj": {"kernel": bf(ks[2], (4, 256, 256))}}}
  h = bf(ks[3], (2, 8, 256))

  def loss(impl):
    c = dataclasses.replace(cfg, moe_impl=impl)
    return lambda h, p: jnp.sum(moe.mlp(c, h, p)[0].astype(jnp.float32) ** 2)

  (lm, gm), (lb, gb) = [jax.value_and_grad(loss(i), argnums=(0, 1))(h, p)
                        for i in ("mgpu", "blocked")]
  assert calls == {"fwd": 2, "dx": 2, "dw": 2}
  np.testing.assert_allclose(lm, lb, rtol=2e-2)
  for a, b in zip(jax.tree.leaves(gm), jax.tree.leaves(gb)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(b)) + 1e-6
  calls.update(fwd=0, dx=0, dw=0)  # frozen experts: no weight gradient
  jax.grad(loss("mgpu"))(h, p)
  assert calls == {"fwd": 2, "dx": 2, "dw": 0}


@pytest.mark.skipif(not grouped_gemm.available(), reason="needs one Hopper GPU "
                    "(run with JAX_PLATFORMS=cuda: conftest.py defaults to the CPU)")
@pytest.mark.parametrize("sizes", [[300, 0, 212, 512], [5, 0, 11, 8]])  # training; decode
def test_mgpu_ragged_dot_and_gradients_match_float32(sizes):
  sizes = jnp.asarray(sizes, jnp.int32)
  m = int(sizes.sum())
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(k1, (m, 256), jnp.bfloat16)
  w = (jax.random.normal(k2, (4, 256, 512)) / 16).astype(jnp.bfloat16)
  dy = jax.random.normal(k3, (m, 512), jnp.bfloat16)
  f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
  got = jax.vjp(grouped_gemm.ragged_dot, x, w, sizes)
  want = jax.vjp(lambda x, w: jax.lax.ragged_dot(x, w, sizes), f32(x), f32(w))
  for a, b in [(got[0], want[0]), *zip(got[1](dy)[:2], want[1](f32(dy)))]:
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(f32(a) - b))) < 2e-2 * scale


@pytest.mark.skipif(not grouped_gemm.available(), reason="needs one Hopper GPU")
@pytest.mark.parametrize("rows", [1, 64])  # a decode step of 2 sequences; a prefill
def test_mgpu_moe_layer_equals_blocked(rows):
  """The whole MoE MLP (routing, permutations, both products) with the Mosaic kernels equals
  the blocked matmul's, at decode and training row counts, bf16."""
  cfg = config_lib.ModelConfig(hidden_size=256, num_experts=8, num_experts_per_tok=2,
                               moe_intermediate_size=256, norm_topk_prob=True,
                               dtype="bfloat16", param_dtype="bfloat16")
  ks = jax.random.split(jax.random.key(5), 4)
  p = {"gate": {"kernel": jax.random.normal(ks[0], (256, 8), jnp.bfloat16) / 16},
       "experts": {"gate_up_proj": {"kernel": jax.random.normal(
           ks[1], (8, 256, 512), jnp.bfloat16) / 16},
                   "down_proj": {"kernel": jax.random.normal(
                       ks[2], (8, 256, 256), jnp.bfloat16) / 16}}}
  h = jax.random.normal(ks[3], (2, rows, 256), jnp.bfloat16)
  outs = [jax.jit(lambda h, c=c: moe.mlp(c, h, p)[0])(h).astype(jnp.float32)
          for c in (dataclasses.replace(cfg, moe_impl=i) for i in ("mgpu", "blocked"))]
  scale = float(jnp.max(jnp.abs(outs[1])))
  assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) < 2e-2 * scale
