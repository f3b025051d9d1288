"""Packaging: what `pip install jaxtune` gives a user. The wheel carries every subpackage, the
launchers and recipes, LICENSE, and a `jaxtune` command that runs the launchers; the slow
test builds the wheel, installs it into a fresh virtual environment (offline: its
dependencies come from this environment) and runs `jaxtune train --help`, a 3-step job from
a shipped recipe and `jaxtune convert`, all from outside the source tree.
"""

import os
import pathlib
import shutil
import site
import subprocess
import sys
import tomllib

import pytest

from jaxtune import cli
from tests import launch_utils as lu

ROOT = pathlib.Path(lu.ROOT)


def _pyproject() -> dict:
  return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_launcher_and_recipe_is_packaged():
  tool = _pyproject()["tool"]["setuptools"]
  packages = set(tool["packages"])
  dirs = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "jaxtune").rglob("*")
          if p.is_dir() and any(p.glob("*.py")) and "assets" not in p.parts
          and "__pycache__" not in p.parts}
  missing = sorted(dirs - packages)
  assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"
  assert tool["package-dir"] == {"jaxtune._launch.launch": "launch",
                                 "jaxtune.recipes": "configs"}
  project = _pyproject()["project"]
  assert project["scripts"] == {"jaxtune": "jaxtune.cli:main"}
  assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert any(d.startswith("hypothesis") for d in project["optional-dependencies"]["test"])
  assert "bitsandbytes" in " ".join(project["optional-dependencies"]["bench"])


def test_cli_dispatches_to_the_launchers(capsys):
  assert cli.main(["nope"]) == 2
  assert "unknown command 'nope'" in capsys.readouterr().err
  assert cli.main([]) == 2 and cli.main(["--help"]) == 0
  assert all(cli.launcher(c) == ROOT / "launch" / f"{c}.py" for c in cli.COMMANDS
             if (ROOT / "launch" / f"{c}.py").exists())
  p = subprocess.run([sys.executable, "-m", "jaxtune.cli", "convert", "--help"], env=lu.env(),
                     cwd=str(ROOT), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0 and "--from_checkpoint" in p.stdout


def _fresh_venv(tmp_path: pathlib.Path) -> pathlib.Path:
  """A venv without pip whose only extra path is this environment's site-packages (the
  dependencies); jaxtune itself must come from the installed wheel."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  venv_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
  deps = [p for p in site.getsitepackages() if os.path.isdir(p)]
  pathlib.Path(venv_site, "zz_jaxtune_test_deps.pth").write_text("\n".join(deps) + "\n")
  return venv


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
  src = tmp_path / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("jaxtune", "launch", "configs"):
    shutil.copytree(ROOT / name, src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(ROOT / name, src / name)
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                  "--no-build-isolation", "-q", "-w", str(wheels)], check=True,
                 capture_output=True, timeout=300)
  (wheel,) = wheels.glob("jaxtune-*.whl")
  venv = _fresh_venv(tmp_path)
  subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                  "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                 capture_output=True, timeout=300)
  work = tmp_path / "work"
  work.mkdir()
  env = {k: v for k, v in lu.env().items() if k != "PYTHONPATH"}

  def jaxtune(*args):
    p = subprocess.run([str(venv / "bin" / "jaxtune"), *args], env=env, cwd=str(work),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p

  where = subprocess.run([str(venv / "bin" / "python"), "-c", "import jaxtune; "
                          "print(jaxtune.__file__)"], env=env, cwd=str(work),
                         capture_output=True, text=True, check=True).stdout
  assert where.startswith(str(venv))  # the wheel's copy, not the checkout
  p = jaxtune("train", "--help")
  assert "--help_config" in p.stdout and "--workdir" in p.stdout
  jaxtune("train", "--config=tiny_test", "--workdir=run", "--set=train.max_steps=3",
          "--set=train.eval_every=3")
  rows = lu.metrics(str(work / "run"))
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
  assert (work / "run" / "hf" / "model.safetensors").is_file()
  jaxtune("convert", "--from_checkpoint=run", "--to_hf=out")
  assert (work / "out" / "model.safetensors").is_file()
  assert (work / "out" / "tokenizer_config.json").is_file()
