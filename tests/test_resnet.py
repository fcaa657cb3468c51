"""ResNet-18 ... 152: shapes, feature names, parameter counts and parity with torchvision."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.models import build_model, resnet

# torchvision.models.resnetXX(weights=None), 1000 classes: sum(p.numel() for p in parameters()).
TORCHVISION_PARAMS = {
    'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
    'resnet101': 44_549_160, 'resnet152': 60_192_808,
}
# Parity input sizes: 32 px keeps the two deepest models inside the test file's time budget.
PARITY_PIXELS = {'resnet18': 64, 'resnet34': 64, 'resnet50': 64, 'resnet101': 32,
                 'resnet152': 32}


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _shapes(model, size: int = 64, channels: int = 3):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size,
                                                                          channels))))


def _random_variables(model, x, seed: int = 0):
  """He-normal kernels, unit BN: what `init` gives, without compiling `init` (slow on XLA:CPU,
  ~10 s CPU for ResNet-18, mostly the random number generators)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
    return (np.ones if name in ('scale', 'var') else np.zeros)(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _torch_resnet(arch: str, seed: int = 0):
  """torchvision's model with random weights and random BN statistics, in eval mode."""
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(seed)
  model = getattr(torchvision.models, arch)(weights=None)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):  # else eval-mode BN is (almost) the identity
        m.running_mean.normal_(0.0, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
  return model.eval()


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _rel_err(ours, ref: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize('arch', list(TORCHVISION_PARAMS))
def test_parameter_counts(arch):
  v = resnet._template(arch, 1000, 3)  # cached eval_shape of init, shared with the next test
  assert _count(v['params']) == TORCHVISION_PARAMS[arch]


def test_parameter_counts_equal_torchvision():
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  for arch, n in TORCHVISION_PARAMS.items():
    with torch.device('meta'):  # shapes only: skips the random initialisation
      model = getattr(torchvision.models, arch)(weights=None)
    assert sum(p.numel() for p in model.parameters()) == n, arch
    buffers = sum(b.numel() for k, b in model.state_dict().items()
                  if k.endswith(('running_mean', 'running_var')))
    assert _count(resnet._template(arch, 1000, 3)['batch_stats']) == buffers


@pytest.mark.parametrize('arch', list(TORCHVISION_PARAMS))
def test_parity_with_torchvision(arch):
  torch = pytest.importorskip('torch')
  ref_model = _torch_resnet(arch)
  feats = {}
  ref_model.relu.register_forward_hook(
      lambda m, i, o: feats.__setitem__('conv1', o.numpy()))  # stem ReLU, before max-pool
  for i in range(1, 5):
    getattr(ref_model, f'layer{i}').register_forward_hook(
        lambda m, inp, o, i=i: feats.__setitem__(f'conv{i + 1}_x', o.numpy()))
  px = PARITY_PIXELS[arch]
  x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = ref_model(x).numpy()

  variables = resnet.from_torchvision(_state_dict(ref_model), arch=arch)
  model = build_model(ml_collections.ConfigDict({'name': arch}), num_classes=1000)
  # Op by op, not jitted: the blocks repeat few shapes, so this compiles far less than one
  # whole-network jit would (ResNet-152: ~9 s against ~14 s here).
  logits, inter = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                              mutable=['intermediates'])
  inter = inter['intermediates']
  errors = {'logits': _rel_err(logits, ref)}
  for name, f in feats.items():
    errors[name] = _rel_err(inter[name][0], f.transpose(0, 2, 3, 1))
  assert max(errors.values()) <= 1e-4, errors
  np.testing.assert_array_equal(inter['features'][0], inter['conv5_x'][0])


def test_shapes_intermediates_one_channel_bf16_train():
  model = build_model(ml_collections.ConfigDict({'name': 'resnet18'}), num_classes=14,
                      dtype='bfloat16')
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = _random_variables(model, x)
  assert jax.tree.leaves(variables['params'])[0].dtype == jnp.float32
  (logits, features), inter = model.apply(variables, x, return_features=True,
                                          mutable=['intermediates'])
  assert logits.shape == (2, 14) and logits.dtype == jnp.float32
  assert features.shape == (2, 1, 1, 512)
  shapes = {k: v[0].shape for k, v in inter['intermediates'].items()}
  assert shapes == {'conv1': (2, 16, 16, 64), 'conv2_x': (2, 8, 8, 64),
                    'conv3_x': (2, 4, 4, 128), 'conv4_x': (2, 2, 2, 256),
                    'conv5_x': (2, 1, 1, 512), 'features': (2, 1, 1, 512), 'pooled': (2, 512)}
  assert set(variables['params']) >= {'stem_conv', 'stem_bn', 'layer1_0', 'layer4_1', 'fc'}
  np.testing.assert_allclose(resnet.head_fn(model, variables)(features), logits, rtol=1e-2,
                             atol=1e-2)  # bf16
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before = variables['batch_stats']['layer1_0']['bn1']['mean']
  assert not np.allclose(before, updates['batch_stats']['layer1_0']['bn1']['mean'])


def _se_params(arch: str, r: int = 16) -> int:
  """Hand count: per block with C output channels, FC C -> C/r and C/r -> C with biases."""
  stages, bottleneck = resnet.RESNET_STAGES[arch]
  total = 0
  for i, n in enumerate(stages):
    c = 64 * 2**i * (4 if bottleneck else 1)
    total += n * (c * (c // r) + c // r + (c // r) * c + c)
  return total


def test_squeeze_excite_parameter_counts():
  assert _se_params('resnet18') == 89_080
  # SE-ResNet-50: 28.09M parameters in Table 7 of Hu et al. (2018).
  assert _se_params('resnet50') == 2_530_992
  for arch in ('resnet18', 'resnet50'):
    v = _shapes(resnet.RESNETS[arch](num_classes=1000, se_reduction=16))
    assert _count(v['params']) == TORCHVISION_PARAMS[arch] + _se_params(arch)
  assert _count(v['params']) == 28_088_024


def test_squeeze_excite_shapes_and_gates():
  model = resnet.ResNet18(num_classes=5, se_reduction=16)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = _random_variables(model, x)
  se = variables['params']['layer3_1']['se']
  assert se['fc1']['kernel'].shape == (256, 16) and se['fc2']['kernel'].shape == (16, 256)
  logits, inter = model.apply(variables, x, mutable=['intermediates'])
  assert logits.shape == (2, 5)
  inter = inter['intermediates']
  for i in range(1, 5):
    for j in range(2):
      gate = inter[f'layer{i}_{j}']['se']['gate'][0]
      assert gate.shape == (2, 64 * 2**(i - 1))
      assert np.all((gate > 0) & (gate < 1))
  assert inter['conv5_x'][0].shape == (2, 1, 1, 512)


@pytest.mark.parametrize('stride_in_1x1', [False, True])
def test_stride_in_1x1_moves_the_stride(stride_in_1x1):
  model = resnet.ResNet50(num_classes=2, stride_in_1x1=stride_in_1x1)
  x = jnp.zeros((1, 64, 64, 3))
  # Shapes only: the modules' outputs as recorded by capture_intermediates, traced abstractly.
  inter = jax.eval_shape(
      lambda: model.init(jax.random.key(0), x, capture_intermediates=True))
  block = inter['intermediates']['layer2_0']  # input 16 x 16 x 256, output 8 x 8 x 512
  conv1 = block['conv1']['__call__'][0].shape
  conv2 = block['conv2']['__call__'][0].shape
  assert conv1 == ((1, 8, 8, 128) if stride_in_1x1 else (1, 16, 16, 128))
  assert conv2 == (1, 8, 8, 128)
  assert inter['intermediates']['conv5_x'][0].shape == (1, 2, 2, 2048)
  # Same parameters either way, so torchvision weights load into both layouts.
  assert _count(inter['params']) == _count(
      _shapes(resnet.ResNet50(num_classes=2))['params'])


def test_from_torchvision_strict_head_and_grey():
  torch = pytest.importorskip('torch')
  ref_model = _torch_resnet('resnet18')
  sd = _state_dict(ref_model)
  assert any(k.endswith('num_batches_tracked') for k in sd)  # ignored, not "unexpected"

  broken = dict(sd)
  del broken['layer2.0.downsample.1.running_var']
  broken['layer1.0.extra.weight'] = np.zeros(3, np.float32)
  broken['layer3.1.conv2.weight'] = np.zeros((256, 256, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    resnet.from_torchvision(broken)
  msg = str(e.value)
  assert 'missing (1): layer2.0.downsample.1.running_var' in msg
  assert 'unexpected (1): layer1.0.extra.weight' in msg
  assert 'wrong shape (1): layer3.1.conv2.weight' in msg
  with pytest.raises(ValueError, match='holds a resnet18, not a resnet34'):
    resnet.from_torchvision(sd, arch='resnet34')
  with pytest.raises(ValueError, match='drop_head=True'):
    resnet.from_torchvision(sd, num_classes=14)

  # drop_head: everything but `fc`, merged into a fresh init by the caller.
  imported = resnet.from_torchvision(sd, num_classes=14, drop_head=True)
  assert 'fc' not in imported['params']
  model = resnet.ResNet18(num_classes=14)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  fresh = _random_variables(model, x)  # stands for model.init
  merged = {'params': {**fresh['params'], **imported['params']},
            'batch_stats': imported['batch_stats']}
  assert jax.tree.structure(merged) == jax.tree.structure(fresh)
  assert model.apply(merged, x).shape == (2, 14)

  # in_channels=1 sums conv1 over RGB: a grey image gives the logits of its RGB copy.
  grey = resnet.from_torchvision(sd, in_channels=1)
  assert grey['params']['stem_conv']['kernel'].shape == (7, 7, 1, 64)
  full = resnet.from_torchvision(sd)
  model = resnet.ResNet18(num_classes=1000)
  np.testing.assert_allclose(model.apply(grey, x[..., :1]),
                             model.apply(full, np.repeat(x[..., :1], 3, axis=-1)),
                             rtol=1e-5, atol=1e-4)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(np.repeat(x[..., :1], 3, -1).transpose(0, 3, 1, 2)))
  assert _rel_err(model.apply(grey, x[..., :1]), ref.numpy()) <= 1e-4
