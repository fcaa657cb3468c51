"""Paper 002's alignment module: the affine sampler (by hand, scipy, torch, TensorFlow), the
smoothing, the losses, the identity start, and the stop on a degenerate alignment."""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from cxr_jax import alignment_train, parallel
from cxr_jax.attention import alignment as al
from cxr_jax.data import align_ops, ops
from cxr_jax.models import build_model


class _TinyLossNet(nn.Module):
  """Stands in for the frozen ResNet-50 of the perceptual loss: two sown maps, quick to
  compile."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Conv(4, (3, 3), strides=2)(x)
    self.sow('intermediates', 'conv2_x', x)
    x = nn.Conv(6, (3, 3), strides=2)(nn.relu(x))
    self.sow('intermediates', 'conv5_x', x)
    return x.mean(axis=(1, 2))


def _tiny_regressor_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({'name': 'resnet18', 'width': 4, 'stage_sizes': (1, 1, 1, 1)})


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def test_eq6_matrix_by_hand():
  m = np.asarray(al.affine_matrix(jnp.array([2.0, 3.0, 0.1, -0.2, math.pi / 2])))
  np.testing.assert_allclose(m, [[0.0, -3.0, 0.1], [2.0, 0.0, -0.2]], atol=1e-6)
  np.testing.assert_allclose(al.affine_matrix_np(np.array(al.IDENTITY)),
                             [[1, 0, 0], [0, 1, 0]])
  inv = al.invert_affine(m)
  np.testing.assert_allclose(inv[:, :2] @ m[:, :2], np.eye(2), atol=1e-6)
  np.testing.assert_allclose(inv[:, :2] @ m[:, 2] + inv[:, 2], 0, atol=1e-6)


def test_warp_by_hand():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  ident = al.affine_matrix(jnp.array([al.IDENTITY]))
  np.testing.assert_allclose(al.warp(x, ident), x, atol=1e-5)
  # t_x = 2 / W: every output pixel samples one pixel to its right; the last column is outside.
  shift = jnp.array([[[1.0, 0, 0.5], [0, 1.0, 0]]])
  out = np.asarray(al.warp(x, shift))[0, ..., 0]
  np.testing.assert_allclose(out[:, :3], np.asarray(x)[0, :, 1:, 0], atol=1e-5)
  np.testing.assert_allclose(out[:, 3], 0, atol=1e-6)
  # Half a pixel: the mean of two neighbours; the last column mixes with the zero padding.
  half = np.asarray(al.warp(x, jnp.array([[[1.0, 0, 0.25], [0, 1.0, 0]]])))[0, ..., 0]
  np.testing.assert_allclose(half[0], [0.5, 1.5, 2.5, 1.5], atol=1e-5)
  # fill=-1: outside is black for images in [-1, 1].
  np.testing.assert_allclose(np.asarray(al.warp(x, shift, fill=-1.0))[0, :, 3, 0], -1, atol=1e-6)


def _scipy_warp(image: np.ndarray, m: np.ndarray) -> np.ndarray:
  """The same warp with scipy: output index (i, j) -> input index, 'grid-constant' = zeros
  beyond the edge with interpolation (torch's padding_mode='zeros')."""
  h, w = image.shape[:2]
  a, b, c = m[0]
  d, e, f = m[1]
  # Pixel-index form of the normalised map (align_corners=False): rows (i) then columns (j).
  lin = np.array([[e, d * h / w], [b * w / h, a]])
  offset = np.array([d * (h / w) * (1 - w) / 2 + e * (1 - h) / 2 + (h / 2) * (f + 1) - 0.5,
                     a * (1 - w) / 2 + b * (w / h) * (1 - h) / 2 + (w / 2) * (c + 1) - 0.5])
  return np.stack([ndimage.affine_transform(image[..., k], lin, offset, order=1,
                                            mode='grid-constant', cval=0.0)
                   for k in range(image.shape[-1])], -1)


@pytest.mark.parametrize('params', [(1.1, 0.9, 0.1, -0.2, 0.3), (0.7, 1.3, -0.3, 0.05, -0.6)])
def test_warp_matches_scipy_affine_transform(params):
  rng = np.random.default_rng(0)
  image = rng.normal(size=(13, 11, 2)).astype(np.float32)
  m = al.affine_matrix_np(np.array(params))
  got = np.asarray(al.warp(jnp.asarray(image[None]), jnp.asarray(m[None], jnp.float32)))[0]
  np.testing.assert_allclose(got, _scipy_warp(image, m), atol=1e-4)


def test_warp_matches_torch_affine_grid_and_grid_sample():
  torch = pytest.importorskip('torch')
  fn = torch.nn.functional
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 9, 7, 3)).astype(np.float32)
  m = al.affine_matrix_np(np.array([[1.1, 0.9, 0.1, -0.2, 0.3],
                                    [0.8, 1.2, -0.05, 0.1, -0.2]])).astype(np.float32)
  grid = fn.affine_grid(torch.tensor(m), (2, 3, 9, 7), align_corners=False)
  want = fn.grid_sample(torch.tensor(x).permute(0, 3, 1, 2), grid, align_corners=False)
  got = al.warp(jnp.asarray(x), jnp.asarray(m))
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  # The smoothing B(G(.)) against avg_pool2d + bilinear interpolate.
  y = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  t = torch.tensor(y).permute(0, 3, 1, 2)
  ref = fn.interpolate(fn.avg_pool2d(t, 4, 4), size=(8, 8), mode='bilinear',
                       align_corners=False)
  np.testing.assert_allclose(al.smooth(jnp.asarray(y), 4), ref.permute(0, 2, 3, 1).numpy(),
                             atol=1e-5)


def test_warp_gradient_by_finite_differences():
  # A smooth image keeps the slope jumps of bilinear interpolation (at pixel crossings) small.
  yy, xx = np.mgrid[0:12, 0:12]
  blob = np.exp(-((xx - 5.0) ** 2 + (yy - 6.5) ** 2) / 12.0).astype(np.float32)
  x = jnp.asarray(blob[None, ..., None])
  target = jnp.asarray(np.roll(blob, 1, axis=1)[None, ..., None])
  f = jax.jit(lambda p: jnp.sum((al.warp(x, al.affine_matrix(p[None])) - target) ** 2))
  p = jnp.array([1.05, 0.97, 0.03, -0.02, 0.1])
  g = np.asarray(jax.grad(f)(p))
  eps = 1e-2
  fd = [(f(p + eps * e) - f(p - eps * e)) / (2 * eps) for e in np.eye(5, dtype=np.float32)]
  np.testing.assert_allclose(g, fd, rtol=0.05, atol=0.02 * np.abs(g).max())


def test_grid_pool_and_smooth():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  pooled = np.asarray(al.grid_pool(x, 2))[0, ..., 0]
  np.testing.assert_allclose(pooled, [[2.5, 4.5], [10.5, 12.5]])
  const = jnp.full((1, 8, 8, 3), 0.7)
  np.testing.assert_allclose(al.smooth(const, 4), const, atol=1e-6)
  np.testing.assert_array_equal(al.smooth(x, 1), x)
  with pytest.raises(ValueError, match='smooth_kernel'):
    al.grid_pool(x, 3)


def test_losses_by_hand():
  anchor = jnp.zeros((2, 2, 2))
  images = jnp.array([[[[3.0, 4.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])
  # Per-pixel L2 over channels: 5, 0, 1, 0 -> eq. 8 sums them (not squares, not a mean).
  np.testing.assert_allclose(al.euclidean_loss(anchor, images), [6.0], atol=1e-5)
  np.testing.assert_allclose(al.euclidean_loss(anchor, images, 'mean'), [1.5], atol=1e-5)
  fa = [jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 1, 1, 2))]
  fx = [jnp.full((2, 2, 2, 1), 1.0), jnp.array([[[[3.0, 4.0]]], [[[0.0, 0.0]]]])]
  # Layer 1: ||diff|| = 2 over C H W = 4 -> 0.5; layer 2: 5 / 2 (image 0), 0 (image 1).
  np.testing.assert_allclose(al.perceptual_loss(fa, fx), [3.0, 0.5], atol=1e-5)


def test_identity_head_and_degenerate():
  model = build_model(_tiny_regressor_config(), num_classes=5)
  x = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
  v = jax.jit(model.init)(jax.random.key(1, impl='rbg'), x)  # rbg: compiles in seconds
  v = {**v, 'params': al.identity_head(v['params'])}
  np.testing.assert_allclose(jax.jit(model.apply)(v, x), np.tile(al.IDENTITY, (3, 1)),
                             atol=1e-6)
  assert al.degenerate(np.tile(al.IDENTITY, (2, 1)), 0.2, 5.0) is None
  assert 'NaN' in al.degenerate(np.array([[np.nan, 1, 0, 0, 0]]), 0.2, 5.0)
  assert 'min_scale' in al.degenerate(np.array([[0.01, 1, 0, 0, 0]]), 0.2, 5.0)
  with pytest.raises(ValueError, match='5 values'):
    al.identity_head({'fc': {'kernel': jnp.zeros((4, 3)), 'bias': jnp.zeros(3)}})


def test_tensorflow_warp_equals_the_jax_sampler_and_moves_boxes():
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 255, size=(12, 10, 1)).astype(np.float32)
  m = al.affine_matrix_np(np.array([1.1, 0.9, 0.1, -0.2, 0.3])).astype(np.float32)
  got = align_ops.warp_features({'image': tf.constant(image)}, tf.constant(m))['image'].numpy()
  want = np.asarray(al.warp(jnp.asarray(image[None]), jnp.asarray(m[None])))[0]
  np.testing.assert_allclose(got, want, atol=1e-3)
  # A bright square and its box: after the warp the box still encloses the square.
  square = np.zeros((40, 40, 1), np.uint8)
  square[8:16, 20:30] = 255
  box = tf.constant([[8 / 40, 20 / 40, 16 / 40, 30 / 40]])
  shift = al.affine_matrix_np(np.array([1.0, 1.0, 0.2, -0.1, 0.2])).astype(np.float32)
  out = align_ops.warp_features({'image': tf.constant(square), 'objects': {'bbox': box}},
                                tf.constant(shift))
  ys, xs = np.nonzero(out['image'].numpy()[..., 0] > 127)
  ymin, xmin, ymax, xmax = out['objects']['bbox'].numpy()[0] * 40
  assert ymin - 1 <= ys.min() and ys.max() + 1 <= ymax + 1
  assert xmin - 1 <= xs.min() and xs.max() + 1 <= xmax + 1


def test_affine_jitter_is_a_fixed_property_of_each_image():
  jitter = ops.get_preprocess_fn('affine_jitter(10, 0.1, 0.1)')
  image = tf.constant(np.random.default_rng(0).integers(0, 255, (16, 16, 1), np.uint8))
  a1 = jitter({'image': image, 'image_id': tf.constant('a.png')})['image'].numpy()
  a2 = jitter({'image': image, 'image_id': tf.constant('a.png')})['image'].numpy()
  b = jitter({'image': image, 'image_id': tf.constant('b.png')})['image'].numpy()
  np.testing.assert_array_equal(a1, a2)
  assert np.abs(a1 - b).max() > 1
  assert ops.required_keys('decode|affine_jitter(1, 0.1, 0.1)|normalize("zero_one")') == (
      'image_id',)
  with pytest.raises(ValueError, match='image_id'):
    jitter({'image': image})
  with pytest.raises(ValueError, match='degrees'):
    ops.get_preprocess_fn('affine_jitter(500, 0.1, 0.1)')


def test_align_op_reads_the_transforms_of_a_run(tmp_path):
  from cxr_jax import layout
  run = layout.Run(tmp_path)
  params = np.array([[1.0, 1.0, 0.5, 0.0, 0.0], list(al.IDENTITY)])
  run.write_align_transforms(['a.png', 'b.png'], ['train', 'train'], params,
                             al.affine_matrix_np(params))
  op = ops.get_preprocess_fn(f'align("{tmp_path}")')
  image = tf.constant(np.arange(16, dtype=np.uint8).reshape(4, 4, 1))
  moved = op({'image': image, 'image_id': tf.constant('a.png')})['image'].numpy()[..., 0]
  np.testing.assert_allclose(moved[:, :3], np.arange(16).reshape(4, 4)[:, 1:], atol=1e-4)
  same = op({'image': image, 'image_id': tf.constant('b.png')})['image'].numpy()[..., 0]
  np.testing.assert_allclose(same, np.arange(16).reshape(4, 4), atol=1e-4)
  with pytest.raises(tf.errors.InvalidArgumentError, match='no transform'):
    op({'image': image, 'image_id': tf.constant('unknown.png')})


def _align_config(data_dir: str) -> ml_collections.ConfigDict:
  from cxr_jax import config_lib
  config = config_lib.base_config()
  config.data.name = 'cxr_phantom/tiny'
  config.data.data_dir = data_dir
  config.keep_checkpoints = 5
  opt = config_lib.base_config().optimizer
  opt.name = 'sgd'
  opt.kwargs = ml_collections.ConfigDict({'momentum': 0.0})
  opt.learning_rate = 1e-3
  # A learning rate 1e6 times larger after step 3: the transforms blow up on purpose.
  opt.schedule = ml_collections.ConfigDict({'name': 'step', 'boundaries': (3,), 'factor': 1e6})
  config.align = ml_collections.ConfigDict({
      'pp': 'decode|grayscale_to_rgb|normalize("minus_one_one")', 'fill': -1.0,
      'model': _tiny_regressor_config(),
      'perceptual_layers': ('conv2_x', 'conv5_x'), 'smooth_kernel': 2,
      'euclidean_reduction': 'mean', 'optimizer': opt, 'batch_size': 8, 'num_epochs': -1,
      'num_train_steps': 8, 'min_scale': 0.2, 'max_scale': 5.0, 'log_every_steps': 1,
      'checkpoint_every_steps': 1})
  return config


def test_a_degenerate_alignment_stops_and_keeps_the_last_good_checkpoint(phantom_data_dir,
                                                                        tmp_path):
  from cxr_jax import checkpoints, inference
  config = _align_config(phantom_data_dir)
  loss_model = _TinyLossNet()
  loss_vars = loss_model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  anchor = np.zeros((64, 64, 3), np.float32)
  with pytest.raises(alignment_train.AlignmentDiverged,
                     match=r'degenerated at step \d+ .*last good checkpoint is step (\d+)') as e:
    alignment_train.train_alignment(config, tmp_path / 'align', anchor=anchor,
                                    loss_model=loss_model, loss_variables=loss_vars)
  good = int(e.value.args[0].split('last good checkpoint is step ')[1].split()[0])
  assert 1 <= good < 8
  ckpt = checkpoints.Checkpoints(tmp_path / 'align')
  assert ckpt.latest_step() == good and ckpt.best_step() == good
  ckpt.close()
  model, variables, info = inference.restore_model(tmp_path / 'align')
  assert info.class_names == al.PARAM_NAMES
  out = np.asarray(model.apply(variables, jnp.zeros((2, 64, 64, 3)), train=False))
  assert al.degenerate(out, 0.2, 5.0) is None


def test_align_step_8_devices_equal_1():
  def run(num_devices):
    mesh = parallel.make_mesh(num_devices)
    cfg = _align_config('unused').align
    cfg.optimizer.schedule = ml_collections.ConfigDict({'name': 'constant'})
    model = alignment_train.build_regressor(cfg, bn_axis_name=parallel.DATA_AXIS)
    loss_model = _TinyLossNet()
    loss_vars = loss_model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    from cxr_jax import optim
    from cxr_jax.train_step import create_train_state
    tx = optim.build_optimizer(cfg.optimizer, 10)
    state = create_train_state(model, tx, (32, 32, 3), jax.random.key(1), mesh)
    # A non-identity start, so that the warp and its gradient are not trivial.
    params = copy.deepcopy(jax.device_get(state.params))
    params['fc']['bias'] = np.array([1.1, 0.9, 0.05, -0.05, 0.1], np.float32)
    state = state.replace(params=jax.device_put(params, parallel.replicated(mesh)))
    step = alignment_train.make_align_step(model, loss_model, tx, mesh,
                                           layers=('conv2_x', 'conv5_x'), smooth_kernel=2,
                                           fill=-1.0, reduction='mean')
    rng = np.random.default_rng(0)
    images = parallel.to_global({'image': rng.normal(size=(8, 32, 32, 3)).astype(np.float32)},
                                mesh)['image']
    anchor = np.zeros((32, 32, 3), np.float32)
    feats = alignment_train.anchor_features(loss_model, loss_vars, anchor,
                                            ('conv2_x', 'conv5_x'))
    state, metrics = step(state, images, jnp.asarray(anchor), feats, loss_vars)
    return jax.device_get(metrics), jax.device_get(state.params)

  (m1, p1), (m8, p8) = run(1), run(8)
  for k in ('loss', 'euclidean', 'perceptual', 'scale_min', 'grad_norm'):
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, err_msg=k)
  np.testing.assert_allclose(p8['fc']['bias'], p1['fc']['bias'], rtol=1e-5, atol=1e-7)
