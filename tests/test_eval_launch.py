"""launch/eval.py end to end on a tiny model trained here, and the lm-eval model class.

One tiny SFT run (configs/tiny_test.py) is shared by the module: its HF export is
evaluated on every record format (run A), and the run itself against its initial weights
(run B, `--base=initial`). Every number in the outputs is recomputed from the written
files with the trusted libraries: sacrebleu, rouge-score and scikit-learn on
predictions.jsonl, transformers for perplexity on the same export and tokens, lm-eval for
the classification accuracy on the same data.
"""

import json
import os

import jax
import numpy as np
import PIL.Image
import pytest
import sacrebleu
import torch
import transformers
from rouge_score import rouge_scorer
from sklearn import metrics as skm

import jaxtune
from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune import tree
from jaxtune import weights
from jaxtune.data import encode
from jaxtune.data import errors
from jaxtune.data import formats
from jaxtune.eval import examples
from jaxtune.eval import load
from jaxtune.train import setup
from tests import launch_utils as lu

pytestmark = pytest.mark.slow
DATA = os.path.join(lu.ROOT, "tests", "data", "eval")
GENERATES = hasattr(jaxtune, "generate")
needs_sampler = pytest.mark.skipif(not GENERATES, reason="jaxtune.generate has not landed")
A_FILES = ("text", "qa_chat", "qa_instruction", "qa_completion", "answers", "colours")
B_FILES = ("qa_chat", "text", "colours_chat")


def _data(names) -> str:
  return ",".join(os.path.join(DATA, f"{n}.jsonl") for n in names)


def _json(path):
  with open(path) as f:
    return json.load(f)


def _rows(out) -> list[dict]:
  with open(os.path.join(out, "predictions.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  workdir = str(root / "run")
  lu.run("train.py", "--config=configs/tiny_test.py", f"--workdir={workdir}")
  gen = [] if GENERATES else ["--nogenerate"]
  a, b = str(root / "a"), str(root / "b")
  lu.run("eval.py", f"--model={workdir}/hf", f"--data={_data(A_FILES)}", f"--out={a}",
         "--max_new_tokens=12", "--bootstrap=200", *gen)
  lu.run("eval.py", f"--model={workdir}", "--base=initial", f"--data={_data(B_FILES)}",
         f"--out={b}", "--max_new_tokens=8", "--bootstrap=200", *gen)
  return {"workdir": workdir, "hf": f"{workdir}/hf", "a": a, "b": b}


@needs_sampler
def test_generation_metrics_equal_sacrebleu_and_rouge_score(run):
  m = _json(os.path.join(run["a"], "metrics.json"))
  rows = [r for r in _rows(run["a"]) if r["kind"] == "generate"]
  assert len(rows) == 9 + 4 + 4 + 4
  preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
  assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score, rel=1e-12)
  assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score, rel=1e-12)
  assert m["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                    use_stemmer=True)
  scores = [scorer.score(r, p) for r, p in zip(refs, preds)]
  for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
    assert m[k] == pytest.approx(np.mean([s[k].fmeasure for s in scores]), rel=1e-12)
  assert m["exact_match"] == np.mean([p.strip() == r.strip() for p, r in zip(preds, refs)])


def _hf_nll(model, ids, train) -> float:
  with torch.no_grad():
    logits = model(input_ids=torch.as_tensor(np.asarray(ids)[None], dtype=torch.long)).logits
  lp = torch.log_softmax(logits[0, :-1].double(), -1)
  picked = lp[torch.arange(len(ids) - 1), torch.as_tensor(np.asarray(ids[1:]))].numpy()
  return float(-picked[np.asarray(train[1:], bool)].sum())


def test_perplexity_equals_transformers(run):
  """Raw text is tokenized here by transformers alone (text + eos, every token after the
  first scored); chat and completion records by the data pipeline's encoder (the tokens
  and loss mask training uses); the NLL in both cases comes from transformers."""
  tok = transformers.AutoTokenizer.from_pretrained(run["hf"])
  model = transformers.AutoModelForCausalLM.from_pretrained(run["hf"], dtype=torch.float32)
  encoder = encode.Encoder(tok)
  nll = tokens = 0.0
  for name in ("text", "qa_chat", "qa_instruction", "qa_completion"):
    for line, rec in enumerate(open(os.path.join(DATA, f"{name}.jsonl")), 1):
      rec = json.loads(rec)
      if name == "text":
        ids = tok(rec["text"])["input_ids"] + [tok.eos_token_id]
        seqs = [(ids, [True] * len(ids))]
      else:
        fmt = formats.detect(rec, "x")
        ex = formats.normalize(rec, fmt, f"{name}:{line}")
        seqs = [(r.seqs[0].ids, r.seqs[0].train) for r in encoder.encode_all(ex)]
      for ids, train in seqs:
        nll += _hf_nll(model, ids, train)
        tokens += int(np.sum(train[1:]))
  m = _json(os.path.join(run["a"], "metrics.json"))
  assert m["perplexity"] == pytest.approx(np.exp(nll / tokens), rel=1e-4)
  rows = [r for r in _rows(run["a"]) if "nll" in r]
  assert sum(r["tokens"] for r in rows) == tokens
  assert sum(r["nll"] for r in rows) == pytest.approx(nll, rel=1e-4)


def test_classification_metrics_equal_scikit_learn(run):
  m = _json(os.path.join(run["a"], "metrics.json"))
  rows = [r for r in _rows(run["a"]) if r["kind"] == "classify"]
  assert len(rows) == 16
  labels = sorted({r["reference"] for r in rows})
  refs, preds = [r["reference"] for r in rows], [r["prediction"] for r in rows]
  for r in rows:  # the prediction is the best-scored label
    assert r["prediction"] == max(r["label_scores"], key=r["label_scores"].get)
  assert m["accuracy"] == skm.accuracy_score(refs, preds)
  p, rc, f, _ = skm.precision_recall_fscore_support(refs, preds, labels=labels,
                                                    average="macro", zero_division=0)
  assert (m["precision"], m["recall"], m["f1"]) == (p, rc, f)
  per = _json(os.path.join(run["a"], "per_label.json"))
  p, rc, f, s = skm.precision_recall_fscore_support(refs, preds, labels=labels, average=None,
                                                    zero_division=0)
  assert per == {lab: {"precision": p[i], "recall": rc[i], "f1": f[i], "support": int(s[i])}
                 for i, lab in enumerate(labels)}


def test_intervals_contain_the_point_estimates(run):
  for out in (run["a"], run["b"]):
    m, iv = _json(os.path.join(out, "metrics.json")), _json(os.path.join(out, "intervals.json"))
    assert set(iv) == {k for k, v in m.items() if not k.endswith("_signature")}
    for k, (lo, hi) in iv.items():
      assert lo <= m[k] <= hi, (out, k, lo, m[k], hi)


def _png(path):
  with PIL.Image.open(path) as im:
    im.load()
    return im.format, im.size


def test_base_comparison_writes_report_and_pngs(run):
  b = run["b"]
  tuned, base = _json(os.path.join(b, "metrics.json")), _json(os.path.join(b, "base_metrics.json"))
  p = _json(os.path.join(b, "p_values.json"))
  assert set(p) == {k for k in tuned if not k.endswith("_signature")}
  assert all(0 < v <= 1 for v in p.values())
  # 12 steps of training beat the random init on perplexity, and the test says so.
  assert tuned["perplexity"] < base["perplexity"] and p["perplexity"] < 0.05
  report = open(os.path.join(b, "report.md")).read()
  assert "| metric | base | tuned | delta | base 95% interval | tuned 95% interval | p |" in report
  for k in p:
    assert f"| {k} | " in report
  assert "## Examples that changed most" in report and "initial weights of" in report
  for name in ("metrics.png", "confusion.png"):
    fmt, (w, h) = _png(os.path.join(b, name))
    assert fmt == "PNG" and w > 300 and h > 200
  rows = _rows(b)
  assert all("base_prediction" in r for r in rows)
  assert all("base_label_scores" in r for r in rows if r["kind"] == "classify")
  assert all(r["base_nll"] > 0 for r in rows if "nll" in r)


def test_initial_base_is_the_runs_own_initialisation(run):
  """--base=initial rebuilds exactly the arrays train.setup started the run from."""
  mesh = sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
  compute = load.compute_options()
  _, w = load.model(run["workdir"], mesh=mesh, compute=compute)
  base = load.initial(w, mesh=mesh, compute=compute)
  tok = load.tokenizer(run["workdir"], w)
  _, params = setup.load_weights(w.run_cfg, mesh, tok)
  flat_a, flat_b = _flat(base.params), _flat(params)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
  trained = _flat(w.params)
  assert any(not np.array_equal(trained[k], flat_a[k]) for k in flat_a)


def _flat(params):
  return {k: np.asarray(v) for k, v in tree.flatten(params).items()}


def test_bad_records_are_one_line_errors(run, tmp_path):
  tok = load.tokenizer(run["hf"], weights.load(run["hf"]))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "Snow is", "label": "white"}\n{"text": "Coal is", "label": "pink"}\n')
  settings = examples.Settings(labels=("white", "black"))
  with pytest.raises(errors.DataError) as e:
    examples.read(str(bad), tok, settings)
  assert str(e.value) == (f"{bad}:2: field 'label': 'pink' is not one of the labels (white, "
                          "black); expected one of them (--labels)")
  bad.write_text('{"prompt": "What is 2 + 2?", "answer": "4"}\n{"prompt": "What is 3 + 3?"}\n')
  with pytest.raises(errors.DataError, match=rf"^{bad}:2: field 'answer': is missing"):
    examples.read(str(bad), tok, examples.Settings())
  bad.write_text('{"text": "' + "word " * 400 + '"}\n')
  with pytest.raises(errors.DataError, match=rf"^{bad}:1: field 'text': the example is \d+ "
                     "tokens, longer than --max_len = 64; expected at most 64 tokens"):
    examples.read(str(bad), tok, examples.Settings(max_len=64))
  dropped = examples.Builder(tok, examples.Settings(max_len=64, truncation="drop"))
  with pytest.raises(errors.DataError, match="no example left"):
    dropped.build(examples._records(str(bad), dropped.s))  # pylint: disable=protected-access
  p = lu.run("eval.py", f"--model={run['hf']}", f"--data={bad}", f"--out={tmp_path / 'o'}",
             "--max_len=64", check=False)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: field 'text': the "
                                                      "example is")


TASK = """task: jaxtune_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}"
doc_to_choice: {choices}
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_accuracy_equals_eval_py(run, tmp_path):
  """A local YAML task on the local colours.jsonl, through the registered `jaxtune` model:
  the same accuracy as launch/eval.py on that file, and the same label log-likelihoods."""
  lm_eval = pytest.importorskip("lm_eval")
  from lm_eval import tasks as lm_tasks  # pylint: disable=g-import-not-at-top
  from jaxtune.eval import lm_eval_model  # pylint: disable=g-import-not-at-top
  rows = [r for r in _rows(run["a"]) if r["kind"] == "classify"]
  labels = list(rows[0]["label_scores"])
  (tmp_path / "colours.yaml").write_text(TASK.format(
      data=os.path.join(DATA, "colours.jsonl"), choices=json.dumps(labels)))
  lm_eval_model.register()
  out = lm_eval.simple_evaluate(
      model="jaxtune", model_args=f"pretrained={run['hf']},batch_size=8",
      tasks=["jaxtune_colours"], log_samples=True,
      task_manager=lm_tasks.TaskManager(include_path=str(tmp_path), include_defaults=False))
  accuracy = _json(os.path.join(run["a"], "metrics.json"))["accuracy"]
  assert out["results"]["jaxtune_colours"]["acc,none"] == accuracy
  samples = sorted(out["samples"]["jaxtune_colours"], key=lambda s: s["doc_id"])
  assert [s["doc"]["text"] for s in samples] == [r["prompt"] for r in rows]
  for s, r in zip(samples, rows):
    theirs = [float(resp[0][0]) for resp in s["resps"]]
    np.testing.assert_allclose(theirs, [r["label_scores"][k] for k in labels], rtol=1e-5)


def _hf_model(run):
  return transformers.AutoModelForCausalLM.from_pretrained(run["hf"], dtype=torch.float32)


def test_lm_eval_rolling_loglikelihood_equals_transformers(run):
  """lm_eval's own rolling windows (16 tokens here), each scored by transformers."""
  pytest.importorskip("lm_eval")
  from lm_eval import utils  # pylint: disable=g-import-not-at-top
  from lm_eval.api import instance  # pylint: disable=g-import-not-at-top
  from jaxtune.eval import lm_eval_model  # pylint: disable=g-import-not-at-top
  lm = lm_eval_model.JaxtuneLM(pretrained=run["hf"], batch_size=4, max_length=16)
  texts = ["A plum is purple.", "Question: What is 2 + 26? Answer: 2 + 26 = 28. 'bread' "
           "reversed is 'daerb'. Snow is white. Coal is black."]
  got = lm.loglikelihood_rolling([instance.Instance("loglikelihood_rolling", {}, (t,), i)
                                  for i, t in enumerate(texts)])
  model, tok = _hf_model(run), lm.tokenizer
  assert lm.prefix_token_id == tok.bos_token_id == 1  # BOS first, as lm_eval's HF model does
  for text, value in zip(texts, got):
    ids = tok(text)["input_ids"]
    windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        token_list=ids, prefix_token=tok.bos_token_id, max_seq_len=16, context_len=1)))
    assert (len(windows) > 2) == (text is texts[1])
    want = -sum(_hf_nll(model, ctx + cont, [False] * len(ctx) + [True] * len(cont))
                for ctx, cont in windows)
    assert value == pytest.approx(want, rel=1e-5)


@needs_sampler
def test_lm_eval_generate_until_equals_transformers_greedy(run):
  pytest.importorskip("lm_eval")
  from lm_eval.api import instance  # pylint: disable=g-import-not-at-top
  from jaxtune.eval import lm_eval_model  # pylint: disable=g-import-not-at-top
  lm = lm_eval_model.JaxtuneLM(pretrained=run["hf"], batch_size=4)
  prompts = ["Question: What is 2 + 26? Answer:", "A plum is", "The capital of Italy"]
  kwargs = {"until": ["."], "max_gen_toks": 10, "do_sample": False}
  got = lm.generate_until([instance.Instance("generate_until", {}, (p, dict(kwargs)), i)
                           for i, p in enumerate(prompts)])
  model, tok = _hf_model(run), lm.tokenizer
  for p, text in zip(prompts, got):
    ids = torch.as_tensor([tok(p)["input_ids"]])
    with torch.no_grad():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                           do_sample=False, eos_token_id=sorted(examples.stop_ids(tok)),
                           pad_token_id=tok.pad_token_id)
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split(".")[0]
    assert text == want
