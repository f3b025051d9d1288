"""The declarative HF <-> jaxtune key tables and their exact inverse.

Each family's table (`Family.rows` in `jaxtune.models.families`) lists (HF key template,
param path, transpose); the functions here read any family's table. `{i}` in a template is
the layer index; those rows map to a param stacked over layers on its leading axis.
`transpose` turns HF's torch Linear weight [out, in] into a kernel [in, out]. The same table
read backwards is the export, so import followed by export is bit-identical.

    >>> to_params(cfg, {"model.layers.0.mlp.up_proj.weight": w0, ...})["layers/mlp/up_proj/kernel"]
    np.stack([w0.T, w1.T, ...])                      # [L, D, F]

A row whose path is a tuple of paths is a fused HF tensor (Phi-3's `qkv_proj`,
`gate_up_proj`): its HF weight is the parts concatenated along the output dim, so import
splits it at the parts' widths and export concatenates them again (bit-identical):

    ("model.layers.{i}.mlp.gate_up_proj.weight",
     ("layers/mlp/gate_proj/kernel", "layers/mlp/up_proj/kernel"), True)
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from jaxtune import config as config_lib
from jaxtune.hf import expert_keys
from jaxtune.models import decoder
from jaxtune.models import families
from jaxtune.models import moe

Row = families.Row

# HF keys that may be present and carry nothing we need.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def parts(path) -> tuple[str, ...]:
  """The param paths of a row's path entry: itself, or the parts of a fused tensor."""
  return path if isinstance(path, tuple) else (path,)


def _shape(shapes: dict, path) -> tuple[int, ...]:
  """The (jaxtune-layout) shape of a row's param, parts concatenated on the last axis."""
  ps = [shapes[p] for p in parts(path)]
  return (*ps[0][:-1], sum(s[-1] for s in ps))


def rows(cfg: config_lib.ModelConfig) -> list[Row]:
  """The family's rows restricted to the params this config has (e.g. no lm_head if tied)."""
  have = decoder.shapes(cfg)
  return [r for r in families.get(cfg.family).rows if all(p in have for p in parts(r[1]))]


def hf_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
  """{HF key: expected HF shape} for every tensor of an HF checkpoint of this config."""
  shapes = decoder.shapes(cfg)
  out = {}
  for template, path, transpose in rows(cfg):
    shape = _shape(shapes, path)
    if "{i}" in template:
      shape = shape[1:]
      for i in moe.layer_ids(cfg, parts(path)[0]):
        out[template.format(i=i)] = tuple(reversed(shape)) if transpose else shape
    else:
      out[template] = tuple(reversed(shape)) if transpose else shape
  out.update(expert_keys.hf_shapes(cfg))  # MoE routers and experts, one tensor per expert
  return out


def check_keys(cfg: config_lib.ModelConfig, present: dict[str, tuple[int, ...]],
               source: str) -> None:
  """Errors on any unknown, missing or mis-shaped tensor, naming key and shapes."""
  expected = hf_shapes(cfg)
  extra = {}
  for k, shape in present.items():
    if k in expected or k.endswith(IGNORED_SUFFIXES):
      continue
    if k == "lm_head.weight" and cfg.tie_word_embeddings:
      continue  # some tied checkpoints store the tied copy as well
    extra[k] = shape
  if extra:
    listed = ", ".join(f"{k} {list(s)}" for k, s in sorted(extra.items())[:8])
    raise ValueError(f"{source}: {len(extra)} unknown tensor(s) for a {cfg.family} model: "
                     f"{listed}")
  missing = {k: s for k, s in expected.items() if k not in present}
  if missing:
    listed = ", ".join(f"{k} (expected {list(s)})" for k, s in sorted(missing.items())[:8])
    raise ValueError(f"{source}: {len(missing)} missing tensor(s): {listed}")
  for k, s in expected.items():
    if tuple(present[k]) != tuple(s):
      raise ValueError(f"{source}: tensor {k} has shape {list(present[k])}, expected {list(s)} "
                       f"for the config (hidden={cfg.hidden_size}, heads={cfg.num_heads}, "
                       f"kv_heads={cfg.num_kv_heads}, head_dim={cfg.head_dim})")


def to_params(cfg: config_lib.ModelConfig, get: Callable[[str], np.ndarray],
              paths: Iterable[str] | None = None) -> Iterable[tuple[str, np.ndarray]]:
  """Yields (param path, host array) one param at a time, reading tensors with `get(key)`.

  One param at a time keeps peak host memory at one stacked weight plus the model.
  """
  wanted = set(paths) if paths is not None else None
  shapes = decoder.shapes(cfg)
  for template, path, transpose in rows(cfg):
    names = parts(path)
    if wanted is not None and not wanted.intersection(names):
      continue
    if "{i}" in template:
      layers_ = []
      for i in moe.layer_ids(cfg, names[0]):
        t = get(template.format(i=i))
        layers_.append(t.T if transpose else t)
      x = np.stack(layers_)
    else:
      t = get(template)
      x = t.T if transpose else t
    if len(names) == 1:
      yield path, x
      continue
    cuts = np.cumsum([shapes[p][-1] for p in names])[:-1]
    for name, piece in zip(names, np.split(x, cuts, axis=-1)):
      if wanted is None or name in wanted:
        yield name, np.ascontiguousarray(piece)
  yield from expert_keys.to_params(cfg, get, wanted)


def to_hf(cfg: config_lib.ModelConfig, flat_params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{HF key: array} from {param path: host array}; the exact inverse of `to_params`."""
  out = {}
  for template, path, transpose in rows(cfg):
    names = parts(path)
    if len(names) == 1:
      x = flat_params[path]
    else:
      x = np.concatenate([np.asarray(flat_params[p]) for p in names], axis=-1)
    if "{i}" in template:
      for j, i in enumerate(moe.layer_ids(cfg, names[0])):
        out[template.format(i=i)] = np.ascontiguousarray(x[j].T if transpose else x[j])
    else:
      out[template] = np.ascontiguousarray(x.T if transpose else x)
  out.update(expert_keys.to_hf(cfg, flat_params))
  return out
