"""Generation metrics from the libraries everyone trusts: sacrebleu and rouge-score.

Nothing is re-implemented; each metric is one library call, plus the per-example pieces a
bootstrap needs to resample it (`jaxtune.eval.bootstrap`):

    bleu, chrf      sacrebleu corpus scores, 0-100, default settings (`sacrebleu.BLEU()`,
                    `sacrebleu.CHRF()`); the signature string is returned beside each score.
                    Resampled from sacrebleu's own per-sentence statistics, summed and
                    scored by sacrebleu (the way `corpus_score` computes it).
    rouge1, rouge2, rouge-score F-measure with the Porter stemmer (`use_stemmer=True`), mean
    rougeL,         over examples, 0-1. rougeLsum splits summaries into sentences at
    rougeLsum       newlines (rouge-score's default).
    exact_match     prediction.strip() == reference.strip(), mean over examples, 0-1.

    >>> m = text.metrics(["the cat sat"], ["the cat sat down"])
    >>> m.values["bleu"], m.values["bleu_signature"], m.stats["rouge1"](np.arange(1))
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
NAMES = ("bleu", "chrf") + ROUGE_TYPES + ("exact_match",)


@dataclasses.dataclass
class Metrics:
  """values: {name: float, "bleu_signature": str, ...}; stats: {name: stat(idx) -> float};
  per_example: {name: [n] float} for the metrics that are means over examples."""
  values: dict
  stats: dict[str, Callable[[np.ndarray], float]]
  per_example: dict[str, np.ndarray]


def rouge_signature() -> str:
  """What the ROUGE numbers are, for metrics.json and the report."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return (f"rouge-score {metadata.version('rouge-score')}|F-measure|use_stemmer=True|"
          "rougeLsum split at newlines|mean over examples")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
  """rouge-score F-measures per example: {rouge type: [n] float64}."""
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  out = {k: np.zeros(len(predictions)) for k in ROUGE_TYPES}
  for i, (p, r) in enumerate(zip(predictions, references)):
    scores = scorer.score(r, p)  # (target, prediction)
    for k in ROUGE_TYPES:
      out[k][i] = scores[k].fmeasure
  return out


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
  """[n] float64: 1.0 where prediction.strip() == reference.strip()."""
  return np.asarray([float(p.strip() == r.strip()) for p, r in zip(predictions, references)])


def _sacrebleu_stat(metric, predictions, references) -> Callable[[np.ndarray], float]:
  """stat(idx): the sacrebleu corpus score of the selected examples, from its statistics."""
  stats = np.asarray(metric._extract_corpus_statistics(  # pylint: disable=protected-access
      list(predictions), [list(references)]), np.float64)  # [n, k]

  def stat(idx: np.ndarray) -> float:
    return float(metric._compute_score_from_stats(  # pylint: disable=protected-access
        stats[idx].sum(0)).score)

  return stat


def metrics(predictions: Sequence[str], references: Sequence[str]) -> Metrics:
  """All generation metrics of n (prediction, reference) pairs; see the module docstring."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references; "
                     "expected as many, and at least one")
  predictions, references = list(predictions), list(references)
  values, stats, per_example = {}, {}, {}
  for name, cls in (("bleu", sacrebleu.BLEU), ("chrf", sacrebleu.CHRF)):
    metric = cls()
    values[name] = float(metric.corpus_score(predictions, [references]).score)
    values[f"{name}_signature"] = str(metric.get_signature())
    stats[name] = _sacrebleu_stat(cls(), predictions, references)
  per_example.update(rouge(predictions, references))
  values["rouge_signature"] = rouge_signature()
  per_example["exact_match"] = exact_match(predictions, references)
  for name, column in per_example.items():
    values[name] = float(column.mean())
    stats[name] = lambda idx, c=column: float(c[idx].mean())
  return Metrics(values, stats, per_example)
