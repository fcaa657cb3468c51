"""The tiny config of the tests, in a module of its own: tests/stage_worker.py runs it in a fresh
process without conftest (which imports torch for the parity tests)."""

import pathlib


def tiny_config(data_dir: str):
  """The demo config of paper 000's baseline, shrunk to seconds: tiny data, a 2-block model."""
  import importlib.util
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'mobilenet_baseline.py'
  spec = importlib.util.spec_from_file_location('mobilenet_baseline', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('demo')
  config.data.name = 'cxr_phantom/tiny'
  config.data.data_dir = data_dir
  config.data.drop_no_finding = False
  config.model.blocks = ((16, 2), (32, 2))
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 2
  config.explain.num_images = 1
  # 4 x 4 windows fit both the tiny model's 8 x 8 feature map and its 64 px input.
  config.explain.window = 4
  config.explain.stride = 4
  config.explain.num_reference = 4
  config.explain.num_samples = 2
  return config
