"""lm-evaluation-harness on a jaxtune model, without converting it: the `jaxtune` model.

    python -m jaxtune.eval.lm_eval_model --model jaxtune \
        --model_args pretrained=runs/x,batch_size=16 --tasks hellaswag,arc_easy
    # or from Python:
    from jaxtune.eval import lm_eval_model
    lm_eval_model.register()                      # lm_eval.simple_evaluate(model="jaxtune", ...)
    lm = lm_eval_model.JaxtuneLM(pretrained="runs/x")   # or pass the instance itself

`pretrained` is any `weights.load` source (HF dir, hub id, run dir with its adapters,
checkpoint dir); `adapter=PEFT_DIR`, `step=N`, `dtype=float32|bfloat16`,
`logits_chunk=N`, `max_length=N` (default: the model's max_position_embeddings),
`max_gen_toks=N`, `tokenizer=DIR`, `chat_template=FILE`, `add_special_tokens=true|false`
(default true: the tokenizer's BOS, as training tokenizes), `tensor=N` (mesh axis).

  loglikelihood           (context, continuation) pairs scored in batches through
                          `perplexity.score` (the decoder and models/head.py, jitted, sharded)
  loglikelihood_rolling   lm_eval's disjoint rolling windows of max_length, scored the same way
  generate_until          `jaxtune.generate` (the KV-cache sampler, adapters unmerged), cut
                          at the first stop string; greedy unless do_sample

lm-eval is an optional extra (`pip install jaxtune[eval]`): this module is the only one
that imports it. Registration is explicit (`register()`, which the `python -m` entry point
calls), so importing the module changes no registry. One process (lm_eval's own
data-parallel ranks are not used; a mesh over this host's devices is).
"""

from __future__ import annotations

from typing import Any

from lm_eval.api import model as lm_model  # the optional dependency, here only
import numpy as np

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune.data import encode
from jaxtune.eval import examples as examples_lib
from jaxtune.eval import load
from jaxtune.eval import perplexity
from jaxtune.eval import runner

NAME = "jaxtune"


def _flag(v) -> bool:
  return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


class JaxtuneLM(lm_model.TemplateLM):
  """lm_eval's TemplateLM over jaxtune's forward and sampler (see the module docstring)."""

  def __init__(self, pretrained: str, adapter: str = "", step: Any = None,
               batch_size: Any = 8, max_length: Any = None, max_gen_toks: Any = 256,
               dtype: str = "float32", logits_chunk: Any = 1024, tokenizer: str = "",
               chat_template: str = "", add_special_tokens: Any = True, tensor: Any = 1,
               seed: Any = 0, **unused):
    super().__init__()
    del unused  # lm_eval passes device, max_batch_size, ...: JAX places arrays itself
    self.mesh = sharding.make_mesh(config_lib.MeshConfig(data=1, fsdp=-1, tensor=int(tensor)))
    compute = load.compute_options(dtype=dtype, logits_chunk=int(logits_chunk))
    self.model, w = load.model(pretrained, mesh=self.mesh, compute=compute, adapter=adapter,
                               step=None if step in (None, "") else int(step))
    self.tokenizer = load.tokenizer(pretrained, w, override=tokenizer,
                                    chat_template=chat_template)
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
    self._max_length = int(max_length or self.model.cfg.max_position_embeddings)
    self.max_gen_toks = int(max_gen_toks)
    self.add_special_tokens = _flag(add_special_tokens)
    self.seed = int(seed)
    self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

  @property
  def eot_token_id(self) -> int:
    if self.tokenizer.eos_token_id is not None:
      return int(self.tokenizer.eos_token_id)
    return int(self.model.cfg.eos_token_id[0])

  @property
  def prefix_token_id(self) -> int:
    bos = self.tokenizer.bos_token_id
    return self.eot_token_id if bos is None else int(bos)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return str(self.tokenizer.name_or_path).replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    del kwargs
    special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
    return list(self.tokenizer(string, add_special_tokens=special)["input_ids"])

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)

  def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per (context, continuation) token lists."""
    seqs = []
    for ctx, cont in pairs:
      ids = (list(ctx) + list(cont))[-(self.max_length + 1):]
      n = min(len(cont), len(ids) - 1)
      train = np.zeros(len(ids), bool)
      train[len(ids) - n:] = True
      seqs.append(encode.Encoded(np.asarray(ids, np.int32), train))
    s = perplexity.score(self.model.cfg, self.model.params, seqs, adapters=self.model.adapters,
                         mesh=self.mesh, batch_size=self.batch_size, pad_id=self.pad_id)
    return [(-float(nll), bool(g)) for nll, g in zip(s.nll, s.greedy)]

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            override_bs: int | None = None) -> list[tuple[float, bool]]:
    del disable_tqdm, override_bs
    out = self._score([(ctx, cont) for _, ctx, cont in requests])
    for (pair, _, _), answer in zip(requests, out):
      if pair is not None:
        self.cache_hook.add_partial("loglikelihood", pair, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    from lm_eval import utils  # pylint: disable=g-import-not-at-top
    del disable_tqdm
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      for w in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)):
        windows.append(w)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, self._score(windows)):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def _sampling(self, gen_kwargs: dict) -> tuple[runner.Sampling, list[str]]:
    kw = dict(gen_kwargs)
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    if eos and eos not in until:
      until.append(eos)
    new = next((int(kw[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                if kw.get(k) is not None), self.max_gen_toks)
    sample = _flag(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
    return runner.Sampling(max_new_tokens=new,
                           temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                           top_k=int(kw.get("top_k", 0) or 0) if sample else 0,
                           top_p=float(kw.get("top_p", 1.0) or 1.0) if sample else 1.0,
                           seed=self.seed), until

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    out: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items(), key=str)), []).append(i)
    stop = examples_lib.stop_ids(self.tokenizer)
    for idx in groups.values():
      sampling, until = self._sampling(requests[idx[0]].args[1])
      keep = max(1, self.max_length - sampling.max_new_tokens)
      prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in idx]
      tokens = runner.generate(self.model, prompts, sampling=sampling, stop=stop,
                               batch_size=self.batch_size)
      for i, t in zip(idx, tokens):
        text = self.tok_decode(t)
        for term in until:
          if term:
            text = text.split(term)[0]
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def register() -> None:
  """Registers JaxtuneLM with lm_eval as `jaxtune` (idempotent)."""
  from lm_eval.api import registry  # pylint: disable=g-import-not-at-top
  import lm_eval.models  # pylint: disable=g-import-not-at-top,unused-import  (builtin table)
  if NAME not in registry.model_registry:
    registry.register_model(NAME)(JaxtuneLM)


def main() -> None:
  """`python -m jaxtune.eval.lm_eval_model ARGS`: lm_eval's command line with `jaxtune`."""
  from lm_eval import __main__ as lm_eval_main  # pylint: disable=g-import-not-at-top
  register()
  lm_eval_main.cli_evaluate()


if __name__ == "__main__":
  main()
