"""What a sweep writes, after every finished trial:

    SWEEP/sweep.md            one row per trial (state, metric, params, steps, workdir),
                              best first, and the command that reproduces the best trial
    SWEEP/sweep.png           the metric against each parameter (one panel per parameter;
                              log axes for log-scaled ones; pruned trials hollow, at the
                              last value they reported)
    SWEEP/best_config.json    the best trial's full resolved config (its workdir's
                              config.json) and SWEEP/best_overrides.txt, its --set flags
"""

from __future__ import annotations

import json
import math
import os
import shutil

from jaxtune.sweep import space as space_lib


def _value(t):
  """A trial's value for the table and plot: final, else its last intermediate value."""
  if t.value is not None:
    return t.value
  if t.intermediate_values:
    return t.intermediate_values[max(t.intermediate_values)]
  return None


def _best(study):
  done = [t for t in study.trials if t.state.name == "COMPLETE"]
  if not done:
    return None
  return study.best_trial


def rows(study) -> list:
  """Trials in table order: complete ones best first, then the rest by number."""
  sign = 1 if study.direction.name.lower() == "minimize" else -1
  done = sorted((t for t in study.trials if t.state.name == "COMPLETE"),
                key=lambda t: sign * t.value)
  rest = [t for t in study.trials if t.state.name != "COMPLETE"]
  return done + rest


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.6g}"
  return str(v)


def markdown(study, keys, metric: str, trials: int, base_flags=()) -> str:
  best = _best(study)
  counts = {}
  for t in study.trials:
    counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
  head = ["trial", "state", metric, *keys, "steps", "workdir"]
  out = [f"# Sweep: {study.direction.name.lower()} {metric}", "",
         f"{trials} trials asked; " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
         ""]
  if best is not None:
    flags = " ".join(f"--set={k}={space_lib.set_value(v)}" for k, v in best.params.items())
    out += [f"Best: trial {best.number}, {metric}={best.value:.6g}; its full config is "
            "best_config.json; to train it again:", "",
            "```", " ".join(["python launch/train.py", *base_flags, flags]), "```", ""]
  out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for t in rows(study):
    steps = t.user_attrs.get("steps") or (max(t.intermediate_values)
                                          if t.intermediate_values else "")
    note = t.user_attrs.get("error", "") if t.state.name == "FAIL" else ""
    state = t.state.name.lower() + (" (best)" if best is not None and t.number == best.number
                                    else "") + (f": {note}" if note else "")
    cells = [str(t.number), state, _fmt(_value(t)),
             *[_fmt(t.params.get(k)) for k in keys], str(steps),
             os.path.basename(t.user_attrs.get("workdir", ""))]
    out.append("| " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def plot(study, space: dict, metric: str, path: str) -> None:
  """The metric against each parameter, one panel per parameter, to `path` (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = list(space)
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    dist = space[key]
    choices = list(getattr(dist, "choices", ()))
    for t in study.trials:
      v = _value(t)
      if key not in t.params or v is None or not math.isfinite(v):
        continue
      x = choices.index(t.params[key]) if choices else t.params[key]
      done = t.state.name == "COMPLETE"
      ax.scatter([x], [v], s=36, facecolors="C0" if done else "none",
                 edgecolors="C0" if done else "0.5")
    if choices:
      ax.set_xticks(range(len(choices)), [str(c) for c in choices])
    elif getattr(dist, "log", False):
      ax.set_xscale("log")
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  fig.suptitle(f"{metric} per trial (hollow: pruned, last reported value)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(study, space: dict, metric: str, trials: int, workdir: str, base_flags=()) -> dict:
  """Writes sweep.md, sweep.png and the best config into `workdir`; returns their paths.
  base_flags: the flags every trial shared (--config, --set), for the command in sweep.md."""
  keys = list(space)
  paths = {"table": os.path.join(workdir, "sweep.md"),
           "plot": os.path.join(workdir, "sweep.png")}
  _atomic_text(paths["table"], markdown(study, keys, metric, trials, base_flags))
  plot(study, space, metric, paths["plot"])
  best = _best(study)
  if best is not None:
    src = os.path.join(best.user_attrs.get("workdir", ""), "config.json")
    paths["best_config"] = os.path.join(workdir, "best_config.json")
    if os.path.exists(src):
      shutil.copyfile(src, paths["best_config"] + ".tmp")
    else:  # the trial's params alone, when its workdir is gone
      _atomic_text(paths["best_config"] + ".tmp", json.dumps(best.params, indent=2))
    os.replace(paths["best_config"] + ".tmp", paths["best_config"])
    paths["best_overrides"] = os.path.join(workdir, "best_overrides.txt")
    _atomic_text(paths["best_overrides"], "".join(
        f"--set={k}={space_lib.set_value(v)}\n" for k, v in best.params.items()))
  return paths


def _atomic_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
