"""The attention kernels on a mesh and against the portable reference.

tests/conftest.py simulates 8 CPU devices. The Pallas kernels (GPU Triton flash and decode,
TPU splash) run in Pallas interpret mode here, which executes the kernel's own program
(its blocking, online softmax and segment masking), so a wrong index or mask shows up as
wrong numbers. The reference is the XLA path, whose mask is written out in full
(`attention.attention_mask`), and an independent numpy softmax attention.

On a mesh the kernels must run per device (`shard_map`): the compiled program then holds no
all-gather at all around attention, while the same kernel without the mesh makes XLA
gather q, k, v and the segment ids onto every device (what issue 15 measured on 2 GPUs).
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.models import attention
from jaxtune.models import decoder

B, T, H, K, DH = 4, 128, 4, 2, 16


def _qkv(kv_heads=K, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, H, DH), jnp.float32),
          jax.random.normal(ks[1], (B, T, kv_heads, DH), jnp.float32),
          jax.random.normal(ks[2], (B, T, kv_heads, DH), jnp.float32))


def _segments():
  """Row 0 packed (3 examples + padding), row 1 one example + padding, row 2 full, row 3
  packed with no padding."""
  seg = np.zeros((B, T), np.int32)
  seg[0, :40], seg[0, 40:90], seg[0, 90:120] = 1, 2, 3
  seg[1, :77] = 1
  seg[2, :] = 1
  seg[3, :64], seg[3, 64:] = 1, 2
  return jnp.asarray(seg)


def _numpy_attention(q, k, v, seg, *, scale=None, softcap=0.0, window=0):
  """Independent reference: per row and head, softmax over visible keys in float64."""
  q, k, v, seg = (np.asarray(x, np.float64) for x in (q, k, v, seg))
  b, t, h, dh = q.shape
  groups = h // k.shape[2]
  scale = dh ** -0.5 if scale is None else scale
  out = np.zeros_like(q)
  i = np.arange(t)
  for r in range(b):
    vis = (i[None, :] <= i[:, None]) & (seg[r][:, None] == seg[r][None, :])
    if window:
      vis &= (i[:, None] - i[None, :]) < window
    for hh in range(h):
      s = q[r, :, hh] @ k[r, :, hh // groups].T * scale
      if softcap:
        s = softcap * np.tanh(s / softcap)
      s = np.where(vis, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[r, :, hh] = (p / p.sum(-1, keepdims=True)) @ v[r, :, hh // groups]
  return out


def _mesh(data=2, fsdp=2, tensor=2):
  return sharding.make_mesh(config_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def _collectives(hlo: str) -> set[str]:
  return set(re.findall(r"\b(all-gather|all-to-all|collective-permute|all-reduce)(?:-start)?\(",
                        hlo))


@pytest.mark.parametrize("impl,kw", [("pallas", {}), ("splash", {"softcap": 20.0}),
                                     ("splash", {"sliding_window": 33})])
def test_kernels_match_numpy(impl, kw):
  q, k, v = _qkv()
  seg = _segments()
  got = attention.attention(q, k, v, segment_ids=seg, impl=impl, **kw)
  ref = _numpy_attention(q, k, v, seg, softcap=kw.get("softcap", 0.0),
                         window=kw.get("sliding_window", 0))
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=2e-5)


def test_unpacked_predicate():
  seg = np.asarray(_segments())
  assert not bool(attention.unpacked(jnp.asarray(seg)))  # rows 0 and 3 are packed
  assert bool(attention.unpacked(jnp.asarray(seg[1:3])))  # one example (+ padding) per row
  assert bool(attention.unpacked(jnp.zeros((2, T), jnp.int32)))  # all padding
  left = np.zeros((1, T), np.int32)
  left[0, 10:] = 1  # left padding: a real token would see padding under plain causal
  assert not bool(attention.unpacked(jnp.asarray(left)))
  two = np.ones((1, T), np.int32)
  two[0, 50:] = 2
  assert not bool(attention.unpacked(jnp.asarray(two)))


def test_segment_runs_and_the_gpu_branch():
  """Hand-derived: row [1 1 2 0] has runs [0, 2), [2, 3), [3, 4) (the padding run counts)."""
  offsets, lengths, count = attention.segment_runs(jnp.asarray([[1, 1, 2, 0], [1, 1, 1, 1]]), 3)
  np.testing.assert_array_equal(offsets, [[0, 2, 3, -1], [0, -1, -1, -1]])
  np.testing.assert_array_equal(lengths, [[2, 1, 1], [4, -1, -1]])
  np.testing.assert_array_equal(count, [3, 1])
  np.testing.assert_array_equal(attention.run_count(_segments()), [4, 2, 1, 2])
  assert attention.PACKED_RUNS == (16, 24, 32, 40, 48, 64)

  def rows(examples, width=2):  # one row of examples of `width` tokens, then padding
    seg = np.zeros((1, T), np.int32)
    seg[0, :width * examples] = np.repeat(np.arange(1, examples + 1), width)
    return jnp.asarray(seg)

  assert int(attention.gpu_branch(_segments()[1:3])) == 0  # unpacked: plain causal cuDNN
  # Runs include a trailing padding run: 15 examples + padding = 16 runs -> bound 16 (1);
  # 16 + padding = 17 -> 24 (2); 31 + padding = 32 -> 32 (3); 39 + padding = 40 -> 40 (4);
  # 40 + padding = 41 -> 48 (5); 63 + padding = 64 -> 64 (6); 64 examples fill the 128
  # tokens (no padding) -> 64; 65 + padding = 66 -> Pallas (7).
  got = [int(attention.gpu_branch(rows(n))) for n in (15, 16, 31, 39, 40, 63, 64)]
  assert got + [int(attention.gpu_branch(rows(65, width=1)))] == [1, 2, 3, 4, 5, 6, 6, 7]


def _sharded_step(impl, mesh, kv_heads, use_mesh, **kw):
  """jit of (loss, dq, dk, dv) with inputs laid out as the decoder lays them out."""
  q, k, v = _qkv(kv_heads)
  seg = _segments()
  w = jax.random.normal(jax.random.PRNGKey(9), q.shape, jnp.float32)

  def loss(q, k, v, seg):
    o = attention.attention(q, k, v, segment_ids=seg, impl=impl,
                            mesh=mesh if use_mesh else None, **kw)
    return jnp.sum(o * w)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  act = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  kv_spec = P(("data", "fsdp"), None, "tensor" if kv_heads % 2 == 0 else None, None)
  args = (jax.device_put(q, act), jax.device_put(k, NamedSharding(mesh, kv_spec)),
          jax.device_put(v, NamedSharding(mesh, kv_spec)),
          jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), None))))
  hlo = fn.lower(*args).compile().as_text()
  return fn(*args), hlo, (q, k, v, seg, w)


@pytest.mark.parametrize("impl,kv_heads,kw", [("pallas", K, {}), ("pallas", 1, {}),
                                              ("splash", K, {"softcap": 20.0})])
def test_kernel_runs_per_device_on_a_mesh(impl, kv_heads, kw):
  mesh = _mesh()
  (val, grads), hlo, (q, k, v, seg, w) = _sharded_step(impl, mesh, kv_heads, True, **kw)
  # Only the loss's scalar sum crosses devices: no gather of q, k, v or segment ids.
  assert _collectives(hlo) <= {"all-reduce"}, _collectives(hlo)

  def ref_loss(q, k, v):  # one device, portable path
    return jnp.sum(attention.attention(q, k, v, segment_ids=seg, impl="xla", **kw) * w)

  with jax.default_device(jax.devices()[0]):
    ref_val, ref_grads = jax.value_and_grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5, rtol=1e-4)


def test_kernel_without_mesh_is_gathered():
  """The regression the mesh argument fixes: XLA cannot split an opaque kernel, so without
  shard_map it gathers the activations onto every device."""
  _, hlo, _ = _sharded_step("pallas", _mesh(), K, False)
  assert "all-gather" in _collectives(hlo)


def test_decode_kernel_per_device():
  mesh = _mesh(data=2, fsdp=2, tensor=2)
  b, s, kh, g = 4, 64, 2, 2
  ks = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(ks[0], (b, 1, kh * g, DH), jnp.float32)
  kc = jax.random.normal(ks[1], (b, kh, s, DH), jnp.float32)
  vc = jax.random.normal(ks[2], (b, kh, s, DH), jnp.float32)
  start = jnp.asarray([0, 5, 17, 30], jnp.int32)
  end = jnp.asarray([64, 40, 18, 51], jnp.int32)
  rows = P(("data", "fsdp"))
  args = (jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))),
          jax.device_put(kc, NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))),
          jax.device_put(vc, NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))),
          jax.device_put(start, NamedSharding(mesh, rows)),
          jax.device_put(end, NamedSharding(mesh, rows)))
  fn = jax.jit(lambda *a: attention.pallas_decode_attention(*a, mesh=mesh))
  assert not _collectives(fn.lower(*args).compile().as_text())
  got = np.asarray(fn(*args))
  slot = np.arange(s)
  mask = (slot[None, :] >= np.asarray(start)[:, None]) & (slot[None, :] < np.asarray(end)[:, None])
  ref = np.stack([_decode_ref(q[r], kc[r], vc[r], mask[r]) for r in range(b)])
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


def _decode_ref(q, k, v, mask):
  """q [1, H, Dh], k/v [K, S, Dh], mask [S] -> [1, H, Dh] in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[1] // k.shape[0]
  out = np.zeros_like(q)
  for hh in range(q.shape[1]):
    s = np.where(mask, k[hh // groups] @ q[0, hh] * q.shape[-1] ** -0.5, -np.inf)
    p = np.exp(s - s.max())
    out[0, hh] = (p / p.sum()) @ v[hh // groups]
  return out


def test_decoder_threads_the_mesh_to_the_kernel():
  """A tiny decoder on a data x tensor mesh with attention='pallas': the same hidden states
  as one device on the XLA path, and no all-gather of a [B, T, ...] activation (weight
  dims are chosen to differ from T, so any gathered tensor with a T dim is an activation)."""
  cfg = config_lib.ModelConfig(
      family="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
      attention="pallas", dtype="float32", param_dtype="float32")
  params = decoder.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)
  seg = _segments()
  ref = decoder.hidden_states(dataclasses.replace(cfg, attention="xla"), params, tokens,
                              segment_ids=seg)
  mesh = _mesh(data=4, fsdp=1, tensor=2)
  axes = decoder.axes(cfg)
  placed = jax.device_put(params, sharding.tree_shardings(mesh, axes, params))
  bs = sharding.batch_sharding(mesh)
  fn = jax.jit(lambda p, t, s: decoder.hidden_states(cfg, p, t, segment_ids=s,
                                                      constrain=sharding.constrainer(mesh)))
  args = (placed, jax.device_put(tokens, bs), jax.device_put(seg, bs))
  hlo = fn.lower(*args).compile().as_text()
  gathered = re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)
  assert all(str(T) not in dims.split(",") for dims in gathered), gathered
  np.testing.assert_allclose(np.asarray(fn(*args)), np.asarray(ref), atol=1e-4, rtol=1e-4)
