"""One model over the evaluation examples: scores, label scores and generations.

    out = runner.run_model(model, data, tok, mesh=mesh, sampling=Sampling(), ...)
    out.nll[i], out.tokens[i]     # summed NLL / scored tokens (text and generate examples)
    out.label_scores[i]           # classify: log-likelihood of each label (by score)
    out.predictions[i]            # generate: the answer; classify: the predicted label

Scoring goes through `perplexity.score` (jitted, sharded over the mesh), generation
through `jaxtune.generate` (the KV-cache sampler) with the adapters applied unmerged, so a
LoRA run and its base with the adapters off share one copy of the weights. Base and tuned
models get the same prompts in the same batches with the same sampling keys.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from jaxtune.eval import classify
from jaxtune.eval import examples as examples_lib
from jaxtune.eval import perplexity

_log = logging.getLogger("jaxtune.eval")


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int = 64
  temperature: float = 0.0  # 0 = greedy
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  seed: int = 0


@dataclasses.dataclass
class Model:
  """What evaluation needs of a model (from `weights.load`)."""
  name: str
  cfg: Any  # config.ModelConfig
  params: Any
  adapters: Any = None


@dataclasses.dataclass
class Outputs:
  """Per example (aligned with Data.examples): see the module docstring. nll is NaN and
  tokens 0 where nothing was scored; predictions / label_scores None where not applicable;
  answers: the generated text of a classification by generation (before it is parsed)."""
  nll: np.ndarray
  tokens: np.ndarray
  predictions: list
  label_scores: list
  answers: list


def generate(model: Model, prompts: list, *, sampling: Sampling, stop: set[int],
             batch_size: int) -> list[list[int]]:
  """New tokens of each prompt (token-id lists), cut before the first stop id."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxtune  # pylint: disable=g-import-not-at-top
  if not hasattr(jaxtune, "generate"):
    raise RuntimeError("generation metrics need jaxtune.generate (the sampler); pass "
                       "--nogenerate for perplexity and scored classification only")
  eos = tuple(sorted(stop | set(model.cfg.eos_token_id or ())))
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[list[int]] = [[] for _ in prompts]
  key = jax.random.PRNGKey(sampling.seed)
  for b, start in enumerate(range(0, len(order), batch_size)):
    chosen = order[start:start + batch_size]
    gen = jaxtune.generate(model.cfg, model.params, [list(map(int, prompts[i]))
                                                     for i in chosen],
                           max_new_tokens=sampling.max_new_tokens,
                           temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, min_p=sampling.min_p, eos_ids=eos,
                           key=jax.random.fold_in(key, b), lora=model.adapters)
    for i, tokens in zip(chosen, gen.tokens):
      tokens = [int(t) for t in tokens]
      cut = next((j for j, t in enumerate(tokens) if t in eos), len(tokens))
      out[i] = tokens[:cut]
  return out


def run_model(model: Model, data: examples_lib.Data, tok, *, mesh, sampling: Sampling,
              classify_by: str = "score", batch_size: int = 8,
              do_generate: bool = True) -> Outputs:
  """Evaluates `model` on every example of `data` (see the module docstring)."""
  exs = data.examples
  n = len(exs)
  out = Outputs(np.full(n, np.nan), np.zeros(n, np.int64), [None] * n, [None] * n, [None] * n)
  pad = tok.pad_token_id if tok.pad_token_id is not None else 0
  score = dict(adapters=model.adapters, mesh=mesh, batch_size=batch_size, pad_id=pad)

  owner = [i for i, e in enumerate(exs) for _ in (e.scored or ())]
  if owner:
    s = perplexity.score(model.cfg, model.params, [q for e in exs for q in (e.scored or ())],
                         **score)
    scored = sorted(set(owner))
    out.nll[scored] = 0.0
    np.add.at(out.nll, owner, s.nll)
    np.add.at(out.tokens, owner, s.tokens)
    _log.info("%s: scored %d sequences (%d tokens)", model.name, len(owner), s.tokens.sum())

  cls = [i for i, e in enumerate(exs) if e.kind == "classify"]
  if cls and classify_by == "score":
    k = len(data.labels)
    s = perplexity.score(model.cfg, model.params,
                         [seq for i in cls for seq in exs[i].label_seqs], **score)
    table = -s.nll.reshape(len(cls), k)  # [n_cls, L] log-likelihoods
    for row, i in zip(table, cls):
      out.label_scores[i] = [float(v) for v in row]
    for i, label in zip(cls, classify.by_score(table, data.labels)):
      out.predictions[i] = label

  gen = [i for i, e in enumerate(exs) if (e.kind == "generate" and do_generate) or
         (e.kind == "classify" and classify_by == "generate")]
  if gen:
    tokens = generate(model, [exs[i].prompt_ids for i in gen], sampling=sampling,
                      stop=examples_lib.stop_ids(tok), batch_size=batch_size)
    for i, t in zip(gen, tokens):
      text = tok.decode(t, skip_special_tokens=True).strip()
      out.predictions[i] = (classify.by_generation(text, data.labels)
                            if exs[i].kind == "classify" else text)
      if exs[i].kind == "classify":
        out.answers[i] = text
    _log.info("%s: generated for %d prompts", model.name, len(gen))
  return out
