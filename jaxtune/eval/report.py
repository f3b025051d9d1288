"""The evaluator's output directory: JSON metrics, predictions, report.md and PNG charts.

    DIR/metrics.json        flat {metric: value} (+ bleu_signature, chrf_signature,
                            rouge_signature), the evaluated (tuned) model
    DIR/intervals.json      {metric: [lo, hi]} 95% bootstrap intervals
    DIR/per_label.json      classification: {label: {precision, recall, f1, support}}
    DIR/predictions.jsonl   one row per example: index, where, kind, prompt, reference,
                            prediction (+ base_prediction), label_scores, nll, tokens
    DIR/report.md           the table (metric, base, tuned, delta, intervals, p-value), the
                            examples that changed most, the charts
    DIR/metrics.png         bars with error bars; DIR/confusion.png (classification)
  with a base model also base_metrics.json, base_intervals.json, base_per_label.json and
  p_values.json (paired bootstrap).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from jaxtune.eval import classify
from jaxtune.eval import examples as examples_lib
from jaxtune.eval import plots
from jaxtune.eval import summary as summary_lib

NOTES = """\
- perplexity: exp of the token-weighted mean NLL over the scored tokens (loss-masked
  tokens as training masks them; raw text: every token after the first). Lower is better.
- bleu, chrf: sacrebleu corpus scores, 0-100, default settings (signatures below).
- rouge1, rouge2, rougeL, rougeLsum: rouge-score F-measure with the Porter stemmer, mean
  over examples, 0-1.
- exact_match: prediction and reference equal after stripping whitespace, 0-1.
- accuracy, precision, recall, f1: scikit-learn; precision / recall / f1 macro-averaged
  over the labels.
- intervals: 95% bootstrap over examples ({resamples} resamples, seed {seed}); p: paired
  bootstrap over the same resamples (sacrebleu's test), two-sided."""


def _dump(path: str, obj: Any) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


def _row(data: examples_lib.Data, i: int, tuned: summary_lib.Result,
         base: summary_lib.Result | None) -> dict:
  e = data.examples[i]
  row = {"index": i, "where": e.where, "kind": e.kind, "prompt": e.prompt,
         "reference": e.reference, "prediction": tuned.outputs.predictions[i]}
  if base is not None:
    row["base_prediction"] = base.outputs.predictions[i]
  for prefix, r in (("", tuned), ("base_", base)):
    if r is None:
      continue
    o = r.outputs
    if o.label_scores[i] is not None:
      row[prefix + "label_scores"] = dict(zip(data.labels, o.label_scores[i]))
    if o.answers[i] is not None:
      row[prefix + "answer"] = o.answers[i]
    if o.tokens[i] > 0:
      row[prefix + "nll"], row[prefix + "tokens"] = float(o.nll[i]), int(o.tokens[i])
  return row


def write_predictions(path: str, data: examples_lib.Data, tuned: summary_lib.Result,
                      base: summary_lib.Result | None = None) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for i in range(len(data.examples)):
      f.write(json.dumps(_row(data, i, tuned, base), ensure_ascii=False) + "\n")


def _fmt(v) -> str:
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return "-"
  return f"{v:.4g}"


def _iv(iv) -> str:
  return "-" if iv is None else f"[{iv[0]:.4g}, {iv[1]:.4g}]"


def _table(tuned: summary_lib.Result, base: summary_lib.Result | None,
           p: dict) -> list[str]:
  names = summary_lib.metric_names(tuned.summary.values)
  if base is None:
    lines = ["| metric | value | 95% interval |", "|---|---|---|"]
    return lines + [f"| {k} | {_fmt(tuned.summary.values[k])} | {_iv(tuned.intervals.get(k))} |"
                    for k in names]
  lines = ["| metric | base | tuned | delta | base 95% interval | tuned 95% interval | p |",
           "|---|---|---|---|---|---|---|"]
  for k in names:
    b, t = base.summary.values.get(k), tuned.summary.values[k]
    delta = None if b is None else t - b
    lines.append(f"| {k} | {_fmt(b)} | {_fmt(t)} | {_fmt(delta)} | "
                 f"{_iv(base.intervals.get(k))} | {_iv(tuned.intervals.get(k))} | "
                 f"{_fmt(p.get(k))} |")
  return lines


def _quote(text: str) -> str:
  return "\n".join("    " + line for line in str(text).splitlines() or [""])


def _changes(changed: dict) -> list[str]:
  what = {"generate": "ROUGE-L F", "classify": "correct (1) or not (0)",
          "text": "mean token log-likelihood"}
  lines = ["## Examples that changed most", ""]
  for kind, rows in changed.items():
    lines += [f"### {kind} (per-example score: {what[kind]})", ""]
    for r in rows:
      lines += [f"**{r['where']}**: {r['base_score']:.4g} -> {r['tuned_score']:.4g} "
                f"(delta {r['delta']:+.4g})", ""]
      parts = (("prompt", r["prompt"]), ("text" if kind == "text" else "reference",
                                         r["reference"]), ("base", r["base"]),
               ("tuned", r["tuned"]))
      for name, value in parts:
        if value:
          lines += [f"{name}:", "", _quote(value), ""]
  return lines


def _per_label(tuned: summary_lib.Result, base: summary_lib.Result | None) -> list[str]:
  lines = ["## Per label", "", "| label | model | precision | recall | f1 | support |",
           "|---|---|---|---|---|---|"]
  for label in tuned.summary.per_label:
    for r in ([base] if base is not None else []) + [tuned]:
      s = r.summary.per_label.get(label)
      if s:
        lines.append(f"| {label} | {r.name} | {s['precision']:.4g} | {s['recall']:.4g} | "
                     f"{s['f1']:.4g} | {s['support']} |")
  return lines + ["", "![confusion matrix](confusion.png)", ""]


def markdown(info: dict, tuned: summary_lib.Result, base: summary_lib.Result | None, p: dict,
             changed: dict) -> str:
  v = tuned.summary.values
  lines = ["# Evaluation report", ""]
  lines += [f"- {k}: {val}" for k, val in info.items()]
  lines += ["", "## Metrics", ""] + _table(tuned, base, p)
  lines += ["", NOTES.format(resamples=info.get("bootstrap_resamples", "?"),
                             seed=info.get("bootstrap_seed", "?")), ""]
  lines += [f"- {k}: `{v[k]}`" for k in ("bleu_signature", "chrf_signature",
                                         "rouge_signature") if k in v]
  lines += ["", "![metrics](metrics.png)", ""]
  if tuned.summary.per_label:
    lines += _per_label(tuned, base)
  if changed:
    lines += _changes(changed)
  return "\n".join(lines) + "\n"


def _confusions(tuned: summary_lib.Result, base: summary_lib.Result | None) -> list:
  panels = []
  for r in ([base] if base is not None else []) + [tuned]:
    s = r.summary
    matrix, names = classify.confusion(s.class_refs, s.class_preds, s.labels)
    panels.append((r.name, matrix, names))
  return panels


def write(out_dir: str, data: examples_lib.Data, tuned: summary_lib.Result,
          base: summary_lib.Result | None = None, *, p: dict | None = None,
          info: dict | None = None, top_k: int = 5) -> dict:
  """Writes every file of the module docstring; returns {file name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  p, info = p or {}, info or {}
  paths = {}

  def put(name, obj):
    paths[name] = os.path.join(out_dir, name)
    _dump(paths[name], obj)

  put("metrics.json", tuned.summary.values)
  put("intervals.json", tuned.intervals)
  if tuned.summary.per_label:
    put("per_label.json", tuned.summary.per_label)
  if base is not None:
    put("base_metrics.json", base.summary.values)
    put("base_intervals.json", base.intervals)
    put("p_values.json", p)
    if base.summary.per_label:
      put("base_per_label.json", base.summary.per_label)
  paths["predictions.jsonl"] = os.path.join(out_dir, "predictions.jsonl")
  write_predictions(paths["predictions.jsonl"], data, tuned, base)
  names = summary_lib.metric_names(tuned.summary.values)
  models = {r.name: (r.summary.values, r.intervals) for r in ([base] if base else []) + [tuned]}
  if names:
    paths["metrics.png"] = plots.metrics_png(os.path.join(out_dir, "metrics.png"), models,
                                             names)
  if tuned.summary.per_label:
    paths["confusion.png"] = plots.confusion_png(os.path.join(out_dir, "confusion.png"),
                                                 _confusions(tuned, base))
  changed = {} if base is None else summary_lib.changed(
      data, base.outputs, tuned.outputs, base.summary, tuned.summary, k=top_k)
  paths["report.md"] = os.path.join(out_dir, "report.md")
  with open(paths["report.md"], "w", encoding="utf-8") as f:
    f.write(markdown(info, tuned, base, p, changed))
  return paths
