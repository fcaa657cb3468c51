"""Entry point: `python -m cxr_jax.main --config=configs/<method>.py[:demo] [--workdir=DIR]`.

Parses flags, validates the config and hands over to `stages.run`; everything else lives in
importable modules.
"""

import logging as std_logging
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/mobilenet_baseline.py:demo.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output directory; default ./workdir/<config name>[-<arg>].')
_STAGES = flags.DEFINE_list('stages', None, 'Run only these stages (default: all of the config).')
_RERUN = flags.DEFINE_bool('rerun', False, 'Rerun stages even if they finished before.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() (multi-host GPU/TPU; see launch/).')


# Libraries whose INFO lines drown the progress lines in the terminal (warnings still show).
_NOISY = ('/orbax/', '/tensorflow_datasets/', '/clu/metric_writers/', '/clu/periodic_actions')


class _QuietLibraries(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or not any(
        s in record.pathname for s in _NOISY)


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from cxr_jax.data import tf_devices
  tf_devices.hide_accelerators()  # TensorFlow only feeds data: keep it off JAX's accelerators.
  import jax

  from cxr_jax import config_lib, stages
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  config = _CONFIG.value
  config_lib.validate(config, stage_names=stages.STAGES)
  workdir = _WORKDIR.value or default_workdir(
      config_flags.get_config_filename(flags.FLAGS['config']))
  logging.info('JAX %s, %d process(es), devices: %s', jax.__version__, jax.process_count(),
               jax.devices())
  logging.info('Config %s, workdir %s', config.name, workdir)
  stages.run(config, workdir, only=_STAGES.value, rerun=_RERUN.value)


def run() -> None:
  """Console-script entry point (`cxr-jax --config=...`)."""
  flags.mark_flag_as_required('config')
  app.run(main)


if __name__ == '__main__':
  run()
