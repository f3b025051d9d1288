"""`jaxtune.generate`: continue token-id prompts with the compiled sampler (engine.py).

    gen = jaxtune.generate(cfg, params, [[1, 5, 9], [1, 7]], max_new_tokens=64,
                           temperature=0.0, lora=adapters)             # ragged prompts
    gen.tokens[0], gen.logprobs[0]     # new ids of prompt 0, up to and including its eos

The params are used as they are: on their mesh (the sampler runs where their shardings say),
4-bit `QArray` projections included, and LoRA adapters applied unmerged (`lora.apply`), so
the arrays a trainer holds are sampled from without a copy. `stream` yields the rows as
they grow (for chat and serving); `run_rows` takes per-row budgets and settings (a batch
of different requests).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxtune import config as config_lib
from jaxtune.models import decoder
from jaxtune.sampling import engine

Row = engine.Row


@dataclasses.dataclass
class Generation:
  """New tokens per prompt (up to and including the first eos id) and their log-probs.

  finished[i]: prompt i stopped at an eos id (else it reached max_new_tokens, or, while
  streaming, is still running).
  """
  tokens: list[list[int]]
  logprobs: list[list[float]]
  finished: list[bool] = dataclasses.field(default_factory=list)


def mesh_of(params) -> jax.sharding.Mesh | None:
  """The mesh the params live on (the first leaf with a NamedSharding), or None."""
  for leaf in jax.tree_util.tree_leaves(params):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
      return sh.mesh if sh.mesh.size > 1 else None
  return None


def check_prompts(cfg: config_lib.ModelConfig, prompts) -> list[list[int]]:
  """prompts as lists of ints; errors name the prompt (and token) and what was expected."""
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
    raise ValueError(f"prompts: expected a non-empty list of token-id lists, got "
                     f"{type(prompts).__name__}")
  out = []
  for i, p in enumerate(prompts):
    ids = np.asarray(p).tolist() if not isinstance(p, list) else p
    if not isinstance(ids, list) or not ids:
      raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {p!r:.80}")
    for j, t in enumerate(ids):
      if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
        raise ValueError(f"prompts[{i}][{j}]: {t!r} is not an int token id")
      if not 0 <= t < cfg.vocab_size:
        raise ValueError(f"prompts[{i}][{j}]: token id {t} is outside the vocabulary "
                         f"[0, {cfg.vocab_size})")
    out.append([int(t) for t in ids])
  return out


def check_settings(*, max_new_tokens, temperature, top_k, top_p, min_p) -> None:
  """One-line errors naming the setting and its allowed range."""
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if not isinstance(top_k, (int, np.integer)) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
  if not 0 <= min_p <= 1:
    raise ValueError(f"min_p must be in [0, 1] (0 = off), got {min_p!r}")


def _eos(cfg: config_lib.ModelConfig, eos_ids) -> tuple[int, ...]:
  return tuple(cfg.eos_token_id) if eos_ids is None else tuple(int(e) for e in eos_ids)


def _row_keys(key, n: int) -> np.ndarray:
  """uint32 [n, 2]: fold_in(key, i) for row i (key None = PRNGKey(0); typed keys too)."""
  if key is None:
    key = jax.random.PRNGKey(0)
  if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, np.arange(n, dtype=np.uint32))
  return np.asarray(keys, np.uint32)


def rows_for(prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
             top_p: float = 1.0, min_p: float = 0.0, key=None) -> list[Row]:
  keys = _row_keys(key, len(prompts))
  return [Row(p, int(max_new_tokens), float(temperature), float(top_p), float(min_p), keys[i])
          for i, p in enumerate(prompts)]


def run_rows(cfg: config_lib.ModelConfig, params, rows: list[Row], *, top_k: int = 0,
             eos_ids=(), chunk: int | None = None, stream: bool = False,
             **buckets) -> Iterator[Generation]:
  """Generates every row; yields the rows so far after each chunk of decode steps when
  `stream` (each Generation holds all tokens so far), else once at the end. `params` are
  ready to run (adapters already applied). buckets: min_rows, min_prompt (make_plan)."""
  mesh = mesh_of(params)
  prefix = params.get(decoder.PREFIX_EMBEDDINGS)  # prompt tuning's virtual tokens
  plan = engine.make_plan(cfg, rows, top_k=top_k, num_eos=len(eos_ids),
                          virtual=0 if prefix is None else int(prefix.shape[0]),
                          **({"chunk": chunk} if chunk else {}), **buckets)
  state = engine.start(cfg, params, plan, rows, eos_ids, mesh=mesh)
  plan = engine.fit_fuse(cfg, params, plan)  # once, with the cache allocated
  while True:
    if stream:
      yield _result(engine.read(state), rows, eos_ids)
    if engine.finished(state):
      break
    step = int(jax.device_get(state["step"]))
    if step >= plan.new:
      break
    state = engine.advance(cfg, params, plan, state, plan.new if not stream else step + 1,
                           mesh=mesh)
  if not stream:
    yield _result(engine.read(state), rows, eos_ids)


def _result(out: dict, rows: list[Row], eos_ids) -> Generation:
  tokens, logprobs, finished = [], [], []
  step = int(out["step"])
  eos = set(eos_ids)
  for i, r in enumerate(rows):
    n = min(int(out["count"][i]) if out["done"][i] else step, r.max_new)
    ids = out["tokens"][i, :n].tolist()
    tokens.append(ids)
    logprobs.append(out["logprobs"][i, :n].tolist())
    finished.append(bool(ids) and ids[-1] in eos)
  return Generation(tokens, logprobs, finished)


def _prepare(cfg, params, prompts, lora, settings):
  check_settings(**settings)
  prompts = check_prompts(cfg, prompts)
  if lora is not None:
    if not callable(getattr(lora, "apply", None)):
      raise TypeError(f"generate: lora must be None or adapters with .apply(params) (what "
                      f"jaxtune.peft.load_peft returns), got {type(lora).__name__}")
    params = lora.apply(params)
  return params, prompts


def generate(cfg: config_lib.ModelConfig, params, prompts, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
             eos_ids=None, key=None, lora=None) -> Generation:
  """Continues each token-id prompt (a ragged list of lists) by up to max_new_tokens.

  temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 are off. eos_ids: None = the
  config's eos ids, () = never stop early. key: a PRNG key (default PRNGKey(0)); prompt i
  samples with fold_in(key, i), so its tokens do not depend on the other prompts. lora:
  adapters (`jaxtune.peft.load_peft`), applied unmerged. Returns a `Generation`; its
  logprobs are log_softmax(logits / temperature) of each token (temperature 1 when greedy),
  before top-k / top-p / min-p.
  """
  settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p)
  params, prompts = _prepare(cfg, params, prompts, lora, settings)
  rows = rows_for(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  min_p=min_p, key=key)
  return next(run_rows(cfg, params, rows, top_k=top_k, eos_ids=_eos(cfg, eos_ids)))


def stream(cfg: config_lib.ModelConfig, params, prompts, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           eos_ids=None, key=None, lora=None, chunk: int = 8) -> Iterator[Generation]:
  """`generate`, yielding every prompt's tokens so far after each `chunk` decode steps; the
  last Generation yielded is what `generate` returns."""
  settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p)
  params, prompts = _prepare(cfg, params, prompts, lora, settings)
  rows = rows_for(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  min_p=min_p, key=key)
  yield from run_rows(cfg, params, rows, top_k=top_k, eos_ids=_eos(cfg, eos_ids), chunk=chunk,
                      stream=True)
