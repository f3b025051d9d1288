"""Signals that stop a run cleanly: SIGTERM (job schedulers) and SIGINT (Ctrl-C).

    with stop.Stop() as s:
      while ...:
        step()
        if s.requested: save a checkpoint; break

The first signal only sets `requested`: the loop finishes the step it is in, saves a
checkpoint and returns status "interrupted" (launch/train.py exits 3 and prints how to
resume), with no traceback. A second SIGINT raises KeyboardInterrupt at once (exit without
saving); a second SIGTERM is ignored (the save is already coming). Handlers are installed
only from the main thread (Python's rule) and restored on exit.
"""

from __future__ import annotations

import signal
import sys
import threading


class Stop:
  """SIGTERM / SIGINT: finish the step, checkpoint, exit; a second SIGINT exits at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signal.signal needs it
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.requested:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      return
    self.requested = True
    sys.stderr.write(f"\n{name}: saving a checkpoint at the end of this step, then exiting"
                     + (" (Ctrl-C again: exit now, without saving)\n"
                        if signum == signal.SIGINT else "\n"))

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)
