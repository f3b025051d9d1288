"""Classification: pick a label per example, then scikit-learn's metrics.

Two ways to predict (`launch/eval.py --classify_by`):

  score     (default, the robust way) every label is scored as the model's continuation of
            the prompt: the summed log-probability of the label's tokens (see
            `jaxtune.eval.examples` for how a label sequence is rendered); the best-scoring
            label is the prediction. Never produces an invalid label.
  generate  the model answers freely (greedy by default); the answer, stripped, is the
            label it equals, else the longest label it starts with, else OTHER (wrong for
            every example, shown in the confusion matrix).

Metrics (scikit-learn, `zero_division=0`): `accuracy` (accuracy_score), macro `precision`,
`recall`, `f1` over the given labels (precision_recall_fscore_support(average="macro")),
and per label precision / recall / f1 / support (average=None).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

OTHER = "<other>"  # a generated answer that is none of the labels
NAMES = ("accuracy", "precision", "recall", "f1")


@dataclasses.dataclass
class Metrics:
  """values {name: float}; stats {name: stat(idx) -> float}; per_label {label: {...}};
  correct [n] float64 (1.0 where the prediction is the reference)."""
  values: dict[str, float]
  stats: dict[str, Callable[[np.ndarray], float]]
  per_label: dict[str, dict[str, float]]
  correct: np.ndarray


def parse_labels(spec: str) -> list[str]:
  """'a,b,c' -> ['a', 'b', 'c'] (stripped, non-empty, no duplicates)."""
  labels = [s.strip() for s in spec.split(",") if s.strip()]
  if len(set(labels)) != len(labels):
    raise ValueError(f"--labels={spec!r} lists a label twice; expected distinct labels")
  return labels


def by_score(scores: np.ndarray, labels: Sequence[str]) -> list[str]:
  """scores [n, L] (log-likelihood of each label) -> the best label per example."""
  scores = np.asarray(scores)
  if scores.ndim != 2 or scores.shape[1] != len(labels):
    raise ValueError(f"label scores of shape {scores.shape}; expected [n, {len(labels)}]")
  return [labels[i] for i in np.argmax(scores, axis=1)]


def by_generation(text: str, labels: Sequence[str]) -> str:
  """A generated answer -> the label it is (see the module docstring), or OTHER."""
  answer = text.strip()
  if answer in labels:
    return answer
  starts = [lab for lab in labels if answer.startswith(lab)]
  return max(starts, key=len) if starts else OTHER


def _scores(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, float]:
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  p, r, f, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                   average="macro", zero_division=0)
  return {"accuracy": float(skm.accuracy_score(y_true, y_pred)), "precision": float(p),
          "recall": float(r), "f1": float(f)}


def metrics(references: Sequence[str], predictions: Sequence[str],
            labels: Sequence[str]) -> Metrics:
  """scikit-learn accuracy, macro precision / recall / f1 and per-label scores."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  if len(references) != len(predictions) or not references:
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references; "
                     "expected as many, and at least one")
  labels = list(labels)
  y_true, y_pred = np.asarray(references, object), np.asarray(predictions, object)
  values = _scores(y_true, y_pred, labels)
  stats = {name: (lambda idx, k=name: _scores(y_true[idx], y_pred[idx], labels)[k])
           for name in NAMES}
  p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                   average=None, zero_division=0)
  per_label = {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                     "support": int(s[i])} for i, lab in enumerate(labels)}
  correct = (y_true == y_pred).astype(np.float64)
  return Metrics(values, stats, per_label, correct)


def confusion(references: Sequence[str], predictions: Sequence[str],
              labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
  """scikit-learn's confusion matrix [rows: reference, cols: prediction] and its labels
  (OTHER appended when a generated answer was none of the labels)."""
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  names = list(labels) + ([OTHER] if OTHER in predictions else [])
  return skm.confusion_matrix(list(references), list(predictions), labels=names), names
