"""A training run's end-of-run artefacts: WORKDIR/report.md, the export's model card and the
one-line evaluation summary, from plain values (no trainer objects: `eval` never imports
`train`).

    info = run_report.RunInfo(workdir=..., config=cfg_dict, summary=loop_summary, ...)
    run_report.write_report(info)        # WORKDIR/report.md
    run_report.write_card(info, "runs/x/hf")   # runs/x/hf/README.md (model_card.write)
    run_report.one_line(info)            # "eval on 20 held-out examples: perplexity ..."

report.md holds the run's status and steps, the git commit of the jaxtune checkout that
ran it, the data / tokenizer / chat-template fingerprints (sha256 of their contents), the
best step of checkpoint.keep_best, the last eval's metrics, the final evaluation of the
exported model with 95% bootstrap intervals (and the base model's values when it is at
hand), the warnings (forgetting, overfitting) and the loss plot, then the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

from jaxtune.eval import model_card
from jaxtune.eval import summary as summary_lib

# Metrics of the one-line summary, in order (the rest are in report.md).
LINE = ("perplexity", "rougeL", "bleu", "accuracy", "f1", "retention_ppl")
LOOP_KEYS = ("val_loss", "retention_ppl", "kl_to_base") + tuple(
    "val_" + k for k in summary_lib.ORDER if k != "perplexity")

_LORA = ("rank", "alpha", "rslora", "dropout", "targets")
_QUANT = ("quant_method", "quant_group_size", "double_quant")
PEFT_KEYS = {"lora": _LORA, "dora": _LORA, "qlora": _LORA + _QUANT, "qdora": _LORA + _QUANT,
             "ia3": ("ia3_targets", "ia3_feedforward"),
             "prompt_tuning": ("num_virtual_tokens", "prompt_init", "prompt_init_text"),
             "prefix_tuning": ("num_virtual_tokens", "prefix_projection", "prefix_hidden"),
             "llama_adapter": ("adapter_len", "adapter_layers")}


@dataclasses.dataclass
class RunInfo:
  workdir: str
  config: dict  # the resolved TrainConfig as a dict
  summary: dict  # the loop's summary (status, step, export, exported_step, best_step, ...)
  provenance: dict  # data.Datasets.provenance: train / eval file digests, tokenizer, template
  fingerprint: str  # data.Datasets.fingerprint
  best_metric: str = ""
  best_value: float | None = None
  warnings: list = dataclasses.field(default_factory=list)  # [[step, message]]
  final: dict | None = None  # {"n", "values", "intervals", "base": {"values", "intervals"}}
  plot: str | None = None


def git_commit(path: str | None = None) -> str:
  """The commit of the git checkout that tracks `path` (default: this file, so jaxtune's own
  checkout), with "+dirty" when it has uncommitted changes; "unknown" when `path` is not a
  tracked file (an installed wheel, even inside some other repository)."""
  path = os.path.abspath(path or __file__)
  where = path if os.path.isdir(path) else os.path.dirname(path)
  try:
    run = lambda *a: subprocess.run(["git", *a], cwd=where, capture_output=True, text=True,  # noqa: E731
                                    timeout=10, check=True).stdout.strip()
    run("ls-files", "--error-unmatch", path)
    commit = run("rev-parse", "HEAD")
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def _fmt(v) -> str:
  return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


def _iv(iv) -> str:
  return f"[{iv[0]:.4g}, {iv[1]:.4g}]" if iv else "-"


def fingerprints(info: RunInfo) -> dict[str, str]:
  """{what: sha256} of the run's inputs (train / eval files, tokenizer, chat template)."""
  p = info.provenance or {}
  out = {"data (all inputs)": info.fingerprint}
  for part in ("train", "eval"):
    for name, digest in (p.get(part) or {}).items():
      out[f"{part}: {name}"] = digest
  for part in ("tokenizer", "chat_template"):
    if p.get(part):
      out[part] = p[part]
  return out


def last_eval(info: RunInfo) -> dict:
  """The loop metrics of the exported step's eval (else the last eval), from metrics.jsonl."""
  path = os.path.join(info.workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return {}
  from jaxtune.eval import plots  # pylint: disable=g-import-not-at-top
  rows = [r for r in plots.read_metrics(path) if any(k in r for k in LOOP_KEYS)]
  want = info.summary.get("exported_step")
  chosen = [r for r in rows if r.get("step") == want] or rows[-1:]
  return {k: v for r in chosen for k, v in r.items() if k in LOOP_KEYS or k == "step"}


def _final_rows(final: dict) -> list[str]:
  base = final.get("base") or {}
  bv, bi = base.get("values", {}), base.get("intervals", {})
  names = [k for k in summary_lib.ORDER + ("retention_ppl",) if k in final["values"]]
  out = ["| metric | tuned | 95% interval | base | 95% interval |", "|---|---|---|---|---|"]
  for k in names:
    out.append(f"| {k} | {_fmt(final['values'][k])} | {_iv(final['intervals'].get(k))} | "
               f"{_fmt(bv[k]) if k in bv else '-'} | {_iv(bi.get(k))} |")
  return out


def markdown(info: RunInfo) -> str:
  s, cfg = info.summary, info.config
  peft = cfg.get("peft", {}).get("method", "none")
  lines = [f"# Training run: {os.path.basename(os.path.abspath(info.workdir))}", "",
           f"- status: {s.get('status')} at step {s.get('step')} (resumed from step "
           f"{s.get('resumed_from', 0)})",
           f"- method: `{cfg.get('method')}`, PEFT: `{peft}`, base model: "
           f"`{cfg.get('model', {}).get('hf_path') or 'random init'}`",
           f"- jaxtune git commit: `{git_commit()}`",
           f"- parameters: {s.get('params', 0):,} total, {s.get('trainable_params', 0):,} "
           "trainable"]
  if info.best_metric:
    lines.append(f"- best step by {info.best_metric}: {s.get('best_step')} "
                 f"({_fmt(info.best_value)})")
  if s.get("export"):
    lines.append(f"- HF export of step {s.get('exported_step')}: `{s['export']}`")
  lines += ["", "## Fingerprints (sha256)", "", "| input | digest |", "|---|---|"]
  lines += [f"| {k} | `{v}` |" for k, v in fingerprints(info).items()]
  ev = last_eval(info)
  if ev:
    lines += ["", f"## Metrics at step {ev.get('step')} (training-time evaluation)", "",
              "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in ev.items() if k != "step"]
  if info.final:
    lines += ["", f"## Final evaluation ({info.final['n']} held-out examples, exported model)",
              ""] + _final_rows(info.final)
    lines += ["", "perplexity: exp of the token-weighted mean NLL over the loss-masked tokens; "
              "bleu, chrf: sacrebleu corpus scores (0-100); rouge*: rouge-score F-measure "
              "with the stemmer, mean over examples (0-1); intervals: 95% bootstrap over "
              "examples."]
  lines += ["", "## Warnings", ""]
  lines += [f"- step {st}: {msg}" for st, msg in info.warnings] or ["none"]
  if info.plot:
    rel = os.path.relpath(info.plot, info.workdir)
    lines += ["", "## Loss", "", f"![training and validation loss]({rel})"]
  lines += ["", "## Config", "", "```json", json.dumps(cfg, indent=2, sort_keys=True), "```", ""]
  return "\n".join(lines)


def write_json(path: str, obj) -> str:
  """Writes `obj` as JSON atomically (a temporary file renamed over `path`)."""
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
  return path


def write_report(info: RunInfo) -> str:
  """Writes WORKDIR/report.md (atomically: a reader never sees half a report)."""
  path = os.path.join(info.workdir, "report.md")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(markdown(info))
  os.replace(tmp, path)
  return path


def card_metrics(info: RunInfo) -> tuple[dict, dict]:
  """(metrics, intervals) of the model card: the final evaluation, else the loop's last."""
  if info.final:
    values = {k: v for k, v in info.final["values"].items() if isinstance(v, (int, float))}
    return values, dict(info.final["intervals"])
  return {k: v for k, v in last_eval(info).items() if k != "step"}, {}


def peft_settings(peft: dict) -> dict | None:
  """The PEFT config keys that matter for its method (None for full fine-tuning)."""
  method = peft.get("method", "none")
  if method == "none":
    return None
  keys = PEFT_KEYS.get(method)
  return {"method": method, **{k: v for k, v in peft.items() if keys is None or k in keys}}


def write_card(info: RunInfo, export_dir: str) -> str:
  """export_dir/README.md: base model, method, PEFT settings, data fingerprints, metrics."""
  cfg = info.config
  peft = peft_settings(dict(cfg.get("peft", {})))
  metrics, intervals = card_metrics(info)
  adapter_only = os.path.exists(os.path.join(export_dir, "adapter_config.json")) and not \
      os.path.exists(os.path.join(export_dir, "config.json"))
  return model_card.write(
      export_dir, base_model=cfg.get("model", {}).get("hf_path", ""),
      method=cfg.get("method", "sft"), peft=peft, data=fingerprints(info), metrics=metrics,
      intervals=intervals, dataset_name="held-out validation data",
      library_name="peft" if adapter_only else "transformers",
      notes=f"Trained for {info.summary.get('step')} steps; this export is step "
            f"{info.summary.get('exported_step')}. Training report: report.md in the run "
            "directory.")


def one_line(info: RunInfo) -> str:
  """'eval on N held-out examples: perplexity 5.2 [4.9, 5.6] (base 512), rougeL ...'."""
  f = info.final
  if not f:
    return ""
  base = (f.get("base") or {}).get("values", {})
  parts = []
  for k in LINE:
    if k in f["values"]:
      part = f"{k} {_fmt(f['values'][k])}"
      if k in f["intervals"]:
        part += f" {_iv(f['intervals'][k])}"
      if k in base:
        part += f" (base {_fmt(base[k])})"
      parts.append(part)
  return (f"eval on {f['n']} held-out examples: " + ", ".join(parts)
          + f"; report: {os.path.join(info.workdir, 'report.md')}")
