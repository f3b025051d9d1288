"""Counting what the pipeline kept, truncated, split, dropped and skipped, per split and source.

Nothing leaves the data path silently: every record read ends up in exactly one of
examples / dropped[reason] / skipped[reason] (truncated examples are kept and also counted;
a record may yield several examples: a document split into windows, a chat rendered turn by
turn), per source and in total. Tokens are counted before the length policy
(`input_tokens`) and as kept (`tokens`, `loss_tokens`), so the share truncation cut
(`lost_tokens`) is known; `length_warnings` turns a loss of more than a few percent, and
assistant turns that cannot teach the model to stop, into loud warnings with the fix.
`Tally.as_dict()` is JSON-serialisable; `summary(stats)` renders the report the launcher
prints before training.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

MAX_SKIP_MESSAGES = 20
LOST_SHARE_WARNING = 0.02  # warn when truncation drops more than this share of tokens
COUNTS = ("records", "examples", "tokens", "loss_tokens", "truncated", "untrained_turns",
          "input_tokens", "lost_tokens", "split_documents", "windows", "by_turns",
          "turns_without_eos")


def _source_entry(name: str, fmt: str) -> dict[str, Any]:
  return {"name": name, "format": fmt, **{k: 0 for k in COUNTS},
          "dropped": collections.Counter(), "skipped": collections.Counter()}


class Tally:
  """Counters of one split (train or eval)."""

  def __init__(self):
    self.sources: list[dict[str, Any]] = []
    self.skip_messages: list[str] = []
    self._lengths: list[list] = []  # per source: lengths before fitting (ints, arrays)

  def add_source(self, name: str, fmt: str = "") -> int:
    self.sources.append(_source_entry(name, fmt))
    self._lengths.append([])
    return len(self.sources) - 1

  def record(self, source: int) -> None:
    self.sources[source]["records"] += 1

  def encoded(self, source: int, results) -> None:
    """The examples of one record as encoded, before the length policy."""
    e = self.sources[source]
    e["by_turns"] += int(any(r.by_turns for r in results))
    for r in results:
      e["input_tokens"] += sum(len(s) for s in r.seqs)
      self._lengths[source].append(max(len(s) for s in r.seqs))

  def kept(self, source: int, result, outcome: str = "ok", lost: int = 0) -> None:
    e = self.sources[source]
    e["examples"] += 1
    e["truncated"] += int(outcome == "truncated")
    e["lost_tokens"] += lost
    e["untrained_turns"] += result.untrained_turns
    e["turns_without_eos"] += result.turns_without_eos
    for seq in result.seqs:
      e["tokens"] += len(seq)
      e["loss_tokens"] += int(seq.train[1:].sum())

  def split(self, source: int, windows: int) -> None:
    """One document became `windows` (> 1) examples."""
    self.sources[source]["split_documents"] += 1
    self.sources[source]["windows"] += windows

  def dropped(self, source: int, reason: str, lost: int = 0) -> None:
    self.sources[source]["dropped"][reason] += 1
    self.sources[source]["lost_tokens"] += lost

  def skipped(self, source: int, error: Exception) -> None:
    self.sources[source]["skipped"][getattr(error, "reason", "invalid")] += 1
    if len(self.skip_messages) < MAX_SKIP_MESSAGES:
      self.skip_messages.append(str(error))

  def state(self) -> dict[str, Any]:
    """JSON-serialisable counters (a store shard keeps them; see `merge`)."""
    return {"sources": [{**e, "dropped": dict(e["dropped"]), "skipped": dict(e["skipped"])}
                        for e in self.sources],
            "skip_messages": list(self.skip_messages)}

  def lengths(self) -> list[np.ndarray]:
    """Per source, each example's length before fitting (int32; p95 in the report)."""
    return [np.concatenate([np.asarray([x for x in l if not isinstance(x, np.ndarray)],
                                       np.int32)] + [x for x in l if isinstance(x, np.ndarray)])
            for l in self._lengths]

  def merge(self, state: dict[str, Any], lengths: list[np.ndarray], at: int = 0) -> None:
    """Adds `state()` and `lengths()` of another tally (a store shard) whose source j is this
    tally's source at + j."""
    if at + len(state["sources"]) > len(self.sources):
      raise ValueError(f"tally of {len(state['sources'])} sources merged at {at} into one of "
                       f"{len(self.sources)}")
    for j, other in enumerate(state["sources"]):
      e = self.sources[at + j]
      for key in COUNTS:
        e[key] += other[key]
      e["dropped"].update(other["dropped"])
      e["skipped"].update(other["skipped"])
      self._lengths[at + j].append(np.asarray(lengths[j], np.int32))
    room = MAX_SKIP_MESSAGES - len(self.skip_messages)
    self.skip_messages.extend(state["skip_messages"][:max(room, 0)])

  def as_dict(self) -> dict[str, Any]:
    sources = []
    for e, lengths in zip(self.sources, self.lengths()):
      p95 = int(np.percentile(lengths, 95, method="higher")) if len(lengths) else 0
      sources.append({**e, "dropped": dict(sorted(e["dropped"].items())),
                      "skipped": dict(sorted(e["skipped"].items())), "p95_length": p95,
                      "max_length": int(lengths.max()) if len(lengths) else 0})
    total: dict[str, Any] = {key: sum(e[key] for e in sources) for key in COUNTS}
    for key in ("dropped", "skipped"):
      c = collections.Counter()
      for e in sources:
        c.update(e[key])
      total[key] = dict(sorted(c.items()))
    total["sources"] = sources
    total["skip_messages"] = list(self.skip_messages)
    return total


def suggested_seq_len(p95_length: int, multiple: int = 64) -> int:
  """The smallest multiple of `multiple` that holds a p95-long example."""
  return max(multiple, -(-p95_length // multiple) * multiple)


def length_warnings(split: dict[str, Any], seq_len: int, eos: str = "") -> list[str]:
  """Warnings for one split's stats: tokens lost to truncation, turns without an eos."""
  out = []
  for e in split["sources"]:
    share = e["lost_tokens"] / max(e["input_tokens"], 1)
    if share > LOST_SHARE_WARNING:
      cut = e["truncated"] + e["dropped"].get("too_long", 0) + e["dropped"].get(
          "no_loss_tokens", 0)
      out.append(
          f"{e['name']}: data.seq_len={seq_len} cut or dropped {cut} of "
          f"{e['examples'] + sum(e['dropped'].values())} examples, losing {share:.1%} of "
          f"their tokens ({e['lost_tokens']} of {e['input_tokens']}); 95% of the examples "
          f"fit in {e['p95_length']} tokens (longest {e['max_length']}): "
          f"--set=data.seq_len={suggested_seq_len(e['p95_length'])}")
    if e["turns_without_eos"]:
      out.append(
          f"{e['name']}: {e['turns_without_eos']} trained assistant turns end without an "
          "end-of-turn special token, so the model never learns to stop; expected a chat "
          f"template that ends assistant turns with one (eos {eos!r}), see data.chat_template")
  return out


def summary(stats: dict[str, Any]) -> str:
  """A few human-readable lines about a pipeline's stats dict."""
  lines = [f"data fingerprint {stats.get('fingerprint', '')[:16]}  kind={stats.get('kind')}"]
  for split in ("train", "eval"):
    t = stats.get(split)
    if not t:
      continue
    extra = ""
    if t.get("split_documents"):
      extra += f", split {t['split_documents']} documents into {t['windows']} windows"
    if t.get("by_turns"):
      extra += f", rendered {t['by_turns']} chats turn by turn"
    lines.append(f"{split}: {t['examples']} examples from {t['records']} records, "
                 f"{t['tokens']} tokens ({t['loss_tokens']} trained), truncated "
                 f"{t['truncated']}, dropped {t['dropped'] or 0}, skipped {t['skipped'] or 0}"
                 + extra)
    for i, e in enumerate(t["sources"]):
      weight = f" weight {e['weight']:.3f}" if "weight" in e else ""
      lines.append(f"  [{i}] {e['name']} ({e['format']}): {e['examples']} examples{weight}")
    for m in t["skip_messages"][:5]:
      lines.append(f"  skipped: {m}")
  if stats.get("cache"):
    hits = sum(c["hit"] for c in stats["cache"])
    where = sorted({c["entry"].rsplit("/", 1)[0] for c in stats["cache"]})
    lines.append(f"tokenized cache {', '.join(where)}: {hits} of {len(stats['cache'])} "
                 "sources reused, the others encoded into it")
  for w in stats.get("warnings", []):
    lines.append(f"WARNING: {w}")
  return "\n".join(lines)
