"""Running the absl launchers in subprocesses, as users do."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices: int = 1) -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = ROOT
  return e


def cmd(script: str, *args: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, "launch", script), *args]


def run(script: str, *args: str, devices: int = 1, check: bool = True, timeout: int = 600):
  p = subprocess.run(cmd(script, *args), env=env(devices), cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout)
  if check and p.returncode != 0:
    raise AssertionError(f"{script} {' '.join(args)} exited {p.returncode}:\n{p.stderr[-4000:]}")
  return p


def metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def losses(workdir: str) -> dict[int, float]:
  return {m["step"]: m["loss"] for m in metrics(workdir) if "loss" in m}
