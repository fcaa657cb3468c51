"""Paper 003's custom CNN (with LRN) and paper 004's U-Net with the Dice loss."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cxr_jax.models import build_model
from cxr_jax.models.custom_cnn import CustomCNN, local_response_norm
from cxr_jax.models.unet import UNet, dice_loss


def _count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def _np_init(model, x, seed: int = 0) -> dict:
  """Variables drawn with numpy (compiling flax's random initialisers takes seconds on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          (rng.uniform(0.5, 1.5, s.shape) if path[-1].key == 'var' else
           rng.normal(0.0, 0.1, s.shape)), s.dtype), shapes)


@pytest.mark.parametrize('size,alpha,beta,k', [(5, 1e-4, 0.75, 2.0), (4, 0.3, 0.5, 1.0),
                                               (3, 1.0, 1.0, 0.5)])
def test_local_response_norm_matches_torch(size, alpha, beta, k):
  torch = pytest.importorskip('torch')
  x = torch.randn(2, 7, 5, 4) * 3  # NCHW, 7 channels: windows cut at both edges
  ref = torch.nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)(x).numpy()
  ours = local_response_norm(jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), size, alpha, beta, k)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref, rtol=1e-5, atol=1e-6)


def test_local_response_norm_by_hand():
  # One pixel, channels (1, 2, 3), size 3, alpha 3 (alpha/size = 1), beta 1, k 1:
  # channel 0 sees 1 + 4, channel 1 sees 1 + 4 + 9, channel 2 sees 4 + 9.
  x = jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(local_response_norm(x, 3, 3.0, 1.0, 1.0),
                             [1 / 6, 2 / 15, 3 / 14], rtol=1e-6)


def test_custom_cnn_shapes_and_parameter_count_at_227():
  model = build_model(ml_collections.ConfigDict({'name': 'custom_cnn'}), num_classes=2)
  x = jnp.zeros((1, 227, 227, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  (logits, features), state = jax.eval_shape(
      lambda v: model.apply(v, x, return_features=True, mutable=['intermediates']), variables)
  shapes = {k: v[0].shape[1:] for k, v in state['intermediates'].items()}
  # No padding: 227 -7/2-> 111 -3/2-> 55 -3-> 53 -3/2-> 26 -3-> 24 -3-> 22 -3-> 20 -3/2-> 9.
  assert shapes == {
      'conv1': (111, 111, 96), 'lrn1': (111, 111, 96), 'pool1': (55, 55, 96),
      'conv2': (53, 53, 128), 'lrn2': (53, 53, 128), 'pool2': (26, 26, 128),
      'conv3': (24, 24, 256), 'conv4': (22, 22, 256), 'conv5': (20, 20, 256),
      'features': (20, 20, 256), 'pool5': (9, 9, 256), 'pooled': (9 * 9 * 256,),
      'fc6': (4096,), 'fc7': (4096,)}
  assert logits.shape == (1, 2) and features.shape == (1, 20, 20, 256)
  conv = lambda k, cin, cout: k * k * cin * cout + cout
  dense = lambda cin, cout: cin * cout + cout
  expected = (conv(7, 3, 96) + conv(3, 96, 128) + conv(3, 128, 256) + 2 * conv(3, 256, 256)
              + dense(9 * 9 * 256, 4096) + dense(4096, 4096) + dense(4096, 2))
  assert expected == 103_328_514
  assert _count(variables['params']) == expected
  assert set(variables['params']) == {'features_0', 'features_4', 'features_8', 'features_10',
                                      'features_12', 'classifier_0', 'classifier_3',
                                      'classifier_6'}


def test_custom_cnn_same_padding_variant():
  model = CustomCNN(padding='SAME', hidden=16)
  x = jnp.zeros((1, 227, 227, 3))
  (_, features) = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, return_features=True))[0]
  # 'SAME' 7/2: 227 -> 114 -3/2-> 56 -> 56 -3/2-> 27 -> 27 -> 27 -> 27.
  assert features.shape == (1, 27, 27, 256)


def test_custom_cnn_init_forward_and_train_mode():
  model = CustomCNN(num_classes=2, hidden=32, widths=(8, 8, 16, 16, 16))
  x = jax.random.uniform(jax.random.key(1), (2, 99, 99, 1))  # conv5: 4x4
  variables = jax.jit(model.init)(jax.random.key(0), x)
  k = variables['params']['features_8']['kernel']
  assert abs(float(jnp.std(k)) - 0.01) < 0.002 and float(jnp.abs(jnp.mean(k))) < 0.002
  assert float(jnp.abs(variables['params']['classifier_0']['bias']).max()) == 0.0
  # Dropout is active in training only (weights x10, so that the logits are not ~0).
  variables = jax.tree.map(lambda p: 10 * p, variables)
  fn = jax.jit(lambda v, key, train: model.apply(v, x, train=train, rngs={'dropout': key}),
               static_argnums=2)
  a, b = fn(variables, jax.random.key(2), True), fn(variables, jax.random.key(3), True)
  e1, e2 = fn(variables, jax.random.key(2), False), fn(variables, jax.random.key(3), False)
  assert a.shape == (2, 2) and not np.allclose(a, b) and np.array_equal(e1, e2)


def test_unet_shapes_features_and_registry():
  model = build_model(ml_collections.ConfigDict({'name': 'unet', 'depth': 3, 'base_width': 4}),
                      num_classes=4, dtype='bfloat16')
  x = jnp.ones((2, 32, 48, 1))
  variables = _np_init(model, x)
  fn = jax.jit(lambda v, x: model.apply(v, x, return_features=True, mutable=['intermediates']))
  (logits, features), state = fn(variables, x)
  assert logits.shape == (2, 32, 48, 4) and logits.dtype == jnp.float32
  assert features.shape == (2, 32, 48, 4)
  inter = {k: v[0].shape for k, v in state['intermediates'].items()}
  assert inter['enc1'] == (2, 32, 48, 4) and inter['enc3'] == (2, 8, 12, 16)
  assert inter['bottleneck'] == (2, 4, 6, 32) and inter['dec1'] == (2, 32, 48, 4)
  with pytest.raises(ValueError, match='divisible by 8'):
    model.init(jax.random.key(0), jnp.ones((1, 36, 32, 1)))


def test_unet_parameter_count_without_batch_norm():
  # Ronneberger et al.'s U-Net (base 64, depth 4, no BN), 'same' convolutions, 1 input channel,
  # 2 outputs, counted by hand.
  model = UNet(num_classes=2, batch_norm=False)
  v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
  conv = lambda k, cin, cout: k * k * cin * cout + cout
  widths = [64, 128, 256, 512, 1024]
  expected = conv(3, 1, 64) + conv(3, 64, 64)
  for cin, cout in zip(widths[:-1], widths[1:], strict=True):  # levels 2-4, bottleneck
    expected += conv(3, cin, cout) + conv(3, cout, cout)
  for cin, cout in zip(widths[:0:-1], widths[-2::-1], strict=True):  # up-conv, 2 convs
    expected += conv(2, cin, cout) + conv(3, 2 * cout, cout) + conv(3, cout, cout)
  expected += conv(1, 64, 2)
  assert _count(v['params']) == expected == 31_030_658
  assert 'batch_stats' not in v


def test_unet_batch_norm_train_mode_updates_stats():
  model = UNet(num_classes=3, depth=2, base_width=4)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = _np_init(model, x)
  logits, state = jax.jit(lambda v: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables)
  assert logits.shape == (2, 16, 16, 3)
  before = variables['batch_stats']['down1']['bn1']['mean']
  assert not np.allclose(state['batch_stats']['down1']['bn1']['mean'], before)


def test_dice_loss_hand_cases():
  masks = np.zeros((2, 8, 8, 2), np.float32)
  masks[:, 2:6, 2:6, 0] = 1.0
  masks[:, :4, :, 1] = 1.0
  big = 30.0
  perfect = jnp.where(masks > 0, big, -big)
  assert float(dice_loss(perfect, masks)) < 1e-6
  disjoint = jnp.where(masks > 0, -big, big)
  assert float(dice_loss(disjoint, masks)) > 0.98
  # Half of a 16-pixel mask predicted, nothing else: dice = (2*8 + 1) / (8 + 16 + 1).
  half = np.full((1, 8, 8, 1), -big, np.float32)
  half[0, 2:4, 2:6, 0] = big
  np.testing.assert_allclose(dice_loss(jnp.asarray(half), masks[:1, :, :, :1]),
                             1 - 17 / 25, rtol=1e-5)
  # Empty mask predicted empty counts as perfect; per-image weights drop padded examples.
  assert float(dice_loss(jnp.full((1, 4, 4, 1), -big), jnp.zeros((1, 4, 4, 1)))) < 1e-6
  both = jnp.concatenate([perfect[:1], disjoint[:1]])
  np.testing.assert_allclose(dice_loss(both, masks, weights=jnp.array([1.0, 0.0])),
                             dice_loss(perfect[:1], masks[:1]), atol=1e-7)


def test_unet_learns_a_mask_with_dice_loss():
  import optax
  model = UNet(num_classes=1, depth=2, base_width=4, batch_norm=False)
  x = np.zeros((2, 16, 16, 1), np.float32)
  x[:, 4:12, 4:12] = 1.0
  masks = jnp.asarray(x)
  variables = _np_init(model, x)
  tx = optax.adam(1e-2)
  opt_state = tx.init(variables)

  @jax.jit
  def step(variables, opt_state):
    loss, grads = jax.value_and_grad(lambda v: dice_loss(model.apply(v, x), masks))(variables)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(variables, updates), opt_state, loss

  losses = []
  for _ in range(60):
    variables, opt_state, loss = step(variables, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.2
