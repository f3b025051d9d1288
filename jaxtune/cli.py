"""The `jaxtune` console command: `jaxtune train|convert|generate|eval|serve|bench|sweep [FLAGS]`.

Each command runs the launcher of the same name, `launch/NAME.py`, exactly as
`python launch/NAME.py [FLAGS]` does (same flags, same output, same exit status):

    jaxtune train --config=sft_chat:Qwen/Qwen2.5-0.5B-Instruct --workdir=runs/sft
    jaxtune convert --from_checkpoint=runs/sft --to_hf=out/
    jaxtune train --help

An installed wheel carries the launchers in jaxtune/_launch/launch/ and the recipes in
jaxtune/recipes/ (pyproject.toml maps launch/ and configs/ there); a source checkout
(`pip install -e .`) runs ../launch/NAME.py next to the package.
"""

from __future__ import annotations

import pathlib
import runpy
import sys

COMMANDS = ("train", "convert", "generate", "eval", "serve", "bench", "sweep")
USAGE = (f"usage: jaxtune {{{'|'.join(COMMANDS)}}} [FLAGS]\n"
         "  jaxtune COMMAND --help   lists the command's flags "
         "(train: --help_config lists every --set key)")


def launcher(name: str) -> pathlib.Path | None:
  """The file of launcher `name`: installed (jaxtune/_launch/launch) or in the checkout."""
  package = pathlib.Path(__file__).resolve().parent
  for directory in (package / "_launch" / "launch", package.parent / "launch"):
    path = directory / f"{name}.py"
    if path.is_file():
      return path
  return None


def main(argv: list[str] | None = None) -> int:
  """Dispatches `jaxtune COMMAND ...` to launch/COMMAND.py; returns its exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(USAGE)
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)}",
          file=sys.stderr)
    return 2
  path = launcher(name)
  if path is None:
    available = [c for c in COMMANDS if launcher(c) is not None]
    print(f"error: 'jaxtune {name}' is not part of this installation (no launch/{name}.py); "
          f"available: {', '.join(available)}", file=sys.stderr)
    return 2
  sys.argv = [str(path), *rest]  # absl reads the program name and flags from here
  try:
    runpy.run_path(str(path), run_name="__main__")
  except SystemExit as e:  # absl's app.run always exits
    code = e.code
    if code is None or isinstance(code, int):
      return code or 0
    print(code, file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
