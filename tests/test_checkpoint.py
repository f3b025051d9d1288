"""Orbax checkpoints: exact round trip of a sharded state tree, keep-N, torn saves ignored."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.models import decoder

MODEL = config_lib.ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8)


def _state(seed, mesh):
  params = decoder.init(MODEL, jax.random.PRNGKey(seed))
  params = jax.device_put(params, sharding.tree_shardings(mesh, decoder.axes(MODEL), params))
  opt = {"mu": jax.tree_util.tree_map(lambda x: x * 0.5, params), "count": jnp.array(seed)}
  return {"step": jnp.array(seed, jnp.int32), "trainable": params, "opt_state": opt,
          "rng": jax.random.PRNGKey(seed + 100)}


def test_round_trip_keep_n_and_torn_saves(tmp_path):
  mesh = sharding.make_mesh(config_lib.MeshConfig(fsdp=4, tensor=2))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step, mesh), {"epoch": 0, "index": step}, {"note": f"s{step}"})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  # A save that died mid-way leaves only a temporary directory: never a resume point.
  torn = os.path.join(ckpt.directory, "4.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(torn, "state"))
  with open(os.path.join(torn, "state", "partial"), "w") as f:
    f.write("x")
  ckpt.close()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), keep=2)
  assert ckpt.latest_step() == 3
  want = _state(3, mesh)
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), want)
  got, data_state, meta = ckpt.restore(3, target)
  assert data_state == {"epoch": 0, "index": 3} and meta == {"note": "s3"}
  for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == b.sharding
  ckpt.close()
