"""64-bit content keys of token sequences, and lookups of them in a sorted table, in-jit.

Values precomputed once per example (DPO reference log-probs, a teacher's top-k log-probs)
are stored by the CONTENT of the example, so the step can find them whatever the order,
packing, shuffling, resume point or process count of the batches it is given. A key is two
independent 32-bit polynomial hashes in wrapping uint32 arithmetic, so the host-side table
(built by these same functions under jit) and the step agree bit for bit:

    key(v_0 .. v_{n-1}) = (sum_p v_p * P1^p mod 2^32, sum_p v_p * P2^p mod 2^32)

    row_keys(values [N, L])                      -> [N, 2]   one key per row
    segment_keys(tokens, segment_ids, positions) -> [B, T+1, 2]  one per packed segment
    index, found = find(table_keys, queries)     table sorted by (k1, k2) (`sort_table`)
    train_examples(loader)                       every train example, to precompute over

`find` binary-searches the first hash and checks the second on the next few entries, so a
table must not hold more than CANDIDATES keys with the same first hash (`sort_table`
checks; for a million keys the expected number of first-hash collisions is ~120 pairs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PRIMES = (1000003, 2654435761)
CANDIDATES = 4


def powers(length: int) -> np.ndarray:
  """[L, 2] uint32: P^p mod 2^32 for p < L, both primes."""
  return np.array([[pow(p, i, 2**32) for p in PRIMES] for i in range(length)],
                  np.uint32).reshape(length, 2)


def row_keys(values: jax.Array) -> jax.Array:
  """[N, L] non-negative integers -> [N, 2] uint32 keys (zeros count as absent)."""
  v = values.astype(jnp.uint32)[..., None] * jnp.asarray(powers(values.shape[-1]))  # [N, L, 2]
  return jnp.sum(v, axis=-2, dtype=jnp.uint32)


def segment_keys(tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
  """[B, T+1, 2] uint32: the key of every (row, segment id) slot of a packed [B, T] batch.

  Segment s of row b has key(ids + 1) over its own positions (which restart at 0 in every
  segment), so it equals the key of the example alone: row_keys([ids + 1]).
  """
  b, t = tokens.shape
  v = (tokens.astype(jnp.uint32) + 1)[..., None] * jnp.asarray(powers(t))[positions]  # [B, T, 2]
  v = jnp.where((segment_ids > 0)[..., None], v, 0).astype(jnp.uint32)
  slot = (jnp.arange(b)[:, None] * (t + 1) + segment_ids).reshape(-1)  # [B*T]
  keys = jax.ops.segment_sum(v.reshape(-1, 2), slot, num_segments=b * (t + 1))
  return keys.astype(jnp.uint32).reshape(b, t + 1, 2)


def find(table: jax.Array, queries: jax.Array):
  """(index [...] int32, found [...] bool) of queries [..., 2] in table [N, 2] (sorted)."""
  k1, k2 = table[:, 0], table[:, 1]
  n = k1.shape[0]
  start = jnp.searchsorted(k1, queries[..., 0], side="left")  # [...]
  cand = jnp.clip(start[..., None] + jnp.arange(CANDIDATES), 0, n - 1)  # [..., C]
  hit = (k1[cand] == queries[..., :1]) & (k2[cand] == queries[..., 1:])  # [..., C]
  index = jnp.take_along_axis(cand, jnp.argmax(hit, -1)[..., None], -1)[..., 0]
  return index.astype(jnp.int32), jnp.any(hit, -1)


def sort_table(keys: np.ndarray) -> np.ndarray:
  """Indices that sort host keys [N, 2] by (k1, k2) with duplicates removed (first kept).

  Raises if more than CANDIDATES distinct keys share a first hash (`find` would miss).
  """
  keys = np.asarray(keys, np.uint32).reshape(-1, 2)
  _, first = np.unique(keys, axis=0, return_index=True)  # lexicographic order
  counts = np.unique(keys[first, 0], return_counts=True)[1]
  if counts.size and counts.max() > CANDIDATES:
    raise ValueError(f"{counts.max()} distinct keys share a first hash (> {CANDIDATES}): the "
                     "table cannot be searched; this is astronomically unlikely for real data")
  return first


def train_examples(loader) -> list:
  """Every train example (encode.Result) of a data Loader, source by source."""
  examples = getattr(loader, "examples", None)
  if examples is None:
    raise NotImplementedError(f"precomputing per-example values needs the train examples; "
                              f"{type(loader).__name__} does not expose them")
  return [r for src in examples for r in src]
