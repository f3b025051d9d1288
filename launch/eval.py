"""Evaluate a model (and compare it with its base) on your data: metrics, intervals, report.

  python launch/eval.py --model=runs/x --base=initial --data=held_out.jsonl --out=eval/x
  python launch/eval.py --model=runs/x/hf --data=chat.jsonl,docs.jsonl --out=eval/hf
  python launch/eval.py --model=meta-llama/Llama-3.2-1B --adapter=runs/x/hf_adapter \
      --base=meta-llama/Llama-3.2-1B --data=reviews.jsonl --labels=pos,neg --out=eval/cls

--model / --base: an HF dir or hub id (safetensors only), a training workdir (its latest
checkpoint, adapters included), or a checkpoint dir; --adapter / --base_adapter: a Hugging
Face PEFT dir; --base=initial: the weights the --model run started from (adapters off for
(Q)LoRA, the initial weights for full fine-tuning). Data: the formats training reads
(jaxtune/eval/examples.py says what each is scored on). Writes DIR/metrics.json,
intervals.json, per_label.json, predictions.jsonl, report.md, metrics.png, confusion.png
(and base_*.json, p_values.json with --base); see jaxtune/eval/report.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from launch import common  # noqa: E402

FLAGS = flags.FLAGS
common.define_runtime_flags()
flags.adopt_module_key_flags(common)
flags.DEFINE_string("model", None, "Model to evaluate: HF dir, hub id, run dir or checkpoint "
                    "dir.", required=True)
flags.DEFINE_string("adapter", "", "A Hugging Face PEFT adapter dir applied to --model.")
flags.DEFINE_integer("step", None, "Checkpoint step of a run --model (default: the latest).")
flags.DEFINE_string("base", "", "Model to compare with (same sources as --model), or "
                    "'initial': the weights the --model run started from.")
flags.DEFINE_string("base_adapter", "", "A PEFT adapter dir applied to --base.")
flags.DEFINE_string("data", None, "Comma-separated data files / dirs / hf:NAME.", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_integer("max_examples", 0, "Evaluate the first N records only (0 = all).")
flags.DEFINE_string("labels", "", "Classification labels 'a,b,c' (default: the 'label' "
                    "values found in the data, sorted).")
flags.DEFINE_enum("classify_by", "score", ["score", "generate"], "Classification by each "
                  "label's log-likelihood after the prompt, or by parsing a generated answer.")
flags.DEFINE_string("label_delimiter", " ", "Text between a raw-text ('text') prompt and its "
                    "label.")
flags.DEFINE_bool("label_end", False, "Also score the end token after each label (eos / "
                  "end-of-turn, as training renders an answer); off: the label tokens only, "
                  "as lm-evaluation-harness scores choices.")
flags.DEFINE_string("format", "auto", "Record format of every source (default: detected).")
flags.DEFINE_string("text_field", "text", "Field holding raw text.")
flags.DEFINE_string("tokenizer", "", "Tokenizer dir or hub id (default: the model's own).")
flags.DEFINE_string("chat_template", "", "A jinja chat template (file or text) replacing the "
                    "tokenizer's.")
flags.DEFINE_integer("max_len", 2048, "Longest sequence in tokens (prompt + generation).")
flags.DEFINE_enum("truncation", "error", ["error", "drop", "truncate_right", "truncate_left"],
                  "Longer examples: an error naming the record, dropped, or truncated "
                  "(prompts always keep their end).")
flags.DEFINE_bool("generate", True, "Generate answers for generation metrics (off: "
                  "perplexity and scored classification only).")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt at most.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Top-p (nucleus) sampling (1 = off).")
flags.DEFINE_float("min_p", 0.0, "Min-p sampling (0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same for --model and --base).")
flags.DEFINE_integer("batch_size", 8, "Sequences per scoring / generation batch.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for intervals and p-values.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute and param dtype.")
flags.DEFINE_integer("logits_chunk", 1024, "Score this many positions at a time (bounds the "
                     "[B, T, V] float32 logits); 0 = all at once.")
flags.DEFINE_integer("tensor", 1, "Tensor-parallel mesh axis (the rest is fsdp).")


def _settings():
  from jaxtune.eval import classify
  from jaxtune.eval import examples
  return examples.Settings(
      labels=tuple(classify.parse_labels(FLAGS.labels)), max_len=FLAGS.max_len,
      max_new_tokens=FLAGS.max_new_tokens, truncation=FLAGS.truncation,
      label_delimiter=FLAGS.label_delimiter, label_end=FLAGS.label_end,
      max_examples=FLAGS.max_examples, format=FLAGS.format, text_field=FLAGS.text_field)


def _evaluate(model, data, tok, mesh):
  from jaxtune.eval import runner
  from jaxtune.eval import summary
  sampling = runner.Sampling(max_new_tokens=FLAGS.max_new_tokens,
                             temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                             top_p=FLAGS.top_p, min_p=FLAGS.min_p, seed=FLAGS.seed)
  return summary.evaluate(model, data, tok, mesh=mesh, sampling=sampling,
                          classify_by=FLAGS.classify_by, batch_size=FLAGS.batch_size,
                          do_generate=FLAGS.generate, resamples=FLAGS.bootstrap)


def _counts(d: dict) -> str:
  labels = f"; labels {', '.join(d['labels'])}" if d["labels"] else ""
  return (f"{d['examples']} ({d['text']} text, {d['generate']} generation, {d['classify']} "
          f"classification) from {d['records']} records, {d['truncated']} truncated, "
          f"{d['dropped']} dropped{labels}")


def _info(data) -> dict:
  from jaxtune.eval import examples
  from jaxtune.eval import load
  info = {"model": load.describe(FLAGS.model, FLAGS.adapter),
          "base": (f"initial weights of {load.describe(FLAGS.model)}"
                   if FLAGS.base == "initial" else load.describe(FLAGS.base, FLAGS.base_adapter))
          if FLAGS.base else "-",
          "data": FLAGS.data, "examples": _counts(examples.describe(data)),
          "classify_by": FLAGS.classify_by,
          "sampling": (f"max_new_tokens={FLAGS.max_new_tokens} temperature={FLAGS.temperature} "
                       f"top_k={FLAGS.top_k} top_p={FLAGS.top_p} min_p={FLAGS.min_p} "
                       f"seed={FLAGS.seed}"),
          "bootstrap_resamples": FLAGS.bootstrap, "bootstrap_seed": 12345}
  return info


def _check_generation(data) -> None:
  """Fails early (one line) when the data needs generation and the sampler is absent."""
  import jaxtune
  needs = any(e.kind == "generate" for e in data.examples) and FLAGS.generate
  needs |= any(e.kind == "classify" for e in data.examples) and FLAGS.classify_by == "generate"
  if needs and not hasattr(jaxtune, "generate"):
    raise SystemExit("error: generation metrics need jaxtune.generate (the sampler), which "
                     "this install lacks; pass --nogenerate for perplexity and scored "
                     "classification")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.setup_runtime()
  import jax
  from jaxtune import config as config_lib
  from jaxtune import sharding
  from jaxtune.eval import examples
  from jaxtune.eval import load
  from jaxtune.eval import report

  mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=-1, tensor=FLAGS.tensor))
  compute = load.compute_options(dtype=FLAGS.dtype, logits_chunk=FLAGS.logits_chunk)
  try:
    model, w = load.model(FLAGS.model, mesh=mesh, compute=compute, adapter=FLAGS.adapter,
                          step=FLAGS.step)
    tok = load.tokenizer(FLAGS.model, w, override=FLAGS.tokenizer,
                         chat_template=FLAGS.chat_template)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: --model={FLAGS.model}: {e}") from None
  data = examples.read(FLAGS.data, tok, _settings())
  _check_generation(data)
  tuned = _evaluate(model, data, tok, mesh)
  base = None
  if FLAGS.base:
    try:
      if FLAGS.base == "initial":
        base_model = load.initial(w, mesh=mesh, compute=compute)
      else:
        del model, w  # one model in memory at a time
        base_model, _ = load.model(FLAGS.base, mesh=mesh, compute=compute,
                                   adapter=FLAGS.base_adapter, name="base")
    except (ValueError, FileNotFoundError) as e:
      raise SystemExit(f"error: --base={FLAGS.base}: {e}") from None
    if base_model.cfg.vocab_size < len(tok):
      raise SystemExit(f"error: --base={FLAGS.base}: vocab {base_model.cfg.vocab_size} is "
                       f"smaller than the tokenizer's {len(tok)}; expected a base of the same "
                       "tokenizer")
    base = _evaluate(base_model, data, tok, mesh)
  p = {}
  if base is not None:
    from jaxtune.eval import summary
    p = summary.p_values(base.summary, tuned.summary, resamples=FLAGS.bootstrap)
  if jax.process_index() == 0:
    report.write(FLAGS.out, data, tuned, base, p=p, info=_info(data))
  shown = {k: round(v, 4) for k, v in tuned.summary.values.items() if isinstance(v, float)}
  common.print_once(f"eval: {json.dumps(shown)} ({len(data.examples)} examples) -> "
                    f"{os.path.abspath(FLAGS.out)}")


if __name__ == "__main__":
  common.run(main)
