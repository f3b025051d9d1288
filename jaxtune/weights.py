"""Every way to get a model's weights, through one function: `weights.load`.

Training, `launch/convert.py`, the distillation teacher and the coming generate / eval
launchers all load through here, so a source that works for one works for all:

    source                          what comes back
    ""                              a random init of `base` (seeded, sharded on the mesh)
    HF directory or hub id          safetensors weights (`hf.io.load_hf`, never pickles)
    jaxtune run dir / checkpoint    the trained params (full FT) or, for a PEFT run, its base
    (workdir, its checkpoints/,     (loaded the way the run loaded it) and its adapters
    or checkpoints/STEP)
    + quant=Quant(...)              projections quantized to 4 bits on the host as they load
    + adapter=PEFT_DIR              adapters read from a Hugging Face PEFT directory

    >>> w = weights.load("Qwen/Qwen2.5-0.5B", mesh=mesh, base=cfg.model)
    >>> w.model_cfg, w.params, w.adapters         # adapters: None here
    >>> w = weights.load("runs/lora")             # base + trained adapters of a LoRA run
    >>> logits = jaxtune.forward(w.model_cfg, w.params, tokens, lora=w.adapters)

Every param is placed on the mesh by its logical axes as it is read (`sharding.placer`), so
a model is never held twice; the compute options (dtype, param_dtype, remat, attention,
scan_layers, logits_chunk, logits_dtype, moe_impl) always come from `base`, the
architecture from the source.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from jaxtune import checkpoint
from jaxtune import config as config_lib
from jaxtune import peft
from jaxtune import quant as quant_lib
from jaxtune import sharding
from jaxtune.hf import io as hf_io
from jaxtune.models import decoder
from jaxtune.peft import qlora

COMPUTE_OPTIONS = ("hf_path", "dtype", "param_dtype", "remat", "attention", "scan_layers",
                   "logits_chunk", "logits_dtype", "moe_impl")


@dataclasses.dataclass(frozen=True)
class Quant:
  """4-bit quantisation of the projection kernels on load (QLoRA base, 4-bit teacher)."""
  method: str = "nf4"  # nf4 | int4
  group_size: int = 64
  double_quant: bool = False


@dataclasses.dataclass
class Weights:
  model_cfg: config_lib.ModelConfig
  params: Any  # base params on the mesh (QArray projections when quantized)
  adapters: Any = None  # PEFT adapters (a run's trained ones, or from a PEFT dir), or None
  run_cfg: config_lib.TrainConfig | None = None  # the run's config when loaded from a run
  trainable: Any = None  # a run's raw trainable tree (method-owned leaves included)
  meta: dict = dataclasses.field(default_factory=dict)  # a run's checkpoint meta


def quant_for(cfg: config_lib.TrainConfig) -> Quant | None:
  """The on-load quantisation a run's PEFT method asks for (QLoRA), else None."""
  if cfg.peft.method == "none" or not peft.get(cfg.peft.method).quantized_base:
    return None
  return Quant(cfg.peft.quant_method, cfg.peft.quant_group_size, cfg.peft.double_quant)


def load(source: str, *, mesh=None, base: config_lib.ModelConfig | None = None,
         quant: Quant | None = None, adapter: str = "", step: int | None = None,
         seed: int = 0, vocab_size: int | None = None) -> Weights:
  """Loads `source` (see the module docstring) onto `mesh` (default: one device).

  base: compute options (and, for a random init, the architecture); default: a run's own
  options for a run, else ModelConfig()'s. seed / vocab_size: random init only. step: a
  run's checkpoint step (default: the latest).
  """
  mesh = mesh or sharding.make_mesh(config_lib.MeshConfig(), jax.devices()[:1])
  if not source:
    w = Weights(*_random(base or config_lib.ModelConfig(), mesh, seed=seed,
                         vocab_size=vocab_size))
    w.params = _quantize(w.params, quant, w.model_cfg, mesh)
  elif (run := checkpoint.locate(source)) is not None:  # workdir, checkpoints dir, step dir
    w = _from_run(run[0], mesh, base, step if step is not None else run[1], quant)
  else:  # quantized on the host as it loads
    w = Weights(*_from_hf(source, mesh, base or config_lib.ModelConfig(), quant))
  if adapter:
    if w.adapters is not None:
      raise ValueError(f"{source} already carries adapters; do not pass adapter={adapter}")
    w.adapters = peft.load_peft(w.model_cfg, adapter)
  return w


def with_compute_options(model_cfg: config_lib.ModelConfig,
                         base: config_lib.ModelConfig) -> config_lib.ModelConfig:
  """model_cfg's architecture with the compute options (dtype, remat, ...) of `base`."""
  return dataclasses.replace(model_cfg, **{k: getattr(base, k) for k in COMPUTE_OPTIONS})


def _random(base, mesh, *, seed: int, vocab_size: int | None):
  model_cfg = base
  if vocab_size is not None and vocab_size != base.vocab_size:
    model_cfg = dataclasses.replace(base, vocab_size=vocab_size)
  init = functools.partial(decoder.init, model_cfg)
  key = jax.random.PRNGKey(seed)
  shardings = sharding.tree_shardings(mesh, decoder.axes(model_cfg), jax.eval_shape(init, key))
  return model_cfg, jax.jit(init, out_shardings=shardings)(key)


def _from_hf(source: str, mesh, base, quant: Quant | None):
  model_dir = hf_io.resolve(source)
  model_cfg = hf_io.read_config(model_dir, base)
  place = sharding.placer(mesh, decoder.axes(model_cfg))
  if quant is not None:
    place = qlora.quantizing_place(method=quant.method, group_size=quant.group_size,
                                   double_quant=quant.double_quant, place=place)
  return hf_io.load_hf(model_dir, decoder.DTYPES[base.param_dtype], base=base, place=place)


def _quantize(params, quant: Quant | None, model_cfg, mesh):
  """params on the device with the projections quantized, each QArray child placed by the
  kernel's logical axes (`quant.axes_for`), as a quantizing load places it (the compiler's
  own choice for a small scales dim could differ from the planner's)."""
  if quant is None:
    return params
  q = qlora.quantize_params(params, method=quant.method, group_size=quant.group_size,
                            double_quant=quant.double_quant)
  axes = quant_lib.tree_axes(q, _axes(model_cfg, params))
  return jax.device_put(q, sharding.tree_shardings(mesh, axes, q))


def _from_run(source: str, mesh, base, step: int | None, quant: Quant | None) -> Weights:
  """A run's trained weights: full params (quantized if `quant`), or, for a PEFT run, the
  run's own base (loaded and quantized as the run did) and its trained adapters."""
  trainable, meta = checkpoint.read(source, step)
  run_cfg = config_lib.from_dict(config_lib.TrainConfig, meta["config"])
  saved = config_lib.from_dict(config_lib.ModelConfig, meta["model_config"])
  base = base or saved
  model_cfg = with_compute_options(saved, base)
  if run_cfg.peft.method == "none":
    dtype = decoder.DTYPES[model_cfg.param_dtype]
    host = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), trainable)
    params = jax.device_put(host, sharding.tree_shardings(mesh, _axes(model_cfg, host), host))
    return Weights(model_cfg, _quantize(params, quant, model_cfg, mesh), None, run_cfg,
                   trainable, meta)
  # A PEFT run: rebuild its base exactly as the run did (same source, seed, quantisation).
  run_base = with_compute_options(saved, run_cfg.model)
  inner = load(run_cfg.model.hf_path, mesh=mesh, base=run_base, quant=quant_for(run_cfg),
               seed=run_cfg.train.seed, vocab_size=saved.vocab_size)
  method = peft.get(run_cfg.peft.method)
  template = method.init(inner.model_cfg, inner.params, run_cfg.peft,
                         jax.random.PRNGKey(0))
  # The adapter leaves go onto THIS mesh by their logical axes (the checkpoint may have been
  # written from another device layout), through host memory.
  body = jax.tree_util.tree_map(np.asarray,
                                {k: v for k, v in trainable.items() if k in template.params})
  axes = method.axes(inner.model_cfg, dataclasses.replace(template, params=body)).params
  adapters = dataclasses.replace(
      template, params=jax.device_put(body, sharding.tree_shardings(mesh, axes, body)))
  return Weights(with_compute_options(inner.model_cfg, base), inner.params, adapters, run_cfg,
                 trainable, meta)


def _axes(model_cfg, params):
  """Logical axes of a params tree; method-owned extras (a reward head) are replicated."""
  axes = decoder.axes(model_cfg)
  return {k: axes.get(k, jax.tree_util.tree_map(lambda x: (None,) * x.ndim, v))
          for k, v in params.items()}
