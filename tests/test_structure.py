"""The shape of the package: no import cycles, small files and functions, explicit registries,
and bad method options refused before any data or weights are touched."""

import ast
import os
import pathlib
import time

import pytest

from jaxtune import config as config_lib
from jaxtune import methods
from jaxtune import peft
from jaxtune.models import families
from tests import launch_utils as lu

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "jaxtune"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PKG.rglob("*.py"):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """jaxtune modules `name` imports anywhere in its file (module level or in functions)."""
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] +
                        ([node.module] if node.module else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in known:
          out.add(sub)
        elif base in known:
          out.add(base)
  out.discard(name)
  return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as a list of module names, or None."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
  mods = _modules()
  graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
  assert graph["jaxtune.train.setup"] >= {"jaxtune.methods", "jaxtune.weights"}  # sanity
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))
  # Layering: the checkpoint, weights and model code never import the trainer or methods.
  for low in ("jaxtune.checkpoint", "jaxtune.weights", "jaxtune.models.decoder",
              "jaxtune.models.layers", "jaxtune.models.head"):
    assert not {m for m in graph[low] if m.startswith(("jaxtune.train", "jaxtune.methods"))}, low


def _long_functions(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      first = node.body[0]
      doc = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
             and isinstance(first.value.value, str))
      start = first.end_lineno + 1 if doc and len(node.body) > 1 else node.lineno
      if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
        yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"


def test_files_and_functions_are_small():
  big_files = [f"{p.relative_to(ROOT)} ({n})" for p in PKG.rglob("*.py")
               if (n := p.read_text().count("\n")) > MAX_FILE_LINES]
  assert not big_files
  long = [f for p in PKG.rglob("*.py") for f in _long_functions(p)]
  assert not long, long


def test_registries_are_explicit_and_complete():
  method_files = {p.stem for p in (PKG / "methods").glob("*.py")}
  helpers = {"__init__", "base", "pairs", "content_keys", "teacher_table", "rewards",
             "grpo_batch", "distill_onpolicy"}
  assert set(methods.METHODS) == method_files - helpers
  assert all(m.name == name for name, m in methods.METHODS.items())
  assert set(families.names()) >= {"llama", "mistral", "qwen2", "qwen3"}
  assert set(peft.names()) >= {"lora", "qlora"}


@pytest.mark.parametrize("assignment,message", [
    ("dpo.loss_type=nope", "bad value for dpo.loss_type: 'nope' (expected one of sigmoid, "
                           "ipo, hinge, robust, simpo, orpo)"),
    ("dpo.reference=nope", "bad value for dpo.reference: 'nope'"),
])
def test_bad_method_option_is_one_line_before_data_or_weights(assignment, message, tmp_path):
  # Data and weights that do not exist: the error must come from the option check first.
  cfg = config_lib.override(config_lib.TrainConfig(), [
      "method=dpo", assignment, f"data.train_files={tmp_path}/missing.jsonl",
      f"model.hf_path={tmp_path}/no_model"])
  with pytest.raises(config_lib.ConfigError) as e:
    methods.check(cfg)
  assert str(e.value).startswith(message)
  t0 = time.perf_counter()
  p = lu.run("train.py", "--set=method=dpo", f"--set={assignment}",
             f"--set=data.train_files={tmp_path}/missing.jsonl",
             f"--set=model.hf_path={tmp_path}/no_model", f"--workdir={tmp_path}/wd",
             check=False)
  elapsed = time.perf_counter() - t0
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith(f"error: {message}"), p.stderr[-2000:]
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")
  print(f"{assignment}: refused in {elapsed:.1f} s (whole process, imports included)")


@pytest.mark.parametrize("assignment,key", [
    ("method=nope", "method"), ("peft.method=nope", "peft.method"),
    ("model.family=nope", "model.family"), ("distill.kind=nope", "distill.kind"),
])
def test_registry_values_are_checked_with_the_key_named(assignment, key):
  cfg = config_lib.override(config_lib.TrainConfig(), [assignment] + (
      ["method=distill", "distill.teacher_path=x"] if key.startswith("distill") else []))
  with pytest.raises(config_lib.ConfigError, match=f"bad value for {key}: 'nope'"):
    methods.check(cfg)
