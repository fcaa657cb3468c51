"""Configs load, `:demo` shrinks them, and bad keys/values fail with a clear message."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

from cxr_jax import config_lib
from cxr_jax.main import default_workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Files starting with '_' hold what several configs share; they are not configs.
CONFIGS = sorted(p for p in (ROOT / 'configs').rglob('*.py') if not p.name.startswith('_'))


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize('arg', [None, 'demo'])
def test_every_config_validates(path, arg):
  config = _load(path).get_config(arg)
  config_lib.validate(config)
  assert config.name


@pytest.mark.parametrize('path', CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_stage_sees_every_init_from_key(path):
  # stage_overrides replace a field wholesale: a partial init_from broke the training loop.
  from cxr_jax import stages
  config = _load(path).get_config('demo')
  for stage in config.stages:
    init_from = stages.stage_config(config, stage).init_from
    assert set(init_from) == set(config_lib.base_config().init_from), (stage, init_from)


def test_demo_shrinks_the_full_config():
  module = _load(ROOT / 'configs' / 'mobilenet_baseline.py')
  full, demo = module.get_config(), module.get_config('demo')
  assert full.data.name.startswith('nih_chest_xray14/') and demo.data.name.startswith('cxr_phantom')
  assert demo.batch_size < full.batch_size
  assert demo.model.width_multiplier < full.model.width_multiplier
  assert full.best_metric == 'f1' and full.optimizer.name == 'adam'
  with pytest.raises(ValueError, match="Unknown config argument 'tiny'"):
    module.get_config('tiny')


@pytest.mark.parametrize('key,value,message', [
    ('model.name', 'resnet_9000', 'config.model.name: Unknown model'),
    ('loss', 'hinge', 'config.loss: Unknown loss'),
    ('batch_size', 0, 'config.batch_size=0: expected a positive number'),
    ('best_metric', 'accuracy_ish', 'config.best_metric: Unknown metric'),
    ('data.pp_train', 'decode|sharpen(3)', 'config.data.pp_train: .*sharpen'),
    ('threshold', 1.5, 'config.threshold=1.5'),
    ('localize.method', 'saliency', "config.localize.method: 'saliency'; valid"),
    ('localize.boxes.mode', 'biggest', 'config.localize.boxes.mode'),
    ('hard_examples.copies', 'per_class', 'config.hard_examples.copies'),
    ('hard_examples.threshold', 1.0, 'config.hard_examples.threshold=1.0'),
])
def test_validate_names_the_bad_key(key, value, message):
  config = config_lib.base_config()
  node, leaf = config, key.split('.')
  for part in leaf[:-1]:
    node = node[part]
  node[leaf[-1]] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_default_workdir():
  assert default_workdir('configs/mobilenet_baseline.py:demo') == 'workdir/mobilenet_baseline-demo'
  assert default_workdir('configs/multi_attention/bsl.py') == 'workdir/multi_attention_bsl'
  assert default_workdir('/abs/elsewhere/my_cfg.py') == 'workdir/my_cfg'


def _main(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'cxr_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_key_and_bad_value(tmp_path):
  cfg = 'configs/mobilenet_baseline.py:demo'
  out = _main(f'--config={cfg}', '--config.no_such_key=1', f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'no_such_key' in out.stderr
  out = _main(f'--config={cfg}', '--config.batch_size=many', f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'batch_size' in out.stderr
  out = _main(f'--config={cfg}', '--config.model.name=vgg_99', f'--workdir={tmp_path}')
  assert out.returncode != 0 and 'config.model.name: Unknown model' in out.stderr
  assert not (tmp_path / 'train_classifier').exists()
