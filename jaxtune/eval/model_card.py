"""The model card (README.md) of an HF export, in the form Hugging Face tooling reads.

The metadata block is built by `huggingface_hub` itself (`ModelCardData`, `EvalResult`,
`ModelCard`), so the Hub, `ModelCard.load` and `transformers` parse it as they parse any
card: base_model (a hub id only; a local path or a random init is named in the text),
library_name, tags and, with metrics, a model-index of eval results. The text says how
the model was trained (method, PEFT settings), on what data (fingerprints) and how it
scored (metrics with their 95% intervals when given).

    model_card.write("runs/x/hf", base_model="Qwen/Qwen2.5-0.5B", method="sft",
                     peft={"method": "lora", "rank": 16, "alpha": 32},
                     data={"train": "7db5c1f1...", "tokenizer": "..."},
                     metrics={"perplexity": 3.21, "rougeL": 0.41},
                     intervals={"perplexity": [3.1, 3.3]}, dataset_name="held-out chat")
"""

from __future__ import annotations

import json
import os
import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TASK = "text-generation"


def _is_hub_id(name: str) -> bool:
  return bool(name) and not os.path.exists(name) and bool(HUB_ID.match(name))


def _metadata(*, base_model: str, method: str, peft: dict | None, metrics: dict | None,
              model_name: str, dataset_name: str, library_name: str):
  from huggingface_hub import EvalResult  # pylint: disable=g-import-not-at-top
  from huggingface_hub import ModelCardData  # pylint: disable=g-import-not-at-top
  tags = ["jaxtune", method] + ([peft["method"]] if peft and peft.get("method") else [])
  results = [EvalResult(task_type=TASK, dataset_type="custom", dataset_name=dataset_name,
                        metric_type=k, metric_name=k, metric_value=float(v))
             for k, v in (metrics or {}).items() if isinstance(v, (int, float))]
  return ModelCardData(base_model=base_model if _is_hub_id(base_model) else None,
                       library_name=library_name, tags=tags, pipeline_tag=TASK,
                       model_name=model_name, eval_results=results or None)


def _body(*, model_name: str, base_model: str, method: str, peft: dict | None, data: dict,
          metrics: dict | None, intervals: dict | None, notes: str) -> str:
  lines = [f"# {model_name}", "",
           f"Fine-tuned with jaxtune by `{method}` from "
           f"{'`' + base_model + '`' if base_model else 'a random initialisation'}.", "",
           "## Training", "", f"- method: `{method}`"]
  if peft:
    lines.append(f"- PEFT: `{json.dumps(peft, sort_keys=True)}`")
  else:
    lines.append("- PEFT: none (full fine-tuning)")
  lines += ["", "## Data", "", "| what | fingerprint (sha256) |", "|---|---|"]
  lines += [f"| {k} | `{v}` |" for k, v in data.items()]
  if metrics:
    lines += ["", "## Evaluation", "", "| metric | value | 95% interval |", "|---|---|---|"]
    for k, v in metrics.items():
      iv = (intervals or {}).get(k)
      shown = f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
      lines.append(f"| {k} | {shown} | {'-' if not iv else f'[{iv[0]:.4g}, {iv[1]:.4g}]'} |")
  lines += ["", "## Use", "", "```python", "import transformers",
            "tok = transformers.AutoTokenizer.from_pretrained(PATH)",
            "model = transformers.AutoModelForCausalLM.from_pretrained(PATH)", "```", ""]
  if notes:
    lines += [notes, ""]
  return "\n".join(lines)


def write(out_dir: str, *, base_model: str = "", method: str = "sft",
          peft: dict | None = None, data: dict | None = None, metrics: dict | None = None,
          intervals: dict | None = None, model_name: str = "", dataset_name: str = "eval",
          library_name: str = "transformers", notes: str = "") -> str:
  """Writes out_dir/README.md (see the module docstring); returns its path."""
  from huggingface_hub import ModelCard  # pylint: disable=g-import-not-at-top
  model_name = model_name or os.path.basename(os.path.abspath(out_dir))
  meta = _metadata(base_model=base_model, method=method, peft=peft, metrics=metrics,
                   model_name=model_name, dataset_name=dataset_name,
                   library_name=library_name)
  body = _body(model_name=model_name, base_model=base_model, method=method, peft=peft,
               data=data or {}, metrics=metrics, intervals=intervals, notes=notes)
  card = ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}")
  path = os.path.join(out_dir, "README.md")
  os.makedirs(out_dir, exist_ok=True)
  card.save(path)
  return path
