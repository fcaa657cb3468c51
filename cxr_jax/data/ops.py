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
    size = tf.cast(tf.stack([h, w, h, w]), tf.float32)  # h, w may be tensors (lung_roi)
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


# ---------------------------------------------------------------------------------------------
# Paper 003: lung region of interest and contrast-limited adaptive histogram equalisation

# The lung channels of the common 'masks' layout (left lung, right lung, heart).
_LUNG_CHANNELS = {'masks': (0, 1)}
ROI_MODES = ('crop', 'mask', 'crop_mask')


def _lung_pixels(features: Features, source: str, hw: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
  """bool [H, W]: the lung pixels of mask feature `source`, resized (nearest) to the image."""
  mask = tf.convert_to_tensor(features[source])
  if mask.shape.rank == 2:
    mask = mask[..., None]
  channels = _LUNG_CHANNELS.get(source)
  if channels is not None:
    mask = tf.gather(mask, list(channels), axis=-1)
  mask = tf.reduce_max(tf.cast(mask > 0, tf.uint8), axis=-1, keepdims=True)
  mask = tf.image.resize(mask, tf.stack(hw), method='nearest')
  return mask[..., 0] > 0


@OPS.register('lung_roi')
def lung_roi(mode: str = 'crop', sources: str | Sequence[str] = ('lung_mask',),
             margin: float = 0.0) -> Op:
  """Paper 003's lung region of interest from lung masks: crop and/or mask out.

  mode: 'crop' (ours, default): the image (and 'masks', and the mask features) cropped to the
    bounding box of the lungs, widened by `margin` x its height/width on each side (clipped);
    'mask': pixels outside the lungs set to 0, same frame; 'crop_mask': both. The paper says
    the lungs "constituting the ROI" are segmented and "the ROI is resized to 1024 x 1024":
    cropping to the lungs' box is our reading; 'mask' is the alternative.
  sources: mask features to take the lungs from, in order; the first one that is non-empty
    for an image is used (e.g. ('lung_mask', 'unet_lung_mask'): the data set's manual masks,
    else masks from another source). A multi-channel 'masks' feature contributes its lung
    channels (left, right). Each source is resized (nearest) to the image first. The features
    must be in the example: the pipeline reads them when they are named in
    config.data.pp_keys.

  An image for which every source is empty fails with an error naming the image id (when
  the example has 'image_id') and what to do. After 'crop' the image size depends on the
  example: follow with `resize`.
  """
  if mode not in ROI_MODES:
    raise ValueError(f'mode must be one of {ROI_MODES}, got {mode!r}')
  sources = (sources,) if isinstance(sources, str) else tuple(sources)
  if not sources or not all(isinstance(s, str) and s for s in sources):
    raise ValueError(f'sources must name one or more mask features, got {sources!r}')
  if not isinstance(margin, int | float) or not 0.0 <= margin < 0.5:
    raise ValueError(f'margin must be a number in [0, 0.5), got {margin!r}')

  def op(features: Features) -> Features:
    missing = [s for s in sources if s not in features]
    if missing:
      raise ValueError(
        f'lung_roi needs the mask feature(s) {missing}, absent from the example (present: '
        f'{sorted(k for k in features if not k.startswith("_"))}); name them in '
        'config.data.pp_keys so that the pipeline reads them.')
    features = dict(features)
    hw = _hw(features['image'])
    masks = [_lung_pixels(features, s, hw) for s in sources]
    lungs = masks[-1]
    for m in reversed(masks[:-1]):
      lungs = tf.cond(tf.reduce_any(m), lambda m=m: m, lambda lungs=lungs: lungs)
    image_id = features.get('image_id', tf.constant('<no image_id in the example>'))
    check = tf.debugging.Assert(tf.reduce_any(lungs), [
      'lung_roi: no lung mask for image', image_id,
      f'(mask features {list(sources)} are all empty). The lung ROI needs a mask for every '
      'image: use a data set with lung masks, add masks from another source to '
      'lung_roi(sources=...) (e.g. U-Net masks, paper 004), or drop lung_roi from '
      'config.data.pp_train / pp_eval.'])
    with tf.control_dependencies([check]):
      lungs = tf.identity(lungs)
    if mode in ('mask', 'crop_mask'):
      keep = tf.cast(lungs[..., None], features['image'].dtype)
      features['image'] = features['image'] * keep
    if mode in ('crop', 'crop_mask'):
      h, w = hw
      rows = tf.where(tf.reduce_any(lungs, axis=1))[:, 0]
      cols = tf.where(tf.reduce_any(lungs, axis=0))[:, 0]
      dy = tf.cast(tf.round(margin * tf.cast(h, tf.float32)), tf.int64)
      dx = tf.cast(tf.round(margin * tf.cast(w, tf.float32)), tf.int64)
      top = tf.maximum(tf.reduce_min(rows) - dy, 0)
      left = tf.maximum(tf.reduce_min(cols) - dx, 0)
      bottom = tf.minimum(tf.reduce_max(rows) + 1 + dy, tf.cast(h, tf.int64))
      right = tf.minimum(tf.reduce_max(cols) + 1 + dx, tf.cast(w, tf.int64))
      top, left = tf.cast(top, tf.int32), tf.cast(left, tf.int32)
      bh, bw = tf.cast(bottom, tf.int32) - top, tf.cast(right, tf.int32) - left
      for s in sources:
        if s != 'masks':
          m = tf.convert_to_tensor(features[s])
          m = m[..., None] if m.shape.rank == 2 else m
          m = tf.image.resize(m, tf.stack(hw), method='nearest')
          features[s] = tf.image.crop_to_bounding_box(m, top, left, bh, bw)
      features = _crop(features, top, left, bh, bw)
    return features

  return op


@OPS.register('clahe')
def clahe(clip_limit: float = 0.01, tiles: int | Sequence[int] = 8, nbins: int = 256) -> Op:
  """Contrast Limited Adaptive Histogram Equalisation of a uint8 image (each channel).

  scikit-image's `exposure.equalize_adapthist`, whose parameters are Matlab's `adapthisteq`
  (what paper 003, built in Matlab R2017a, ran; it gives no values): `tiles` x `tiles`
  contextual regions (kernel_size = image size // tiles), `clip_limit` normalised to [0, 1],
  `nbins` histogram bins. Defaults = Matlab's defaults (NumTiles [8 8], ClipLimit 0.01, NBins
  256). The result is rounded back to uint8. Masks and boxes are unchanged.
  """
  ty, tx = (tiles, tiles) if isinstance(tiles, int) else tuple(tiles)
  if not all(isinstance(t, int) and t > 0 for t in (ty, tx)):
    raise ValueError(f'tiles must be a positive int or (rows, cols), got {tiles!r}')
  if not isinstance(clip_limit, int | float) or not 0.0 < clip_limit <= 1.0:
    raise ValueError(f'clip_limit must be in (0, 1], got {clip_limit!r}')
  if not isinstance(nbins, int) or nbins < 2:
    raise ValueError(f'nbins must be an int >= 2, got {nbins!r}')

  def equalize(image: Any) -> Any:
    import numpy as np
    from skimage import exposure
    h, w = image.shape[:2]
    kernel = (max(1, h // ty), max(1, w // tx))
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
      eq = exposure.equalize_adapthist(image[..., c], kernel_size=kernel,
                                       clip_limit=clip_limit, nbins=nbins)
      out[..., c] = np.round(eq * 255.0).astype(np.uint8)
    return out

  def op(features: Features) -> Features:
    features = dict(features)
    image = tf.convert_to_tensor(features['image'])
    if image.dtype != tf.uint8:
      raise ValueError(f'clahe needs a uint8 image (put it before normalize), got {image.dtype}')
    out = tf.numpy_function(equalize, [image], tf.uint8, stateful=False)
    features['image'] = tf.ensure_shape(out, image.shape)
    return features

  return op


@OPS.register('label_from_findings')
def label_from_findings(classes: Sequence[str] = (), key: str = 'label') -> Op:
  """A single-label target from multi-hot NIH 'labels' (the stored 14, NIH_CLASSES order):
  `key` = 1 (abnormal) when any of `classes` (default: all 14) is present, else 0 (normal).

  Gives the synthetic `cxr_phantom` a normal / abnormal task for paper 003's demos (read
  'labels' through config.data.pp_keys). Without 'labels' (a user's image) it does nothing.
  """
  from cxr_jax.labels import class_indices
  idx = class_indices(tuple(classes)) if classes else None

  def op(features: Features) -> Features:
    if 'labels' not in features:
      return features  # an unlabelled image (predict, the viewer): nothing to derive
    features = dict(features)
    labels = tf.convert_to_tensor(features['labels'])
    if idx is not None:
      labels = tf.gather(labels, idx, axis=-1)
    features[key] = tf.cast(tf.reduce_any(labels > 0, axis=-1), tf.int32)
    return features

  return op


# Paper 002's alignment ops register themselves (they build on the helpers above).
from cxr_jax.data import align_ops  # noqa: E402,F401
