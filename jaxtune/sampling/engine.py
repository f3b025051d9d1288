"""The compiled sampler: a jitted prefill, then a `lax.while_loop` of decode steps.

`start` runs the prompts through the decoder once (`decoder.cached_hidden_states`,
prefill=True), filling a KV cache allocated for the whole generation (`models/cache.py`), and
picks each row's first token. `advance` then runs decode steps, one token per row each,
inside one `lax.while_loop` whose state (cache included) is donated, so the cache is updated
in place and never copied. The loop checks whether every row has stopped once per `chunk`
steps (an inner loop of fixed trip count runs between checks, so the device does not wait
for the host every token), and returns when every row has stopped or at `stop_at`, so a
caller can stream: `advance` again from where it stopped.

Shapes are bucketed (`make_plan`): rows, prompt columns and new-token columns round up to
powers of two, so a few programs serve every request; each is traced once per bucket and
says so in a log line ("sampling: compiling ..."). `TRACES` counts the traces.

State (B rows, P prompt columns, N token columns + 1 scratch column, S cache slots):

    kv        cache.KVCache            the keys and values of every layer (a mixed-window
                                       model's sliding layers: a ring of `local_slots`)
    tokens    [B, N + 1] int32         new tokens; column t is the t-th new token
    logprobs  [B, N + 1] float32       their log-probabilities (see select.py)
    step      [] int32                 columns written so far (the same for every row)
    done      [B] bool                 row has emitted an eos id or reached its limit
    count     [B] int32                tokens the row keeps (up to and including its eos)
    lengths, limit [B] int32; keys [B, 2] uint32; temperature, top_p, min_p [B] float32;
    eos [E] int32 (-1 = unused)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxtune import config as config_lib
from jaxtune import sharding
from jaxtune import tree
from jaxtune.models import cache
from jaxtune.models import decoder
from jaxtune.models import fused
from jaxtune.models import head
from jaxtune.models import layer_pattern
from jaxtune.models import moe
from jaxtune.sampling import select

log = logging.getLogger("jaxtune.sampling")

TRACES: collections.Counter = collections.Counter()  # "prefill" / "decode" -> times traced

MIN_PROMPT = 8  # smallest prompt bucket


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static shapes and switches of one compiled sampler program."""
  batch: int  # B rows
  prompt: int  # P prompt columns (prompts are left-padded to it)
  new: int  # N new-token columns
  slots: int  # S cache slots (V + P + N, or the sliding window of a uniform model)
  chunk: int  # decode steps between checks of "every row stopped"
  eos: int  # E eos-id slots
  mode: select.Mode
  virtual: int = 0  # V prompt-tuning tokens in front of every prompt (cache columns)
  local_slots: int = 0  # a mixed-window model's sliding layers' ring (0: none; cache.py)
  fuse: bool = True  # decode with q|k|v and gate|up fused (models/fused.py)


@dataclasses.dataclass(frozen=True)
class Row:
  """One sequence to continue: its prompt ids, budget and sampling settings."""
  prompt: list[int]
  max_new: int
  temperature: float = 1.0
  top_p: float = 1.0
  min_p: float = 0.0
  key: np.ndarray | None = None  # uint32 [2] PRNG key of this row (None: zeros)


def bucket(n: int, minimum: int = 1) -> int:
  """The power of two >= max(n, minimum)."""
  n = max(int(n), minimum, 1)
  return 1 << (n - 1).bit_length()


def make_plan(cfg: config_lib.ModelConfig, rows: list[Row], *, top_k: int = 0,
              num_eos: int = 1, chunk: int = 16, min_rows: int = 1,
              min_prompt: int = MIN_PROMPT, virtual: int = 0) -> Plan:
  """The bucketed plan for `rows`; min_rows / min_prompt raise the smallest buckets (a
  server that sees many sizes compiles fewer programs)."""
  batch = bucket(len(rows), min_rows)
  prompt = bucket(max(len(r.prompt) for r in rows), min_prompt)
  new = bucket(max(r.max_new for r in rows))
  mode = select.Mode(sample=any(r.temperature > 0 for r in rows), top_k=int(top_k),
                     top_p=any(r.top_p < 1.0 for r in rows),
                     min_p=any(r.min_p > 0.0 for r in rows))
  if not mode.sample:
    mode = select.Mode()
  num_slots, local = cache.slots(cfg, virtual + prompt + new, virtual)
  return Plan(batch=batch, prompt=prompt, new=new, slots=num_slots, local_slots=local,
              chunk=min(chunk, new), eos=bucket(num_eos), mode=mode, virtual=virtual)


def _spec(mesh, axes, shape):
  return NamedSharding(mesh, sharding.spec(axes, shape, mesh))


def inputs(plan: Plan, rows: list[Row], eos_ids, mesh=None) -> dict:
  """Host arrays for `_prefill` (rows padded to plan.batch), placed on `mesh` if given."""
  b, p = plan.batch, plan.prompt
  tokens = np.zeros((b, p), np.int32)
  lengths = np.ones(b, np.int32)
  limit = np.zeros(b, np.int32)  # padding rows: done at once
  keys = np.zeros((b, 2), np.uint32)
  temp, top_p, min_p = np.zeros(b, np.float32), np.ones(b, np.float32), np.zeros(b, np.float32)
  for i, r in enumerate(rows):
    n = len(r.prompt)
    tokens[i, p - n:] = r.prompt
    lengths[i], limit[i] = n, r.max_new
    temp[i], top_p[i], min_p[i] = r.temperature, r.top_p, r.min_p
    if r.key is not None:
      keys[i] = np.asarray(r.key, np.uint32).reshape(2)
  eos = np.full(plan.eos, -1, np.int32)
  eos[:len(eos_ids)] = list(eos_ids)
  out = dict(tokens=tokens, lengths=lengths, limit=limit, keys=keys, temperature=temp,
             top_p=top_p, min_p=min_p, eos=eos)
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in out.items()}
  return {k: jax.device_put(v, _spec(mesh, ("batch",) + (None,) * (v.ndim - 1), v.shape)
                            if k != "eos" else sharding.replicated(mesh))
          for k, v in out.items()}


def _logits(cfg: config_lib.ModelConfig, params: dict, h):
  """float32 logits [B, V] of h [B, 1, D], the projection written in the activation dtype
  (`head.logits`' product_dtype: a bf16 model's logits are bf16-rounded, as in HF)."""
  return head.logits(cfg, params, h, product_dtype=decoder.DTYPES[cfg.dtype])[:, 0]


def _pick(plan: Plan, logits, state: dict, step):
  """Tokens and log-probs [B] for column `step` from logits [B, V]."""
  keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state["keys"], step)
  return select.pick(logits, keys, state["temperature"], state["top_p"], state["min_p"],
                     mode=plan.mode)


def _prefill(cfg: config_lib.ModelConfig, plan: Plan, mesh, params: dict, inp: dict) -> dict:
  TRACES["prefill"] += 1
  log.info("sampling: compiling prefill for %d rows x %d prompt columns, %d new-token "
           "columns, %d cache slots%s, %s", plan.batch, plan.prompt, plan.new, plan.slots,
           _ring_note(plan), plan.mode)
  constrain = sharding.constrainer(mesh)
  b, p = plan.batch, plan.prompt
  cols = jnp.arange(p, dtype=jnp.int32)[None] - (p - inp["lengths"][:, None])  # [B, P]
  kv = cache.init(cfg, b, plan.slots, decoder.DTYPES[cfg.dtype], plan.local_slots)
  v = plan.virtual  # prompt tuning: V virtual tokens at positions 0..V-1, the prompt after
  full = jnp.concatenate([jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), (b, v)),
                          jnp.where(cols >= 0, cols + v, -1)], axis=1)  # [B, V + P]
  kv = cache.set_prefill_positions(kv, full)
  kv = cache.constrain(kv, constrain)
  h, kv = decoder.cached_hidden_states(
      cfg, params, inp["tokens"], kv, positions=jnp.maximum(cols, 0),
      segment_ids=(cols >= 0).astype(jnp.int32), prefill=True, constrain=constrain)
  logits = _logits(cfg, params, h[:, -1:])  # [B, V]: the last prompt column
  state = dict(inp, kv=kv, step=jnp.ones((), jnp.int32))
  del state["tokens"]
  tok, lp = _pick(plan, logits, state, jnp.zeros((), jnp.int32))
  state["tokens"] = jnp.zeros((b, plan.new + 1), jnp.int32).at[:, 0].set(tok)
  state["logprobs"] = jnp.zeros((b, plan.new + 1), jnp.float32).at[:, 0].set(lp)
  state["done"] = _is_eos(tok, inp["eos"]) | (inp["limit"] <= 1)
  state["count"] = jnp.ones((b,), jnp.int32)
  return state


def _ring_note(plan: Plan) -> str:
  return f" ({plan.local_slots} in sliding layers)" if plan.local_slots else ""


def _is_eos(tok, eos):
  return jnp.any(tok[:, None] == eos[None, :], axis=-1)


def _step(cfg: config_lib.ModelConfig, plan: Plan, constrain, params: dict, s: dict) -> dict:
  """One decode step: the token of column step - 1 in, the token of column step out."""
  t = s["step"]
  prev = jax.lax.dynamic_index_in_dim(s["tokens"], t - 1, axis=1, keepdims=False)  # [B]
  qpos = s["lengths"] + plan.virtual + t - 1  # [B]
  column = plan.virtual + plan.prompt + t - 1  # each cache group's slot: column mod its S
  kv = cache.write_positions(s["kv"], column, qpos)
  h, kv = decoder.cached_hidden_states(cfg, params, prev[:, None], kv, positions=qpos[:, None],
                                       column=column, prefill=False, constrain=constrain)
  logits = _logits(cfg, params, h)  # [B, V]
  tok, lp = _pick(plan, logits, s, t)
  zero = jnp.zeros((), jnp.int32)
  out = dict(s, kv=cache.constrain(kv, constrain), step=t + 1)
  out["tokens"] = jax.lax.dynamic_update_slice(s["tokens"], tok[:, None], (zero, t))
  out["logprobs"] = jax.lax.dynamic_update_slice(s["logprobs"], lp[:, None], (zero, t))
  out["count"] = jnp.where(s["done"], s["count"], t + 1)
  out["done"] = s["done"] | _is_eos(tok, s["eos"]) | (t + 1 >= s["limit"])
  return out


def _fusable(cfg: config_lib.ModelConfig) -> bool:
  """Layers whose params `fused.fuse_layer` may extend: unrolled, or scanned as one uniform
  stack (layer patterns and mixed dense/MoE stacks slice their layers themselves)."""
  return not cfg.scan_layers or (layer_pattern.uniform(cfg) and not moe.is_mixed(cfg))


def _outputs_whole(cfg: config_lib.ModelConfig, mesh) -> bool:
  """True when no part of a fused group has its output (last) dim split on `mesh`."""
  if mesh is None:
    return True
  axes, shapes = tree.flatten(decoder.axes(cfg)), decoder.shapes(cfg)
  paths = [f"layers/{g}/{p}/kernel" for g, _, parts in fused.GROUPS for p in parts]
  return all(sharding.spec(axes[p], shapes[p], mesh)[-1] is None for p in paths if p in shapes)


def _decode(cfg: config_lib.ModelConfig, plan: Plan, mesh, params: dict, state: dict,
            stop_at: jax.Array) -> dict:
  TRACES["decode"] += 1
  # Side-by-side projections (models/fused.py), joined once here: a transient copy of those
  # weights. Not when a part's output dim is split (a 'tensor' axis), whose shards of the
  # parts would not line up.
  fuse = plan.fuse and _fusable(cfg) and _outputs_whole(cfg, mesh)
  log.info("sampling: compiling decode for %d rows, %d cache slots%s, %d steps per check%s",
           plan.batch, plan.slots, _ring_note(plan), plan.chunk,
           ", fused projections" if fuse else "")
  constrain = sharding.constrainer(mesh)
  if not cfg.scan_layers:  # slice each layer's weights once, not once per token
    per_layer = decoder.split_layers(cfg, params["layers"])
    if fuse:
      per_layer = tuple(fused.fuse_layer(layer) for layer in per_layer)
    params = dict(params, layers=per_layer)
  elif fuse:  # stacked [L, ...]: joined along the same last axis
    params = dict(params, layers=fused.fuse_layer(params["layers"]))
  step = functools.partial(_step, cfg, plan, constrain, params)

  def cond(s):
    return (s["step"] < jnp.minimum(stop_at, plan.new)) & ~jnp.all(s["done"])

  def body(s):
    return jax.lax.fori_loop(0, plan.chunk, lambda _, x: step(x), s)

  return jax.lax.while_loop(cond, body, state)


_prefill_jit = jax.jit(_prefill, static_argnums=(0, 1, 2))
_decode_jit = jax.jit(_decode, static_argnums=(0, 1, 2), donate_argnums=(4,))


def start(cfg: config_lib.ModelConfig, params: dict, plan: Plan, rows: list[Row], eos_ids,
          *, mesh=None) -> dict:
  """Prefill: the state after each row's first new token (column 0)."""
  return _prefill_jit(cfg, plan, mesh, params, inputs(plan, rows, eos_ids, mesh))


def advance(cfg: config_lib.ModelConfig, params: dict, plan: Plan, state: dict, stop_at: int,
            *, mesh=None) -> dict:
  """Decode until every row stopped or `stop_at` columns exist (rounded up to a chunk).

  `state` is donated: use the returned one."""
  return _decode_jit(cfg, plan, mesh, params, state, jnp.asarray(stop_at, jnp.int32))


def fused_bytes(cfg: config_lib.ModelConfig, params: dict) -> int:
  """Bytes per device of the entries `fused.fuse_layer` would add (0: nothing joins, e.g. a
  4-bit base or another adapter kind), found by abstract evaluation: nothing is built."""
  def added(stacked):
    per_layer = decoder.split_layers(cfg, stacked) if not cfg.scan_layers else (stacked,)
    out = [fused.fuse_layer(layer) for layer in per_layer]
    return [o[g][n] for o in out for g, n, _ in fused.GROUPS if n in o.get(g, {})]

  shapes = jax.tree_util.tree_leaves(jax.eval_shape(added, params["layers"]))
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in shapes)
  arrays = [x for x in jax.tree_util.tree_leaves(params["layers"]) if isinstance(x, jax.Array)]
  whole = sum(x.nbytes for x in arrays)
  local = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
              for x in arrays)
  return int(total * local / whole) if whole else total


def _free_bytes() -> int | None:
  """Free memory of the first local device, or None where the backend does not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def fit_fuse(cfg: config_lib.ModelConfig, params: dict, plan: Plan) -> Plan:
  """`plan` with fused projections only where some projections join and their transient
  copy takes at most half the free device memory (an 8B model's is ~14 GB in bf16: kept
  on a large GPU, dropped on a full one). Called once per generation, after the prefill
  has allocated the cache, so the free memory counts it."""
  if not plan.fuse or not _fusable(cfg):
    return plan
  need = fused_bytes(cfg, params)
  free = _free_bytes()
  if need and (free is None or need <= free // 2):
    return plan
  if need:
    log.info("sampling: decoding without fused projections (their copy, %.1f GiB, is more "
             "than half the free %.1f GiB)", need / 2**30, free / 2**30)
  return dataclasses.replace(plan, fuse=False)


def finished(state: dict) -> bool:
  """True when every row has stopped (one small device-to-host read)."""
  return bool(jax.device_get(jnp.all(state["done"])))


def read(state: dict) -> dict:
  """Host copies of what the rows produced: tokens, logprobs [B, N + 1], count, done [B],
  step."""
  keys = ("tokens", "logprobs", "count", "done", "step")
  return {k: np.asarray(v) for k, v in jax.device_get({k: state[k] for k in keys}).items()}
