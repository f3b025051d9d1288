"""losses.chunked: the chunked log-probs against plain log-softmax on full logits, and both
chunked losses per device on a mesh against one device, with the compiled program checked
for the gather of every row onto every device that the per-device form removes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune import config as config_lib
from jaxtune import losses
from jaxtune import sharding
from jaxtune.models import head
from tests import numerics

B, T, D, V = 8, 12, 24, 40  # distinct sizes: a gathered [.., 12, 24] is an activation


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D), jnp.float32)
  y = rng.integers(0, V, size=(B, T))
  y[1, -2:] = -100  # padding ids: clipped, finite
  mask = (rng.random((B, T)) > 0.2).astype(np.float32)
  g = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)  # cotangent weights
  return h, w, jnp.asarray(y), jnp.asarray(mask), g


def _plain_lp(h, w, y, transpose, cap):
  z = jnp.einsum("btd,vd->btv" if transpose else "btd,dv->btv", h, w)
  return losses.token_logprobs(cap * jnp.tanh(z / cap) if cap else z, y)


@pytest.mark.parametrize("transpose,chunk,cap", [(False, 5, 0.0), (True, 16, 0.0),
                                                 (False, 7, 3.0)])
def test_chunked_token_logprobs_equal_plain_values_and_grads(transpose, chunk, cap):
  """Values and the gradients of sum(g * lp) w.r.t. hidden and weight equal autodiff of
  log-softmax on the full logits (chunks that do not divide B*T, tied layout, soft-cap);
  with the weight frozen, the gradient w.r.t. hidden alone is the same."""
  h, w, y, _, g = _inputs(1)
  h = h * (3.0 if cap else 1.0)  # logits big enough for the cap to bend them
  w = w.T if transpose else w

  def chunked(h, w):
    return losses.chunked_token_logprobs(h, w, y, chunk_size=chunk, transpose=transpose,
                                         softcap=cap)

  lp = jax.jit(chunked)(h, w)
  np.testing.assert_allclose(lp, _plain_lp(h, w, y, transpose, cap), rtol=1e-5, atol=1e-5)
  z = np.asarray(h, np.float64) @ np.asarray(w.T if transpose else w, np.float64)
  z = cap * np.tanh(z / cap) if cap else z
  zy = np.take_along_axis(z, np.clip(np.asarray(y), 0, None)[..., None], -1)[..., 0]
  want = zy - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) - z.max(-1)
  np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)
  loss = lambda f: (lambda h, w: jnp.sum(f(h, w) * g))
  got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(h, w)
  ref = jax.jit(jax.grad(loss(lambda h, w: _plain_lp(h, w, y, transpose, cap)),
                         argnums=(0, 1)))(h, w)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  only_h = jax.jit(jax.grad(loss(chunked)))(h, w)
  np.testing.assert_allclose(only_h, ref[0], rtol=1e-5, atol=1e-6)


def _mesh():
  return sharding.make_mesh(config_lib.MeshConfig(data=2, fsdp=4, tensor=1))


def _gathered_shapes(hlo: str) -> set[tuple[int, ...]]:
  dims = re.findall(r"= \w+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)
  return {tuple(int(d) for d in s.split(",") if d) for s in dims}


@pytest.mark.parametrize("kind", ["cross_entropy", "token_logprobs"])
def test_per_device_rows_equal_one_device_without_gathering_rows(kind):
  """On 8 simulated devices (rows over data x fsdp, the weight split over fsdp as FSDP
  places it): value and gradients w.r.t. hidden and weight equal the one-device ones;
  the only all-gather in the program is the weight's, where the same loss left to the
  compiler gathers the hidden states."""
  h, w, y, mask, g = _inputs(2)
  mesh = _mesh()
  rows = head.row_axes(mesh, h)
  assert rows == ("data", "fsdp")

  def fn(mesh_arg, rows_arg):
    if kind == "cross_entropy":
      return lambda h, w: losses.chunked_cross_entropy(
          h, w, y, mask, chunk_size=5, mesh=mesh_arg, row_axes=rows_arg)[0]
    return lambda h, w: jnp.sum(g * losses.chunked_token_logprobs(
        h, w, y, chunk_size=5, mesh=mesh_arg, row_axes=rows_arg))

  want = jax.jit(jax.value_and_grad(fn(None, None), argnums=(0, 1)))(h, w)
  hs = jax.device_put(h, jax.sharding.NamedSharding(mesh, sharding.spec(
      ("batch", "seq", "act_embed"), h.shape, mesh)))
  ws = jax.device_put(w, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
  per_device = jax.jit(jax.value_and_grad(fn(mesh, rows), argnums=(0, 1)))
  got = per_device(hs, ws)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert _gathered_shapes(per_device.lower(hs, ws).compile().as_text()) <= {(D, V)}
  left = jax.jit(jax.value_and_grad(fn(None, None), argnums=(0, 1))).lower(hs, ws)
  assert _gathered_shapes(left.compile().as_text()) - {(D, V)}  # the probe sees row gathers


def test_chunk_counts_tokens_of_the_whole_mesh():
  """chunk_size is one chunk of the whole mesh: over 8 row shards, chunk 16 gives each
  device [2, V] logits at a time (one device: [16, V]), with the same loss; so the head's
  temporaries per device shrink with the devices like the other activations."""
  h, w, y, mask, _ = _inputs(3)
  mesh = _mesh()
  rows = head.row_axes(mesh, h)

  def run(mesh_arg, rows_arg, *args):
    fn = jax.jit(lambda h, w: losses.chunked_cross_entropy(
        h, w, y, mask, chunk_size=16, mesh=mesh_arg, row_axes=rows_arg)[0])
    hlo = fn.lower(*args).compile().as_text()
    return fn(*args), set(re.findall(rf"f32\[(\d+),{V}\]", hlo))

  want, one_shapes = run(None, None, h, w)
  hs = jax.device_put(h, jax.sharding.NamedSharding(mesh, sharding.spec(
      ("batch", "seq", "act_embed"), h.shape, mesh)))
  got, mesh_shapes = run(mesh, rows, hs, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert "16" in one_shapes and "16" not in mesh_shapes and "2" in mesh_shapes, (
      one_shapes, mesh_shapes)


def test_row_axes_leaves_a_tensor_split_vocabulary_to_the_compiler():
  h = jnp.zeros((B, T, D))
  assert head.row_axes(None, h) is None
  tensor = sharding.make_mesh(config_lib.MeshConfig(data=4, fsdp=1, tensor=2))
  assert head.row_axes(tensor, h) is None
  data = sharding.make_mesh(config_lib.MeshConfig(data=8, fsdp=1, tensor=1))
  assert head.row_axes(data, h) in ("data", ("data",))
  assert head.row_axes(data, jnp.zeros((3, T, D))) is None  # 3 rows do not split over 8


@pytest.mark.parametrize("kind", ["cross_entropy", "token_logprobs"])
def test_per_device_rows_without_grad_under_remat_and_accumulation(kind):
  """The paths that do not take the custom VJP's forward rule at the top level: the value
  alone (the eval step), the gradient through jax.checkpoint (remat), and a gradient summed
  over micro-batches in lax.scan (gradient accumulation, as train/step.py runs it), each on
  the mesh against one device."""
  h, w, y, mask, g = _inputs(3)
  mesh = _mesh()

  def loss(h, w, y, mask, g, mesh_arg):
    rows = head.row_axes(mesh_arg, h)
    if kind == "cross_entropy":
      return losses.chunked_cross_entropy(h, w, y, mask, chunk_size=5, mesh=mesh_arg,
                                          row_axes=rows)[0]
    return jnp.sum(g * losses.chunked_token_logprobs(h, w, y, chunk_size=5, mesh=mesh_arg,
                                                      row_axes=rows))

  big_h = jnp.concatenate([h, h * 0.5])  # 16 rows: 8 per micro-batch, 1 per device
  big = [jnp.concatenate([x, x]) for x in (y, mask, g)]
  hs = jax.device_put(h, jax.sharding.NamedSharding(mesh, sharding.spec(
      ("batch", "seq", "act_embed"), h.shape, mesh)))
  checks = {
      "value": (lambda m: jax.jit(lambda h: loss(h, w, y, mask, g, m))(hs)),
      "remat": (lambda m: jax.jit(jax.grad(jax.checkpoint(
          lambda h, w: loss(h, w, y, mask, g, m)), argnums=(0, 1)))(hs, w)),
      "accumulation": (lambda m: jax.jit(lambda h, w: _accum(h, w, m, big, loss))(big_h, w)),
  }
  for name, run in checks.items():
    for a, b in zip(jax.tree.leaves(run(mesh)), jax.tree.leaves(run(None))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def _accum(h, w, mesh_arg, rest, loss):
  """grad w.r.t. w summed over 2 micro-batches in lax.scan, each a row-split batch."""
  mesh = mesh_arg or _mesh()
  split = lambda x: x.reshape(2, x.shape[0] // 2, *x.shape[1:])
  parts = tuple(split(x) for x in (h, *rest))

  def body(acc, xs):
    hh, yy, mm, gg = xs
    if mesh_arg is not None:
      hh = jax.lax.with_sharding_constraint(hh, jax.sharding.NamedSharding(
          mesh, sharding.spec(("batch", "seq", "act_embed"), hh.shape, mesh)))
    return acc + jax.grad(loss, argnums=1)(hh, w, yy, mm, gg, mesh_arg), None

  return jax.lax.scan(body, jnp.zeros_like(w), parts)[0]


def _dot_out_dtypes(fn, *args, width):
  """Output dtypes of the dot_generals in fn's jaxpr (nested ones included) whose last
  dimension is `width` (the vocabulary), a [D, V] weight gradient excepted: the dtype the
  head's projection writes."""
  return [e.outvars[0].aval.dtype for e in numerics.jaxpr_eqns(jax.make_jaxpr(fn)(*args))
          if e.primitive.name == "dot_general" and e.outvars[0].aval.shape[-1] == width
          and e.outvars[0].aval.shape != (D, width)]


@pytest.mark.parametrize("chunk,tied", [(0, True), (16, True), (0, False), (16, False)])
def test_logits_dtype_compute_writes_the_activation_dtype(chunk, tied):
  """model.logits_dtype=compute: every logits product of a bf16 model (chunked or not, loss
  and log-probs, forward and the chunked backward's recompute) is written in bf16, and the
  loss and gradients stay within bf16 rounding of the float32 default; float32 (default)
  writes float32. (XLA on CPU is free to keep the product in float32, so the values are
  compared with bf16 tolerance; on a GPU the cuBLAS call writes bf16, docs/BENCHMARKS.md.)"""
  h, w, y, mask, g = _inputs()
  h = h.astype(jnp.bfloat16)
  wb = (w.T if tied else w).astype(jnp.bfloat16)  # [V, D] tied, [D, V] lm_head
  as_params = lambda wb: ({"embed_tokens": {"embedding": wb}} if tied
                          else {"lm_head": {"kernel": wb}})
  results = {}
  for dtype in ("float32", "compute"):
    cfg = config_lib.ModelConfig(vocab_size=V, hidden_size=D, tie_word_embeddings=tied,
                                 dtype="bfloat16", logits_chunk=chunk, logits_dtype=dtype)
    params = as_params(wb)

    def loss(h, wb):
      p = as_params(wb)
      total, _ = head.nll_sum(cfg, p, h, y, mask)
      return total + jnp.sum(g * head.token_logprobs(cfg, p, h, y))

    want = jnp.bfloat16 if dtype == "compute" else jnp.float32
    dts = _dot_out_dtypes(jax.grad(loss, argnums=(0, 1)), h, wb, width=V)
    assert dts and all(d == want for d in dts), (dtype, dts)
    fwd = _dot_out_dtypes(lambda h: head.nll_sum(cfg, params, h, y, mask)[0], h, width=V)
    assert fwd and all(d == want for d in fwd), (dtype, fwd)
    results[dtype] = (loss(h, wb), jax.grad(loss, argnums=(0, 1))(h, wb))
  (l32, g32), (lc, gc) = results["float32"], results["compute"]
  np.testing.assert_allclose(float(lc), float(l32), rtol=2e-2)
  for a, b in zip(gc, g32):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


def test_logits_dtype_is_checked():
  cfg = config_lib.TrainConfig()
  with pytest.raises(config_lib.ConfigError, match="model.logits_dtype.*compute"):
    config_lib.validate(config_lib.override(cfg, ["model.logits_dtype=bfloat16"]))
