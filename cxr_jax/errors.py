"""The errors a user sees, and the exit status each gives on the command line.

A command line prints one line (`error: ...`) and exits with:
  2 (`EXIT_USAGE`) for a usage error: a bad flag, config key, value or registry name;
  1 (`EXIT_RUNTIME`) for a failure while running: missing data, a broken file, non-finite loss;
  75 (`EXIT_PREEMPTED`, sysexits' EX_TEMPFAIL) when SIGTERM or SIGINT stopped training after
    saving a checkpoint: a scheduler can requeue the job on this status, and rerunning the same
    command resumes where it stopped.
The traceback goes to the run's error log (and to the terminal with --verbose).
"""

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75


class UsageError(ValueError):
  """A bad flag, config key or value, or unknown name: the command was wrong, not the data."""


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after saving a checkpoint at the current step."""


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient stopped training (config.nan_policy='stop')."""
