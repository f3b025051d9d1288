"""The order examples are drawn in: shuffled epochs, and mixtures of sources by weight.

Each source s has an endless stream of its examples: its n_s indices shuffled afresh for
every pass k (seed, s, k), one pass after another. An epoch is N = sum(n_s) draws:

  * no weights: the draws take exactly n_s examples from every source, interleaved in a
    shuffled order, so every example is seen once per epoch;
  * weights w (data.weights, one per train source, normalized): every draw picks source s
    with probability w_s, independently, and takes the next example of s's stream; a
    small source with a large weight repeats within an epoch, a large one is not exhausted.

The state between epochs is only the per-source stream offsets, so an epoch is a pure
function of (seed, epoch, offsets): this is what makes iteration resumable.

    >>> sched = Schedule([3, 2], None, seed=0)
    >>> src, idx, offsets = sched.epoch(0, [0, 0])
    >>> sorted(zip(src.tolist(), idx.tolist()))
    [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    >>> offsets
    [3, 2]
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxtune.data import errors


def parse_weights(text: str, num_sources: int) -> np.ndarray | None:
  """data.weights ('3,1') -> normalized float64 [S], or None when empty."""
  if not text.strip():
    return None
  try:
    w = np.array([float(x) for x in text.split(",") if x.strip()], np.float64)
  except ValueError:
    raise errors.DataError(f"bad data.weights {text!r}: expected comma-separated numbers, "
                           "one per train source") from None
  if len(w) != num_sources:
    raise errors.DataError(f"data.weights has {len(w)} values but data.train_files has "
                           f"{num_sources} sources; expected one weight per source")
  if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
    raise errors.DataError(f"bad data.weights {text!r}: expected finite weights >= 0 with a "
                           "positive sum")
  return w / w.sum()


def _seed(*parts: int) -> np.random.Generator:
  return np.random.default_rng([int(p) % (2**32) for p in parts])


class Schedule:
  """Draw order over epochs for sources of `sizes` examples (see module docstring)."""

  def __init__(self, sizes: Sequence[int], weights: np.ndarray | None, seed: int):
    self.sizes = [int(n) for n in sizes]
    if any(n <= 0 for n in self.sizes):
      raise errors.DataError(f"every train source needs at least one example; sizes "
                             f"{self.sizes}")
    self.weights = weights
    self.seed = int(seed)
    self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

  @property
  def epoch_size(self) -> int:
    return sum(self.sizes)

  def _perm(self, source: int, k: int) -> np.ndarray:
    key = (source, k)
    if key not in self._perm_cache:
      if len(self._perm_cache) > 4 * len(self.sizes):
        self._perm_cache.clear()
      self._perm_cache[key] = _seed(self.seed, 7, source, k).permutation(self.sizes[source])
    return self._perm_cache[key]

  def epoch(self, epoch: int, offsets: Sequence[int]) -> tuple[np.ndarray, np.ndarray,
                                                               list[int]]:
    """Draws of `epoch`: (source [N], index within source [N], offsets after the epoch)."""
    rng = _seed(self.seed, 3, epoch)
    num = len(self.sizes)
    if self.weights is None or num == 1:
      src = rng.permutation(np.repeat(np.arange(num), self.sizes))
    else:
      src = rng.choice(num, size=self.epoch_size, p=self.weights)
    idx = np.zeros(len(src), np.int64)
    new_offsets = list(int(o) for o in offsets)
    for s in range(num):
      where = np.nonzero(src == s)[0]
      pos = offsets[s] + np.arange(len(where))
      n = self.sizes[s]
      for k in np.unique(pos // n):
        sel = pos // n == k
        idx[where[sel]] = self._perm(s, int(k))[pos[sel] % n]
      new_offsets[s] += len(where)
    return src.astype(np.int32), idx, new_offsets
