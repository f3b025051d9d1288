"""Flags and runtime set-up shared by the launchers: config loading, overrides, multi-host.

`--config=configs/NAME.py[:ARG]` imports the file and calls `get_config(ARG)`; no --config
means the built-in default job (`TrainConfig()`). `--set=key=value` (repeatable) overrides
any field with type checking; a bad key or value exits with a one-line error naming it.
Several hosts: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or
`--distributed=auto` to let JAX detect the cluster (Cloud TPU, SLURM) when present.
"""

import importlib.util
import logging
import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_config_flags():
  flags.DEFINE_string("config", None, "Recipe file configs/NAME.py[:ARG] with get_config(arg). "
                      "Default: the built-in tiny job on the bundled sample data.")
  flags.DEFINE_multi_string("set", [], "Override a config field, e.g. --set=optim.lr=1e-5 "
                            "--set=train.max_steps=100 --set=model.hf_path=DIR_OR_ID.")
  define_runtime_flags()


def define_runtime_flags():
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "Multi-host runtime: 'on' calls jax.distributed.initialize (with the flags "
                    "below or JAX's cluster detection), 'auto' does so when a cluster is "
                    "detected (SLURM with >1 task, Cloud TPU pods) or the flags are given.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_string("cpu_collectives", None, "CPU collectives for multi-process CPU runs "
                      "(e.g. 'gloo'); tests use it.")
  flags.DEFINE_integer("local_device_count", None, "CPU only: simulate this many devices.")


def _cluster_detected() -> bool:
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return True
  return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))


def set_xla_flags() -> None:
  """GPU performance flags (before jax initialises its backends); user flags win.

  Measured on one H200 (docs/BENCHMARKS.md), 1B shapes: with the layers scanned, turning
  Triton GEMMs off (--xla_gpu_enable_triton_gemm=false) cost 7% (full FT) to 13% (LoRA),
  so XLA's default is kept (autotuning makes compiles ~30 s longer); with unrolled layers
  neither that flag, command buffers nor the scheduler changed the speed. The latency
  hiding scheduler is for meshes of several devices: it overlaps collectives with compute.
  """
  extra = ["--xla_gpu_enable_latency_hiding_scheduler=true"]
  current = os.environ.get("XLA_FLAGS", "")
  keep = [f for f in extra if f.split("=")[0] not in current]
  os.environ["XLA_FLAGS"] = " ".join([current, *keep]).strip()


def setup_runtime() -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  if FLAGS.local_device_count:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count="
                               f"{FLAGS.local_device_count}")
  set_xla_flags()
  import jax
  if FLAGS.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
  explicit = FLAGS.coordinator_address is not None
  if FLAGS.distributed == "on" or (FLAGS.distributed == "auto" and
                                    (explicit or _cluster_detected())):
    kwargs = {}
    if explicit:
      kwargs = dict(coordinator_address=FLAGS.coordinator_address,
                    num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    jax.distributed.initialize(**kwargs)
  logging.getLogger("absl").setLevel(logging.WARNING)


def load_config():
  from jaxtune import config as config_lib
  if FLAGS.config:
    path, _, arg = FLAGS.config.partition(":")
    if not os.path.exists(path):
      raise app.UsageError(f"--config: no such file {path}")
    spec = importlib.util.spec_from_file_location("jaxtune_recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise app.UsageError(f"--config: {path} has no get_config(arg)")
    cfg = module.get_config(arg or None)
  else:
    cfg = config_lib.TrainConfig()
  try:
    return config_lib.override(cfg, FLAGS.set)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def print_once(msg: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(msg, flush=True)


def run(main):
  """app.run with data/config errors printed as one line instead of a traceback."""
  from jaxtune import config as config_lib
  from jaxtune.data import errors as data_errors

  def wrapped(argv):
    try:
      return main(argv)
    except (config_lib.ConfigError, data_errors.DataError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)
