"""From one model's outputs to its metrics; intervals; base-vs-tuned p-values and changes.

    s = summary.summarize(data, outputs)      # s.values: the flat metrics.json object
    intervals = summary.intervals(s)          # {metric: [lo, hi]} 95% bootstrap
    p = summary.p_values(base, tuned)         # {metric: paired bootstrap p-value}
    rows = summary.changed(data, base_out, tuned_out, base, tuned, k=5)

Metric names are exactly those of `launch/eval.py`'s metrics.json: perplexity; bleu, chrf
(with bleu_signature, chrf_signature), rouge1, rouge2, rougeL, rougeLsum (with
rouge_signature), exact_match; accuracy, precision, recall, f1. Each metric is computed
over the examples that allow it (perplexity: text and scored generation examples;
generation metrics: examples with a reference answer; classification: labelled examples).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from jaxtune.eval import bootstrap
from jaxtune.eval import classify
from jaxtune.eval import examples as examples_lib
from jaxtune.eval import perplexity
from jaxtune.eval import runner
from jaxtune.eval import text

ORDER = ("perplexity",) + text.NAMES + classify.NAMES
LOWER_IS_BETTER = frozenset({"perplexity"})


@dataclasses.dataclass
class Summary:
  """values: flat {metric: float, signature: str}; stats: {metric: (stat(idx), n)};
  per_label: classification per-label scores; quality: [n] per-example score (higher is
  better; NaN where none: ROUGE-L F, correctness, or mean token log-likelihood);
  references / predictions of the classified examples (for the confusion matrix)."""
  values: dict
  stats: dict[str, tuple[Callable[[np.ndarray], float], int]]
  per_label: dict
  quality: np.ndarray
  labels: list
  class_refs: list
  class_preds: list


@dataclasses.dataclass
class Result:
  """One model's evaluation: its outputs, summary and intervals."""
  name: str
  outputs: runner.Outputs
  summary: Summary
  intervals: dict


def evaluate(model: runner.Model, data: examples_lib.Data, tok, *, mesh,
             sampling: runner.Sampling = runner.Sampling(), classify_by: str = "score",
             batch_size: int = 8, do_generate: bool = True,
             resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> Result:
  """Runs `model` on `data` and summarises it with 95% bootstrap intervals."""
  out = runner.run_model(model, data, tok, mesh=mesh, sampling=sampling,
                         classify_by=classify_by, batch_size=batch_size,
                         do_generate=do_generate)
  s = summarize(data, out)
  return Result(model.name, out, s, intervals(s, resamples=resamples, seed=seed))


def metric_names(values: dict) -> list[str]:
  """The metrics of `values` (signatures left out), in report order."""
  return [k for k in ORDER if k in values]


def summarize(data: examples_lib.Data, out: runner.Outputs) -> Summary:
  exs = data.examples
  values, stats, per_label = {}, {}, {}
  quality = np.full(len(exs), np.nan)

  ppl = np.flatnonzero(out.tokens > 0)
  if len(ppl):
    nll, tok = out.nll[ppl], out.tokens[ppl]
    values["perplexity"] = perplexity.perplexity(nll, tok)
    stats["perplexity"] = (lambda j: math.exp(nll[j].sum() / max(tok[j].sum(), 1)), len(ppl))
    quality[ppl] = -nll / tok

  gen = [i for i, e in enumerate(exs) if e.kind == "generate" and out.predictions[i] is not None]
  if gen:
    m = text.metrics([out.predictions[i] for i in gen], [exs[i].reference for i in gen])
    values.update(m.values)
    stats.update({k: (m.stats[k], len(gen)) for k in text.NAMES})
    quality[gen] = m.per_example["rougeL"]

  cls = [i for i, e in enumerate(exs) if e.kind == "classify" and out.predictions[i] is not None]
  refs = [exs[i].reference for i in cls]
  preds = [out.predictions[i] for i in cls]
  if cls:
    m = classify.metrics(refs, preds, data.labels)
    values.update(m.values)
    stats.update({k: (m.stats[k], len(cls)) for k in classify.NAMES})
    per_label = m.per_label
    quality[cls] = m.correct
  return Summary(values, stats, per_label, quality, list(data.labels), refs, preds)


def intervals(s: Summary, *, resamples: int = bootstrap.RESAMPLES,
              seed: int = bootstrap.SEED) -> dict[str, list[float]]:
  """{metric: [lo, hi]}: 95% bootstrap intervals over examples."""
  return {k: list(bootstrap.interval(fn, n, resamples=resamples, seed=seed))
          for k, (fn, n) in s.stats.items()}


def p_values(base: Summary, tuned: Summary, *, resamples: int = bootstrap.RESAMPLES,
             seed: int = bootstrap.SEED) -> dict[str, float]:
  """{metric: paired bootstrap p-value} for the metrics both models have, same examples."""
  out = {}
  for k, (fn, n) in tuned.stats.items():
    if k in base.stats:
      if base.stats[k][1] != n:
        raise ValueError(f"{k}: base has {base.stats[k][1]} examples, tuned {n}; a paired "
                         "test needs the same examples")
      out[k] = bootstrap.paired_p_value(base.stats[k][0], fn, n, resamples=resamples,
                                        seed=seed)
  return out


def changed(data: examples_lib.Data, base_out: runner.Outputs, tuned_out: runner.Outputs,
            base: Summary, tuned: Summary, *, k: int = 5) -> dict[str, list[dict]]:
  """Per kind, the k examples whose per-example score changed most (by |tuned - base|)."""
  delta = tuned.quality - base.quality
  out = {}
  for kind in examples_lib.KINDS:
    idx = [i for i, e in enumerate(data.examples) if e.kind == kind and np.isfinite(delta[i])]
    idx = sorted(idx, key=lambda i: -abs(delta[i]))[:k]
    rows = []
    for i in idx:
      e = data.examples[i]
      rows.append({"index": i, "where": e.where, "prompt": e.prompt, "reference": e.reference,
                   "base": _shown(base_out, i), "tuned": _shown(tuned_out, i),
                   "base_score": float(base.quality[i]), "tuned_score": float(tuned.quality[i]),
                   "delta": float(delta[i])})
    if rows:
      out[kind] = rows
  return out


def _shown(out: runner.Outputs, i: int) -> str:
  """What a model produced for example i, for the report."""
  if out.predictions[i] is not None:
    return str(out.predictions[i])
  if out.tokens[i] > 0:
    return f"mean token NLL {out.nll[i] / out.tokens[i]:.4f}"
  return ""
