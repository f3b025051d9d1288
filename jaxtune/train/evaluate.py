"""Evaluation inside a training run (`eval.*`, `checkpoint.keep_best`): the loop's glue to
jaxtune/eval/.

    tracker = evaluate.Tracker(job, progress.evals)   # reads the retention / held-out data
    tracker.start(job, state, start, writer)           # step 0: retention_ppl, kl_to_base
    vals |= tracker.at_eval(job, state, step, vals, train_loss)   # every eval
    improved = evaluate.update_best(cfg, progress, vals, step)     # keep_best / early stop
    line = evaluate.finish(job, tracker, ...)          # report.md, plots, card, one line

At every eval (train.eval_every), next to val_loss:

  retention_ppl   perplexity of the current model on `eval.retention_files` (raw text: every
                  token after the first; records cut to data.seq_len tokens)
  kl_to_base      mean over the same tokens of KL(p_model || p_base) over the vocabulary. The
                  base is the adapters-off model for PEFT runs (no copy: exactly 0 at step 0
                  for LoRA, whose B starts at zero); for full fine-tuning a second copy of the
                  initial weights, loaded only with eval.kl_to_base=on
  val_bleu, val_chrf, val_rouge1, val_rouge2, val_rougeL, val_rougeLsum, val_exact_match
                  greedy generations for the first eval.generate_examples held-out records
                  (data.eval_files, or the records data.eval_fraction held out), scored by
                  sacrebleu / rouge-score (jaxtune/eval/text.py), at the evals whose step is
                  a multiple of eval.generate_every

Warnings (logged on the "jaxtune" logger, kept in report.md and the run summary):

  forgetting   retention_ppl > (1 + eval.forgetting_tolerance) x its step-0 value (the base
               model's), once each time it crosses
  overfitting  val_loss rose at eval.overfit_evals consecutive evals while the mean training
               loss between them fell, once per such run of evals

`checkpoint.keep_best=METRIC` keeps and exports the best checkpoint by METRIC (lower is
better for val_loss*, retention_ppl, kl_to_base; higher for the generation metrics and
val_accuracy); early stopping watches the same metric (val_loss when keep_best is unset).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax

from jaxtune import config as config_lib
from jaxtune import methods
from jaxtune.data import errors
from jaxtune.data import pipeline
from jaxtune.data import sources
from jaxtune.data import tokenizer_lib
from jaxtune.eval import examples as examples_lib
from jaxtune.eval import perplexity
from jaxtune.eval import runner
from jaxtune.eval import summary as summary_lib
from jaxtune.eval import text

_log = logging.getLogger("jaxtune")

RETENTION = ("retention_ppl", "kl_to_base")
GENERATION = tuple("val_" + n for n in text.NAMES)
LOWER = frozenset(RETENTION) | {"val_loss"}
HIGHER = frozenset(GENERATION) | {"val_accuracy"}
EVAL_ROWS = 8  # at most this many sequences per evaluation batch


def best_metric(cfg: config_lib.TrainConfig) -> str:
  """The metric whose best checkpoint is kept ("" = none)."""
  if cfg.checkpoint.keep_best:
    return cfg.checkpoint.keep_best
  return "val_loss" if cfg.train.early_stopping_patience > 0 else ""


def lower_is_better(name: str) -> bool:
  return name in LOWER or name.startswith("val_loss/")


def _kl_on(cfg: config_lib.TrainConfig) -> bool:
  if cfg.eval.kl_to_base == "auto":
    return cfg.peft.method != "none"
  return cfg.eval.kl_to_base == "on"


def check(cfg: config_lib.TrainConfig) -> None:
  """ConfigError naming the key for eval.* / checkpoint.keep_best settings that cannot work."""
  e, metric = cfg.eval, cfg.checkpoint.keep_best
  if metric and not (lower_is_better(metric) or metric in HIGHER):
    raise config_lib.ConfigError(
        f"bad value for checkpoint.keep_best: {metric!r} (expected a metric: val_loss, "
        f"{', '.join(RETENTION)}, {', '.join(GENERATION)}, val_accuracy; '' = off)")
  if metric and not cfg.train.eval_every:
    raise config_lib.ConfigError(f"checkpoint.keep_best={metric} needs evaluations: set "
                                 "train.eval_every > 0")
  if metric in RETENTION and not e.retention_files:
    raise config_lib.ConfigError(f"checkpoint.keep_best={metric} needs a retention set: set "
                                 "eval.retention_files")
  if metric == "kl_to_base" and not _kl_on(cfg):
    raise config_lib.ConfigError("checkpoint.keep_best=kl_to_base needs kl_to_base: set "
                                 "eval.kl_to_base=on (full fine-tuning loads a copy of the "
                                 "initial weights)")
  if metric in GENERATION and not e.generate_every:
    raise config_lib.ConfigError(f"checkpoint.keep_best={metric} needs generation metrics: "
                                 "set eval.generate_every > 0")
  if e.generate_every and (not cfg.train.eval_every or e.generate_every % cfg.train.eval_every):
    raise config_lib.ConfigError(
        f"bad value for eval.generate_every: {e.generate_every} (expected a multiple of "
        f"train.eval_every={cfg.train.eval_every}: generation runs at evals)")
  if cfg.method == "reward" and (e.retention_files or e.generate_every):
    raise config_lib.ConfigError("eval.retention_files / eval.generate_every need a language "
                                 "model; method=reward trains a scalar reward head")
  if e.generate_every and methods.get(cfg.method).data_kind == "preference":
    raise config_lib.ConfigError(
        f"eval.generate_every: method={cfg.method} trains on preference records, which have "
        "no single reference answer; expected eval.generate_every=0 (val_loss and the "
        "retention set still work)")


@dataclasses.dataclass
class Book:
  """Tracker state that survives a resume (checkpoint meta, loop progress "evals")."""
  retention_spec: str = ""
  base_ppl: float | None = None  # retention_ppl at step 0 (the base model)
  forgetting: bool = False  # above the tolerance at the latest measurement
  prev_val: float | None = None
  prev_train: float | None = None
  streak: int = 0  # consecutive evals with val_loss up and training loss down
  warnings: list = dataclasses.field(default_factory=list)  # [[step, message]]


def model_of(job, state) -> runner.Model:
  """The current model as evaluation runs it: the trainable tree (full fine-tuning) or the
  frozen base with the adapters (leaves from the state), applied unmerged."""
  if job.ctx.adapters is None:
    return runner.Model("tuned", job.run.model_cfg, state.trainable)
  adapters = dataclasses.replace(job.ctx.adapters, params=state.trainable)
  return runner.Model("tuned", job.run.model_cfg, job.run.frozen["base"], adapters)


def heldout_records(cfg: config_lib.TrainConfig, kind: str,
                    limit: int) -> list[tuple[str, str, dict]]:
  """(format, where, record) of the held-out records, as the data pipeline splits them:
  data.eval_files, else each train source's data.eval_fraction (same seed); first `limit`
  (0 = all)."""
  d = cfg.data
  specs = sources.parse(d.eval_files, setting="data.eval_files")
  held = bool(specs)
  if not held:
    train = d.train_files or tokenizer_lib.sample_path(pipeline.DEFAULT_SAMPLE[kind])
    specs = sources.parse(train, setting="data.train_files")
  out = []
  for src in specs:
    raw = list(sources.read(src))
    fmt = pipeline._detect(raw, d)  # pylint: disable=protected-access  (same detection)
    if not held:
      raw = pipeline._split(raw, d.eval_fraction)[1]  # pylint: disable=protected-access
    out += [(fmt, w, r) for w, r in raw if not isinstance(r, errors.DataError)]
  return out[:limit] if limit else out


def heldout_data(job, limit: int) -> examples_lib.Data:
  """The held-out records as evaluation examples (rendered exactly as training renders them)."""
  cfg = job.cfg
  settings = examples_lib.Settings(
      max_len=cfg.data.seq_len + cfg.eval.max_new_tokens, max_new_tokens=cfg.eval.max_new_tokens,
      truncation="drop", text_field=cfg.data.text_field, loss_policy=cfg.data.loss_policy)
  records = heldout_records(cfg, job.method.data_kind, limit)
  if not records:
    raise errors.DataError("no held-out records (set data.eval_files or data.eval_fraction > 0)")
  return examples_lib.Builder(job.tokenizer, settings).build(records)


def _write_generations(path: str, data: examples_lib.Data, out: runner.Outputs) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for i, ex in enumerate(data.examples):
      if ex.kind == "generate":
        f.write(json.dumps({"where": ex.where, "prompt": ex.prompt, "reference": ex.reference,
                            "prediction": out.predictions[i]}) + "\n")
  os.replace(path + ".tmp", path)


def _rows(cfg: config_lib.TrainConfig) -> int:
  """Sequences per evaluation batch: the training batch, at most EVAL_ROWS (scoring holds
  full-vocabulary logits unless model.logits_chunk is set)."""
  return min(cfg.data.batch_size, EVAL_ROWS)


def _pad(tok) -> int:
  return tok.pad_token_id if tok.pad_token_id is not None else 0


class Tracker:
  """Retention set, generation prompts, base for KL, warnings (see the module docstring)."""

  def __init__(self, job, saved: dict | None = None, initial=None):
    """saved: the state from a checkpoint's meta; initial: () -> a copy of the initial
    params (full fine-tuning's KL base with eval.kl_to_base=on)."""
    cfg = job.cfg
    self.cfg, self.e = cfg, cfg.eval
    self.book = Book(**(saved or {}))
    self.retention = self.base = self.prompts = None
    if self.e.retention_files:
      settings = examples_lib.Settings(max_len=cfg.data.seq_len, truncation="truncate_right",
                                       format="text", text_field=cfg.data.text_field,
                                       max_examples=self.e.retention_examples)
      data = examples_lib.read(self.e.retention_files, job.tokenizer, settings)
      self.retention = [q for ex in data.examples for q in (ex.scored or ())]
      if self.book.retention_spec != self.e.retention_files:
        if self.book.retention_spec:
          _log.info("eval.retention_files changed since the checkpoint: forgetting is "
                    "measured from the next retention_ppl")
        self.book.retention_spec, self.book.base_ppl = self.e.retention_files, None
      if _kl_on(cfg):
        self.base = self._base(job, initial)
    if self.e.generate_every:
      self.prompts = heldout_data(job, self.e.generate_examples)

  @property
  def active(self) -> bool:
    return self.retention is not None or self.prompts is not None

  def _base(self, job, initial) -> runner.Model:
    if job.ctx.adapters is not None:  # adapters off: the same arrays, no copy
      return runner.Model("base", job.run.model_cfg, job.run.frozen["base"])
    if initial is None:
      raise ValueError("eval.kl_to_base=on for full fine-tuning needs the initial weights")
    return runner.Model("base", job.run.model_cfg, initial())

  def to_meta(self) -> dict:
    return dataclasses.asdict(self.book)

  def start(self, job, state, start: int, writer) -> dict:
    """Step 0 of a fresh run: the base model's retention_ppl (and kl_to_base) logged."""
    if self.retention is None or start:
      return {}
    vals = self.measure(job, state)
    writer.write(0, vals)
    return vals

  def measure(self, job, state) -> dict:
    """retention_ppl (and kl_to_base) of the current model; checks forgetting."""
    model, tok = model_of(job, state), job.tokenizer
    common = dict(mesh=job.run.mesh, batch_size=_rows(self.cfg), pad_id=_pad(tok))
    s = perplexity.score(model.cfg, model.params, self.retention, adapters=model.adapters,
                         **common)
    vals = {"retention_ppl": perplexity.perplexity(s.nll, s.tokens)}
    if self.base is not None:
      kl, n = perplexity.kl_to_base(model.cfg, model.params, self.base.params, self.retention,
                                    adapters=model.adapters, **common)
      vals["kl_to_base"] = kl / max(n, 1)
    if self.book.base_ppl is None:
      self.book.base_ppl = vals["retention_ppl"]
    return vals

  def generate(self, job, state, step: int) -> dict:
    """val_<text metric> of greedy generations on the held-out prompts; the generations go
    to WORKDIR/generations/step_<N>.jsonl (prompt, reference, prediction per row)."""
    out = runner.run_model(model_of(job, state), self.prompts, job.tokenizer, mesh=job.run.mesh,
                           sampling=runner.Sampling(max_new_tokens=self.e.max_new_tokens),
                           batch_size=_rows(self.cfg))
    values = summary_lib.summarize(self.prompts, out).values
    if job.ctx.workdir and jax.process_index() == 0:
      _write_generations(os.path.join(job.ctx.workdir, "generations", f"step_{step}.jsonl"),
                         self.prompts, out)
    return {"val_" + k: float(values[k]) for k in text.NAMES if k in values}

  def at_eval(self, job, state, step: int, vals: dict, train_loss: float | None) -> dict:
    """The extra metrics of this eval; updates and emits the warnings."""
    out = {}
    if self.retention is not None:
      out.update(self.measure(job, state))
    if self.prompts is not None and (step % self.e.generate_every == 0
                                     or step == self.cfg.train.max_steps):
      out.update(self.generate(job, state, step))
    self._forgetting(step, out.get("retention_ppl"))
    self._overfitting(step, vals.get("val_loss"), train_loss)
    return out

  def _warn(self, step: int, msg: str) -> None:
    self.book.warnings.append([step, msg])
    _log.warning("step %d: %s", step, msg)

  def _forgetting(self, step: int, ppl: float | None) -> None:
    if ppl is None or self.book.base_ppl is None:
      return
    limit = (1 + self.e.forgetting_tolerance) * self.book.base_ppl
    over = ppl > limit
    if over and not self.book.forgetting:
      self._warn(step, f"forgetting: retention_ppl {ppl:.4g} is more than "
                 f"{100 * self.e.forgetting_tolerance:g}% above its step-0 value "
                 f"{self.book.base_ppl:.4g} (eval.forgetting_tolerance="
                 f"{self.e.forgetting_tolerance:g}); lower optim.lr, train fewer steps, use "
                 "LoRA, or mix general data into data.train_files")
    self.book.forgetting = over

  def _overfitting(self, step: int, val: float | None, train: float | None) -> None:
    b, k = self.book, self.e.overfit_evals
    if val is None or train is None or not k:
      return
    rising = (b.prev_val is not None and b.prev_train is not None and val > b.prev_val
              and train < b.prev_train)
    b.streak = b.streak + 1 if rising else 0
    b.prev_val, b.prev_train = val, train
    if b.streak == k:
      self._warn(step, f"overfitting: val_loss rose at {k} evals in a row (now {val:.4f}) "
                 f"while the training loss fell (now {train:.4f}); consider "
                 "checkpoint.keep_best=val_loss, train.early_stopping_patience, fewer steps "
                 "or more data")


def update_best(cfg: config_lib.TrainConfig, progress, vals: dict, step: int) -> bool:
  """Compares this eval's best_metric with progress.best (stored lower-is-better: the
  negated value for higher-is-better metrics); True when it improved. An eval without the
  metric (generation at some evals only) changes nothing."""
  name = best_metric(cfg) or "val_loss"
  if name not in vals:
    if name.startswith("val_") and name not in GENERATION and "val_loss" in vals:
      raise config_lib.ConfigError(f"checkpoint.keep_best={name}: no such metric at step "
                                   f"{step} (this run's evals log: {', '.join(sorted(vals))})")
    return False
  key = float(vals[name]) if lower_is_better(name) else -float(vals[name])
  if not math.isfinite(key):
    progress.bad_evals += 1
    return False
  if key < progress.best - 1e-6:
    progress.best, progress.best_step, progress.bad_evals = key, step, 0
    return True
  progress.bad_evals += 1
  return False


def best_value(cfg: config_lib.TrainConfig, progress) -> float | None:
  """progress.best as the metric's own value."""
  if progress.best == float("inf"):
    return None
  return progress.best if lower_is_better(best_metric(cfg) or "val_loss") else -progress.best


def final(job, tracker: Tracker, state) -> dict | None:
  """The exported model on the held-out records: {"n", "values", "intervals", "base"} (base
  where it is at hand: PEFT adapters off, or the kl_to_base copy), or None."""
  e = job.cfg.eval
  if not e.final or state is None or job.method.data_kind == "preference" or (
      job.cfg.method == "reward"):
    return None
  try:
    data = heldout_data(job, e.final_examples)
  except errors.DataError as err:
    _log.warning("final evaluation skipped: %s", err)
    return None
  common = dict(mesh=job.run.mesh, sampling=runner.Sampling(max_new_tokens=e.max_new_tokens),
                batch_size=_rows(job.cfg))
  tuned = summary_lib.evaluate(model_of(job, state), data, job.tokenizer, **common)
  out = {"n": len(data.examples), "values": tuned.summary.values, "intervals": tuned.intervals}
  base = tracker.base
  if base is None and job.ctx.adapters is not None:
    base = runner.Model("base", job.run.model_cfg, job.run.frozen["base"])
  if base is not None:
    b = summary_lib.evaluate(base, data, job.tokenizer, **common)
    out["base"] = {"values": b.summary.values, "intervals": b.intervals}
  if tracker.retention is not None:
    out["values"].update(tracker.measure(job, state))
    if tracker.book.base_ppl is not None:
      out.setdefault("base", {"values": {}, "intervals": {}})["values"]["retention_ppl"] = \
          tracker.book.base_ppl
  return out


def finish(job, tracker: Tracker, summary: dict, state, workdir: str) -> str:
  """End of run: final evaluation, WORKDIR/plots/loss.png, WORKDIR/report.md, the model
  card in the export; returns the one-line evaluation summary ("" when there is none)."""
  from jaxtune.eval import run_report  # pylint: disable=g-import-not-at-top
  result = final(job, tracker, state)  # every process: the forward passes are collective
  if jax.process_index() != 0:
    return ""
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  plot = None
  if os.path.exists(metrics_file):
    try:
      from jaxtune.eval import plots  # pylint: disable=g-import-not-at-top
      plot = plots.loss_png(metrics_file, os.path.join(workdir, "plots", "loss.png"))
    except ImportError as err:  # a trained and exported run does not fail over a plot
      _log.warning("plots/loss.png not written: %s (pip install matplotlib)", err)
  info = run_report.RunInfo(
      workdir=workdir, config=config_lib.to_dict(job.cfg), summary=summary,
      provenance=job.data.provenance, fingerprint=job.data.fingerprint,
      best_metric=best_metric(job.cfg), best_value=summary.get("best_value"),
      warnings=tracker.book.warnings, final=result, plot=plot)
  run_report.write_report(info)
  if result is not None:
    run_report.write_json(os.path.join(workdir, "final_eval.json"), result)
  export = summary.get("export")
  if export and os.path.isdir(export):
    run_report.write_card(info, export)
    adapter = export.rstrip("/") + "_adapter"  # a PEFT run's adapter next to the merged model
    if not export.rstrip("/").endswith("_adapter") and os.path.isdir(adapter):
      run_report.write_card(info, adapter)
  return run_report.one_line(info)


