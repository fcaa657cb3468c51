"""Entry point: `python -m cxr_jax.main --config=configs/<method>.py[:demo] [--workdir=DIR]`.

Parses flags, validates the config and hands over to `stages.run`; everything else lives in
importable modules.

Errors reach the user as one line on stderr and an exit status (cxr_jax/errors.py): 2 for a
usage error (a bad flag, config key, value or name), 1 for a failure while running, 75 when
SIGTERM/SIGINT stopped training after a checkpoint (rerun the command to resume). The traceback
goes to the run's error log and, with --verbose, to the terminal.

Multi-process: `--distributed` lets `jax.distributed.initialize()` find its peers (TPU VMs,
SLURM); `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` name them where
nothing can be auto-detected (e.g. several processes on one machine; on CPUs the processes
talk through gloo collectives).
"""

import logging as std_logging
import os
import sys
import traceback

# TensorFlow's C++ start-up lines drown a one-line error (set TF_CPP_MIN_LOG_LEVEL=0 for them).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cxr_jax import errors  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/mobilenet_baseline.py:demo.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default ./workdir/<config name>[-<arg>].')
_STAGES = flags.DEFINE_list('stages', None, 'Run only these stages (default: all of the config).')
_RERUN = flags.DEFINE_bool('rerun', False, 'Rerun stages even if they finished before.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host GPU/TPU; see launch/).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for clusters without auto-detection '
    '(with --num_processes and --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Print tracebacks and library INFO lines.')


# Libraries whose INFO lines drown the progress lines in the terminal (warnings still show).
_NOISY = ('/orbax/', '/tensorflow_datasets/', '/clu/metric_writers/', '/clu/periodic_actions')


class _QuietLibraries(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        s in record.pathname for s in _NOISY)


def _init_distributed() -> None:
  import jax
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise errors.UsageError('--coordinator_address, --num_processes and --process_id go '
                              'together: give all three (or --distributed to auto-detect).')
    n = _NUM_PROCESSES.value
    if not 0 <= _PROCESS_ID.value < n:
      raise errors.UsageError(f'--process_id={_PROCESS_ID.value}: expected 0 .. {n - 1} '
                              f'(--num_processes={n}).')
    try:  # CPU processes need a collectives implementation to talk to each other.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    except (AttributeError, ValueError):
      pass
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad flag (e.g. an unknown --config.key) is one line and status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    message = str(e)
    if isinstance(e, AttributeError | KeyError):  # ml_collections: an unknown config key
      key = message.strip('"\'')
      given = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.') and
               key in a.split('=')[0].split('.')]
      message = (f'{given[0] if given else key}: no such config key (the config file lists '
                 'the valid ones)')
    print(f'error: {_one_line(message) or type(e).__name__}', file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)


def _one_line(message: str) -> str:
  """ml_collections reports an unloadable config file over several lines, with the config
  module's traceback inside: keep the lead and the exception's own line."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if any(line.startswith('Traceback (most recent call last)') or
         line.endswith('Traceback (most recent call last):') for line in lines):
    lead = message.split('Traceback (most recent call last)')[0].strip().rstrip(':')
    return f'{lead}: {lines[-1]}' if lead else lines[-1]
  return ' '.join(lines)


def default_workdir(config_flag_value: str) -> str:
  """'configs/multi_attention/bsl.py:demo' -> './workdir/multi_attention_bsl-demo'."""
  path, _, arg = config_flag_value.partition(':')
  parts = os.path.normpath(path).split(os.sep)
  if 'configs' in parts:
    parts = parts[len(parts) - parts[::-1].index('configs'):]
  else:
    parts = parts[-1:]
  name = '_'.join(parts)
  name = name[:-3] if name.endswith('.py') else name
  return os.path.join('workdir', f'{name}-{arg}' if arg else name)


def _run(workdir_holder: list[str]) -> None:
  from cxr_jax.data import tf_devices
  tf_devices.hide_accelerators()  # TensorFlow only feeds data: keep it off JAX's accelerators.
  import jax

  from cxr_jax import config_lib, stages
  try:
    config = _CONFIG.value  # a config file that cannot be loaded fails here
    config_lib.validate(config, stage_names=stages.STAGES)
  except (ValueError, OSError) as e:
    raise errors.UsageError(str(e)) from e
  unknown = [s for s in (_STAGES.value or []) if s not in config.stages]
  if unknown:
    raise errors.UsageError(f'--stages: {unknown} not in this config\'s stages '
                            f'{list(config.stages)}.')
  _init_distributed()
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  workdir_holder.append(workdir)
  logging.info('JAX %s, %d process(es), devices: %s', jax.__version__, jax.process_count(),
               jax.devices())
  logging.info('Config %s, workdir %s', config.name, workdir)
  stages.run(config, workdir, only=_STAGES.value, rerun=_RERUN.value)


def _log_traceback(workdir: str | None) -> str | None:
  """Appends the current exception's traceback to the run's error log; its path, or None."""
  if not workdir:
    return None
  from cxr_jax import layout
  path = layout.Run(workdir).error_log_file
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
      import time
      f.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")} {" ".join(sys.argv)}\n')
      f.write(traceback.format_exc())
  except OSError:
    return None
  return str(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  workdir: list[str] = []
  try:
    _run(workdir)
  except errors.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(errors.EXIT_PREEMPTED)
  except KeyboardInterrupt:
    print('interrupted (a second Ctrl-C): the last checkpoint is kept; rerun to resume.',
          file=sys.stderr)
    sys.exit(errors.EXIT_PREEMPTED)
  except Exception as e:  # noqa: BLE001 - every failure becomes one line and a status
    usage = isinstance(e, errors.UsageError)
    log = _log_traceback(workdir[0] if workdir else None)
    if _VERBOSE.value:
      traceback.print_exc()
    message = _one_line(str(e)) or type(e).__name__
    where = '' if _VERBOSE.value or not log else f' (traceback: {log}; --verbose prints it)'
    print(f'error: {message}{where}', file=sys.stderr)
    sys.exit(errors.EXIT_USAGE if usage else errors.EXIT_RUNTIME)


def run() -> None:
  """Console-script entry point (`cxr-jax --config=...`)."""
  flags.mark_flag_as_required('config')
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
