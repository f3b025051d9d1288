"""The resume guard: a workdir's checkpoint continues only the run that wrote it.

Before anything is restored, the checkpoint's meta (resolved config + input identities) is
compared with the current run, in two phases:

    phase 1, before data or weights (seconds)      phase 2, after they are built
    config keys (flattened "peft.alpha" ...)        data.train_files / data.eval_files:
    model.hf_path: path + content digest              content digests, in order
                                                    data.tokenizer, data.chat_template:
                                                      content digests
                                                    model.*: the resolved architecture

A changed key that alters what the run trains is refused with ONE line naming each key
with old -> new (config.ConfigError, so the launcher exits 2):

    error: cannot resume runs/x (checkpoint step 8): peft.alpha 16.0 -> 64.0; ... use a new
    --workdir, or --allow_changed=peft.alpha to continue anyway

Safe keys proceed (logged): train.max_steps / log_every / eval_every / eval_batches /
early_stopping_patience / max_skipped / progress, checkpoint.*, mesh.* (restoring onto
another mesh or device count works: orbax reshards into the current shardings), the compute
options model.dtype / remat / attention / scan_layers / logits_chunk / logits_dtype /
moe_impl, the micro-batching keys optim.grad_accum / train.micro_batch / device_memory_gib /
memory_margin (accumulation gives the full-batch update, so a planner that picks another
micro-batch on another machine changes nothing but rounding), train.epochs (like
train.max_steps: the run's length), data.streaming / cache_dir / workers (how the same
examples are read: the batches are identical), and the config sections of methods the run
does not use. Every other key (architecture, base weights, peft.*, optim.*, data.*,
train.seed, the method and its section, ...) is meaning-changing, including keys added
later: unknown means guarded. `allow_changed=("peft.alpha", "data")` (keys or whole
sections) lets those through; each allowed change is recorded in the meta under
"allowed_changes" (step, key, old, new).

The base weights' identity is a SAMPLED content digest, not a full hash (a 140 GB model
would take minutes to hash): per weights file (sorted), its size and the sha256 of its
first, middle and last MiB (a safetensors header, with every tensor's name, dtype, shape
and offsets, is in the first MiB). Copies and moves of the same files keep the digest;
different weights of the same architecture change it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

from jaxtune import checkpoint as checkpoint_lib
from jaxtune import config as config_lib
from jaxtune import weights
from jaxtune.hf import io as hf_io

_log = logging.getLogger("jaxtune")

# Compute options (weights.COMPUTE_OPTIONS) other than the base weights (model.hf_path,
# compared by content) and the master weights' precision (model.param_dtype, meaning).
_COMPUTE_KEYS = tuple(f"model.{k}" for k in weights.COMPUTE_OPTIONS
                      if k not in ("hf_path", "param_dtype"))
SAFE_KEYS = ("train.max_steps", "train.log_every", "train.eval_every", "train.eval_batches",
             "train.early_stopping_patience", "train.max_skipped", "train.progress",
             *_COMPUTE_KEYS, "optim.grad_accum", "train.micro_batch",
             "train.device_memory_gib", "train.memory_margin", "train.epochs",
             "data.streaming", "data.cache_dir", "data.workers")
SAFE_SECTIONS = ("checkpoint", "mesh")
CORE_SECTIONS = ("method", "model", "peft", "optim", "mesh", "data", "train", "checkpoint")
# Compared by content in phase 2 (or, for model.hf_path, by digest in phase 1).
CONTENT_KEYS = ("model.hf_path", "data.train_files", "data.eval_files", "data.tokenizer",
                "data.chat_template")
_MIB = 1 << 20


class ResumeError(config_lib.ConfigError):
  """The workdir's checkpoint belongs to a different run (or does not fit this one)."""


def flatten(d: dict, prefix: str = "") -> dict:
  """{"peft": {"alpha": 8}, "model": {"eos": (2,)}} -> {"peft.alpha": 8, "model.eos": [2]}
  (values as JSON sees them, so a saved meta and a live config compare equal)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v))
  return out


def _sampled_digest(path: str) -> str:
  size = os.path.getsize(path)
  h = hashlib.sha256(str(size).encode())
  with open(path, "rb") as f:
    for offset in sorted({0, max(size // 2 - _MIB // 2, 0), max(size - _MIB, 0)}):
      f.seek(offset)
      h.update(f.read(_MIB))
  return h.hexdigest()


def _weight_files(path: str) -> list[str]:
  """The files that hold a model dir's weights (HF: *.safetensors + config.json; a jaxtune
  run or converted dir: its latest checkpoint's files)."""
  if checkpoint_lib.is_run(path):
    ckdir = os.path.join(path, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckdir) if s.isdigit())
    if not steps:
      return []
    root = os.path.join(ckdir, str(steps[-1]))
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
  names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  names += ["config.json"] if os.path.exists(os.path.join(path, "config.json")) else []
  return [os.path.join(path, f) for f in names]


def weights_identity(source: str) -> dict:
  """{"source", "path", "digest"} of `model.hf_path` ({} for a random init: train.seed
  and the architecture keys identify it)."""
  if not source:
    return {}
  path = os.path.abspath(hf_io.resolve(source))
  h = hashlib.sha256()
  for f in _weight_files(path):
    h.update(_sampled_digest(f).encode())
  return {"source": source, "path": path, "digest": h.hexdigest()}


class _Text(str):
  """A description (not a config value): printed without quotes."""


def _short(v, limit: int = 80) -> str:
  """A config value for a message, cut to `limit`; a description (`_Text`: a path and its
  content digest) is never cut, or a long path would hide the digest that differs."""
  if isinstance(v, _Text):
    return str(v)
  s = repr(v) if isinstance(v, str) else str(v)
  return s if len(s) <= limit else s[:limit - 3] + "..."


def _section(key: str) -> str:
  return key.split(".", 1)[0]


def is_safe(key: str, method: str) -> bool:
  """True for keys whose change keeps the run's meaning (see the module docstring)."""
  sec = _section(key)
  if key in SAFE_KEYS or sec in SAFE_SECTIONS:
    return True
  return sec not in CORE_SECTIONS and sec != method  # another method's section: unused


def _arch_keys(model: dict) -> set[str]:
  return {f"model.{k}" for k in model} - {f"model.{k}" for k in weights.COMPUTE_OPTIONS}


def _canonical(cfg_dict: dict) -> dict:
  """A saved config dict with today's defaults filled in (legacy layouts migrated)."""
  try:
    return config_lib.to_dict(config_lib.from_dict(config_lib.TrainConfig, cfg_dict))
  except (config_lib.ConfigError, TypeError):
    return cfg_dict


def config_changes(old: dict, new: dict, old_identity: dict, new_identity: dict) -> list:
  """[(key, old, new)] of phase 1: config keys and the base weights' identity."""
  old, new = flatten(_canonical(old)), flatten(new)
  skip = set(CONTENT_KEYS)
  if old.get("model.hf_path") and new.get("model.hf_path"):
    skip |= _arch_keys({k[6:]: v for k, v in new.items() if k.startswith("model.")})
  if old.get("peft.method") == new.get("peft.method") == "none":
    skip |= {k for k in new if k.startswith("peft.") and k != "peft.method"}
  changes = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
             if k not in skip and old.get(k) != new.get(k)]
  ob, nb = old_identity.get("base"), new_identity.get("base", {})
  if ob is not None:  # checkpoints from before identities: the config string was compared
    if (ob.get("digest") or "") != (nb.get("digest") or ""):
      changes.append(("model.hf_path", _ident(ob), _ident(nb)))
  elif old.get("model.hf_path") != new.get("model.hf_path") and not _same_dir(
      old.get("model.hf_path"), new.get("model.hf_path")):
    changes.append(("model.hf_path", old.get("model.hf_path"), new.get("model.hf_path")))
  return changes


def _ident(b: dict) -> str:
  return _Text(f"{b['source']} (content {b['digest'][:12]})" if b else "random init")


def _same_dir(a, b) -> bool:
  return bool(a and b and os.path.isdir(a) and os.path.isdir(b)
              and os.path.samefile(a, b))


def input_changes(saved_meta: dict, provenance: dict, model_cfg: dict) -> list:
  """[(key, old, new)] of phase 2: data, tokenizer and template content, resolved model."""
  old = saved_meta.get("provenance") or {}
  changes = []
  for part, key in (("train", "data.train_files"), ("eval", "data.eval_files")):
    a, b = old.get(part), provenance.get(part) or {}
    if a is not None and list(a.values()) != list(b.values()):
      changes.append((key, _files(a), _files(b)))
  for part in ("tokenizer", "chat_template"):
    a, b = old.get(part), provenance.get(part)
    if a is not None and a != b:
      changes.append((f"data.{part}", _Text(f"content {str(a)[:12]}"),
                      _Text(f"content {str(b)[:12]}")))
  saved_model = flatten(saved_meta.get("model_config") or {}, "model.")
  current = flatten(model_cfg, "model.")
  arch = {k for k in current if _section_key(k) in _arch_keys(model_cfg)}
  for k in sorted(arch):
    if k in saved_model and saved_model[k] != current[k]:
      changes.append((k, saved_model[k], current[k]))
  return changes


def _section_key(key: str) -> str:
  """"model.rope_scaling.factor" -> "model.rope_scaling"."""
  return ".".join(key.split(".")[:2])


def _files(parts: dict) -> str:
  return _Text("[" + ", ".join(f"{os.path.basename(str(n))}:{str(d)[:8]}"
                               for n, d in parts.items()) + "]")


def check_allow(allow: tuple[str, ...], cfg: config_lib.TrainConfig) -> tuple[str, ...]:
  """The --allow_changed keys, each a config key or a section; else a one-line error."""
  keys = set(flatten(config_lib.to_dict(cfg)))
  sections = {_section(k) for k in keys}
  out = tuple(a.strip() for a in allow if a.strip())
  bad = [a for a in out if a not in keys and a not in sections]
  if bad:
    raise config_lib.ConfigError(f"--allow_changed: unknown config key(s) {', '.join(bad)} "
                                 "(expected keys such as peft.alpha, or a section such as peft)")
  return out


def _allowed(key: str, allow) -> bool:
  return any(key == a or key.startswith(a + ".") for a in allow)


class Guard:
  """Compares a checkpoint's meta with the current run; refuses, allows or logs changes."""

  def __init__(self, directory: str, step: int, saved_meta: dict, cfg, allow=()):
    self.directory, self.step, self.saved = directory, step, saved_meta
    self.cfg, self.allow = cfg, check_allow(tuple(allow), cfg)
    self.allowed: list[dict] = []

  def _judge(self, changes: list) -> None:
    refused = []
    for key, old, new in changes:
      if is_safe(key, self.cfg.method):
        _log.info("resume: %s %s -> %s (safe)", key, _short(old), _short(new))
      elif _allowed(key, self.allow):
        _log.warning("resume: %s %s -> %s (allowed by --allow_changed)", key, _short(old),
                     _short(new))
        self.allowed.append({"step": self.step, "key": key, "old": _short(old, 200),
                             "new": _short(new, 200)})
      else:
        refused.append((key, old, new))
    if refused:
      keys = ",".join(k for k, _, _ in refused)
      what = "; ".join(f"{k} {_short(o)} -> {_short(n)}" for k, o, n in refused)
      raise ResumeError(f"cannot resume {os.path.dirname(self.directory)} (checkpoint step "
                        f"{self.step}): {what}. These change what the run trains: use a new "
                        f"--workdir, or --allow_changed={keys} to continue anyway")

  def check_config(self, identity: dict) -> None:
    """Phase 1: config keys and base weights, before data or weights are touched."""
    self._judge(config_changes(self.saved.get("config", {}), config_lib.to_dict(self.cfg),
                               self.saved.get("identity", {}), identity))

  def check_inputs(self, provenance: dict, model_cfg) -> None:
    """Phase 2: data / tokenizer / template content and the resolved architecture."""
    self._judge(input_changes(self.saved, provenance, dataclasses.asdict(model_cfg)))

  @property
  def data_allowed(self) -> bool:
    """True when a data change was allowed: the loader position is then adopted loosely."""
    return any(c["key"].startswith("data.") for c in self.allowed)

  def history(self) -> list[dict]:
    """The meta's allowed_changes: those recorded before plus this resume's."""
    return list(self.saved.get("allowed_changes", [])) + self.allowed


def restore(ckpt, step: int, abstract_state: dict):
  """ckpt.restore with a one-line ResumeError when the stored tree does not fit the run."""
  try:
    return ckpt.restore(step, abstract_state)
  except (ValueError, KeyError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ResumeError(f"cannot restore {ckpt.directory} step {step} into this run's state: "
                      f"{first[:300]}") from None
