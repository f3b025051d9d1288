"""The search space: `--space=KEY=DIST(ARGS)` flags -> optuna distributions.

    optim.lr=loguniform(1e-5,1e-3)   FloatDistribution(1e-5, 1e-3, log=True)
    peft.dropout=uniform(0,0.2)      FloatDistribution(0.0, 0.2)
    data.batch_size=int(2,8)         IntDistribution(2, 8)
    peft.rank=logint(4,64)           IntDistribution(4, 64, log=True)
    peft.rank=choice(8,16,32)        CategoricalDistribution((8, 16, 32))
    optim.schedule=choice(cosine,linear)

KEY is any `--set` key of the run's config (`launch/train.py --help_config`); every bound
and choice is checked against the key's type before a trial runs, so a typo fails in
seconds, naming the flag.
"""

from __future__ import annotations

import ast
import re

from jaxtune import config as config_lib

_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(\w+)\s*\((.*)\)\s*$")
KINDS = ("loguniform", "uniform", "int", "logint", "choice")


def _value(text: str):
  """'1e-3' -> 0.001, '16' -> 16, 'cosine' -> 'cosine', 'true' -> True."""
  text = text.strip()
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def set_value(value) -> str:
  """A sampled value as the text of `--set=KEY=TEXT`."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return repr(value)
  return str(value)


def parse(spec: str):
  """(key, optuna distribution) of one --space flag; ValueError naming it when malformed."""
  import optuna  # pylint: disable=g-import-not-at-top
  m = _SPEC.match(spec)
  if not m:
    raise ValueError(f"--space={spec}: expected KEY=KIND(ARGS) with KIND one of "
                     f"{', '.join(KINDS)}, e.g. optim.lr=loguniform(1e-5,1e-3)")
  key, kind, args = m.group(1), m.group(2), [a for a in m.group(3).split(",") if a.strip()]
  values = [_value(a) for a in args]
  if kind == "choice":
    if not values:
      raise ValueError(f"--space={spec}: choice() needs at least one value")
    return key, optuna.distributions.CategoricalDistribution(tuple(values))
  if kind not in KINDS:
    raise ValueError(f"--space={spec}: unknown kind {kind!r} (expected one of "
                     f"{', '.join(KINDS)})")
  if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in values) or not values[0] < values[1]:
    raise ValueError(f"--space={spec}: {kind}(LOW,HIGH) needs two numbers with LOW < HIGH")
  low, high = values
  log = kind.startswith("log")
  if log and low <= 0:
    raise ValueError(f"--space={spec}: {kind} needs LOW > 0")
  if kind in ("int", "logint"):
    if not all(isinstance(v, int) for v in values):
      raise ValueError(f"--space={spec}: {kind}(LOW,HIGH) needs integers")
    return key, optuna.distributions.IntDistribution(low, high, log=log)
  return key, optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def parse_all(specs, cfg: config_lib.TrainConfig) -> dict:
  """{key: distribution} of the --space flags, checked against `cfg` (a key it lacks, a
  repeated key, a bound or choice the key's type refuses: ValueError naming the flag)."""
  space = {}
  for spec in specs:
    key, dist = parse(spec)
    if key in space:
      raise ValueError(f"--space={spec}: {key} is already in the space")
    for v in _extremes(dist):
      try:
        config_lib.override(cfg, [f"{key}={set_value(v)}"])
      except config_lib.ConfigError as e:
        raise ValueError(f"--space={spec}: {e}") from e
    space[key] = dist
  if not space:
    raise ValueError("--space: give at least one, e.g. --space='optim.lr=loguniform(1e-5,1e-3)'")
  return space


def _extremes(dist) -> list:
  if hasattr(dist, "choices"):
    return list(dist.choices)
  return [dist.low, dist.high]
