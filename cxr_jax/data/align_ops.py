"""Preprocessing ops of paper 002's alignment: per-image affine warps in the input pipeline.

- `align(workdir)`: warps each image by the transform the `align` stage of run `workdir` wrote
  for its image id (cxr_jax/layout.py: `Run.align_transforms_file`), so every later stage reads
  aligned images without running the alignment network again. Configs write
  `align("{workdir}")`; `stages.run` fills in the run's folder.
- `affine_jitter(degrees, scale, shift)`: a random affine per image, drawn from its image id
  (the same image always gets the same jitter): the `:demo` configs misalign the phantom on
  purpose, so that the alignment module has something to undo.

Both use the convention of cxr_jax/attention/alignment.py: a 2 x 3 matrix maps each output
location (normalised [-1, 1], pixel centres at (2j + 1) / W - 1) to the source location it
samples; bilinear sampling, zero fill outside the source (TensorFlow's
ImageProjectiveTransformV3, tested equal to the JAX sampler). Masks move with nearest
sampling; boxes become the axis-aligned box of their mapped corners, clipped to the image.
These ops need the 'image_id' feature (`ops.REQUIRED_KEYS`), which the pipeline then reads.
"""

import math
from typing import Any

import numpy as np
import tensorflow as tf

from cxr_jax.data.ops import OPS, REQUIRED_KEYS, Features, Op, _get_boxes, _set_boxes

REQUIRED_KEYS.update({'align': ('image_id',), 'affine_jitter': ('image_id',)})


def pixel_transform(matrix: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """A normalised sampling matrix [2, 3] -> ImageProjectiveTransformV3's [8] in pixel indices.

  With u = ((x_s + 1) W - 1) / 2 and x_t = (2j + 1) / W - 1 (and likewise v, y, i, H), the
  source pixel (u, v) of output pixel (j, i) is again affine in (j, i).
  """
  m = tf.cast(matrix, tf.float32)
  h, w = float(height), float(width)
  a, b, c = m[0, 0], m[0, 1], m[0, 2]
  d, e, f = m[1, 0], m[1, 1], m[1, 2]
  a0, a1 = a, b * w / h
  a2 = a * (1 - w) / 2 + b * (w / h) * (1 - h) / 2 + (w / 2) * (c + 1) - 0.5
  b0, b1 = d * h / w, e
  b2 = d * (h / w) * (1 - w) / 2 + e * (1 - h) / 2 + (h / 2) * (f + 1) - 0.5
  return tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])


def _inverse(matrix: tf.Tensor) -> tf.Tensor:
  lin = matrix[:, :2]
  lin_inv = tf.linalg.inv(lin)
  return tf.concat([lin_inv, -tf.matmul(lin_inv, matrix[:, 2:])], axis=1)


def warp_features(features: Features, matrix: tf.Tensor) -> Features:
  """Warps 'image' (bilinear, to float32) and 'masks' (nearest) by the sampling matrix [2, 3];
  boxes follow (the box of their mapped corners)."""
  features = dict(features)
  image = features['image']
  h, w = image.shape[0], image.shape[1]
  if h is None or w is None:
    raise ValueError('align / affine_jitter need a static image size; decode the image first.')
  transform = pixel_transform(matrix, h, w)[None]
  for key, interpolation in (('image', 'BILINEAR'), ('masks', 'NEAREST')):
    if key in features:
      x = features[key]
      out = tf.raw_ops.ImageProjectiveTransformV3(
          images=tf.cast(x, tf.float32)[None], transforms=transform,
          output_shape=tf.constant([h, w]), fill_value=0.0, interpolation=interpolation,
          fill_mode='CONSTANT')[0]
      features[key] = tf.ensure_shape(out if key == 'image' else tf.cast(out, x.dtype), x.shape)
  boxes = _get_boxes(features)
  if boxes is not None:
    # Source corners (normalised [-1, 1]) -> output frame by the inverse map.
    inv = _inverse(tf.cast(matrix, tf.float32))
    ymin, xmin, ymax, xmax = tf.unstack(tf.cast(boxes, tf.float32) * 2.0 - 1.0, 4, axis=-1)
    xs = tf.stack([xmin, xmax, xmin, xmax], axis=-1)
    ys = tf.stack([ymin, ymin, ymax, ymax], axis=-1)
    ox = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    oy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    new = tf.stack([tf.reduce_min(oy, -1), tf.reduce_min(ox, -1), tf.reduce_max(oy, -1),
                    tf.reduce_max(ox, -1)], axis=-1)
    _set_boxes(features, (new + 1.0) / 2.0)
  return features


def eq6_matrix(params: tf.Tensor) -> tf.Tensor:
  """Eq. 6 in TensorFlow: (s_x, s_y, t_x, t_y, theta) [5] -> [2, 3]."""
  sx, sy, tx, ty, th = tf.unstack(tf.cast(params, tf.float32), 5)
  c, s = tf.cos(th), tf.sin(th)
  return tf.stack([tf.stack([sx * c, -sy * s, tx]), tf.stack([sx * s, sy * c, ty])])


class _Table:
  """image id -> sampling matrix [2, 3], loaded from an align stage's transforms on first use
  (outside any traced function, so tf.data captures it as a constant)."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self._loaded: tuple[Any, tf.Tensor] | None = None

  def lookup(self, image_id: tf.Tensor) -> tf.Tensor:
    if self._loaded is None:
      from cxr_jax import layout  # a library module; imported late to keep ops light
      with tf.init_scope():
        ids, matrices = layout.Run(self.workdir).read_align_transforms()
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.string),
                                                tf.range(len(ids), dtype=tf.int64)),
            default_value=np.int64(-1))
        self._loaded = (table, tf.constant(np.asarray(matrices, np.float32)))
    table, matrices = self._loaded
    index = table.lookup(image_id)
    check = tf.debugging.assert_non_negative(
        index, message=f'align("{self.workdir}"): an image id has no transform in the align '
        'stage\'s transforms (run the align stage over this split); image_id:',
        summarize=1)
    with tf.control_dependencies([check]):
      return tf.gather(matrices, tf.maximum(index, 0))


def _image_id(features: Features, op_name: str) -> tf.Tensor:
  if 'image_id' not in features:
    raise ValueError(f"preprocessing op {op_name!r} needs the 'image_id' feature (the input "
                     'pipeline reads it for this op); a lone image has none.')
  return features['image_id']


@OPS.register('align')
def align(workdir: str) -> Op:
  """Warps image, masks and boxes by the align stage's transform of each image id (run
  `workdir`; configs write "{workdir}", filled in by `stages.run`)."""
  if not isinstance(workdir, str) or not workdir:
    raise ValueError(f'align needs the run folder as a string, got {workdir!r}')
  table = _Table(workdir)

  def op(features: Features) -> Features:
    return warp_features(features, table.lookup(_image_id(features, 'align')))

  return op


@OPS.register('affine_jitter')
def affine_jitter(degrees: float, scale: float, shift: float, seed: int = 0) -> Op:
  """A fixed random affine per image id (eq. 6 form): rotation uniform in +-`degrees`, s_x and
  s_y each uniform in 1 +- `scale`, t_x and t_y uniform in +-`shift` (normalised units: 0.1 =
  5 % of the width). The same image always gets the same transform: a misaligned data set,
  not an augmentation."""
  for name, value, top in (('degrees', degrees, 90), ('scale', scale, 0.9), ('shift', shift, 1)):
    if not isinstance(value, int | float) or not 0 <= value <= top:
      raise ValueError(f'affine_jitter {name} must be a number in [0, {top}], got {value!r}')

  def op(features: Features) -> Features:
    key = tf.strings.to_hash_bucket_fast(_image_id(features, 'affine_jitter'), 2**62)
    u = tf.random.stateless_uniform([5], tf.stack([key, tf.constant(seed, tf.int64)]), -1.0, 1.0)
    params = tf.stack([1.0 + scale * u[0], 1.0 + scale * u[1], shift * u[2], shift * u[3],
                       math.radians(degrees) * u[4]])
    return warp_features(features, eq6_matrix(params))

  return op
