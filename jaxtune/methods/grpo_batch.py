"""Rollout plumbing for method=grpo: prompts to token lists, completions to a training batch,
rewards to advantages, and the reward scorer (functions and/or a learned reward model).

The batch a rollout yields (N = prompts x generations rows, T = data.seq_len +
grpo.max_new_tokens):

    tokens, targets, segment_ids, positions   int32 [N, T]   prompt + completion, right-padded
    loss_mask                                 float32 [N, T] 1 on the completion's targets
    sampler_logps                             float32 [N, T] the sampler's log-prob per target
    advantages                                float32 [N, 1]
    row/NAME                                  float32 [N, 1] per-row statistics that the step
                                              reports as means (NaN rows are left out)

Per-row values are [N, 1], not [N], so every array shares the batch sharding's two axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtune import sharding
from jaxtune.data import global_batch
from jaxtune.hf import reward as hf_reward
from jaxtune.methods import base
from jaxtune.methods import reward as reward_method
from jaxtune.methods import rewards as rewards_lib
from jaxtune.models import decoder
from jaxtune.models import head

ROW_STATS = "row/"
RESERVED = ("prompts", "completions", "completion", "completion_ids")


def prompt_lists(prompts: dict) -> list[list[int]]:
  """Left-padded prompt_tokens / prompt_mask [P, T] -> P token lists (padding dropped)."""
  return [row[m > 0].tolist() for row, m in zip(prompts["prompt_tokens"],
                                                prompts["prompt_mask"])]


def record_fields(prompts: dict, n_gen: int) -> dict[str, list]:
  """The prompt records' columns as reward-function keyword arguments, each repeated per
  completion (TRL passes a dataset's extra columns so): `answer` (as a string) and every
  other column of the records; a record without a column gets None there. Columns named
  like the function's own arguments (RESERVED) are not passed, as in TRL.

      prompts["answers"] = ["4", None]; prompts["fields"] = [{"id": 7}, {"id": 8, "tag": "x"}]
      -> {"answer": ["4", "4", None, None], "id": [7, 7, 8, 8], "tag": [None, None, "x", "x"]}
                                                                              (n_gen = 2)
  """
  rows = prompts.get("fields") or [None] * len(prompts["prompt_tokens"])
  names = sorted({k for r in rows if r for k in r} - set(RESERVED))
  out = {k: [(r or {}).get(k) for r in rows for _ in range(n_gen)] for k in names}
  answers = prompts.get("answers")
  if answers is not None:
    out["answer"] = [a for a in answers for _ in range(n_gen)]
  return out


def assemble(prompt_ids: list[list[int]], completions: list[list[int]],
             completion_logps: list[list[float]], *, seq_len: int, pad_id: int) -> dict:
  """Rows of prompt + completion as a next-token batch; see the module docstring."""
  n = len(prompt_ids)
  out = {k: np.zeros((n, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids",
                                                       "positions")}
  out["tokens"][:] = pad_id
  out["loss_mask"] = np.zeros((n, seq_len), np.float32)
  out["sampler_logps"] = np.zeros((n, seq_len), np.float32)
  for i, (p, c, lp) in enumerate(zip(prompt_ids, completions, completion_logps)):
    seq = list(p) + list(c)
    if len(seq) < 2 or not p:  # an empty (padding) prompt row trains nothing
      continue
    if len(seq) - 1 > seq_len:
      raise ValueError(f"rollout row {i}: prompt {len(p)} + completion {len(c)} tokens do not "
                       f"fit data.seq_len + grpo.max_new_tokens = {seq_len + 1}")
    m = len(seq) - 1
    out["tokens"][i, :m] = seq[:-1]
    out["targets"][i, :m] = seq[1:]
    out["segment_ids"][i, :m] = 1
    out["positions"][i, :m] = np.arange(m)
    out["loss_mask"][i, len(p) - 1:m] = 1.0  # targets that are completion tokens
    out["sampler_logps"][i, len(p) - 1:m] = np.asarray(lp, np.float32)
  return out


def advantages(reward: np.ndarray, group: int, scale: str) -> tuple[np.ndarray, dict]:
  """(advantages [N], rollout statistics) from rewards [N] in groups of `group` consecutive.

  scale: "group" divides by each group's (unbiased) std + 1e-4 (GRPO; TRL's default),
  "batch" by the whole batch's std, "none" only centres (Dr. GRPO).
  """
  r = reward.reshape(-1, group).astype(np.float64)  # [P, G]
  centred = r - r.mean(axis=1, keepdims=True)
  std = r.std(axis=1, ddof=1, keepdims=True) if group > 1 else np.zeros_like(r[:, :1])
  if scale == "group":
    centred = centred / (std + 1e-4)
  elif scale == "batch":
    centred = centred / (r.std(ddof=1 if r.size > 1 else 0) + 1e-4)
  stats = {"reward_std": float(np.mean(std)),
           "frac_reward_zero_std": float(np.mean(std[:, 0] == 0))}
  return centred.reshape(-1).astype(np.float32), stats


def add_row_stats(batch: dict, adv: np.ndarray, stats: dict) -> None:
  """advantages and every statistic as [N, 1] rows (scalars broadcast, NaN kept)."""
  n = batch["tokens"].shape[0]
  batch["advantages"] = adv.reshape(n, 1)
  for k, v in stats.items():
    v = np.broadcast_to(np.asarray(v, np.float32), (n,)).reshape(n, 1)
    batch[ROW_STATS + k] = np.ascontiguousarray(v)


def split(batch: dict, parts: int) -> list[dict]:
  """Rows a::parts (as the step's micro-batches do), each a dict of the same keys."""
  return [{k: v[a::parts] for k, v in batch.items()} for a in range(parts)]


def trainer_logps(ctx: base.Context, params, batch: dict) -> np.ndarray:
  """The trainer's own log-probs [N, T] of the batch's targets (old log-probs), each device
  scoring its own rows (attention kernels and the chunked head per device, as in training)."""
  fn = _logps_fn(ctx.model_cfg, ctx.mesh)
  arrays = {k: batch[k] for k in ("tokens", "targets", "segment_ids", "positions")}
  out = fn(params, global_batch.to_global(arrays, sharding.batch_sharding(ctx.mesh)))
  return np.asarray(jax.device_get(out)) * batch["loss_mask"]


_LOGPS_CACHE: dict = {}


def _logps_fn(model_cfg, mesh):
  if (model_cfg, mesh) not in _LOGPS_CACHE:
    constrain = sharding.constrainer(mesh)

    def fn(params, b):
      h = base.hidden(model_cfg, params, b, constrain)
      return head.token_logprobs(model_cfg, params, h, b["targets"], constrain=constrain)
    _LOGPS_CACHE[(model_cfg, mesh)] = jax.jit(fn)
  return _LOGPS_CACHE[(model_cfg, mesh)]


@dataclasses.dataclass
class Scorer:
  """Rewards for completions: the weighted reward functions plus, with grpo.reward_model,
  a learned reward model scored in-engine (its tokenizer must be the policy's)."""
  fns: rewards_lib.Rewards | None
  eos: tuple[int, ...]
  model: Any = None  # (cfg, params, head) of the reward model on the mesh
  mesh: Any = None

  @classmethod
  def build(cls, ctx: base.Context) -> "Scorer":
    g = ctx.cfg.grpo
    fns = rewards_lib.build(g, g.max_new_tokens) if g.reward_fns else None
    model = None
    if g.reward_model:
      cfg, params, score_head = hf_reward.load(g.reward_model, ctx.cfg.model)
      tied = dataclasses.replace(cfg, tie_word_embeddings=True)
      params = jax.device_put(params, sharding.tree_shardings(ctx.mesh, decoder.axes(tied),
                                                              params))
      model = (tied, params, jax.device_put(score_head, sharding.replicated(ctx.mesh)))
    return cls(fns=fns, eos=tuple(ctx.model_cfg.eos_token_id), model=model, mesh=ctx.mesh)

  def stopped(self, completion: list[int]) -> bool:
    return bool(completion) and completion[-1] in self.eos

  def __call__(self, tokenizer, prompt_ids, completions, fields) -> tuple[np.ndarray, dict]:
    """(total reward [N] float32, {name: [N]}) for the N completions."""
    n = len(completions)
    total, each = np.zeros(n, np.float32), {}
    if self.fns is not None:
      prompts = [tokenizer.decode(p, skip_special_tokens=True) for p in prompt_ids]
      texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
      total, each = self.fns(prompts, texts, completion_ids=completions,
                             **{k: v for k, v in fields.items() if v is not None})
    if self.model is not None:
      scores = self._model_scores(prompt_ids, completions)
      total = total + scores
      each["reward_model"] = scores
    return total, each

  def _model_scores(self, prompt_ids, completions) -> np.ndarray:
    cfg, params, score_head = self.model
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completions)]
    t = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)], seg[i, :len(s)] = s, 1
    out = _score_fn(cfg)(params, score_head, jnp.asarray(tokens), jnp.asarray(seg))
    return np.asarray(jax.device_get(out), np.float32)


_SCORE_CACHE: dict = {}


def _score_fn(cfg):
  if cfg not in _SCORE_CACHE:
    _SCORE_CACHE[cfg] = jax.jit(lambda p, h, t, s: reward_method.score(cfg, p, h, t, s))
  return _SCORE_CACHE[cfg]
