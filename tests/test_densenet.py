"""DenseNet-121/161/169/201: shapes, feature names, parameter counts, parity with torchvision."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.models import build_model, densenet

# torchvision.models.densenetXXX(weights=None), 1000 classes: sum(p.numel() for p in parameters()).
TORCHVISION_PARAMS = {
    'densenet121': 7_978_856, 'densenet161': 28_681_000, 'densenet169': 14_149_480,
    'densenet201': 20_013_928,
}


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _shapes(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x))


def _rel_err(ours, ref: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


def _torch_densenet(arch: str, seed: int = 0):
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
    model.classifier.bias.normal_(0.0, 0.1)  # torchvision zeroes it
  return model.eval()


@pytest.fixture(scope='module')
def torch_densenet121():
  model = _torch_densenet('densenet121')
  return model, {k: v.numpy() for k, v in model.state_dict().items()}


def _random_variables(model, x, seed: int = 0):
  """He-normal kernels, unit BN: what `init` gives, without compiling `init` (slow on XLA:CPU)."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))).astype(s.dtype)
    return (np.ones if name in ('scale', 'var') else np.zeros)(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(model, x))


@pytest.mark.parametrize('arch', list(TORCHVISION_PARAMS))
def test_parameter_counts(arch):
  v = densenet._template(arch, 1000, 3)  # cached eval_shape of init, shared with the next test
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
    assert _count(densenet._template(arch, 1000, 3)['batch_stats']) == buffers, arch


def test_parity_densenet121(torch_densenet121):
  torch = pytest.importorskip('torch')
  ref_model, sd = torch_densenet121
  feats = {}
  for i in range(1, 5):
    getattr(ref_model.features, f'denseblock{i}').register_forward_hook(
        lambda m, inp, o, i=i: feats.__setitem__(f'denseblock{i}', o.numpy()))
  # torchvision's forward applies the final ReLU outside `features`.
  ref_model.features.register_forward_hook(
      lambda m, inp, o: feats.__setitem__('features', torch.relu(o).numpy()))
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = ref_model(x).numpy()

  variables = densenet.from_torchvision(sd, arch='densenet121')
  model = build_model(ml_collections.ConfigDict({'name': 'densenet121'}), num_classes=1000)
  # Jitted: every dense layer has its own input width, so op-by-op would compile each anyway.
  apply = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))
  logits, inter = apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  inter = inter['intermediates']
  errors = {'logits': _rel_err(logits, ref)}
  for name, f in feats.items():
    errors[name] = _rel_err(inter[name][0], f.transpose(0, 2, 3, 1))
  assert max(errors.values()) <= 1e-4, errors
  assert inter['features'][0].shape == (2, 2, 2, 1024)


@pytest.mark.parametrize('arch', ['densenet169', 'densenet201'])
def test_deeper_densenets_forward(arch):
  model = build_model(ml_collections.ConfigDict({'name': arch}), num_classes=14)
  x = jnp.zeros((2, 32, 32, 1))
  # Abstract (shapes only): compiling a real forward of these takes 20+ s on 2 cores.
  (logits, features), inter = jax.eval_shape(
      lambda v: model.apply(v, x, return_features=True, mutable=['intermediates']),
      _shapes(model, x))
  width = {'densenet169': 1664, 'densenet201': 1920}[arch]
  assert logits.shape == (2, 14) and features.shape == (2, 1, 1, width)
  assert inter['intermediates']['denseblock4'][0].shape == (2, 1, 1, width)


def test_shapes_intermediates_one_channel_bf16_train():
  # A small DenseNet (same code path as 121) keeps this fast.
  model = densenet.DenseNet(num_classes=3, block_config=(1, 2, 1, 1), growth_rate=8,
                            num_init_features=16, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = _random_variables(model, x)
  assert jax.tree.leaves(variables['params'])[0].dtype == jnp.float32
  (logits, features), inter = jax.jit(
      lambda v, x: model.apply(v, x, return_features=True, mutable=['intermediates']))(
          variables, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  shapes = {k: v[0].shape for k, v in inter['intermediates'].items()}
  # Channels: 16 + 8 = 24 -> 12 + 16 = 28 -> 14 + 8 = 22 -> 11 + 8 = 19.
  assert shapes == {'stem': (2, 16, 16, 16), 'denseblock1': (2, 8, 8, 24),
                    'denseblock2': (2, 4, 4, 28), 'denseblock3': (2, 2, 2, 22),
                    'denseblock4': (2, 1, 1, 19), 'features': (2, 1, 1, 19), 'pooled': (2, 19)}
  assert features.shape == (2, 1, 1, 19)
  np.testing.assert_allclose(densenet.head_fn(model, variables)(features), logits, rtol=1e-2,
                             atol=1e-2)  # bf16
  assert set(variables['params']) == {'conv0', 'norm0', 'dense_block1', 'transition1',
                                      'dense_block2', 'transition2', 'dense_block3',
                                      'transition3', 'dense_block4', 'norm5', 'classifier'}
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  before = variables['batch_stats']['norm0']['mean']
  assert not np.allclose(before, updates['batch_stats']['norm0']['mean'])


def test_from_torchvision_strict_head_grey_and_old_keys(torch_densenet121):
  _, sd = torch_densenet121
  assert any(k.endswith('num_batches_tracked') for k in sd)  # ignored, not "unexpected"

  broken = dict(sd)
  del broken['features.transition2.norm.running_mean']
  broken['features.denseblock1.extra.weight'] = np.zeros(3, np.float32)
  broken['features.denseblock3.denselayer2.conv2.weight'] = np.zeros((32, 128, 1, 1))
  with pytest.raises(ValueError) as e:
    densenet.from_torchvision(broken)
  msg = str(e.value)
  assert 'missing (1): features.transition2.norm.running_mean' in msg
  assert 'unexpected (1): features.denseblock1.extra.weight' in msg
  assert 'wrong shape (1): features.denseblock3.denselayer2.conv2.weight' in msg
  with pytest.raises(ValueError, match='holds a densenet121, not a densenet169'):
    densenet.from_torchvision(sd, arch='densenet169')
  with pytest.raises(ValueError, match='drop_head=True'):
    densenet.from_torchvision(sd, num_classes=14)

  # torchvision's own .pth files use pre-0.4 names ('denselayer1.norm.1.weight').
  old = {k.replace('.norm1.', '.norm.1.').replace('.conv2.', '.conv.2.'): v
         for k, v in sd.items()}
  assert 'features.denseblock1.denselayer1.norm.1.weight' in old
  full = densenet.from_torchvision(old)
  np.testing.assert_array_equal(full['params']['dense_block1']['denselayer1']['norm1']['scale'],
                                sd['features.denseblock1.denselayer1.norm1.weight'])

  # drop_head for CheXNet's 14 classes: everything but `classifier`, merged by the caller.
  imported = densenet.from_torchvision(sd, num_classes=14, drop_head=True)
  assert 'classifier' not in imported['params']
  model = densenet.DenseNet121(num_classes=14)
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
  fresh = _shapes(model, np.repeat(x, 3, -1))  # stands for model.init
  merged = {'params': {**fresh['params'], **imported['params']},
            'batch_stats': imported['batch_stats']}
  assert jax.tree.structure(merged) == jax.tree.structure(fresh)

  # in_channels=1 sums conv0 over RGB (a grey image then gives the logits of its RGB copy;
  # test_resnet checks that end to end), the rest is unchanged.
  grey = densenet.from_torchvision(sd, in_channels=1)
  rgb_sum = sd['features.conv0.weight'].sum(1, keepdims=True).transpose(2, 3, 1, 0)
  np.testing.assert_allclose(grey['params']['conv0']['kernel'], rgb_sum, rtol=1e-6)
  np.testing.assert_array_equal(grey['params']['norm5']['scale'], full['params']['norm5']['scale'])
