"""content_keys: a packed segment's key is its example's key alone, and `find` locates keys
in a sorted table (and reports the ones that are not there)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.data import encode
from jaxtune.data import packing
from jaxtune.methods import content_keys


def test_segment_keys_equal_row_keys_and_find_them():
  rng = np.random.RandomState(0)
  seqs = [rng.randint(0, 500, n).astype(np.int32) for n in (5, 9, 3, 7, 12, 4)]
  enc = [encode.Encoded(s, np.ones(len(s), bool)) for s in seqs]
  batch = packing.assemble([[(enc[0], 0), (enc[1], 0)], [(enc[2], 0), (enc[3], 0), (enc[4], 0)],
                            [(enc[5], 0)]], 32)
  keys = np.asarray(content_keys.segment_keys(batch["tokens"], batch["segment_ids"],
                                              batch["positions"]))  # [3, 33, 2]
  alone = [np.asarray(content_keys.row_keys(jnp.asarray(s + 1)[None]))[0] for s in seqs]
  slots = [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (2, 1)]
  for (b, s), want in zip(slots, alone):
    np.testing.assert_array_equal(keys[b, s], want)
  assert len({tuple(k) for k in alone}) == len(alone)
  table = np.stack(alone[:5])  # the last example is not in the table
  order = content_keys.sort_table(np.concatenate([table, table[:2]]))  # duplicates dropped
  assert len(order) == 5
  sorted_keys = np.concatenate([table, table[:2]])[order]
  idx, found = content_keys.find(jnp.asarray(sorted_keys), jnp.asarray(np.stack(alone)))
  idx, found = np.asarray(idx), np.asarray(found)
  assert found.tolist() == [True] * 5 + [False]
  for i in range(5):
    np.testing.assert_array_equal(sorted_keys[idx[i]], alone[i])


def test_sort_table_refuses_too_many_first_hash_collisions():
  keys = np.array([[7, i] for i in range(content_keys.CANDIDATES + 1)], np.uint32)
  with pytest.raises(ValueError, match="share a first hash"):
    content_keys.sort_table(keys)
  found = content_keys.find(jnp.asarray(keys[:4]), jnp.asarray(keys[:4]))[1]
  assert np.asarray(found).all()
