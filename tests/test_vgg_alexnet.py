"""VGG and AlexNet: parity with torchvision (random weights, eval mode), weight import,
parameter counts, and paper 003's fine-tuning recipe (learning-rate multipliers)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax import optim
from cxr_jax.config_lib import base_config
from cxr_jax.models import alexnet, build_model, vgg

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _np_init(model, x, seed: int = 0) -> dict:
  """Variables of `model` drawn with numpy (XLA:CPU takes seconds to compile flax's random
  initialisers, even for tiny models); BatchNorm variances positive."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          (rng.uniform(0.5, 1.5, s.shape) if path[-1].key == 'var' else
           rng.normal(0.0, 0.1, s.shape)), s.dtype), shapes)


def _rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref|: the parity metric (<= 1e-4 in float32)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _randomise_bn(model) -> None:
  """Non-trivial BatchNorm statistics and affine parameters, so that their import is tested."""
  g = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
        m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)


def _torch_run(model, x, taps: dict[str, object]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Logits and the outputs of `taps` {our name: torch submodule} (NCHW maps -> NHWC)."""
  out = {}
  hooks = [m.register_forward_hook(
      lambda _m, _i, o, name=name: out.__setitem__(name, o.detach().clone()))
      for name, m in taps.items()]
  with torch.no_grad():
    logits = model(x).numpy()
  for h in hooks:
    h.remove()
  return logits, {k: _nhwc(v) if v.ndim == 4 else v.numpy() for k, v in out.items()}


@pytest.mark.parametrize('size,out', [(1, 7), (2, 7), (5, 3), (10, 7), (13, 6), (14, 7), (7, 7),
                                      (9, 4)])
def test_adaptive_avg_pool_matches_torch(size, out):
  x = torch.randn(2, 3, size, size + 3)
  ref = torch.nn.AdaptiveAvgPool2d((out, out - 1))(x)
  ours = vgg.adaptive_avg_pool2d(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), (out, out - 1))
  np.testing.assert_allclose(ours, _nhwc(ref), rtol=1e-5, atol=1e-6)


def test_first_linear_kernel_permutes_nchw_flatten_to_nhwc():
  rng = np.random.default_rng(0)
  c, h, w, out = 5, 3, 4, 7
  weight = rng.normal(size=(out, c * h * w)).astype(np.float32)
  fmap = rng.normal(size=(c, h, w)).astype(np.float32)
  ref = weight @ fmap.reshape(-1)  # torch: flatten of (C, H, W)
  ours = fmap.transpose(1, 2, 0).reshape(-1) @ vgg.first_linear_kernel(c, h, w)(weight)
  # Float32 sums of 60 terms in two orders: tolerance on the scale of the outputs, since one
  # that nearly cancels has rounding errors the size of the others.
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize('arch', ['vgg16', 'vgg19', 'vgg11_bn'])
def test_vgg_parity_with_torchvision(arch):
  torch.manual_seed(0)
  ref_model = getattr(torchvision.models, arch)(weights=None).eval()
  batch_norm = arch.endswith('_bn')
  _randomise_bn(ref_model)
  last_conv = max(i for i, m in enumerate(ref_model.features) if isinstance(m, torch.nn.Conv2d))
  taps = {'conv1_1': ref_model.features[2 if batch_norm else 1],
          'conv5': ref_model.features[last_conv + (2 if batch_norm else 1)],
          'pool5': ref_model.features, 'fc6': ref_model.classifier[1],
          'fc7': ref_model.classifier[4]}
  x = torch.randn(2, 3, 64, 64)
  ref_logits, ref_feats = _torch_run(ref_model, x, taps)

  variables = vgg.from_torchvision(ref_model.state_dict())
  model = build_model(ml_collections.ConfigDict({'name': arch.removesuffix('_bn'),
                                                 'batch_norm': batch_norm}), num_classes=1000)
  logits, state = model.apply(variables, jnp.asarray(_nhwc(x)), mutable=['intermediates'])
  inter = {k: v[0] for k, v in state['intermediates'].items()}
  assert _rel_err(logits, ref_logits) <= 1e-4
  for name, ref in ref_feats.items():
    assert inter[name].shape == ref.shape, name
    assert _rel_err(inter[name], ref) <= 1e-4, name
  assert inter['features'] is inter['conv5'] or np.array_equal(inter['features'], inter['conv5'])
  last = 'conv5_3' if arch == 'vgg16' else 'conv5_4' if arch == 'vgg19' else 'conv5_2'
  np.testing.assert_array_equal(inter[last], inter['conv5'])
  # `pooled` is the 7x7 map flattened in NHWC order.
  assert inter['pooled'].shape == (2, 512 * 7 * 7)


def test_alexnet_parity_with_torchvision():
  torch.manual_seed(0)
  ref_model = torchvision.models.alexnet(weights=None).eval()
  taps = {'conv1': ref_model.features[1], 'conv2': ref_model.features[4],
          'conv5': ref_model.features[11], 'pool5': ref_model.features,
          'fc6': ref_model.classifier[2], 'fc7': ref_model.classifier[5]}
  x = torch.randn(2, 3, 96, 80)  # conv5 is 5x4 here, so avgpool(6) replicates and mixes
  ref_logits, ref_feats = _torch_run(ref_model, x, taps)
  variables = alexnet.from_torchvision(ref_model.state_dict())
  model = build_model(ml_collections.ConfigDict({'name': 'alexnet'}), num_classes=1000)
  (logits, features), state = model.apply(variables, jnp.asarray(_nhwc(x)),
                                          return_features=True, mutable=['intermediates'])
  inter = {k: v[0] for k, v in state['intermediates'].items()}
  assert _rel_err(logits, ref_logits) <= 1e-4
  for name, ref in ref_feats.items():
    assert _rel_err(inter[name], ref) <= 1e-4, name
  np.testing.assert_array_equal(features, inter['conv5'])


def test_parameter_counts_equal_torchvision():
  # torchvision: sum(p.numel() for p in vgg16().parameters()) etc.
  expected = {('vgg16', False): 138_357_544, ('vgg19', False): 143_667_240,
              ('vgg16', True): 138_365_992, ('alexnet', False): 61_100_840}
  x = jnp.zeros((1, 224, 224, 3))
  for (name, bn), count in expected.items():
    kw = {'batch_norm': bn} if name != 'alexnet' else {}
    model = build_model(ml_collections.ConfigDict({'name': name, **kw}), num_classes=1000)
    v = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))
    assert _count(v['params']) == count, name


def test_import_is_strict_and_lists_problems():
  sd = {k: v.numpy() for k, v in torchvision.models.alexnet(weights=None).state_dict().items()}
  bad = dict(sd)
  del bad['features.3.bias']
  bad['features.99.weight'] = np.zeros(3, np.float32)
  bad['classifier.4.weight'] = np.zeros((4096, 4095), np.float32)
  with pytest.raises(ValueError) as err:
    alexnet.from_torchvision(bad)
  msg = str(err.value)
  assert 'features.3.bias' in msg and 'features.99.weight' in msg and 'classifier.4.weight' in msg
  with pytest.raises(ValueError, match='classifier.6.weight'):
    alexnet.from_torchvision(sd, num_classes=14)  # 1000-way head where 14 were asked for
  headless = alexnet.from_torchvision(sd, drop_head=True)
  assert 'classifier_6' not in headless['params'] and 'classifier_4' in headless['params']


def test_headless_grayscale_import_then_new_head():
  torch.manual_seed(0)
  ref_model = torchvision.models.alexnet(weights=None).eval()
  imported = alexnet.from_torchvision(ref_model.state_dict(), drop_head=True, in_channels=1)
  model = build_model(ml_collections.ConfigDict({'name': 'alexnet'}), num_classes=14)
  gray = jax.random.uniform(jax.random.key(1), (2, 64, 64, 1))
  fresh = jax.eval_shape(lambda: model.init(jax.random.key(0), gray))
  assert (imported['params']['features_0']['kernel'].shape ==
          fresh['params']['features_0']['kernel'].shape == (11, 11, 1, 64))
  # A new 14-way head (here zeros; `model.init` would draw it, but initialising all of AlexNet
  # just for it is slow).
  head = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), fresh['params']['classifier_6'])
  params = {**imported['params'], 'classifier_6': head}
  logits, ours = model.apply({'params': params}, gray, return_features=True)
  assert logits.shape == (2, 14)
  # A gray image repeated over RGB gives the same conv5 map through the RGB weights.
  rgb = torch.from_numpy(np.repeat(np.asarray(gray).transpose(0, 3, 1, 2), 3, axis=1))
  _, ref = _torch_run(ref_model, rgb, {'conv5': ref_model.features[11]})
  assert _rel_err(ours, ref['conv5']) <= 1e-4


def test_dtype_train_mode_and_any_channels():
  model = build_model(ml_collections.ConfigDict({'name': 'vgg11', 'widths': (4, 8, 8, 8, 8),
                                                 'hidden': 16, 'batch_norm': True}),
                      num_classes=3, dtype='bfloat16', bn_axis_name='data')
  x = jnp.ones((2, 32, 32, 1))
  variables = _np_init(model, x)
  assert jax.tree.leaves(variables['params'])[0].dtype == jnp.float32
  logits, features = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert features.shape == (2, 2, 2, 8) and features.dtype == jnp.bfloat16
  # Train mode: dropout needs its rng; BatchNorm statistics are updated (no mesh -> no axis).
  model = model.clone(bn_axis_name=None)
  logits, state = jax.eval_shape(lambda v: model.apply(
      v, x, train=True, rngs={'dropout': jax.random.key(1)}, mutable=['batch_stats']), variables)
  assert logits.shape == (2, 3) and 'batch_stats' in state


# ----------------------------------------------------------------------------------------------
# Paper 003's fine-tuning recipe: learning-rate multipliers per parameter-path prefix.


def _sgd(lr_multipliers=None, **overrides):
  cfg = base_config().optimizer
  cfg.name = 'sgd'
  cfg.learning_rate = 0.1
  cfg.kwargs = ml_collections.ConfigDict({'momentum': 0.0})
  for k, v in overrides.items():
    cfg[k] = v
  if lr_multipliers is not None:
    cfg.lr_multipliers = lr_multipliers
  return cfg


def _one_step(tx, params):
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  return updates, state


@pytest.mark.parametrize('rest', [1.0, 0.0])
def test_lr_multipliers_scale_and_freeze(rest):
  params = {'features': {'conv': {'kernel': jnp.zeros((2,))}},
            'classifier': {'fc': {'kernel': jnp.zeros((3,)), 'bias': jnp.zeros(())}},
            'classifier_extra': {'w': jnp.zeros(())}}  # a prefix must end at a '/' boundary
  mult = {'classifier': 10.0, '': rest}
  tx = optim.build_optimizer(_sgd(mult), 10)
  updates, state = _one_step(tx, params)
  np.testing.assert_allclose(updates['classifier']['fc']['kernel'], -1.0, rtol=1e-6)
  np.testing.assert_allclose(updates['classifier']['fc']['bias'], -1.0, rtol=1e-6)
  np.testing.assert_allclose(updates['features']['conv']['kernel'], -0.1 * rest, rtol=1e-6)
  np.testing.assert_allclose(updates['classifier_extra']['w'], -0.1 * rest, rtol=1e-6)
  # The plateau scale stays the last element and still scales every group.
  assert optim.plateau_scale(state) == 1.0
  state = optim.set_plateau_scale(tx.init(params), 0.5)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  np.testing.assert_allclose(updates['classifier']['fc']['kernel'], -0.5, rtol=1e-6)


def test_lr_multipliers_adam_momentum_and_frozen_together():
  params = {'backbone': {'w': jnp.zeros(())}, 'mid': {'w': jnp.zeros(())},
            'classifier_6': {'w': jnp.zeros(())}}
  cfg = _sgd({'classifier_6': 10.0, 'mid': 0.5}, name='adam', learning_rate=0.01,
             frozen=('backbone',), kwargs=ml_collections.ConfigDict({'eps': 1e-8}))
  tx = optim.build_optimizer(cfg, 10)
  updates, _ = _one_step(tx, params)
  # Adam's first step is -lr * sign(g): the multiplier scales the learning rate.
  np.testing.assert_allclose(updates['classifier_6']['w'], -0.1, rtol=1e-5)
  np.testing.assert_allclose(updates['mid']['w'], -0.005, rtol=1e-5)
  assert float(updates['backbone']['w']) == 0.0


def test_paper_003_recipe_on_vgg():
  """New 2-way fc8 at 10x the base rate, transferred layers at 1x (paper 003, Matlab's
  WeightLearnRateFactor=10), through config only."""
  model = build_model(ml_collections.ConfigDict({'name': 'vgg11', 'widths': (4, 4, 4, 4, 4),
                                                 'hidden': 8}), num_classes=2)
  params = _np_init(model, jnp.ones((1, 32, 32, 3)))['params']
  tx = optim.build_optimizer(_sgd({'classifier_6': 10.0}, weight_decay=5e-4), 10)
  updates, _ = _one_step(tx, params)
  g = lambda p: 1.0 + 5e-4 * p  # gradient of 1 plus the L2 term
  head, conv = 'classifier_6', 'features_0'
  np.testing.assert_allclose(updates[head]['kernel'], -1.0 * g(params[head]['kernel']), rtol=1e-5)
  np.testing.assert_allclose(updates[conv]['kernel'], -0.1 * g(params[conv]['kernel']), rtol=1e-5)
