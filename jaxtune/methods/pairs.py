"""Preference-pair plumbing shared by the DPO and reward-model objectives.

Preference batches hold one (chosen, rejected) pair per row, every key shaped [B, 2, T]
(0 = chosen, 1 = rejected; see `jaxtune.data.packing`). Both completions of every pair go
through ONE forward as [2B, T] rows (b0 chosen, b0 rejected, b1 chosen, ...), so the
leading axis keeps its batch sharding, and come back as [B, 2] per-sequence values:

    flat = flatten(batch)                    # {"tokens": [2B, T], ...}
    lp = sequence_logprobs(...)              # [B, 2] summed over each response's loss mask
    valid = valid_pairs(batch)               # [B] 1.0 where both completions have a response

Rows of all padding (the tail of the last eval batch) are not pairs: objectives weight
every per-pair term by `valid`, so they contribute exactly nothing, and `summed` turns
per-pair metrics into the (sum, count) pairs the step reduces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


PAIR_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def check(batch: dict) -> None:
  """Fails loudly, naming keys and shapes, unless `batch` is a [B, 2, T] preference batch."""
  shapes = {k: tuple(batch[k].shape) for k in PAIR_KEYS if k in batch}
  missing = [k for k in ("tokens", "targets", "loss_mask", "segment_ids") if k not in batch]
  if missing or any(len(s) != 3 or s[1] != 2 for s in shapes.values()):
    raise ValueError(f"expected a preference batch with keys {PAIR_KEYS} of shape [B, 2, T] "
                     f"(data kind 'preference'); got {shapes}, missing {missing}")


def flatten(batch: dict) -> dict:
  """{key: [B, 2, T]} -> {key: [2B, T]} for the model keys (row 2b = chosen, 2b+1 = rejected)."""
  check(batch)
  return {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in PAIR_KEYS if k in batch}


def unflatten(x: jax.Array) -> jax.Array:
  """[2B, ...] -> [B, 2, ...]."""
  return x.reshape(x.shape[0] // 2, 2, *x.shape[1:])


def valid_pairs(batch: dict) -> jax.Array:
  """[B] float32: 1 where both the chosen and the rejected completion have trained tokens."""
  has = jnp.sum(batch["loss_mask"].astype(jnp.float32), axis=-1) > 0  # [B, 2]
  return jnp.all(has, axis=-1).astype(jnp.float32)


def sequence_logprobs(token_lp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum, average) per sequence of token log-probs over the loss mask: [N, T] -> [N], [N]."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(jnp.where(mask != 0, token_lp, 0.0) * mask, axis=-1)  # [N]
  return total, total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def last_token_index(segment_ids: jax.Array) -> jax.Array:
  """[N, T] -> [N] int32: the last position with segment_ids > 0 (0 for an empty row).

  That is the last non-pad token of a right-padded sequence, the one HF's
  *ForSequenceClassification models pool when the pad id does not occur in the sequence.
  """
  t = segment_ids.shape[-1]
  idx = jnp.arange(t, dtype=jnp.int32)
  return jnp.max(jnp.where(segment_ids > 0, idx, 0), axis=-1)


def summed(per_pair: dict, valid: jax.Array) -> dict:
  """{name: [B] values} -> {name: (sum over valid pairs, number of valid pairs)}."""
  n = jnp.sum(valid)
  return {k: (jnp.sum(jnp.where(valid > 0, v.astype(jnp.float32), 0.0)), n)
          for k, v in per_pair.items()}
