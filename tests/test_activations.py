"""Paper 003's visualisation library: grids, filters, the strongest channel, the discrete jet
heat map with transparent zeros, activation maximisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib import colormaps

from cxr_jax.explain import activations as A


def test_grids_and_filters():
  acts = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32) * 3
  grid = A.activation_grid(acts)
  assert grid.shape == (3 * 6 - 1, 3 * 7 - 1)  # 7 channels -> 3 x 3 tiles, 1 px gaps
  np.testing.assert_allclose(grid[:5, :6], A.scale01(acts[..., 0]))
  assert A.activation_grid(acts, channels=[2, 4], ncols=2).shape == (5, 13)
  kernel = np.random.default_rng(1).normal(size=(7, 7, 3, 10))
  f = A.filter_images(kernel)
  assert f.shape == (10, 7, 7, 3) and f.min() == 0.0 and f.max() == 1.0
  with pytest.raises(ValueError, match='1 or 3 input channels'):
    A.filter_images(np.zeros((3, 3, 64, 8)))


def test_strongest_channel_inside_the_roi():
  acts = np.zeros((4, 4, 3), np.float32)
  acts[0, 0, 1] = 10.0  # strongest overall, outside the ROI
  acts[2:, 2:, 2] = 1.0
  assert A.strongest_channel(acts) == 1
  roi = np.zeros((8, 8), bool)
  roi[4:, 4:] = True
  assert A.strongest_channel(acts, roi) == 2


def test_jet_heatmap_is_discrete_saturated_and_transparent_at_zero():
  act = np.zeros((4, 4), np.float32)
  act[1, 1], act[2, 2], act[3, 3] = 0.2, 0.7, 1.0
  rgba = A.jet_rgba(act, (32, 32), threshold=0.6, steps=5, alpha=0.5)
  assert rgba.shape == (32, 32, 4)
  alpha = rgba[..., 3]
  assert alpha[0, 0] == 0.0 and set(np.unique(alpha)) == {0.0, 0.5}
  colours = {tuple(c) for c in rgba[alpha > 0][:, :3].round(6)}
  assert len(colours) <= 5
  top = tuple(np.asarray(colormaps['jet'](1.0))[:3].round(6))
  assert tuple(rgba[27, 27, :3].round(6)) == top  # the peak, saturated
  image = np.full((32, 32), 0.5, np.float32)
  out = A.overlay(image, act, threshold=0.6, steps=5, alpha=0.5)
  np.testing.assert_allclose(out[0, 0], 0.5)  # transparent: the X-ray shows through


def test_maximize_activation_raises_the_chosen_channel():
  w = jax.random.normal(jax.random.key(0), (3, 3, 1, 4))

  def fn(x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jax.nn.relu(y)

  start = A.maximize_activation(fn, [1, 3], (16, 16, 1), steps=0)
  after = A.maximize_activation(fn, [1, 3], (16, 16, 1), steps=20)
  for i, c in enumerate([1, 3]):
    before_v = float(jnp.mean(fn(jnp.asarray(start[i:i + 1]))[..., c]))
    after_v = float(jnp.mean(fn(jnp.asarray(after[i:i + 1]))[..., c]))
    assert after_v > before_v + 0.1
  shown = A.synthesized_images(after)
  assert shown.shape == (2, 16, 16) and shown.min() == 0.0 and shown.max() == 1.0


@pytest.mark.parametrize('cfg,size', [
    ({'name': 'custom_cnn', 'widths': (4, 4, 8, 8, 8), 'hidden': 8}, 96),
    ({'name': 'alexnet', 'hidden': 8}, 96),
    ({'name': 'vgg16', 'widths': (2, 2, 4, 4, 4), 'hidden': 8}, 64)])
def test_head_fn_recomputes_the_logits_for_grad_cam(cfg, size):
  import ml_collections

  from cxr_jax.models import build_model, model_function
  model = build_model(ml_collections.ConfigDict(cfg), num_classes=2)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  variables = model.init(jax.random.key(1), x)
  logits, features = model.apply(variables, x, return_features=True)
  head = model_function(model, 'head_fn')(model, variables)
  np.testing.assert_allclose(head(features), logits, rtol=1e-4, atol=1e-5)
