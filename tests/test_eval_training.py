"""Evaluation during training (issue 12 items 4-5): retention_ppl and kl_to_base against
`transformers` on the exported and the base model, generation metrics against sacrebleu /
rouge-score on the logged generations, the forgetting and overfitting warnings on a
constructed run, checkpoint.keep_best=METRIC exporting the best step, and the end-of-run
report.md, plots/loss.png and model card."""

import dataclasses
import json
import logging
import os

import numpy as np
import pytest
import torch
import transformers

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune.eval import examples as examples_lib
from jaxtune.train import evaluate
from jaxtune.train import loop
from tests import hf_models

SEQ_LEN = 96


def _text_file(path, n, words, seed, length=(6, 14)):
  rng = np.random.RandomState(seed)
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"text": " ".join(rng.choice(words, rng.randint(*length)))}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny HF Llama with the bundled tokenizer (the base), a narrow training text, and a
  retention set of other words."""
  d = tmp_path_factory.mktemp("evtrain")
  base = d / "base"
  hf_models.make("llama3.2", vocab_size=512, hidden_size=32, intermediate_size=64,
                 num_attention_heads=4, num_key_value_heads=2).save_pretrained(base)
  data_lib.load_tokenizer("").save_pretrained(base)
  narrow = _text_file(d / "narrow.jsonl", 40, ["alpha"], 0, length=(20, 30))
  retention = _text_file(d / "retention.jsonl", 6, ["one", "two", "three", "river", "stone"], 1)
  return {"base": str(base), "narrow": narrow, "retention": retention}


def _cfg(base: str, *, peft="none", train_files="", **sections) -> config_lib.TrainConfig:
  cfg = config_lib.TrainConfig(
      model=config_lib.ModelConfig(hf_path=base),
      peft=config_lib.PeftConfig(method=peft, rank=4),
      optim=config_lib.OptimConfig(lr=3e-2, warmup_steps=0, schedule="constant"),
      data=config_lib.DataConfig(train_files=train_files, seq_len=SEQ_LEN, batch_size=8),
      train=config_lib.LoopConfig(max_steps=4, eval_every=2, eval_batches=1, progress=False),
      checkpoint=config_lib.CheckpointConfig(every_steps=100, keep=1, async_save=False))
  for name, fields in sections.items():
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)})
  return cfg


def _rows(wd):
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f]


def _retention_ids(path) -> list[np.ndarray]:
  """The retention tokens as the tracker reads them: raw text, every token after the first
  scored (token 0 is never a target, whatever its flag)."""
  tok = data_lib.load_tokenizer("")
  data = examples_lib.read(path, tok, examples_lib.Settings(
      max_len=SEQ_LEN, truncation="truncate_right", format="text"))
  seqs = [q for e in data.examples for q in e.scored]
  for q in seqs:
    assert q.train[1:].all() and len(q) <= SEQ_LEN
  return [q.ids for q in seqs]


def _logp(model_dir: str, ids: np.ndarray) -> np.ndarray:
  """transformers: [n-1, V] float64 log-probs of the next token at positions 0..n-2."""
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
  logits = hf_models.logits(model.eval(), ids[None].astype(np.int64))[0, :-1]
  return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), -1).numpy()


def _reference(model_dir: str, ids_list, base_dir: str | None = None) -> tuple[float, float]:
  """(perplexity, mean token KL(model || base)) recomputed with transformers in float64."""
  nll = kl = n = 0.0
  for ids in ids_list:
    lp = _logp(model_dir, ids)
    nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
    if base_dir:
      lq = _logp(base_dir, ids)
      kl += (np.exp(lp) * (lp - lq)).sum()
    n += len(ids) - 1
  return float(np.exp(nll / n)), kl / n


def test_lora_retention_generation_and_end_of_run_files(files, tmp_path):
  """LoRA on the bundled chat data with a retention set and generation metrics."""
  import sacrebleu  # pylint: disable=g-import-not-at-top
  from huggingface_hub import ModelCard  # pylint: disable=g-import-not-at-top
  from matplotlib import image  # pylint: disable=g-import-not-at-top
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path / "lora")
  cfg = _cfg(files["base"], peft="lora", train={"max_steps": 2}, eval={
      "retention_files": files["retention"], "generate_every": 2, "generate_examples": 3,
      "max_new_tokens": 4, "final": True, "final_examples": 4})
  summary = loop.train(cfg, wd)
  rows = _rows(wd)
  step0 = [r for r in rows if r["step"] == 0]
  assert step0 and step0[0]["kl_to_base"] == 0.0  # LoRA B starts at zero: the base itself
  ids = _retention_ids(files["retention"])
  ppl0, _ = _reference(files["base"], ids)
  np.testing.assert_allclose(step0[0]["retention_ppl"], ppl0, rtol=1e-4)

  last = [r for r in rows if r["step"] == 2 and "retention_ppl" in r][0]
  assert summary["exported_step"] == 2
  ppl, kl = _reference(os.path.join(wd, "hf"), ids, files["base"])
  np.testing.assert_allclose(last["retention_ppl"], ppl, rtol=1e-4)
  assert kl > 1e-4  # trained: the adapters moved the model
  # KL is a small difference of two float32 log-softmaxes (jaxtune's and torch's forward
  # passes each round at ~1e-7 of logits of size ~6): 1e-3 relative, perplexity 1e-4.
  np.testing.assert_allclose(last["kl_to_base"], kl, rtol=1e-3)

  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  for step in (2,):
    with open(os.path.join(wd, "generations", f"step_{step}.jsonl")) as f:
      gens = [json.loads(l) for l in f]
    assert len(gens) == 3
    row = [r for r in rows if r["step"] == step and "val_rougeL" in r][0]
    preds, refs = [g["prediction"] for g in gens], [g["reference"] for g in gens]
    rl = np.mean([scorer.score(r, p)["rougeL"].fmeasure for r, p in zip(refs, preds)])
    np.testing.assert_allclose(row["val_rougeL"], rl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(row["val_bleu"], sacrebleu.corpus_bleu(preds, [refs]).score,
                               rtol=1e-9, atol=1e-12)

  final = json.load(open(os.path.join(wd, "final_eval.json")))
  assert final["n"] == 4 and "base" in final  # LoRA: the base is the adapters-off model
  for k in ("perplexity", "rougeL", "bleu"):
    lo, hi = final["intervals"][k]
    assert lo <= final["values"][k] <= hi
  assert summary["eval_summary"].startswith("eval on 4 held-out examples: perplexity ")
  assert f"(base {final['base']['values']['perplexity']:.4g})" in summary["eval_summary"]

  png = image.imread(os.path.join(wd, "plots", "loss.png"))
  assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100
  report = open(os.path.join(wd, "report.md")).read()
  for part in ("## Fingerprints",
               "## Final evaluation (4 held-out examples", "jaxtune git commit: `",
               "![training and validation loss](plots/loss.png)", "\"retention_files\""):
    assert part in report, part
  card = ModelCard.load(os.path.join(wd, "hf", "README.md"))
  assert "lora" in card.data.tags and card.data.library_name == "transformers"
  logged = {m["type"]: m["value"] for m in
            card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
  assert logged["perplexity"] == pytest.approx(final["values"]["perplexity"], rel=1e-12)
  assert logged["retention_ppl"] == pytest.approx(final["values"]["retention_ppl"], rel=1e-12)
  assert '"rank": 4' in card.text and files["base"] in card.text
  transformers.AutoModelForCausalLM.from_pretrained(os.path.join(wd, "hf"))  # still loads
  adapter_card = ModelCard.load(os.path.join(wd, "hf_adapter", "README.md"))
  assert adapter_card.data.library_name == "peft"


def _expected_overfit_step(rows, evals, k):
  """The eval step where val_loss has risen k times in a row while the mean training loss
  of the steps since the previous eval fell (the issue's definition), from metrics.jsonl."""
  streak, prev = 0, None
  for step, val in evals:
    before = prev[0] if prev else 0
    train = np.mean([r["loss"] for r in rows if "loss" in r and before < r["step"] <= step])
    if prev is not None and val > prev[1] and train < prev[2]:
      streak += 1
    else:
      streak = 0
    if streak == k:
      return step
    prev = (step, val, train)
  return None


def test_full_ft_forgetting_overfitting_and_keep_best(files, tmp_path, monkeypatch, caplog):
  """Full fine-tuning on one repeated word: the retention set (other words) gets worse. The
  validation loss is scripted to rise at every eval: with the training loss falling that is
  the overfitting pattern. keep_best=retention_ppl keeps and exports the best eval's step."""
  vals = iter([5.0, 5.1, 5.2, 5.3, 5.4])
  monkeypatch.setattr(loop, "evaluate", lambda *a: {"val_loss": next(vals)})
  wd = str(tmp_path / "full")
  tol = 0.05
  cfg = _cfg(files["base"], train_files=files["narrow"],
             train={"max_steps": 8}, checkpoint={"keep_best": "retention_ppl"},
             eval={"retention_files": files["retention"], "kl_to_base": "on",
                   "forgetting_tolerance": tol, "overfit_evals": 2, "final": False})
  with caplog.at_level(logging.WARNING, logger="jaxtune"):
    summary = loop.train(cfg, wd)
  rows = _rows(wd)
  evals = [r for r in rows if "retention_ppl" in r]
  assert [r["step"] for r in evals] == [0, 2, 4, 6, 8]
  assert evals[0]["kl_to_base"] == 0.0  # the initial weights against their second copy
  warnings = [r.getMessage() for r in caplog.records]

  ppl0, crossed, above = evals[0]["retention_ppl"], [], False
  for r in evals[1:]:  # a warning each time retention_ppl crosses (1 + tol) x its step-0 value
    if r["retention_ppl"] > (1 + tol) * ppl0 and not above:
      crossed.append(r["step"])
    above = r["retention_ppl"] > (1 + tol) * ppl0
  assert crossed, "the constructed run must forget"
  forgetting = [w for w in warnings if "forgetting" in w]
  assert [int(w.split(":")[0][5:]) for w in forgetting] == crossed

  want = _expected_overfit_step(rows, [(r["step"], r["val_loss"]) for r in evals[1:]], 2)
  assert want is not None, "the constructed run must overfit"
  overfit = [w for w in warnings if "overfitting" in w]
  assert len(overfit) == 1 and overfit[0].startswith(f"step {want}: ")
  assert len(summary["warnings"]) == len(crossed) + 1

  best = min(evals[1:], key=lambda r: r["retention_ppl"])
  assert summary["best_metric"] == "retention_ppl" and summary["best_step"] == best["step"]
  assert summary["exported_step"] == best["step"] != 8
  ppl, kl = _reference(os.path.join(wd, "hf"), _retention_ids(files["retention"]),
                       files["base"])
  np.testing.assert_allclose(best["retention_ppl"], ppl, rtol=1e-4)
  np.testing.assert_allclose(best["kl_to_base"], kl, rtol=1e-3)
  assert f"best step by retention_ppl: {best['step']}" in open(
      os.path.join(wd, "report.md")).read()
  assert not os.path.exists(os.path.join(wd, "final_eval.json"))  # eval.final=False

  # Resume for two more steps: the tracker's state comes back from the checkpoint (the
  # step-0 baseline, the forgetting and overfitting state), so nothing is re-measured at
  # step 0 and a warning comes only from a new crossing; the best step stays unless step
  # 10 beats it.
  saved = checkpoint_lib.read_meta(wd, step=8)["loop"]["evals"]
  assert saved["base_ppl"] == ppl0 and saved["prev_val"] == 5.3 and saved["forgetting"]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jaxtune"):
    again = loop.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                         max_steps=10)), wd)
  rows = _rows(wd)
  assert again["resumed_from"] == 8 and [r["step"] for r in rows if "retention_ppl" in r] == [
      0, 2, 4, 6, 8, 10]
  over = rows[-1]["retention_ppl"] > (1 + tol) * ppl0  # against the saved step-0 value
  assert [r.getMessage()[:8] for r in caplog.records if "forgetting" in r.getMessage()] == (
      ["step 10:"] if over and not saved["forgetting"] else [])
  assert again["best_step"] == (10 if rows[-1]["retention_ppl"] < best["retention_ppl"] else
                                best["step"])


def test_overfitting_rule_by_hand():
  """val 1.0, 1.1, 1.2, 1.3, 1.0, 1.1 with train 2.0, 1.9, 1.8, 1.9, 1.7, 1.6, K=2: rises
  with a falling train loss at evals 2 and 3 (warn at 3); eval 4 has train up (reset); eval
  5 has val down (reset); eval 6 is one rise: no second warning."""
  class Job:
    cfg = config_lib.TrainConfig(eval=config_lib.EvalConfig(overfit_evals=2))
  tracker = evaluate.Tracker.__new__(evaluate.Tracker)
  tracker.cfg, tracker.e, tracker.book = Job.cfg, Job.cfg.eval, evaluate.Book()
  for step, (v, t) in enumerate(zip([1.0, 1.1, 1.2, 1.3, 1.0, 1.1],
                                    [2.0, 1.9, 1.8, 1.9, 1.7, 1.6]), 1):
    tracker._overfitting(step, v, t)  # pylint: disable=protected-access
  assert [s for s, _ in tracker.book.warnings] == [3]


@pytest.mark.parametrize("sets,message", [
    ({"checkpoint.keep_best": "bleu"}, "bad value for checkpoint.keep_best: 'bleu'"),
    ({"checkpoint.keep_best": "val_rougeL"}, "set eval.generate_every > 0"),
    ({"checkpoint.keep_best": "retention_ppl"}, "set eval.retention_files"),
    ({"checkpoint.keep_best": "kl_to_base", "eval.retention_files": "x.jsonl"},
     "eval.kl_to_base=on"),
    ({"eval.generate_every": "3"}, "expected a multiple of train.eval_every=50"),
    ({"method": "reward", "eval.retention_files": "x.jsonl"}, "method=reward"),
    ({"method": "dpo", "eval.generate_every": "50"}, "method=dpo trains on preference"),
])
def test_bad_eval_settings_are_one_line_errors(sets, message):
  cfg = config_lib.override(config_lib.TrainConfig(), [f"{k}={v}" for k, v in sets.items()])
  with pytest.raises(config_lib.ConfigError) as e:
    evaluate.check(cfg)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_boolean_keep_best_of_older_checkpoints_reads_as_val_loss():
  d = config_lib.to_dict(config_lib.TrainConfig())
  for old, new in ((True, "val_loss"), (False, "")):
    d["checkpoint"]["keep_best"] = old
    assert config_lib.from_dict(config_lib.TrainConfig, d).checkpoint.keep_best == new
