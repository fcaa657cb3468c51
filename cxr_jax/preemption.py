"""SIGTERM / SIGINT during a run: finish the step, save a checkpoint, exit with its own status.

Schedulers (SLURM, Kubernetes, preemptible cloud VMs) send SIGTERM before they kill a job.
`watch()` installs handlers for the duration of a run that only record the signal; the
training loop asks `requested()` after every step, saves a checkpoint at the current step and
raises `errors.Preempted`; the stage runner asks between stages. A second SIGINT (Ctrl-C twice)
interrupts at once. Signals are process-wide, so the record is too (this module's state).
"""

import contextlib
import signal
from collections.abc import Iterator

_requested: int | None = None


def _handler(signum: int, frame) -> None:
  del frame
  global _requested
  if signum == signal.SIGINT and _requested == signal.SIGINT:
    raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
  _requested = signum


@contextlib.contextmanager
def watch() -> Iterator[None]:
  """Records SIGTERM and SIGINT instead of dying, for the duration of the block (main thread
  only; elsewhere, e.g. a notebook's worker thread, signals keep their handlers)."""
  global _requested
  _requested = None
  try:
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGTERM, signal.SIGINT)}
  except ValueError:  # not the main thread: signal handlers cannot be installed
    yield
    return
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
    _requested = None


def requested() -> str | None:
  """The name of the signal received ('SIGTERM', 'SIGINT'), or None."""
  return None if _requested is None else signal.Signals(_requested).name


def requested_anywhere() -> str | None:
  """`requested()` agreed over all processes: every process stops at the same step when any
  of them was signalled (a collective: every process must call it at the same point)."""
  import jax
  if jax.process_count() == 1:
    return requested()
  import numpy as np
  from jax.experimental import multihost_utils
  mine = np.int32(_requested or 0)
  every = np.asarray(multihost_utils.process_allgather(mine))
  signalled = [int(s) for s in every.ravel() if s]
  return signal.Signals(signalled[0]).name if signalled else None
