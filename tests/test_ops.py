"""Tests for cxr_jax.data.ops: each op on small hand-made arrays, eagerly and inside tf.data."""

import math
import re

import numpy as np
import pytest
import tensorflow as tf

from cxr_jax.data import ops

FULL_PP = (
  'decode|grayscale_to_rgb|resize(12)|random_translate(2)|center_crop(10)|flip_lr|rotate(5)|'
  "normalize('imagenet')"
)


def _one_hot(h: int, w: int, r: int, c: int, channels: int = 1) -> np.ndarray:
  """uint8 [h, w, channels], 200 at (r, c), zero elsewhere."""
  x = np.zeros((h, w, channels), np.uint8)
  x[r, c] = 200
  return x


def _pixel_box(h: int, w: int, r: int, c: int) -> np.ndarray:
  """Normalised [1, 4] box covering exactly pixel (r, c)."""
  return np.array([[r / h, c / w, (r + 1) / h, (c + 1) / w]], np.float32)


def _features(image: np.ndarray, box: np.ndarray | None = None, seed=(0, 0)) -> dict:
  f = {'image': tf.constant(image), 'masks': tf.constant(image), '_seed': tf.constant(seed)}
  if box is not None:
    f['objects'] = {'bbox': tf.constant(box), 'label': tf.zeros([len(box)], tf.int64)}
  return f


def _run(pp: str, features: dict, in_tf_data: bool) -> dict:
  fn = ops.get_preprocess_fn(pp)
  if not in_tf_data:
    return tf.nest.map_structure(lambda t: t.numpy(), fn(features))
  ds = tf.data.Dataset.from_tensors(features).map(fn)
  return next(iter(ds.as_numpy_iterator()))


def _argmax2d(x: np.ndarray) -> tuple[int, int]:
  return tuple(int(i) for i in np.unravel_index(np.argmax(x[..., 0]), x.shape[:2]))


# --- parsing and registry ---------------------------------------------------------------------


def test_parse_pp():
  assert ops.parse_pp("decode|resize(256)|normalize(kind='zero_one')|keep('image', 'a|b')") == [
    ('decode', (), {}),
    ('resize', (256,), {}),
    ('normalize', (), {'kind': 'zero_one'}),
    ('keep', ('image', 'a|b'), {}),
  ]
  assert ops.parse_pp('') == []


def test_unknown_op_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown preprocessing op 'flipp'.*flip_lr.*resize"):
    ops.get_preprocess_fn('decode|flipp')


@pytest.mark.parametrize(
  'pp, name',
  [
    ('decode|resize(-3)', 'resize'),
    ("normalize('imagenett')", 'normalize'),
    ('center_crop(1, 2, 3)', 'center_crop'),
    ('flip_lr(p=2.0)', 'flip_lr'),
    ('rotate(foo=1)', 'rotate'),
  ],
)
def test_bad_arguments_name_op_and_pp(pp, name):
  with pytest.raises(ValueError, match=re.escape(f'op {name!r} in pp string "{pp}"')):
    ops.get_preprocess_fn(pp)


def test_unparseable_spec():
  with pytest.raises(ValueError, match='Cannot parse'):
    ops.get_preprocess_fn('resize(x)')


def test_random_op_without_seed_is_a_clear_error():
  with pytest.raises(ValueError, match="'flip_lr' is random and needs a '_seed'"):
    ops.get_preprocess_fn('flip_lr')({'image': tf.zeros([4, 4, 1])})


# --- single ops ---------------------------------------------------------------------------------


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_decode(in_tf_data):
  image = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
  mask = (np.arange(16, dtype=np.uint8).reshape(4, 4, 1) % 2) * 255
  f = {'image': tf.io.encode_png(image), 'masks': tf.io.encode_png(mask)}
  out = _run('decode', f, in_tf_data)
  np.testing.assert_array_equal(out['image'], image)
  np.testing.assert_array_equal(out['masks'], mask)
  # Already decoded tensors pass through untouched.
  out = _run('decode', {'image': tf.constant(image)}, in_tf_data)
  np.testing.assert_array_equal(out['image'], image)


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_grayscale_to_rgb(in_tf_data):
  image = np.arange(4, dtype=np.uint8).reshape(2, 2, 1)
  out = _run('grayscale_to_rgb', {'image': tf.constant(image)}, in_tf_data)
  np.testing.assert_array_equal(out['image'], np.concatenate([image] * 3, -1))
  rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
  np.testing.assert_array_equal(_run('grayscale_to_rgb', {'image': rgb}, in_tf_data)['image'], rgb)
  with pytest.raises(ValueError, match='1 or 3 channels'):
    _run('grayscale_to_rgb', {'image': tf.zeros([2, 2, 2])}, in_tf_data)


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_resize(in_tf_data):
  # 4x4 made of four constant 2x2 quadrants: halving keeps each quadrant's value exactly.
  quads = np.array([[10, 20], [30, 40]], np.uint8)
  image = np.kron(quads, np.ones((2, 2), np.uint8))[..., None]
  mask = np.kron(np.array([[0, 255], [255, 0]], np.uint8), np.ones((2, 2), np.uint8))[..., None]
  box = np.array([[0.25, 0.0, 0.75, 0.5]], np.float32)
  f = {'image': image, 'masks': mask, 'objects': {'bbox': box}}
  out = _run("resize(2, method='area')", f, in_tf_data)
  assert out['image'].dtype == np.uint8
  np.testing.assert_array_equal(out['image'][..., 0], quads)
  np.testing.assert_array_equal(out['masks'][..., 0], [[0, 255], [255, 0]])
  np.testing.assert_array_equal(out['objects']['bbox'], box)  # Normalised boxes do not move.
  # Default bilinear + antialias: a constant image stays constant, dtype kept.
  flat = _run('resize(3)', {'image': np.full((4, 4, 1), 77, np.uint8)}, in_tf_data)['image']
  np.testing.assert_array_equal(flat, np.full((3, 3, 1), 77, np.uint8))
  up = _run('resize((8, 6))', {'image': image.astype(np.float32), 'masks': mask}, in_tf_data)
  assert up['image'].shape == (8, 6, 1) and up['image'].dtype == np.float32
  assert set(np.unique(up['masks'])) == {0, 255}  # Nearest neighbour keeps masks binary.


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_center_crop(in_tf_data):
  image = np.arange(25, dtype=np.uint8).reshape(5, 5, 1)
  box = np.array([[0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 0.2, 0.2]], np.float32)
  out = _run('center_crop(3)', {'image': image, 'masks': image, 'objects/bbox': box}, in_tf_data)
  np.testing.assert_array_equal(out['image'], image[1:4, 1:4])
  np.testing.assert_array_equal(out['masks'], image[1:4, 1:4])
  # Pixels 1..3 become the whole crop; the corner box falls outside and is clipped to zero area.
  np.testing.assert_allclose(out['objects/bbox'], [[0, 0, 1, 1], [0, 0, 0, 0]], atol=1e-6)
  # Even remainder: offset floor((6 - 3) / 2) = 1 rows, (4 - 2) / 2 = 1 column.
  image = np.arange(24, dtype=np.uint8).reshape(6, 4, 1)
  out = _run('center_crop((3, 2))', {'image': image}, in_tf_data)
  np.testing.assert_array_equal(out['image'], image[1:4, 1:3])


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_random_crop_moves_image_mask_box_together(in_tf_data):
  h = w = 8
  image = _one_hot(h, w, 3, 4)
  seen = set()
  for s in range(12):
    out = _run('random_crop(6)', _features(image, _pixel_box(h, w, 3, 4), (s, 1)), in_tf_data)
    assert out['image'].shape == (6, 6, 1)
    r, c = _argmax2d(out['image'])
    top, left = 3 - r, 4 - c
    assert 0 <= top <= 2 and 0 <= left <= 2
    seen.add((top, left))
    np.testing.assert_array_equal(out['image'], image[top : top + 6, left : left + 6])
    np.testing.assert_array_equal(out['masks'], out['image'])
    np.testing.assert_allclose(out['objects']['bbox'], _pixel_box(6, 6, r, c), atol=1e-6)
  assert len(seen) > 3


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_random_translate_moves_pixel_by_offset_within_max(in_tf_data):
  h, w, max_px = 7, 7, 2
  offsets = set()
  for s in range(40):
    f = _features(_one_hot(h, w, 3, 3), _pixel_box(h, w, 3, 3), (s, 7))
    out = _run(f'random_translate({max_px})', f, in_tf_data)
    assert out['image'].shape == (h, w, 1)
    assert out['image'].sum() == 200  # Nothing lost: the pixel moves at most max_px.
    r, c = _argmax2d(out['image'])
    dy, dx = r - 3, c - 3
    assert abs(dy) <= max_px and abs(dx) <= max_px
    offsets.add((dy, dx))
    np.testing.assert_array_equal(out['masks'], out['image'])
    np.testing.assert_allclose(out['objects']['bbox'], _pixel_box(h, w, r, c), atol=1e-6)
  assert {d for d, _ in offsets} == set(range(-max_px, max_px + 1))


def test_translate_zero_fills_and_clips_boxes():
  image = np.arange(1, 10, dtype=np.uint8).reshape(3, 3, 1)
  box = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
  out = ops.translate({'image': tf.constant(image), 'objects/bbox': box}, 1, -1, max_px=1)
  np.testing.assert_array_equal(out['image'][..., 0], [[0, 0, 0], [2, 3, 0], [5, 6, 0]])
  np.testing.assert_allclose(out['objects/bbox'], [[1 / 3, 0.0, 1.0, 2 / 3]], atol=1e-6)


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_flip_lr(in_tf_data):
  image = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  box = np.array([[0.0, 0.0, 0.5, 1 / 3]], np.float32)
  out = _run('flip_lr(p=1.0)', _features(image, box), in_tf_data)
  np.testing.assert_array_equal(out['image'][..., 0], [[2, 1, 0], [5, 4, 3]])
  np.testing.assert_array_equal(out['masks'], out['image'])
  np.testing.assert_allclose(out['objects']['bbox'], [[0.0, 2 / 3, 0.5, 1.0]], atol=1e-6)
  out = _run('flip_lr(p=0.0)', _features(image, box), in_tf_data)
  np.testing.assert_array_equal(out['image'], image)
  np.testing.assert_array_equal(out['objects']['bbox'], box)
  flipped = [
    _run('flip_lr', _features(image, seed=(s, 3)), in_tf_data)['image'][0, 0, 0] == 2
    for s in range(30)
  ]
  assert 5 < sum(flipped) < 25


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_rotate_zero_is_identity(in_tf_data):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (6, 5, 1), dtype=np.uint8)
  box = np.array([[0.1, 0.2, 0.5, 0.9]], np.float32)
  out = _run('rotate(0)', _features(image, box, (4, 2)), in_tf_data)
  np.testing.assert_array_equal(out['image'], image)
  np.testing.assert_array_equal(out['masks'], image)
  np.testing.assert_allclose(out['objects']['bbox'], box, atol=1e-6)


def test_rotate_by_quarter_turn_is_counter_clockwise():
  # Top-middle pixel of a 5x5 image goes to the left-middle, and its box with it.
  f = {'image': tf.constant(_one_hot(5, 5, 0, 2)), 'masks': tf.constant(_one_hot(5, 5, 0, 2))}
  f['objects'] = {'bbox': tf.constant(_pixel_box(5, 5, 0, 2))}
  out = ops.rotate_by(f, math.pi / 2)
  np.testing.assert_array_equal(out['masks'].numpy(), _one_hot(5, 5, 2, 0))
  np.testing.assert_allclose(out['image'].numpy(), _one_hot(5, 5, 2, 0), atol=1)
  np.testing.assert_allclose(out['objects']['bbox'].numpy(), _pixel_box(5, 5, 2, 0), atol=1e-6)


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_rotate_box_contains_rotated_mask(in_tf_data):
  h = w = 32
  mask = np.zeros((h, w, 1), np.uint8)
  mask[8:14, 18:26] = 255
  box = np.array([[8 / h, 18 / w, 14 / h, 26 / w]], np.float32)
  for s in range(5):
    out = _run('rotate(30)', _features(mask, box, (s, 9)), in_tf_data)
    assert set(np.unique(out['masks'])) <= {0, 255}
    rows, cols = np.nonzero(out['masks'][..., 0])
    ymin, xmin, ymax, xmax = out['objects']['bbox'][0] * [h, w, h, w]
    # Nearest sampling may round a boundary pixel outwards by at most one pixel.
    assert rows.min() >= ymin - 1 and rows.max() + 1 <= ymax + 1
    assert cols.min() >= xmin - 1 and cols.max() + 1 <= xmax + 1
    # The box is the tight hull of the rotated rectangle: not much bigger than the mask.
    assert ymax - ymin <= rows.max() + 1 - rows.min() + 2


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_normalize(in_tf_data):
  image = np.array([[[255, 0, 51]]], np.uint8)
  out = _run("normalize('imagenet')", {'image': image}, in_tf_data)['image']
  assert out.dtype == np.float32
  expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
  np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6)
  out = _run("normalize('minus_one_one')", {'image': image}, in_tf_data)['image']
  np.testing.assert_allclose(out[0, 0], [1.0, -1.0, -0.6], rtol=1e-6)
  out = _run("normalize('zero_one')", {'image': image}, in_tf_data)['image']
  np.testing.assert_allclose(out[0, 0], [1.0, 0.0, 0.2], rtol=1e-6)
  with pytest.raises(ValueError, match='3-channel.*grayscale_to_rgb'):
    _run("normalize('imagenet')", {'image': image[..., :1]}, in_tf_data)


def test_keep():
  f = {'image': 1, 'labels': 2, 'masks': 3, '_seed': np.array([4, 5])}
  out = _run("keep('image', 'labels')", f, False)
  assert sorted(out) == ['_seed', 'image', 'labels']
  assert out['image'] == 1 and out['labels'] == 2
  with pytest.raises(KeyError, match='missing keys'):
    _run("keep('image', 'nope')", {'image': 1}, False)


# --- composition ------------------------------------------------------------------------------


def _phantom_example(seed) -> dict:
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  masks = (rng.random((16, 16, 3)) > 0.5).astype(np.uint8) * 255
  box = np.array([[0.1, 0.2, 0.6, 0.7]], np.float32)
  return {
    'image': tf.io.encode_png(image),
    'masks': tf.io.encode_png(masks),
    'objects': {'bbox': tf.constant(box)},
    '_seed': tf.constant(seed, tf.int64),
  }


def test_full_pp_eager_equals_tf_data_and_is_deterministic():
  eager = _run(FULL_PP, _phantom_example((3, 5)), in_tf_data=False)
  graph = _run(FULL_PP, _phantom_example((3, 5)), in_tf_data=True)
  assert eager['image'].shape == (10, 10, 3) and eager['image'].dtype == np.float32
  assert eager['masks'].shape == (10, 10, 3)
  np.testing.assert_allclose(eager['image'], graph['image'], atol=1e-5)
  np.testing.assert_array_equal(eager['masks'], graph['masks'])
  np.testing.assert_allclose(eager['objects']['bbox'], graph['objects']['bbox'], atol=1e-6)
  np.testing.assert_array_equal(eager['_seed'], [3, 5])  # The caller's seed is restored.
  again = _run(FULL_PP, _phantom_example((3, 5)), in_tf_data=False)
  np.testing.assert_array_equal(eager['image'], again['image'])
  other = _run(FULL_PP, _phantom_example((3, 6)), in_tf_data=False)
  assert not np.array_equal(eager['image'], other['image'])


def test_random_ops_get_their_own_sub_seeds():
  # With a shared seed the two flips would always cancel out.
  image = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
  flipped = [
    _run('flip_lr|flip_lr', _features(image, seed=(s, 0)), False)['image'][0, 0, 0] == 2
    for s in range(20)
  ]
  assert any(flipped)
