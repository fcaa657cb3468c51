"""Test-wide setup: 8 fake CPU devices, so every multi-device code path runs in CI."""

import os

# Must happen before JAX initialises its backends (i.e. before any test imports jax).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The tests compile the same small programs again and again, many in subprocesses (the SIGKILL
# and resume chains, the command-line tests): one persistent compilation cache for the session
# (inherited by the subprocesses through the environment) compiles each of them once.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _CACHE = tempfile.mkdtemp(prefix='cxr_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

# torchvision (parity tests) must be imported before TensorFlow: the other order segfaults in
# torchvision's import (seen with TF 2.21 + torch 2.14.1 here). The parity tests skip without it.
try:
  import torch  # noqa: E402,F401
  import torchvision  # noqa: E402,F401
except ImportError:
  pass

import pathlib  # noqa: E402

import pytest  # noqa: E402
from tiny import tiny_config  # noqa: E402,F401  (tests import it from here)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data (real samples); tests using it skip where it is absent (users' machines)."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'real sample data not found at {SHARED_DATA} (only on the team machines / CI)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def phantom_data_dir(tmp_path_factory) -> str:
  """A TFDS data dir holding `cxr_phantom/tiny` (24/8/8/8 images at 64 px), built once."""
  import tensorflow_datasets as tfds

  import cxr_jax.data  # noqa: F401  (registers the builder)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = tfds.builder('cxr_phantom/tiny', data_dir=data_dir)
  builder.download_and_prepare()
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  assert sizes == {'train': 24, 'validation': 8, 'test': 8, 'bbox': 8}, sizes
  return data_dir


@pytest.fixture(scope='session')
def tiny_run_dir(phantom_data_dir, tmp_path_factory) -> str:
  """A run of `tiny_config` trained for 2 steps (its first stage only), built once per session
  for the tests that predict with a trained model (predict, fault injection)."""
  from cxr_jax import stages
  config = tiny_config(phantom_data_dir)
  config.num_train_steps = 2
  workdir = tmp_path_factory.mktemp('tiny_run')
  stages.run(config, workdir, only=[config.stages[0]])
  return str(workdir)


