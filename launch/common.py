"""Flags and runtime set-up shared by the launchers: config loading, overrides, multi-host,
and how every launcher reports an error (one line) or its help (exit status 0).

`--config=configs/NAME.py[:ARG]` imports the file and calls `get_config(ARG)`; a recipe
shipped with jaxtune can be named without its directory (`--config=sft_chat:MODEL`, what
an installed `jaxtune train` uses); no --config means the built-in default job
(`config.default_job()`: the defaults, with the end-of-run evaluation on).
`--set=key=value` (repeatable) overrides any field with type checking; local paths are
then made absolute (`config.resolve_paths`). Several hosts:
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, or `--distributed=auto`
to let JAX detect the cluster (Cloud TPU, SLURM) when present.

Errors: `run(main)` prints every error as one line `error: ...` on stderr (a config, data or
usage error exits 2, anything else 1); `--verbose` shows the traceback instead. `--help`
prints the launcher's flags and exits 0.
"""

import importlib.util
import logging
import os
import pathlib
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def define_config_flags():
  flags.DEFINE_string("config", None, "Recipe file configs/NAME.py[:ARG] with get_config(arg), "
                      "or the name of a recipe shipped with jaxtune (NAME[:ARG]). Default: the "
                      "built-in tiny job on the bundled sample data.")
  flags.DEFINE_multi_string("set", [], "Override a config field, e.g. --set=optim.lr=1e-5 "
                            "--set=train.max_steps=100 --set=model.hf_path=DIR_OR_ID. "
                            "--help_config lists every key with its type, default and doc.")
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
  flags.DEFINE_bool("verbose", False, "On an error, show the full traceback instead of the "
                    "one-line message.")
  flags.DEFINE_string("compile_cache", "auto", "XLA's persistent compilation cache: a directory, "
                      "'off', or 'auto': $JAX_COMPILATION_CACHE_DIR or "
                      "~/.cache/jaxtune/xla on GPU / TPU, off on CPU. A step compiled once (by "
                      "the memory planner, an earlier run, or before a resume) is loaded, not "
                      "compiled again.")
  flags.DEFINE_float("compile_cache_max_gib", 20.0, "Bound on the persistent compilation "
                     "cache's size in GiB: beyond it the least recently used executables are "
                     "deleted. 0: no bound.")


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
  compile_cache(FLAGS.compile_cache, FLAGS.compile_cache_max_gib)
  logging.getLogger("absl").setLevel(logging.WARNING)


def compile_cache(where: str, max_gib: float = 20.0) -> str | None:
  """Turns on XLA's persistent compilation cache (`--compile_cache`); returns its directory.

  Keyed by the program, its shardings and the compiler, so a hit is the same executable:
  the train step the memory planner compiles (model.remat=auto, train.micro_batch=auto) is
  then the one the run loads, and a resumed or repeated run skips its compiles. 'auto' leaves
  CPU off (its compiles are short; the test suite runs there). `max_gib` > 0 bounds its size
  (`--compile_cache_max_gib`): JAX deletes the least recently used entries beyond it (its
  eviction needs the `filelock` package, which huggingface_hub already brings; without it
  the cache stays unbounded, with a warning). A cache in a bucket (gs://...) is left
  unbounded: JAX's eviction takes a lock file around every cache read and write, which on a
  bucket is untested here.
  """
  import jax
  if where == "auto":
    if jax.default_backend() == "cpu":
      return None
    where = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
             or os.path.join(os.path.expanduser("~"), ".cache", "jaxtune", "xla"))
  if where in ("", "off"):
    return None
  from jaxtune import storage  # pylint: disable=g-import-not-at-top
  if max_gib > 0 and storage.is_remote(where):  # eviction locks a file at every read, write
    logging.getLogger("jaxtune").info(
        "--compile_cache_max_gib: the compilation cache at %s is not on a local disk; it is "
        "not bounded", where)
  elif max_gib > 0:
    if importlib.util.find_spec("filelock") is None:
      logging.getLogger("jaxtune").warning(
          "--compile_cache_max_gib=%s: the filelock package is missing, so the compilation "
          "cache at %s has no size bound (pip install filelock)", max_gib, where)
    else:
      jax.config.update("jax_compilation_cache_max_size", int(max_gib * 2**30))
  jax.config.update("jax_compilation_cache_dir", where)
  return where


def recipes_dir() -> pathlib.Path:
  """The shipped recipes: jaxtune/recipes in an installed wheel, configs/ in a checkout."""
  import jaxtune  # pylint: disable=g-import-not-at-top
  package = pathlib.Path(jaxtune.__file__).resolve().parent
  installed = package / "recipes"
  return installed if installed.is_dir() else package.parent / "configs"


def recipe_path(name: str) -> str:
  """The file --config names: a path, else a shipped recipe ('sft_chat', 'configs/lora.py')."""
  if os.path.exists(name):
    return name
  stem = pathlib.Path(name).name
  stem = stem[:-3] if stem.endswith(".py") else stem
  shipped = recipes_dir() / f"{stem}.py"
  if shipped.is_file():
    return str(shipped)
  known = sorted(p.stem for p in recipes_dir().glob("*.py") if not p.stem.startswith("_"))
  raise app.UsageError(f"--config: no such file {name} and no shipped recipe {stem!r} "
                       f"(shipped: {', '.join(known)})")


def load_config():
  """The run's TrainConfig: the recipe (or the default job), --set overrides, and its
  local paths made absolute. Bad keys, values, recipe arguments and paths raise errors that
  `run` prints as one line."""
  from jaxtune import config as config_lib
  if FLAGS.config:
    spec, _, arg = FLAGS.config.partition(":")
    path = recipe_path(spec)
    loader = importlib.util.spec_from_file_location("jaxtune_recipe", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise app.UsageError(f"--config: {path} has no get_config(arg)")
    try:
      cfg = module.get_config(arg or None)
    except (config_lib.ConfigError, app.UsageError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (a recipe's own argument check)
      raise config_lib.ConfigError(f"--config={FLAGS.config}: get_config({arg or None!r}) "
                                   f"failed: {one_line(e)}") from e
  else:
    cfg = config_lib.default_job()
  cfg = config_lib.override(cfg, FLAGS.set)
  from jaxtune import methods  # pylint: disable=g-import-not-at-top
  methods.check(cfg)  # a bad option is refused first, in seconds
  return config_lib.resolve_paths(cfg)


def print_once(msg: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(msg, flush=True)


def one_line(e: BaseException) -> str:
  """The exception as one line: its message (whitespace collapsed), with its type unless it
  is one of the errors jaxtune raises for bad input (ValueErrors, usage errors)."""
  text = " ".join(str(e).split())
  if isinstance(e, (ValueError, app.UsageError)) and text:
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _usage_errors() -> tuple[type, ...]:
  from jaxtune import config as config_lib
  from jaxtune.data import errors as data_errors
  return (config_lib.ConfigError, data_errors.DataError, app.UsageError)


def run(main):
  """app.run with --help exiting 0 and every error printed as one line (see module doc)."""
  argv = sys.argv[1:]
  help_flags = [a for a in argv if a in HELP_FLAGS]
  if help_flags:  # absl's own --help exits 1
    app.usage(shorthelp=help_flags[0] != "--helpfull", writeto_stdout=True, exitcode=0)

  def wrapped(argv):
    try:
      return main(argv)
    except (SystemExit, KeyboardInterrupt):
      raise
    except Exception as e:  # pylint: disable=broad-except
      if FLAGS.verbose:
        raise
      usage = isinstance(e, _usage_errors())
      hint = "" if usage else " (--verbose shows the traceback)"
      print(f"error: {one_line(e)}{hint}", file=sys.stderr, flush=True)
      sys.exit(2 if usage else 1)

  app.run(wrapped)
