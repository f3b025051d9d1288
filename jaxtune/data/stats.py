"""Counting what the pipeline kept, truncated, dropped and skipped, per split and source.

Nothing leaves the data path silently: every record read ends up in exactly one of
examples / dropped[reason] / skipped[reason] (truncated examples are kept and also counted),
per source and in total. `Tally.as_dict()` is JSON-serialisable; `summary(stats)` renders
the report the launcher prints before and after training.
"""

from __future__ import annotations

import collections
from typing import Any

MAX_SKIP_MESSAGES = 20


def _source_entry(name: str, fmt: str) -> dict[str, Any]:
  return {"name": name, "format": fmt, "records": 0, "examples": 0, "tokens": 0,
          "loss_tokens": 0, "truncated": 0, "untrained_turns": 0,
          "dropped": collections.Counter(), "skipped": collections.Counter()}


class Tally:
  """Counters of one split (train or eval)."""

  def __init__(self):
    self.sources: list[dict[str, Any]] = []
    self.skip_messages: list[str] = []

  def add_source(self, name: str, fmt: str = "") -> int:
    self.sources.append(_source_entry(name, fmt))
    return len(self.sources) - 1

  def record(self, source: int) -> None:
    self.sources[source]["records"] += 1

  def kept(self, source: int, result, truncated: bool) -> None:
    e = self.sources[source]
    e["examples"] += 1
    e["truncated"] += int(truncated)
    e["untrained_turns"] += result.untrained_turns
    for seq in result.seqs:
      e["tokens"] += len(seq)
      e["loss_tokens"] += int(seq.train[1:].sum())

  def dropped(self, source: int, reason: str) -> None:
    self.sources[source]["dropped"][reason] += 1

  def skipped(self, source: int, error: Exception) -> None:
    self.sources[source]["skipped"][getattr(error, "reason", "invalid")] += 1
    if len(self.skip_messages) < MAX_SKIP_MESSAGES:
      self.skip_messages.append(str(error))

  def as_dict(self) -> dict[str, Any]:
    sources = []
    for e in self.sources:
      sources.append({**e, "dropped": dict(sorted(e["dropped"].items())),
                      "skipped": dict(sorted(e["skipped"].items()))})
    total: dict[str, Any] = {}
    for key in ("records", "examples", "tokens", "loss_tokens", "truncated",
                "untrained_turns"):
      total[key] = sum(e[key] for e in sources)
    for key in ("dropped", "skipped"):
      c = collections.Counter()
      for e in sources:
        c.update(e[key])
      total[key] = dict(sorted(c.items()))
    total["sources"] = sources
    total["skip_messages"] = list(self.skip_messages)
    return total


def summary(stats: dict[str, Any]) -> str:
  """A few human-readable lines about a pipeline's stats dict."""
  lines = [f"data fingerprint {stats.get('fingerprint', '')[:16]}  kind={stats.get('kind')}"]
  for split in ("train", "eval"):
    t = stats.get(split)
    if not t:
      continue
    lines.append(f"{split}: {t['examples']} examples from {t['records']} records, "
                 f"{t['tokens']} tokens ({t['loss_tokens']} trained), truncated "
                 f"{t['truncated']}, dropped {t['dropped'] or 0}, skipped {t['skipped'] or 0}")
    for i, e in enumerate(t["sources"]):
      weight = f" weight {e['weight']:.3f}" if "weight" in e else ""
      lines.append(f"  [{i}] {e['name']} ({e['format']}): {e['examples']} examples{weight}")
    for m in t["skip_messages"][:5]:
      lines.append(f"  skipped: {m}")
  return "\n".join(lines)
