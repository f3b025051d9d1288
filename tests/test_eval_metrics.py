"""Metrics, intervals, p-values, plots and model cards, checked against the libraries.

No model here: predictions are fixed strings and labels. Every value jaxtune reports is
recomputed with sacrebleu, rouge-score, scikit-learn, huggingface_hub and PIL directly.
"""

import json

import numpy as np
import PIL.Image
import pytest
import sacrebleu
from huggingface_hub import ModelCard
from rouge_score import rouge_scorer
from sacrebleu import significance
from sklearn import metrics as skm

from jaxtune.eval import bootstrap
from jaxtune.eval import classify
from jaxtune.eval import model_card
from jaxtune.eval import plots
from jaxtune.eval import text

REFS = ["The capital of France is Paris.", "A plum is purple.", "12 + 7 = 19.",
        "'stone' reversed is 'enots'.", "The sky is blue.", "Coal is black.",
        "The capital of Japan is Tokyo.", "30 - 4 = 26.", "Snow is white.",
        "Grass is green.", "A tomato is red.", "An orange is orange."]
TUNED = ["The capital of France is Paris.", "A plum is red.", "12 + 7 = 19.",
         "'stone' reversed is 'senot'.", "The sky is blue.", "Coal is white.",
         "The capital of Japan is Kyoto.", "30 - 4 = 24.", "Snow is white.",
         "Grass is green", "A tomato is red.", "orange"]
# TUNED with four answers changed: a close call, so the p-values are far from their minimum.
CLOSE = TUNED[:1] + ["A plum is purple."] + TUNED[2:5] + ["Coal is black."] + TUNED[6:9] + \
    ["Grass is green."] + TUNED[10:11] + ["An orange."]
BASE = ["capital France", "A plum.", "12 7 19", "stone", "sky blue today", "Coal",
        "Tokyo is a city.", "30 4 26", "white snow", "green grass", "tomato", "An orange."]


def test_text_metrics_equal_sacrebleu_and_rouge_score():
  m = text.metrics(TUNED, REFS)
  assert m.values["bleu"] == pytest.approx(sacrebleu.corpus_bleu(TUNED, [REFS]).score, 1e-12)
  assert m.values["chrf"] == pytest.approx(sacrebleu.corpus_chrf(TUNED, [REFS]).score, 1e-12)
  bleu = sacrebleu.BLEU()
  bleu.corpus_score(TUNED, [REFS])
  assert m.values["bleu_signature"] == str(bleu.get_signature())
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                    use_stemmer=True)
  scores = [scorer.score(r, p) for r, p in zip(REFS, TUNED)]
  for k in text.ROUGE_TYPES:
    assert m.values[k] == pytest.approx(np.mean([s[k].fmeasure for s in scores]), 1e-12)
  assert m.values["exact_match"] == pytest.approx(5 / 12)  # examples 0, 2, 4, 8, 10
  # The resampling statistic of the whole set is the corpus score itself.
  everything = np.arange(len(REFS))
  for k in text.NAMES:
    assert m.stats[k](everything) == pytest.approx(m.values[k], 1e-9), k
  # ... and of a subset, the corpus score of that subset.
  sub = np.array([0, 0, 3, 5, 7])
  sub_bleu = sacrebleu.corpus_bleu([TUNED[i] for i in sub], [[REFS[i] for i in sub]]).score
  assert m.stats["bleu"](sub) == pytest.approx(sub_bleu, 1e-9)


def test_paired_p_values_equal_sacrebleu_paired_bootstrap():
  for other in (BASE, CLOSE):
    tuned, base = text.metrics(TUNED, REFS), text.metrics(other, REFS)
    test = significance.PairedTest([("base", other), ("tuned", TUNED)],
                                   {"BLEU": sacrebleu.BLEU(), "chrF": sacrebleu.CHRF()},
                                   [REFS], test_type="bs", n_samples=200)
    _, results = test()
    for name, theirs in (("bleu", results["BLEU"][1]), ("chrf", results["chrF2"][1])):
      ours = bootstrap.paired_p_value(base.stats[name], tuned.stats[name], len(REFS),
                                      resamples=200, seed=12345)
      assert ours == pytest.approx(theirs.p_value, abs=1e-12), name
      if other is CLOSE:
        assert 0.05 < ours < 1.0, name  # not a trivially equal minimum
  # A model compared with itself: nothing to detect.
  same = bootstrap.paired_p_value(tuned.stats["bleu"], tuned.stats["bleu"], len(REFS),
                                  resamples=200)
  assert same == 1.0


def test_intervals_contain_point_estimates_and_use_sacrebleu_ranks():
  m = text.metrics(TUNED, REFS)
  for k in text.NAMES:
    lo, hi = bootstrap.interval(m.stats[k], len(REFS), resamples=400)
    assert lo <= m.values[k] <= hi, (k, lo, m.values[k], hi)
    assert lo < hi, k
  values = np.arange(1000.0)[::-1]
  assert bootstrap.interval_of(values) == (25.0, 974.0)  # ranks R // 40 and R - R // 40 - 1


def test_classification_metrics_equal_scikit_learn():
  labels = ["neg", "neu", "pos"]
  refs = ["pos", "neg", "neu", "pos", "pos", "neg", "neu", "neu", "pos", "neg"]
  preds = ["pos", "neg", "pos", "pos", "neg", "neg", "neu", "pos", "pos", classify.OTHER]
  m = classify.metrics(refs, preds, labels)
  assert m.values["accuracy"] == skm.accuracy_score(refs, preds) == 0.6
  p, r, f, s = skm.precision_recall_fscore_support(refs, preds, labels=labels,
                                                   average="macro", zero_division=0)
  assert (m.values["precision"], m.values["recall"], m.values["f1"]) == (p, r, f)
  p, r, f, s = skm.precision_recall_fscore_support(refs, preds, labels=labels, average=None,
                                                   zero_division=0)
  for i, lab in enumerate(labels):
    assert m.per_label[lab] == {"precision": p[i], "recall": r[i], "f1": f[i],
                                "support": int(s[i])}
  sub = np.array([1, 2, 2, 9])
  assert m.stats["f1"](sub) == skm.f1_score(np.array(refs)[sub], np.array(preds)[sub],
                                            labels=labels, average="macro", zero_division=0)
  matrix, names = classify.confusion(refs, preds, labels)
  assert names == labels + [classify.OTHER]
  np.testing.assert_array_equal(matrix, skm.confusion_matrix(refs, preds, labels=names))
  for k in classify.NAMES:
    lo, hi = bootstrap.interval(m.stats[k], len(refs), resamples=300)
    assert lo <= m.values[k] <= hi, k


def test_label_choice_by_score_and_by_generation():
  labels = ["no", "yes", "yes, maybe"]
  assert classify.by_score(np.array([[-3.0, -1.0, -2.0], [-0.5, -4.0, -9.0]]),
                           labels) == ["yes", "no"]
  assert classify.by_generation("  yes\n", labels) == "yes"
  assert classify.by_generation("yes, maybe so", labels) == "yes, maybe"  # longest prefix
  assert classify.by_generation("perhaps", labels) == classify.OTHER
  with pytest.raises(ValueError, match="lists a label twice"):
    classify.parse_labels("a,b,a")


def _decoded(path):
  with PIL.Image.open(path) as im:
    im.load()
    return im.format, im.size


def test_plots_decode(tmp_path):
  values = {"perplexity": 12.5, "bleu": 30.0, "accuracy": 0.7}
  ivs = {"perplexity": [11.0, 14.0], "bleu": [25.0, 35.0], "accuracy": [0.6, 0.8]}
  base = ({"perplexity": 40.0, "bleu": 5.0, "accuracy": 0.4},
          {"perplexity": [35.0, 45.0], "bleu": [2.0, 8.0], "accuracy": [0.3, 0.5]})
  path = plots.metrics_png(str(tmp_path / "m.png"), {"base": base, "tuned": (values, ivs)},
                           list(values))
  fmt, (w, h) = _decoded(path)
  assert fmt == "PNG" and w >= 600 and h >= 200
  path = plots.confusion_png(str(tmp_path / "c.png"),
                             [("tuned", np.array([[3, 1], [0, 4]]), ["a", "b"])])
  assert _decoded(path)[0] == "PNG"
  rows = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 21)]
  rows += [{"step": s, "val_loss": 4.5 - 0.05 * s, "retention_ppl": 30.0 + s}
           for s in (10, 20)]
  jsonl = tmp_path / "run" / "metrics.jsonl"
  jsonl.parent.mkdir()
  jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 21, \"lo")  # torn
  assert len(plots.read_metrics(str(jsonl))) == len(rows)
  path = plots.loss_png(str(jsonl), str(tmp_path / "plots" / "loss.png"))
  fmt, (w, h) = _decoded(path)
  assert fmt == "PNG" and (w, h) == (700, 400)


def test_model_card_parses_with_huggingface_hub(tmp_path):
  path = model_card.write(str(tmp_path / "hf"), base_model="Qwen/Qwen2.5-0.5B", method="sft",
                          peft={"method": "lora", "rank": 8, "alpha": 16},
                          data={"train": "ab" * 32, "tokenizer": "cd" * 32},
                          metrics={"perplexity": 3.25, "rougeL": 0.41},
                          intervals={"perplexity": [3.0, 3.5]}, dataset_name="held-out")
  card = ModelCard.load(path)
  assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
  assert card.data.library_name == "transformers"
  assert set(card.data.tags) == {"jaxtune", "sft", "lora"}
  got = {r.metric_type: r.metric_value for r in card.data.eval_results}
  assert got == {"perplexity": 3.25, "rougeL": 0.41}
  assert "ab" * 32 in card.text and "[3, 3.5]" in card.text
  # A local base (or a random init) is named in the text, never as base_model metadata.
  path = model_card.write(str(tmp_path / "hf2"), base_model=str(tmp_path), method="sft")
  card = ModelCard.load(path)
  assert card.data.base_model is None and card.data.eval_results is None
  assert str(tmp_path) in card.text and "full fine-tuning" in card.text
