"""PNG charts, headless: metric bars with error bars, confusion matrices, loss curves.

matplotlib's object API (`matplotlib.figure.Figure(...).savefig`) renders with the Agg
canvas and never touches pyplot or the global backend, so plotting works on a machine
without a display and inside a training process without side effects.

    plots.metrics_png("out/metrics.png", {"tuned": (values, intervals), "base": (...)})
    plots.confusion_png("out/confusion.png", [("tuned", matrix, names)])
    plots.loss_png("runs/x/metrics.jsonl", "runs/x/plots/loss.png")
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

COLORS = {"base": "#9aa5b1", "tuned": "#1f6feb"}


def _figure(width: float, height: float):
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  return figure.Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format="png")
  return path


def metrics_png(path: str, models: dict[str, tuple[dict, dict]],
                names: Sequence[str]) -> str:
  """One panel per metric: a bar per model ({name: (values, intervals)}) with its 95%
  interval as the error bar. Panels, not one axis: the metrics have different scales."""
  cols = min(4, len(names))
  rows = math.ceil(len(names) / cols)
  fig = _figure(3.0 * cols, 2.6 * rows)
  axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
  for ax, name in zip(axes, names):
    labels, heights, errs, colors = [], [], [[], []], []
    for model, (values, intervals) in models.items():
      if name not in values:
        continue
      v = float(values[name])
      lo, hi = intervals.get(name, (v, v))
      labels.append(f"{model}\n{v:.4g}")
      heights.append(v)
      errs[0].append(max(0.0, v - lo))
      errs[1].append(max(0.0, hi - v))
      colors.append(COLORS.get(model, "#555555"))
    ax.bar(labels, heights, yerr=errs, color=colors, capsize=6)
    ax.set_title(name + (" (lower is better)" if name == "perplexity" else ""), fontsize=10)
  for ax in axes[len(names):]:
    ax.set_visible(False)
  fig.suptitle("metrics with 95% bootstrap intervals")
  return _save(fig, path)


def confusion_png(path: str, panels: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> str:
  """Confusion matrices side by side: (title, counts [ref, pred], label names) each."""
  size = max(len(p[2]) for p in panels)
  fig = _figure(1.2 + 0.9 * size * len(panels) + 1.5 * len(panels), 1.2 + 0.8 * size)
  axes = np.atleast_1d(fig.subplots(1, len(panels))).reshape(-1)
  for ax, (title, matrix, names) in zip(axes, panels):
    matrix = np.asarray(matrix)
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, int(matrix.max())))
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    half = matrix.max() / 2 if matrix.size else 0
    for (r, c), v in np.ndenumerate(matrix):
      ax.text(c, r, str(int(v)), ha="center", va="center",
              color="white" if v > half else "black")
  return _save(fig, path)


def read_metrics(path: str) -> list[dict]:
  """The rows of a run's metrics.jsonl (a torn last line is skipped)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], float(r[key])) for r in rows
         if key in r and "step" in r and r[key] is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def loss_png(metrics_jsonl: str, path: str) -> str:
  """Training and validation loss against step (and retention_ppl, on its own axis, when
  logged) from a run's metrics.jsonl."""
  rows = read_metrics(metrics_jsonl)
  fig = _figure(7, 4)
  ax = fig.subplots()
  for key, style in (("loss", "-"), ("val_loss", "o-")):
    x, y = _series(rows, key)
    if x:
      ax.plot(x, y, style, label=key, markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (token NLL)")
  x, y = _series(rows, "retention_ppl")
  handles, labels = ax.get_legend_handles_labels()
  if x:
    right = ax.twinx()
    right.plot(x, y, "s--", color="#b35900", label="retention_ppl", markersize=4)
    right.set_ylabel("retention perplexity")
    h2, l2 = right.get_legend_handles_labels()
    handles, labels = handles + h2, labels + l2
  if handles:
    ax.legend(handles, labels, loc="upper right")
  ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl))) or "run")
  return _save(fig, path)
