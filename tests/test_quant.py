"""Tests for jaxtune.quant against an independent float64 numpy reference.

The reference (`_ref_*` below) re-derives everything from the documented layout: block
absmax over `group_size` input rows, nearest code-book value by argmin, codes unpacked from
the bytes by hand (row 2i low nibble, 2i+1 high), dequantized value codebook[code] * scale.
"""

import math
import statistics

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxtune import quant

# The 16 NF4 values as printed in the QLoRA paper's appendix / bitsandbytes kernels.cu,
# typed in again here (not imported) so a typo in the library is caught.
NF4_REF = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])
INT4_REF = np.arange(-8, 8) / 7.0
BOOKS = {"nf4": NF4_REF, "int4": INT4_REF}


def _weights(shape, seed=0):
  """Normal weights with a few outliers and one all-zero group (rows 0..63 of column 0)."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal(shape) * 0.02
  w.reshape(-1)[rng.integers(0, w.size, 8)] *= 40.0
  w[..., :64, 0] = 0.0
  return w.astype(np.float32)


def _ref_unpack(packed):
  """uint8 [..., in/2, out] -> int codes [..., in, out], written out with numpy."""
  packed = np.asarray(packed).astype(np.int64)
  out = np.empty(packed.shape[:-2] + (2 * packed.shape[-2], packed.shape[-1]), np.int64)
  out[..., 0::2, :] = packed & 15
  out[..., 1::2, :] = packed >> 4
  return out


def _ref_absmax(w, g):
  """float64 [..., in/g, out] absmax of each group of g input rows."""
  w = np.asarray(w, np.float64)
  return np.abs(w.reshape(*w.shape[:-2], w.shape[-2] // g, g, w.shape[-1])).max(-2)


def _ref_codes(w, scale, g, book):
  """Nearest-code reference in float64: returns (codes, ambiguous mask)."""
  w = np.asarray(w, np.float64)
  s = np.repeat(np.asarray(scale, np.float64), g, axis=-2)  # [..., in, out]
  x = w / np.where(s > 0, s, 1.0)
  d = np.abs(x[..., None] - book)  # [..., in, out, 16]
  order = np.argsort(d, axis=-1, kind="stable")
  codes, second = order[..., 0], order[..., 1]
  gap = np.take_along_axis(d, order[..., 1:2], -1) - np.take_along_axis(d, order[..., :1], -1)
  ambiguous = gap[..., 0] < 1e-6  # float32 rounding may pick either of the two
  return codes, ambiguous, second


def _check_codes(codes, ref_codes, ambiguous, second):
  """Codes equal the reference; at float32 near-ties, one of the two nearest."""
  assert ambiguous.mean() < 1e-3
  np.testing.assert_array_equal(codes[~ambiguous], ref_codes[~ambiguous])
  tie = codes[ambiguous]
  assert ((tie == ref_codes[ambiguous]) | (tie == second[ambiguous])).all()


def test_nf4_codebook_is_the_normal_quantile_map():
  # bitsandbytes create_normal_map(offset=0.9677083): 8 positive and 7 negative N(0,1)
  # quantiles plus 0, divided by the largest; the literals are these rounded to float32.
  n, off = statistics.NormalDist(), 0.9677083
  pos = [n.inv_cdf(p) for p in np.linspace(off, 0.5, 9)[:-1]]
  neg = [-n.inv_cdf(p) for p in np.linspace(off, 0.5, 8)[:-1]]
  v = np.sort(np.array(pos + [0.0] + neg))
  np.testing.assert_allclose(quant.NF4_CODEBOOK, v / np.abs(v).max(), atol=2e-7)
  np.testing.assert_array_equal(quant.NF4_CODEBOOK, NF4_REF)
  np.testing.assert_array_equal(quant.INT4_CODEBOOK, INT4_REF)


@pytest.mark.parametrize("method", ["nf4", "int4"])
@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_matches_numpy_reference(method, scale_dtype):
  g, book = 64, BOOKS[method]
  w = _weights((2, 256, 96))
  q = quant.quantize_array(jnp.asarray(w), method, g, scale_dtype=scale_dtype)
  assert q.packed.shape == (2, 128, 96) and q.packed.dtype == jnp.uint8
  assert q.scales.shape == (2, 4, 96) and q.scales.dtype == scale_dtype
  assert q.shape == w.shape and q.dtype == np.float32 and q.scales2 is None

  # Scales: the exact absmax, rounded once to the scale dtype.
  absmax = _ref_absmax(w, g)
  want = absmax.astype(np.float32).astype(np.dtype(scale_dtype))
  np.testing.assert_array_equal(np.asarray(q.scales), want)
  stored = np.asarray(q.scales).astype(np.float64)

  # Codes: nearest code-book value of w / stored scale, decided in float64.
  codes = _ref_unpack(q.packed)
  ref_codes, ambiguous, second = _ref_codes(w, stored, g, book)
  _check_codes(codes, ref_codes, ambiguous, second)
  if method == "int4":
    assert codes.min() >= 1  # -8 is never produced: symmetric -7..7
  assert (codes[:, :64, 0] == np.argmin(np.abs(book))).all()  # zero group -> exact 0

  # Dequantized values: codebook[code] * scale, both float32 (int4's (k-8)/7 rounded), the
  # product exact in float64 and rounded once to float32.
  deq = np.asarray(quant.dequantize(q))
  book32 = book.astype(np.float32).astype(np.float64)
  ref = (book32[ref_codes] * np.repeat(stored, g, axis=-2)).astype(np.float32)
  np.testing.assert_array_equal(deq[~ambiguous], ref[~ambiguous])

  # Error per block <= half the largest code-book gap * absmax (bf16 scales: the stored
  # scale is within 2^-9 of absmax, hence the (1 + 2^-8) slack).
  gaps = np.diff(book[1:] if method == "int4" else book)
  half_gap = gaps.max() / 2
  assert half_gap == pytest.approx(0.15190359950065613 if method == "nf4" else 1 / 14)
  slack = 1 + (2.0 ** -8 if scale_dtype == jnp.bfloat16 else 1e-6)
  err = np.abs(deq.astype(np.float64) - w).reshape(2, 4, g, 96).max(-2)
  assert (err <= half_gap * absmax * slack).all()
  # Not vacuous: typical errors sit well inside the bound but are not zero.
  assert 0.01 < (err / np.where(absmax > 0, absmax, 1)).mean() < half_gap


def test_numpy_host_path_is_bit_identical_to_jax():
  w = _weights((2, 128, 64), seed=1)
  for kw in [dict(method="nf4"), dict(method="int4"), dict(double_quant=True)]:
    qn = quant.quantize_array(w, **kw)
    qj = quant.quantize_array(jnp.asarray(w), **kw)
    assert isinstance(qn.packed, np.ndarray) and isinstance(qn.scales, np.ndarray)
    assert jax.tree.structure(qn) == jax.tree.structure(qj)
    for a, b in zip(jax.tree.leaves(qn), jax.tree.leaves(qj)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, np.asarray(b))


def test_bytes_per_param():
  w = jnp.asarray(_weights((2, 512, 1024)))
  measured = {}
  for name, kw in {"bf16": {}, "f32": dict(scale_dtype=jnp.float32),
                   "bf16_g128": dict(group_size=128), "dq": dict(double_quant=True)}.items():
    q = quant.quantize_array(w, **kw)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(q))
    assert q.nbytes == nbytes and q.size == w.size
    measured[name] = nbytes / w.size
  assert measured == {"bf16": 0.53125, "f32": 0.5625, "bf16_g128": 0.515625,
                      "dq": 0.5 + 1 / 64 + 4 / (64 * 256)}
  assert measured["bf16"] <= 0.55 and measured["dq"] <= 0.55
  # Default quantize() of a tree: the same 0.53125 over its quantized leaves.
  nbytes, n = quant.num_bytes(quant.quantize({"mlp": {"kernel": w}}))
  assert (nbytes, n) == (0.53125 * w.size, w.size)


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_double_quant_error_bound(method):
  g, book = 64, BOOKS[method]
  w = _weights((2, 512, 300), seed=2)  # 300 scales per row: blocks of 256 + 44 (padded)
  q = quant.quantize_array(jnp.asarray(w), method, g, double_quant=True)
  assert q.scales.dtype == jnp.uint8 and q.scales.shape == (2, 8, 300)
  assert q.scales2.dtype == jnp.float32 and q.scales2.shape == (2, 8, 2)

  absmax = _ref_absmax(w, g)  # [2, 8, 300]
  blocks = [absmax[..., :256], absmax[..., 256:]]
  step = np.stack([b.max(-1) / 255 for b in blocks], -1)  # [2, 8, 2]
  np.testing.assert_allclose(np.asarray(q.scales2), step, rtol=1e-6)
  s2 = np.asarray(q.scales2).astype(np.float64)
  s = np.asarray(q.scales).astype(np.float64) * np.repeat(s2, 256, -1)[..., :300]
  # First level: |s - s'| <= step / 2 = max(block) / 510.
  assert (np.abs(s - absmax) <= np.repeat(s2, 256, -1)[..., :300] * (0.5 + 1e-5)).all()

  codes = _ref_unpack(q.packed)
  ref_codes, ambiguous, second = _ref_codes(w, s, g, book)
  _check_codes(codes, ref_codes, ambiguous, second)
  deq = np.asarray(quant.dequantize(q)).astype(np.float64)
  book32 = book.astype(np.float32).astype(np.float64)
  ref = (book32[ref_codes] * np.repeat(s, g, axis=-2).astype(np.float32)).astype(np.float32)
  np.testing.assert_array_equal(deq[~ambiguous], ref[~ambiguous])

  # Weight error <= half_gap * s' + max(0, s - s') <= half_gap * absmax + |s - s'| * 1.2.
  half_gap = np.diff(book[1:] if method == "int4" else book).max() / 2
  err = np.abs(deq - w).reshape(2, 8, g, 300).max(-2)
  assert (err <= half_gap * absmax + np.abs(s - absmax) * 1.2 + 1e-9).all()
  # ... and it costs little next to plain bf16 scales.
  e_bf16 = np.abs(np.asarray(quant.dequantize(quant.quantize_array(w, method, g))) - w)
  assert np.abs(deq - w).mean() < 1.05 * e_bf16.mean()


def test_jit_matmul_equals_dequantized_matmul():
  w = _weights((256, 96), seed=3)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 256)), jnp.float32)
  for kw in [{}, dict(method="int4", double_quant=True)]:
    q = quant.quantize_array(jnp.asarray(w), **kw)
    got = jax.jit(quant.matmul)(x, q)
    assert got.shape == (3, 5, 96)
    np.testing.assert_allclose(got, x @ quant.dequantize(q), rtol=1e-5, atol=1e-6)
  # bf16 dequantized dtype: the kernel comes back in bf16, the product follows promotion.
  q = quant.quantize_array(jnp.asarray(w), dtype=jnp.bfloat16)
  assert quant.dequantize(q).dtype == jnp.bfloat16
  np.testing.assert_array_equal(jax.jit(quant.matmul)(x.astype(jnp.bfloat16), q),
                                x.astype(jnp.bfloat16) @ quant.dequantize(q))
  with pytest.raises(ValueError, match="2D kernel"):
    quant.matmul(x, quant.quantize_array(jnp.asarray(w[None])))


def test_scan_over_stacked_layers():
  layers = [_weights((128, 128), seed=10 + i) for i in range(3)]
  q = quant.quantize_stacked(layers, "nf4", 64, double_quant=True)  # host, per layer
  assert isinstance(q.packed, np.ndarray) and q.shape == (3, 128, 128)
  whole = quant.quantize_array(np.stack(layers), "nf4", 64, double_quant=True)
  for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(whole)):
    np.testing.assert_array_equal(a, b)
  q = jax.device_put(q)
  h0 = jnp.asarray(np.random.default_rng(5).standard_normal((4, 128)), jnp.float32)

  @jax.jit
  def run(h, q):
    def body(h, layer_q):
      assert layer_q.shape == (128, 128) and layer_q.packed.shape == (64, 128)
      return jnp.tanh(quant.matmul(h, layer_q)), None
    return jax.lax.scan(body, h, q)[0]

  want = h0
  for i in range(3):
    want = jnp.tanh(want @ quant.dequantize(q)[i])
  np.testing.assert_allclose(run(h0, q), want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="item 1"):
    quant.stack([quant.quantize_array(layers[0]),
                 quant.quantize_array(layers[1], method="int4")])


def _params():
  rng = np.random.default_rng(6)
  f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.02, jnp.float32)
  return {
      "embed": {"embedding": f(32, 128)},
      "layers": {
          "self_attn": {"q_proj": {"kernel": f(2, 128, 64)},
                        "q_bias": {"bias": f(2, 64)}},
          "mlp": {"down_proj": {"kernel": f(2, 96, 128)}},  # 96 % 64 != 0: stays float
          "input_norm": {"scale": f(2, 128)},
      },
      "lm_head": {"kernel": f(128, 32)},
  }


def test_quantize_tree_selects_kernels_and_round_trips():
  params = _params()
  qp = quant.quantize(params)
  kinds = jax.tree_util.tree_map_with_path(
      lambda p, x: isinstance(x, quant.QArray), qp, is_leaf=quant.is_qarray)
  assert jax.tree.leaves_with_path(kinds) and [
      jax.tree_util.keystr(p) for p, v in jax.tree.leaves_with_path(kinds) if v
  ] == ["['layers']['self_attn']['q_proj']['kernel']"]
  for path in [("embed", "embedding"), ("lm_head", "kernel")]:
    assert qp[path[0]][path[1]] is params[path[0]][path[1]]
  back = quant.dequantize_tree(qp)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  q_w, w = back["layers"]["self_attn"]["q_proj"]["kernel"], params["layers"]["self_attn"][
      "q_proj"]["kernel"]
  assert 0 < np.abs(q_w - w).max() <= 0.152 * np.abs(w).max()
  # quantize is idempotent on QArray leaves; a regex can add lm_head.
  assert quant.quantize(qp)["layers"]["self_attn"]["q_proj"]["kernel"] is (
      qp["layers"]["self_attn"]["q_proj"]["kernel"])
  qh = quant.quantize(params, predicate=r"(q_proj|lm_head)/kernel$", method="int4")
  assert qh["lm_head"]["kernel"].method == "int4"
  # A predicate that picks an unquantizable leaf fails naming it.
  with pytest.raises(ValueError, match="layers/mlp/down_proj/kernel.*96, 128"):
    quant.quantize(params, predicate=r"kernel$")
  with pytest.raises(ValueError, match="input_norm/scale"):
    quant.quantize(params, predicate=lambda path, x: "norm" in path)


def test_tree_axes_shard_quantized_children_like_the_kernel():
  params = {"layers": {"mlp": {"kernel": jnp.asarray(_weights((2, 512, 256), seed=7))}},
            "norm": {"scale": jnp.ones((512,))}}
  axes = {"layers": {"mlp": {"kernel": ("layers", "embed", "mlp")}},
          "norm": {"scale": ("embed",)}}
  rules = {"layers": None, "embed": "fsdp", "mlp": "tensor", None: None}
  auto, explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
  for dq, axis_type in [(False, auto), (True, explicit)]:
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(axis_type,) * 2)
    qp = quant.quantize(params, double_quant=dq)
    qaxes = quant.tree_axes(qp, axes)
    ax = qaxes["layers"]["mlp"]["kernel"]
    assert isinstance(ax, quant.QArray) and ax.packed == ("layers", "embed", "mlp")
    assert ax.scales == ("layers", "embed", "mlp")
    assert ax.scales2 == (("layers", "embed", None) if dq else None)
    is_axes = lambda a: isinstance(a, tuple)
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, P(*[rules[n] for n in a])),
                             qaxes, is_leaf=is_axes)
    assert jax.tree.structure(shardings) == jax.tree.structure(qp)
    sharded = jax.device_put(qp, shardings)
    qk = sharded["layers"]["mlp"]["kernel"]
    assert qk.packed.sharding.spec == P(None, "fsdp", "tensor")
    assert qk.packed.addressable_shards[0].data.shape == (2, 128, 64)
    assert qk.scales.addressable_shards[0].data.shape == (2, 4, 64)
    with jax.set_mesh(mesh):
      out = jax.jit(quant.dequantize_tree)(sharded)
    assert out["layers"]["mlp"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(quant.dequantize_tree(qp))):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="rank 3"):
    quant.axes_for(qp["layers"]["mlp"]["kernel"], ("embed", "mlp"))


def test_orbax_round_trip_is_bit_identical(tmp_path):
  w = _weights((2, 128, 256), seed=8)
  tree = {
      "nf4": {"kernel": quant.quantize_array(jnp.asarray(w))},
      "int4_dq": {"kernel": quant.quantize_array(jnp.asarray(w), "int4", 32,
                                                  double_quant=True)},
      "bf16_out": {"kernel": quant.quantize_array(jnp.asarray(w), dtype=jnp.bfloat16)},
      "norm": jnp.arange(4.0),
  }
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", tree)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  restored = ckpt.restore(tmp_path / "ckpt", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(tree)
  assert restored["int4_dq"]["kernel"].scales2.dtype == jnp.float32
  assert restored["bf16_out"]["kernel"].scales.dtype == jnp.bfloat16
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
  np.testing.assert_array_equal(quant.dequantize(restored["nf4"]["kernel"]),
                                quant.dequantize(tree["nf4"]["kernel"]))


def test_bad_inputs_fail_with_names_and_shapes():
  with pytest.raises(ValueError, match=r"input dim 100 .* group_size 64"):
    quant.quantize_array(np.zeros((100, 8), np.float32))
  with pytest.raises(ValueError, match="unknown quantization method 'fp4'"):
    quant.quantize_array(np.zeros((64, 8), np.float32), method="fp4")
  with pytest.raises(ValueError, match="float array"):
    quant.quantize_array(np.zeros((64, 8), np.int32))
  with pytest.raises(TypeError, match="expects a QArray"):
    quant.dequantize(jnp.zeros((64, 8)))
  assert repr(quant.quantize_array(np.zeros((64, 8), np.float32))) == (
      "QArray(nf4, shape=(64, 8), group_size=64, dtype=float32, double_quant=False)")
  assert math.isclose(quant.quantize_array(np.zeros((64, 8), ml_dtypes.bfloat16)).nbytes
                      / 512, 0.53125)
