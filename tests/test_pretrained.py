"""Weight import: the torch-free .pth reader, torchvision/Keras logit parity, strictness, CLI."""

import json
import os
import pickle

import flax
import jax
import numpy as np
import pytest

from cxr_jax import pretrained
from cxr_jax.models import resnet  # noqa: F401  (a broken ResNet module fails, not skips)
from cxr_jax.tools import import_weights

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _randomise_bn(model) -> None:
  """Non-trivial running statistics, so that a BN mix-up cannot hide behind mean 0 / var 1."""
  gen = torch.Generator().manual_seed(0)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
      m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
      m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
      m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
  _randomise_bn(model)
  path = tmp_path_factory.mktemp('tv') / 'resnet18.pth'
  torch.save(model.state_dict(), path)
  return model, path


def test_read_pth_equals_torch_load(resnet18_file, tmp_path):
  _, path = resnet18_file
  ours = pretrained.read_pth(path)
  ref = torch.load(path, map_location='cpu', weights_only=True)
  assert list(ours) == list(ref)
  for k, v in ref.items():
    assert ours[k].dtype == v.numpy().dtype, k
    np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)
  # Non-contiguous views, offsets into shared storages, other dtypes, the legacy format.
  base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
  odd = {'t': base.t(), 'row': base[2], 'half': torch.ones(3, dtype=torch.float16),
         'long': torch.tensor([1, -2], dtype=torch.int64), 'scalar': torch.tensor(3.5),
         'bool': torch.tensor([True, False])}
  for legacy in (False, True):
    f = tmp_path / f'odd{legacy}.pth'
    torch.save(odd, f, _use_new_zipfile_serialization=not legacy)
    got = pretrained.read_pth(f)
    for k, v in odd.items():
      np.testing.assert_array_equal(got[k], v.numpy(), err_msg=f'{k} legacy={legacy}')
      assert got[k].dtype == v.numpy().dtype


def test_read_pth_refuses_pickled_modules(tmp_path):
  f = tmp_path / 'module.pth'
  torch.save(torch.nn.Linear(2, 2), f)
  with pytest.raises(pickle.UnpicklingError, match='torch.nn.modules.linear.Linear'):
    pretrained.read_pth(f)


def _torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def test_resnet18_parity_and_one_channel(resnet18_file):
  ref, path = resnet18_file
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model, variables = pretrained.load(path, source='torchvision', arch='resnet18')
  got = model.apply(variables, x, train=False)
  assert got.shape == (2, 10)
  assert _rel_err(got, _torch_logits(ref, x)) <= 1e-4
  # One channel: the summed first convolution on a grey image equals RGB = grey, grey, grey.
  model1, variables1 = pretrained.load(path, source='torchvision', arch='resnet18',
                                       one_channel=True)
  grey = x[..., :1]
  got1 = model1.apply(variables1, grey, train=False)
  assert _rel_err(got1, _torch_logits(ref, np.repeat(grey, 3, axis=-1))) <= 1e-4


def test_new_head_is_initialised_rest_imported(resnet18_file):
  _, path = resnet18_file
  _, full = pretrained.load(path, source='torchvision', arch='resnet18')
  model, variables = pretrained.load(path, source='torchvision', arch='resnet18',
                                     num_classes=14, key=jax.random.key(3))
  head = pretrained.classifier_paths(model)
  assert head and all(p.startswith('params/') for p in head)
  flat_new = pretrained.tree_shapes(variables)
  assert all(flat_new[p][-1] == 14 for p in head)
  # Everything but the head is the imported tensor.
  a = flax.traverse_util.flatten_dict(full, sep='/')
  b = flax.traverse_util.flatten_dict(variables, sep='/')
  assert set(a) == set(b)
  for k in set(a) - set(head):
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  assert model.apply(variables, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 14)


def test_strict_errors_name_the_tensors(resnet18_file, tmp_path):
  ref, _ = resnet18_file
  sd = dict(ref.state_dict())
  sd.pop('layer2.0.bn1.running_var')
  sd['layer9.extra.weight'] = torch.zeros(3)
  sd['layer3.1.conv2.weight'] = torch.zeros(256, 256, 3, 1)
  bad = tmp_path / 'bad.pth'
  torch.save(sd, bad)
  with pytest.raises(ValueError) as e:
    pretrained.load(bad, source='torchvision', arch='resnet18')
  msg = str(e.value)
  assert 'layer2.0.bn1.running_var' in msg
  assert 'layer9.extra.weight' in msg
  assert 'layer3.1.conv2.weight' in msg


# ----------------------------------------------------------------------------------------------
# Keras MobileNet v1.


@pytest.fixture(scope='module')
def keras_mobilenet(tmp_path_factory):
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  tf = pytest.importorskip('tensorflow')
  tf.config.set_visible_devices([], 'GPU')
  keras = pytest.importorskip('keras')
  keras.utils.set_random_seed(0)
  model = keras.applications.MobileNet(weights=None, alpha=0.25, input_shape=(64, 64, 3),
                                       classes=10, classifier_activation=None)
  rng = np.random.default_rng(0)
  for layer in model.layers:  # non-trivial BN statistics
    if isinstance(layer, keras.layers.BatchNormalization):
      g, b, m, v = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                         rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 1.5, v.shape)])
  d = tmp_path_factory.mktemp('keras')
  model.save_weights(d / 'mobilenet.weights.h5')
  model.save(d / 'mobilenet.h5')
  return model, d


@pytest.mark.parametrize('fname', ['mobilenet.weights.h5', 'mobilenet.h5'])
def test_keras_mobilenet_parity(keras_mobilenet, fname):
  ref, d = keras_mobilenet
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model, variables = pretrained.load(d / fname, source='keras', arch='mobilenet_v1')
  want = np.asarray(ref(x, training=False))
  assert _rel_err(model.apply(variables, x, train=False), want) <= 1e-4
  model1, variables1 = pretrained.load(d / fname, source='keras', arch='mobilenet_v1',
                                       one_channel=True)
  got1 = model1.apply(variables1, x[..., :1], train=False)
  assert _rel_err(got1, np.asarray(ref(np.repeat(x[..., :1], 3, -1), training=False))) <= 1e-4


def test_keras_strict(keras_mobilenet):
  _, d = keras_mobilenet
  weights = pretrained.read_keras_h5(d / 'mobilenet.weights.h5')
  bad = dict(weights)
  bad.pop('conv_pw_3_bn')
  bad['extra_layer'] = [np.zeros(3)]
  with pytest.raises(ValueError, match=r"conv_pw_3_bn(.|\n)*extra_layer"):
    pretrained.mobilenet_v1_from_keras(bad)
  bad = dict(weights)
  bad['conv_pw_5'] = [np.zeros((1, 1, 64, 7), np.float32)]
  model_kwargs = pretrained.mobilenet_v1_from_keras(weights)[1]
  assert model_kwargs['width_multiplier'] == 0.25
  variables, kwargs = pretrained.mobilenet_v1_from_keras(bad)
  model = pretrained.MODELS.get('mobilenet_v1')(**kwargs)
  with pytest.raises(ValueError, match='block_5_pointwise/conv/kernel'):
    pretrained._finish(model, variables, reinit_head=False, in_channels=3, key=None,
                       what='test')


# ----------------------------------------------------------------------------------------------
# The CLI.


def test_cli_writes_checkpoint_and_refuses_overwrite(keras_mobilenet, tmp_path, capsys):
  _, d = keras_mobilenet
  src = d / 'mobilenet.weights.h5'
  out = tmp_path / 'ckpt'
  argv = ['--source=keras', '--arch=mobilenet_v1', f'--input={src}', f'--output={out}',
          '--num_classes=14']
  # In-process (a subprocess would spend most of the test importing JAX and TensorFlow again).
  assert import_weights.main(argv) == 0
  meta = json.loads((out / 'import.json').read_text())
  assert meta['arch'] == 'mobilenet_v1' and meta['num_classes'] == 14
  assert meta['reference_classes'] == 10
  assert meta['input_sha256'] == pretrained.sha256(src)
  assert meta['head_paths'] == ['params/head/bias', 'params/head/kernel']
  model, variables = pretrained.load_checkpoint(out)
  # Every imported leaf is the file's tensor; the head is new, 14 wide.
  want, _ = pretrained.mobilenet_v1_from_keras(pretrained.read_keras_h5(src), drop_head=True)
  got = flax.traverse_util.flatten_dict(variables, sep='/')
  want = flax.traverse_util.flatten_dict(want, sep='/')
  assert set(got) == set(want) | set(meta['head_paths'])
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  assert got['params/head/kernel'].shape == (256, 14) and got['params/head/bias'].shape == (14,)
  assert model.apply(variables, np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 14)
  capsys.readouterr()
  assert import_weights.main(argv) == 1
  assert 'not empty' in capsys.readouterr().err
  assert not (tmp_path / 'ckpt.tmp').exists()


def test_train_init_from_imported_checkpoint(tmp_path):
  """config.init_from.checkpoint: every imported leaf lands in the train state, the head of a
  run with another class count keeps its own initialisation."""
  import jax.numpy as jnp

  from cxr_jax import optim, parallel, train
  from cxr_jax.config_lib import base_config
  from cxr_jax.models.mobilenet import MobileNetV1

  blocks = ((16, 2), (32, 2))
  source = MobileNetV1(num_classes=10, blocks=blocks)
  imported = source.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  pretrained.save_checkpoint(
      tmp_path / 'imported', source, imported,
      {'model': 'mobilenet_v1', 'model_config': {'num_classes': 10, 'blocks': blocks},
       'head_paths': []})
  model = MobileNetV1(num_classes=14, blocks=blocks, bn_axis_name=parallel.DATA_AXIS)
  tx = optim.build_optimizer(base_config().optimizer, 1)
  state = train.create_train_state(model, tx, (32, 32, 3), jax.random.key(0),
                                   parallel.make_mesh())
  head0 = np.asarray(state.params['head']['kernel'])
  state = train.init_from_checkpoint(state, model, str(tmp_path / 'imported'), in_channels=3)
  np.testing.assert_array_equal(state.params['stem']['conv']['kernel'],
                                imported['params']['stem']['conv']['kernel'])
  np.testing.assert_array_equal(state.batch_stats['stem']['bn']['mean'],
                                imported['batch_stats']['stem']['bn']['mean'])
  np.testing.assert_array_equal(state.params['head']['kernel'], head0)


def test_init_from_plain_resnet_into_se_and_space_attention(tmp_path):
  """Paper 001's recipe: an ImageNet ResNet (no SE, `fc` head) initialises the multi-attention
  model; SE gates (config.init_from.fresh) and the new head keep their initialisation."""
  import jax.numpy as jnp

  from cxr_jax import optim, parallel, train
  from cxr_jax.config_lib import base_config
  from cxr_jax.models.resnet import ResNet18

  source = ResNet18(num_classes=10, width=8)
  imported = source.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  pretrained.save_checkpoint(tmp_path / 'imported', source, imported,
                             {'model_config': {'num_classes': 10, 'width': 8}, 'head_paths': []})
  model = ResNet18(num_classes=14, width=8, se_reduction=4, head='space_attention',
                   bn_axis_name=parallel.DATA_AXIS)
  tx = optim.build_optimizer(base_config().optimizer, 1)
  state = train.create_train_state(model, tx, (32, 32, 3), jax.random.key(0),
                                   parallel.make_mesh())
  se0 = np.asarray(state.params['layer1_0']['se']['fc1']['kernel'])
  with pytest.raises(ValueError, match='missing'):
    train.init_from_checkpoint(state, model, str(tmp_path / 'imported'), in_channels=3)
  with pytest.raises(ValueError, match='init_from.fresh'):
    train.init_from_checkpoint(state, model, str(tmp_path / 'imported'), in_channels=3,
                               fresh=('params/*/squeeze/*',))
  state = train.init_from_checkpoint(state, model, str(tmp_path / 'imported'), in_channels=3,
                                     fresh=('params/*/se/*',))
  np.testing.assert_array_equal(state.params['layer4_1']['conv2']['kernel'],
                                imported['params']['layer4_1']['conv2']['kernel'])
  np.testing.assert_array_equal(state.batch_stats['stem_bn']['var'],
                                imported['batch_stats']['stem_bn']['var'])
  np.testing.assert_array_equal(state.params['layer1_0']['se']['fc1']['kernel'], se0)
  assert state.params['space_attention']['classifier']['kernel'].shape == (128, 14)  # [2 x 64, K]
