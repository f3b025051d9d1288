"""`launch/train.py --dry_run`: check a run's config, data and template, and say what it
would do, without loading weights or compiling anything.

    print(plan.dry_run(cfg))

runs every check a run makes before its first step that needs no weights: the config
checks (`methods.check`), the tokenizer, and the whole data pipeline (every record read,
checked, rendered with the chat template and tokenized, so a bad record or a template that
cannot train fails here, with the same one-line message). The architecture comes from the
model's config.json (or a run's checkpoint meta); parameter counts from the shapes alone
(`jax.eval_shape`). The memory line counts weights, gradients and AdamW moments (float32)
for the trainable params, not activations.

`launch/train.py --plan` compiles the step instead (`train/memory.py`); its plan dict is
printed by `report(p)` and saved by `write(p, workdir)` as WORKDIR/plan.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np

from jaxtune import checkpoint
from jaxtune import config as config_lib
from jaxtune import data as data_lib
from jaxtune import methods
from jaxtune import paths
from jaxtune import peft
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.train import setup

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def architecture(cfg: config_lib.TrainConfig, tokenizer) -> tuple[config_lib.ModelConfig, str]:
  """(model config, where it came from) without reading any weight."""
  source = cfg.model.hf_path
  if not source:
    vocab = max(cfg.model.vocab_size, len(tokenizer))
    return dataclasses.replace(cfg.model, vocab_size=vocab), "random init"
  if checkpoint.locate(source) is not None:
    meta = checkpoint.read_meta(source)
    saved = config_lib.from_dict(config_lib.ModelConfig, meta["model_config"])
    return saved, f"run {source}"
  if not os.path.exists(source) and paths.is_hub_id(source):
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    source = os.path.dirname(huggingface_hub.hf_hub_download(source, "config.json"))
  return hf_io.read_config(source, cfg.model), f"{cfg.model.hf_path}"


def _size(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def param_counts(cfg: config_lib.TrainConfig, model_cfg) -> tuple[int, int]:
  """(total model params, trainable params) from shapes (PEFT adapters when peft is on)."""
  shapes = jax.eval_shape(functools.partial(decoder.init, model_cfg), jax.random.PRNGKey(0))
  total = _size(shapes)
  if cfg.peft.method == "none":
    return total, total
  method = peft.get(cfg.peft.method)
  adapters = jax.eval_shape(lambda key: method.init(model_cfg, shapes, cfg.peft, key),
                            jax.random.PRNGKey(0))
  return total, _size(adapters.params)


def memory_line(cfg, model_cfg, total: int, trainable: int) -> str:
  weights = total * _BYTES.get(model_cfg.param_dtype, 4)
  if cfg.peft.method != "none" and peft.get(cfg.peft.method).quantized_base:
    weights = total * 0.53  # 4-bit codes + block scales (projections; an upper bound)
  train = trainable * 4 * 3  # float32 gradients + AdamW's two moments
  devices = jax.device_count()
  return (f"weights {gib(weights)} + gradients and AdamW {gib(train)} = "
          f"{gib(weights + train)}, about {gib((weights + train) / devices)} per device on "
          f"{devices} device(s) when sharded (activations not included: --plan compiles the "
          "step and counts them)")


def dry_run(cfg: config_lib.TrainConfig) -> str:
  """Runs the checks (raising the run's own one-line errors) and returns the plan text."""
  cfg = config_lib.resolve_paths(cfg)
  method = methods.check(cfg)
  tokenizer = data_lib.tokenizer_from_config(cfg)
  ds = data_lib.build(cfg.data, tokenizer, kind=method.data_kind,
                      process_index=jax.process_index(), process_count=jax.process_count())
  steps_from = "train.max_steps"
  if cfg.train.epochs > 0:
    cfg, steps_from = setup.with_epochs(cfg, method, ds), f"train.epochs={cfg.train.epochs}"
  model_cfg, source = architecture(cfg, tokenizer)
  total, trainable = param_counts(cfg, model_cfg)
  rows, batch = ds.stats["rows_per_epoch"], cfg.data.batch_size
  per_epoch = max(1, math.ceil(rows / batch))
  tokens = batch * cfg.data.seq_len * (2 if method.data_kind == "preference" else 1)
  lines = [
      "dry run: config, tokenizer, data and chat template checked; nothing was trained",
      f"  method     {cfg.method} (data kind {method.data_kind}), peft {cfg.peft.method}",
      f"  model      {model_cfg.family}: {model_cfg.num_layers} layers, hidden "
      f"{model_cfg.hidden_size}, vocab {model_cfg.vocab_size}, {total:,} params ({source})",
      f"  trainable  {trainable:,} params ({100 * trainable / max(total, 1):.2f}%)",
      f"  per step   {batch} rows x {cfg.data.seq_len} tokens = {tokens:,} tokens "
      f"(grad_accum {cfg.optim.grad_accum})",
      f"  steps      {cfg.train.max_steps} ({steps_from}); an epoch is {rows} rows = "
      f"{per_epoch} steps, so {cfg.train.max_steps / per_epoch:.2f} epochs",
      f"  memory     {memory_line(cfg, model_cfg, total, trainable)}",
  ]
  lines += ["  " + line for line in data_lib.summary(ds.stats).splitlines()]
  return "\n".join(lines)


def gib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


_NOTES = {
    "params": "weights the step reads (the frozen base and the trainable leaves)",
    "reference": "frozen copies (a DPO reference)",
    "optimizer": "AdamW moments and counts",
    "gradients": "estimate: trainable leaves (+ float32 sums with accumulation)",
    "batch": "the global batch's rows on this device",
    "activations": "XLA temporaries minus the gradients: activations, workspaces",
}


CATEGORIES = ("params", "reference", "optimizer", "gradients", "batch", "activations")


def report(p: dict) -> str:
  """The plan as text (what --plan prints and the log shows)."""
  m = p["model"]
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  lines = [
      f"plan: method {p['method']}, peft {p['peft']}, {m['family']} {m['layers']} layers "
      f"hidden {m['hidden']} ({m['params']:,} params, {m['param_dtype']} weights, {m['dtype']} "
      f"compute, remat {m['remat']}"
      f"{' (model.remat=auto)' if p.get('remat_setting') == 'auto' else ''}"
      f"); mesh {mesh} over {p['devices']} x {p['device_kind']}",
      f"  batch      {p['batch_size']} rows x {p['seq_len']} tokens = micro-batch "
      f"{p['micro_batch']} x grad_accum {p['grad_accum']}"
      + (" (train.micro_batch=auto)" if p["micro_batch_setting"] == "auto" else ""),
      "  per device (compiled train step, XLA memory analysis):"]
  for k in CATEGORIES:
    lines.append(f"    {k:<12}{gib(p['per_device'][k]):>12}  {_NOTES[k]}")
  limit = f" of {gib(p['limit'])} ({p['total'] / p['limit']:.0%})" if p["limit"] else ""
  lines.append(f"    {'total':<12}{gib(p['total']):>12}{limit}: {p['verdict']}")
  for e in p["tried"]:
    lines.append(f"  tried      micro-batch {e['micro_batch']} (grad_accum {e['grad_accum']}): "
                 f"{gib(e['total'])} -> {'fits' if e['fits'] else 'too big'}")
  for e in p.get("remat_tried", []):
    at = (f" at micro-batch {e['micro_batch']}: {gib(e['total'])}" if "total" in e
          else ": no micro-batch")
    lines.append(f"  tried      model.remat={e['remat']}{at} -> "
                 f"{'fits' if e['fits'] else 'too big'}")
  return "\n".join(lines)


def resolved_line(p: dict, path: str) -> str:
  """The one line a run prints when the planner set train.micro_batch or model.remat."""
  parts = []
  if p["micro_batch_setting"] == "auto":
    parts.append(f"train.micro_batch=auto: micro-batch {p['micro_batch']} x grad_accum "
                 f"{p['grad_accum']} = data.batch_size {p['batch_size']}")
  if p.get("remat_setting") == "auto":
    parts.append(f"model.remat=auto: {p['model']['remat']}")
  limit = f" of {gib(p['limit'])}" if p["limit"] else " (no device limit known)"
  return (f"{'; '.join(parts)}; predicted peak {gib(p['total'])} per device{limit} "
          f"(plan in {path})")


def write(p: dict, workdir: str) -> str:
  """WORKDIR/plan.json (process 0 only); returns its path."""
  path = os.path.join(workdir, "plan.json")
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(p, f, indent=1)
    os.replace(tmp, path)
  return path
