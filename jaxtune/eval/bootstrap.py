"""95% bootstrap intervals and paired bootstrap p-values, for any corpus metric.

A metric is given as `stat(idx) -> float` over an int array of example indices (repeats
allowed): a corpus BLEU from summed sacrebleu statistics, a mean ROUGE, scikit-learn's
macro F1 of the selected rows, exp of the summed NLL over the summed token count. Every
metric is resampled over EXAMPLES, so a corpus score is resampled the way it is computed.

The resampling is sacrebleu's (`sacrebleu.significance`, after Moses'
`bootstrap-hypothesis-difference-significance.pl`), applied to every metric alike:

    idx = default_rng(seed).choice(n, size=(R, n))            # R resamples of n examples
    interval   = sorted(stat(idx_r))[R // 40], [R - R // 40 - 1]   # the 2.5% / 97.5% ranks
    p (paired) : d_r = |stat_tuned(idx_r) - stat_base(idx_r)|, same idx_r for both models;
                 p = (#{d_r - mean(d) > |observed difference|} + 1) / (R + 1)

With the same seed and R, the BLEU / chrF p-values equal sacrebleu's own paired bootstrap
test (`sacrebleu.significance.PairedTest(test_type="bs")`, seed 12345): the tests check it.
One departure: when the two models score exactly the same, p = 1 (sacrebleu's count would
give its minimum, 1 / (R + 1), which reads as a significant difference where there is none).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Stat = Callable[[np.ndarray], float]  # stat(idx [n] int) -> float
SEED = 12345  # sacrebleu's default SACREBLEU_SEED
RESAMPLES = 1000


def draws(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
  """[R, n] int indices: R resamples with replacement of n examples (sacrebleu's draw)."""
  if n <= 0:
    raise ValueError(f"bootstrap over {n} examples; expected at least one")
  return np.random.default_rng(seed).choice(n, size=(resamples, n), replace=True)


def samples(stat: Stat, idx: np.ndarray) -> np.ndarray:
  """stat over each resample: [R] float64."""
  return np.asarray([stat(row) for row in idx], np.float64)


def interval_of(values: np.ndarray) -> tuple[float, float]:
  """The 95% percentile interval of resampled values (sacrebleu's ranks R//40, R-R//40-1)."""
  s = np.sort(np.asarray(values, np.float64))
  lo = len(s) // 40
  return float(s[lo]), float(s[len(s) - lo - 1])


def interval(stat: Stat, n: int, *, resamples: int = RESAMPLES,
             seed: int = SEED) -> tuple[float, float]:
  """95% bootstrap interval of `stat` over n examples."""
  return interval_of(samples(stat, draws(n, resamples, seed)))


def paired_p_value(stat_base: Stat, stat_tuned: Stat, n: int, *, resamples: int = RESAMPLES,
                   seed: int = SEED) -> float:
  """Paired bootstrap p-value of the difference between two models on the same n examples.

  Small p: the observed difference is unlikely under the null hypothesis that the models
  are equally good (sacrebleu's / Moses' statistic, see the module docstring).
  """
  idx = draws(n, resamples, seed)
  everything = np.arange(n)
  observed = abs(stat_tuned(everything) - stat_base(everything))
  if observed == 0:
    return 1.0
  diffs = np.abs(samples(stat_tuned, idx) - samples(stat_base, idx))
  centred = diffs - diffs.mean()
  return float((np.sum(centred > observed) + 1) / (len(diffs) + 1))
