"""Named preprocessing ops over a feature dict, composed from a pp string (big_vision style).

A pp string such as

  "decode|grayscale_to_rgb|resize(256)|random_translate(12)|center_crop(224)|flip_lr|rotate(5)|"
  "normalize('imagenet')"

is split at '|' into op specs `name` or `name(args)`; arguments are Python literals. Each name is
looked up in `OPS` (a `cxr_jax.registry.Registry`) whose entries are factories
`factory(*args, **kwargs) -> op`, and `op(features) -> features` works on one example's dict of
TF tensors, eagerly or inside `tf.data.Dataset.map`.

Feature conventions (one example, no batch dimension):
  'image':  uint8 or float [H, W, C], or an encoded PNG/JPEG scalar string before `decode`.
  'masks':  uint8 [H, W, M] segmentation masks (or encoded); geometric ops move them with the
            image using nearest-neighbour sampling so they stay binary.
  'objects': {'bbox': float32 [N, 4]} boxes as normalised (ymin, xmin, ymax, xmax), TFDS
            convention (a flat 'objects/bbox' key works too); geometric ops move and clip them.
            Boxes pushed out of the image are clipped to zero area, never dropped, so they stay
            aligned with 'objects/label'.
  '_seed':  int32/int64 [2] per-example seed set by the pipeline. Random ops are stateless
            (tf.random.stateless_*). `get_preprocess_fn` folds the op's position into the seed
            before each op, so two random ops in one pp string never share randomness and
            re-running with the same seed reproduces the same augmentation.
"""

import ast
import math
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from cxr_jax.registry import Registry

Features = dict[str, Any]
Op = Callable[[Features], Features]

OPS: Registry[Callable[..., Op]] = Registry('preprocessing op')
# Features an op reads besides 'image' (op name -> keys), e.g. paper 002's `align` needs
# 'image_id': the input pipeline reads them for pp strings that use such an op.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {}

SEED_KEY = '_seed'
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_METHODS = (
  'bilinear',
  'bicubic',
  'area',
  'nearest',
  'lanczos3',
  'lanczos5',
  'gaussian',
  'mitchellcubic',
)


# ---------------------------------------------------------------------------------------------
# pp string parsing and composition


def _split_pp(pp: str) -> list[str]:
  """Splits at '|' outside quotes and brackets, so string arguments may contain '|'."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(pp):
    if quote:
      if ch == quote:
        quote = None
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == '|' and depth == 0:
      parts.append(pp[start:i])
      start = i + 1
  parts.append(pp[start:])
  return [p.strip() for p in parts if p.strip()]


def parse_pp(pp: str) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
  """Parses a pp string into (op name, args, kwargs) triples; arguments must be literals."""
  specs = []
  for spec in _split_pp(pp):
    try:
      node = ast.parse(spec, mode='eval').body
      if isinstance(node, ast.Name):
        specs.append((node.id, (), {}))
        continue
      if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError('expected `name` or `name(literal args)`')
      args = tuple(ast.literal_eval(a) for a in node.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
      if None in kwargs:
        raise ValueError('**kwargs are not supported')
    except (SyntaxError, ValueError) as e:
      raise ValueError(f'Cannot parse preprocessing op {spec!r} in pp string "{pp}": {e}') from None
    specs.append((node.func.id, args, kwargs))
  return specs


def required_keys(pp: str) -> tuple[str, ...]:
  """The features the ops of `pp` read besides the image (`REQUIRED_KEYS`), in order."""
  keys: list[str] = []
  for name, _, _ in parse_pp(pp):
    keys += [k for k in REQUIRED_KEYS.get(name, ()) if k not in keys]
  return tuple(keys)


def get_preprocess_fn(pp: str) -> Op:
  """Builds the composed op for a pp string; all names and arguments are checked here."""
  ops = []
  for name, args, kwargs in parse_pp(pp):
    factory = OPS.get(name)  # Unknown names fail here listing the valid ones.
    try:
      ops.append(factory(*args, **kwargs))
    except (TypeError, ValueError) as e:
      raise ValueError(
        f'Bad arguments for preprocessing op {name!r} in pp string "{pp}": {e}'
      ) from e

  def preprocess(features: Features) -> Features:
    # Accept numpy / Python values too, so ops can be tried eagerly on plain arrays.
    features = dict(tf.nest.map_structure(tf.convert_to_tensor, features))
    base_seed = features.get(SEED_KEY)
    for i, op in enumerate(ops):
      if base_seed is not None:
        # A distinct sub-seed per position: `flip_lr|flip_lr` flips independently.
        features[SEED_KEY] = tf.random.experimental.stateless_fold_in(
          base_seed, tf.constant(i, base_seed.dtype)
        )
      features = op(features)
    if base_seed is not None:
      features[SEED_KEY] = base_seed
    return features

  return preprocess


# ---------------------------------------------------------------------------------------------
# Helpers shared by the geometric ops


def _seed(features: Features, op_name: str) -> tf.Tensor:
  if SEED_KEY not in features:
    raise ValueError(
      f'Preprocessing op {op_name!r} is random and needs a {SEED_KEY!r} feature (int [2]); '
      'the input pipeline sets it per example.'
    )
  return tf.convert_to_tensor(features[SEED_KEY])


def _get_boxes(features: Features) -> tf.Tensor | None:
  objects = features.get('objects')
  if isinstance(objects, dict) and 'bbox' in objects:
    return objects['bbox']
  return features.get('objects/bbox')


def _set_boxes(features: Features, boxes: tf.Tensor) -> None:
  boxes = tf.clip_by_value(boxes, 0.0, 1.0)
  objects = features.get('objects')
  if isinstance(objects, dict) and 'bbox' in objects:
    features['objects'] = {**objects, 'bbox': boxes}
  else:
    features['objects/bbox'] = boxes


def _hw(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  shape = tf.shape(image)
  return shape[0], shape[1]


def _check_size(size: int | Sequence[int], op_name: str) -> tuple[int, int]:
  """Accepts `s` or `(h, w)` positive ints."""
  hw = (size, size) if isinstance(size, int) else tuple(size)
  if len(hw) != 2 or not all(isinstance(s, int) and s > 0 for s in hw):
    raise ValueError(f'{op_name}: size must be a positive int or (height, width), got {size!r}')
  return hw


def _crop(features: Features, top: tf.Tensor, left: tf.Tensor, h: int, w: int) -> Features:
  """Crops image and masks to [top:top+h, left:left+w] and re-expresses boxes in the crop."""
  features = dict(features)
  img_h, img_w = _hw(features['image'])
  for key in ('image', 'masks'):
    if key in features:
      features[key] = tf.image.crop_to_bounding_box(features[key], top, left, h, w)
  boxes = _get_boxes(features)
  if boxes is not None:
    scale = tf.cast(tf.stack([img_h, img_w, img_h, img_w]), tf.float32)
    offset = tf.cast(tf.stack([top, left, top, left]), tf.float32)
    size = tf.constant([h, w, h, w], tf.float32)
    _set_boxes(features, (boxes * scale - offset) / size)
  return features


def translate(features: Features, dy: tf.Tensor, dx: tf.Tensor, max_px: int) -> Features:
  """Shifts content by (dy, dx) pixels (|dy|, |dx| <= max_px), zero fill, same size.

  Implemented as pad-by-max_px then crop, so the shapes stay static for tf.data.
  """
  features = dict(features)
  img_h, img_w = _hw(features['image'])
  paddings = [[max_px, max_px], [max_px, max_px], [0, 0]]
  for key in ('image', 'masks'):
    if key in features:
      padded = tf.pad(features[key], paddings)
      shape = features[key].shape
      cropped = tf.slice(padded, tf.stack([max_px - dy, max_px - dx, 0]), tf.shape(features[key]))
      features[key] = tf.ensure_shape(cropped, shape)
  boxes = _get_boxes(features)
  if boxes is not None:
    shift = tf.cast(tf.stack([dy, dx, dy, dx]), tf.float32)
    scale = tf.cast(tf.stack([img_h, img_w, img_h, img_w]), tf.float32)
    _set_boxes(features, boxes + shift / scale)
  return features


def flip(features: Features) -> Features:
  """Mirrors image, masks and boxes left-right.

  Mask channels are not swapped: after a mirror the anatomical left lung is still the same
  pixels, it just appears on the other side (as in situs inversus).
  """
  features = dict(features)
  for key in ('image', 'masks'):
    if key in features:
      features[key] = tf.reverse(features[key], axis=[1])
  boxes = _get_boxes(features)
  if boxes is not None:
    ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
    _set_boxes(features, tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1))
  return features


def rotate_by(features: Features, radians: tf.Tensor) -> Features:
  """Rotates content counter-clockwise (as displayed) by `radians` about the image centre.

  Image: bilinear, masks: nearest, both zero filled. Boxes become the axis-aligned bounding box
  of their rotated corners, clipped to the image.
  """
  features = dict(features)
  img_h, img_w = _hw(features['image'])
  h, w = tf.cast(img_h, tf.float32), tf.cast(img_w, tf.float32)
  cos, sin = tf.cos(tf.cast(radians, tf.float32)), tf.sin(tf.cast(radians, tf.float32))
  # ImageProjectiveTransform maps each output pixel (x, y) back to the input pixel it samples,
  # i.e. the inverse rotation about the pixel-index centre ((w-1)/2, (h-1)/2).
  cx, cy = (w - 1) / 2, (h - 1) / 2
  transform = tf.stack(
    [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
  )[None]
  for key, interpolation in (('image', 'BILINEAR'), ('masks', 'NEAREST')):
    if key in features:
      x = features[key]
      out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None],
        transforms=transform,
        output_shape=tf.shape(x)[:2],
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode='CONSTANT',
      )[0]
      features[key] = tf.ensure_shape(out, x.shape)
  boxes = _get_boxes(features)
  if boxes is not None:
    # Continuous coordinates: pixel i covers [i, i+1), so the centre is (w/2, h/2).
    ymin, xmin, ymax, xmax = tf.unstack(boxes, 4, axis=-1)
    xs = tf.stack([xmin, xmax, xmin, xmax], axis=-1) * w - w / 2
    ys = tf.stack([ymin, ymin, ymax, ymax], axis=-1) * h - h / 2
    # Forward (content) rotation, counter-clockwise on screen with y pointing down.
    rx = (cos * xs + sin * ys + w / 2) / w
    ry = (-sin * xs + cos * ys + h / 2) / h
    _set_boxes(
      features,
      tf.stack(
        [
          tf.reduce_min(ry, -1),
          tf.reduce_min(rx, -1),
          tf.reduce_max(ry, -1),
          tf.reduce_max(rx, -1),
        ],
        axis=-1,
      ),
    )
  return features


# ---------------------------------------------------------------------------------------------
# Registered ops


@OPS.register('decode')
def decode(channels: int = 0) -> Op:
  """Decodes encoded 'image' and 'masks' strings to uint8 [H, W, C]; decoded tensors pass.

  channels=0 keeps the stored channel count. The pipeline already decodes with the TFDS
  feature decoders (static shapes), so in pipeline pp strings this op is a no-op kept for
  readability and for use on raw bytes.
  """
  if channels not in (0, 1, 3, 4):
    raise ValueError(f'channels must be 0, 1, 3 or 4, got {channels!r}')

  def op(features: Features) -> Features:
    features = dict(features)
    for key in ('image', 'masks'):
      if key in features and features[key].dtype == tf.string:
        features[key] = tf.io.decode_image(
          features[key], channels=channels if key == 'image' else 0, expand_animations=False
        )
    return features

  return op


@OPS.register('grayscale_to_rgb')
def grayscale_to_rgb() -> Op:
  """[H, W, 1] -> [H, W, 3] by repetition; a 3-channel image passes unchanged."""

  def op(features: Features) -> Features:
    features = dict(features)
    image = features['image']
    channels = image.shape[-1]
    if channels == 3:
      return features
    if channels is not None and channels != 1:
      raise ValueError(f'grayscale_to_rgb needs 1 or 3 channels, got image shape {image.shape}')
    if channels == 1:
      features['image'] = tf.tile(image, [1, 1, 3])
      return features
    # Channel count unknown until run time (e.g. after decode(channels=0) on raw bytes).
    n = tf.shape(image)[-1]
    check = tf.debugging.assert_equal(
      tf.logical_or(tf.equal(n, 1), tf.equal(n, 3)), True, 'grayscale_to_rgb needs 1 or 3 channels'
    )
    with tf.control_dependencies([check]):
      rgb = tf.cond(tf.equal(n, 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    features['image'] = tf.ensure_shape(rgb, [*image.shape[:-1], 3])
    return features

  return op


@OPS.register('resize')
def resize(size: int | Sequence[int], method: str = 'bilinear', antialias: bool = True) -> Op:
  """Resizes image (`method`, antialiased) and masks (nearest) to `size`; boxes are unchanged.

  Integer images stay integer (rounded), so decode|resize keeps uint8 like the stored data.
  """
  hw = _check_size(size, 'resize')
  if method not in RESIZE_METHODS:
    raise ValueError(f'method must be one of {RESIZE_METHODS}, got {method!r}')

  def op(features: Features) -> Features:
    features = dict(features)
    image = features['image']
    out = tf.image.resize(image, hw, method=method, antialias=antialias)
    if image.dtype.is_integer:
      out = tf.saturate_cast(tf.round(out), image.dtype)
    else:
      out = tf.cast(out, image.dtype)
    features['image'] = out
    if 'masks' in features:
      features['masks'] = tf.image.resize(features['masks'], hw, method='nearest')
    return features

  return op


@OPS.register('center_crop')
def center_crop(size: int | Sequence[int]) -> Op:
  """Crops the central `size` window (offset floor((H - h) / 2)); masks and boxes follow."""
  h, w = _check_size(size, 'center_crop')

  def op(features: Features) -> Features:
    img_h, img_w = _hw(features['image'])
    return _crop(features, (img_h - h) // 2, (img_w - w) // 2, h, w)

  return op


@OPS.register('random_crop')
def random_crop(size: int | Sequence[int]) -> Op:
  """Crops a `size` window at a uniformly random integer offset; masks and boxes follow."""
  h, w = _check_size(size, 'random_crop')

  def op(features: Features) -> Features:
    seed = _seed(features, 'random_crop')
    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    img_h, img_w = _hw(features['image'])
    top = tf.random.stateless_uniform([], seed_y, 0, img_h - h + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], seed_x, 0, img_w - w + 1, dtype=tf.int32)
    return _crop(features, top, left, h, w)

  return op


@OPS.register('random_translate')
def random_translate(max_px: int) -> Op:
  """Shifts by integer (dy, dx), each uniform in [-max_px, max_px]; zero fill, same size."""
  if not isinstance(max_px, int) or max_px < 0:
    raise ValueError(f'max_px must be a non-negative int, got {max_px!r}')

  def op(features: Features) -> Features:
    seed = _seed(features, 'random_translate')
    dy, dx = tf.unstack(tf.random.stateless_uniform([2], seed, -max_px, max_px + 1, dtype=tf.int32))
    return translate(features, dy, dx, max_px)

  return op


@OPS.register('flip_lr')
def flip_lr(p: float = 0.5) -> Op:
  """Mirrors left-right (image, masks, boxes) with probability p."""
  if not 0.0 <= p <= 1.0:
    raise ValueError(f'p must be in [0, 1], got {p!r}')

  def op(features: Features) -> Features:
    u = tf.random.stateless_uniform([], _seed(features, 'flip_lr'))
    # Both branches return the same structure; tf.cond keeps it one graph for tf.data.
    return tf.cond(u < p, lambda: flip(features), lambda: dict(features))

  return op


@OPS.register('rotate')
def rotate(max_degrees: float) -> Op:
  """Rotates by an angle uniform in [-max_degrees, max_degrees] (see `rotate_by`)."""
  if not isinstance(max_degrees, int | float) or max_degrees < 0:
    raise ValueError(f'max_degrees must be a non-negative number, got {max_degrees!r}')

  def op(features: Features) -> Features:
    seed = _seed(features, 'rotate')
    degrees = tf.random.stateless_uniform([], seed, -max_degrees, max_degrees)
    return rotate_by(features, degrees * (math.pi / 180.0))

  return op


@OPS.register('normalize')
def normalize(kind: str = 'imagenet') -> Op:
  """Image to float32: 'imagenet' (x/255 - mean)/std per RGB channel, 'minus_one_one' x/127.5-1,
  'zero_one' x/255. Input values are in [0, 255]."""
  kinds = ('imagenet', 'minus_one_one', 'zero_one')
  if kind not in kinds:
    raise ValueError(f'kind must be one of {kinds}, got {kind!r}')

  def op(features: Features) -> Features:
    features = dict(features)
    image = tf.cast(features['image'], tf.float32)
    if kind == 'imagenet':
      if image.shape[-1] is None:
        image = tf.ensure_shape(image, [*image.shape[:-1], 3])
      elif image.shape[-1] != 3:
        # Averaging the statistics would silently mismatch ImageNet-pretrained weights.
        raise ValueError(
          f"normalize('imagenet') needs a 3-channel RGB image, got shape {image.shape}; "
          'put grayscale_to_rgb before it.'
        )
      image = (image / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
    elif kind == 'minus_one_one':
      image = image / 127.5 - 1.0
    else:
      image = image / 255.0
    features['image'] = image
    return features

  return op


@OPS.register('keep')
def keep(*keys: str) -> Op:
  """Keeps only `keys` (internal '_'-prefixed keys such as '_seed' always survive)."""
  if not keys or not all(isinstance(k, str) for k in keys):
    raise ValueError(f'keep needs one or more key names, got {keys!r}')

  def op(features: Features) -> Features:
    missing = [k for k in keys if k not in features]
    if missing:
      raise KeyError(f'keep{keys}: missing keys {missing}; present: {sorted(features)}')
    return {k: v for k, v in features.items() if k in keys or k.startswith('_')}

  return op


# Paper 002's alignment ops register themselves (they build on the helpers above).
from cxr_jax.data import align_ops  # noqa: E402,F401
