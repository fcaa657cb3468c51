"""Tests of the cxr_phantom TFDS builder: determinism, label statistics, splits, boxes, masks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

import cxr_jax.data.cxr_phantom  # noqa: F401  (registers the builder)
from cxr_jax.data.cxr_phantom import anatomy, findings, phantom, sampling
from cxr_jax.data.cxr_phantom.cxr_phantom_dataset_builder import Builder, make_example
from cxr_jax.labels import BOX_CLASSES, NIH_CLASSES

PARAMS = phantom.PhantomParams()
TINY = phantom.PhantomParams(split_sizes=(24, 8, 8, 8))


def _centroid_x(mask: np.ndarray) -> float:
  ys, xs = np.nonzero(mask)
  return float(xs.mean())


def test_config_names_and_sizes():
  names = [c.name for c in Builder.BUILDER_CONFIGS]
  assert names == ['64', '128', '256', '512', 'tiny']
  cfg = Builder.builder_configs['64']
  assert cfg.split_sizes == {'train': 16000, 'validation': 2000, 'test': 4000, 'bbox': 1000}
  assert cfg.phantom_params() == PARAMS


def test_render_is_deterministic():
  a = phantom.render(phantom.sample_spec(PARAMS, 'test', 17), 64)
  b = phantom.render(phantom.sample_spec(PARAMS, 'test', 17), 64)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.masks, b.masks)
  np.testing.assert_array_equal(a.boxes, b.boxes)
  c = phantom.render(phantom.sample_spec(PARAMS, 'test', 18), 64)
  assert not np.array_equal(a.image, c.image)


def test_example_alone_equals_example_in_sequence(tmp_path):
  builder = Builder(config='tiny', data_dir=tmp_path)
  seq = list(builder._generate_examples('validation'))
  assert len(seq) == 8
  key, ex = seq[5]
  alone = make_example(builder.builder_config.phantom_params(), 'validation', 5, 64)
  assert key == 'validation_0000005'
  for name in ('image', 'masks', 'labels'):
    np.testing.assert_array_equal(ex[name], alone[name])
  for name in ('image_id', 'patient_id', 'follow_up', 'age', 'sex', 'view_position'):
    assert ex[name] == alone[name]
  np.testing.assert_array_equal(ex['objects']['bbox'], alone['objects']['bbox'])


def test_label_prevalence_matches_nih():
  rng = np.random.default_rng(0)
  n = 20000
  hot = sampling.masks_to_multihot(sampling.sample_label_masks(rng, n))
  expected = sampling.nih_prevalence()
  # NIH prevalences (e.g. Infiltration 17.7 %, Hernia 0.2 %) within 4.5 binomial std errors.
  tol = 4.5 * np.sqrt(expected * (1 - expected) / n) + 1e-3
  np.testing.assert_array_less(np.abs(hot.mean(0) - expected), tol)
  assert abs(expected[NIH_CLASSES.index('Infiltration')] - 0.1774) < 1e-3
  # Co-occurrence: Effusion & Atelectasis appear together far more often than independence says.
  i, j = NIH_CLASSES.index('Effusion'), NIH_CLASSES.index('Atelectasis')
  pair = float((hot[:, i] * hot[:, j]).mean())
  nih_pair = sampling.nih_pair_frequency(i, j)
  assert abs(pair - nih_pair) < 4.5 * np.sqrt(nih_pair / n) + 1e-3
  assert nih_pair > 2 * expected[i] * expected[j]
  no_finding = float((hot.sum(1) == 0).mean())
  assert abs(no_finding - 60361 / 112120) < 0.015


def test_bbox_split_labels_have_a_box_class():
  masks = sampling.sample_label_masks(np.random.default_rng(1), 5000, box_only=True)
  assert np.all(masks & sampling.BOX_BITS)
  box_idx = [NIH_CLASSES.index(c) for c in BOX_CLASSES]
  specs = [phantom.sample_spec(PARAMS, 'bbox', i) for i in range(50)]
  for s in specs:
    assert sampling.masks_to_multihot(np.array(s.label_mask))[box_idx].sum() >= 1


def test_spec_labels_views_and_patients():
  specs = [phantom.sample_spec(PARAMS, 'train', i) for i in range(1500)]
  no_finding = np.mean([s.label_mask == 0 for s in specs])
  assert abs(no_finding - 0.538) < 0.05
  ap = np.mean([s.view == 'AP' for s in specs])
  assert 0.3 < ap < 0.5
  # Follow-ups of each patient are 0..n-1 in order, with one sex and non-decreasing age.
  by_patient: dict[int, list] = {}
  for s in specs:
    by_patient.setdefault(s.patient_id, []).append(s)
  assert len(by_patient) < len(specs) / 1.5  # several images per patient
  for group in by_patient.values():
    assert [s.follow_up for s in group] == list(range(len(group)))
    assert len({s.sex for s in group}) == 1
    assert all(a.age <= b.age for a, b in zip(group, group[1:], strict=False))
    # Anatomy is per patient: body size is shared, per-image inspiration varies.
    assert len({s.anatomy.body_w for s in group}) == 1


def test_splits_are_patient_disjoint():
  plans = sampling.split_plans(0, PARAMS.split_sizes, PARAMS.max_images_per_patient)
  ranges = []
  for split, n in zip(sampling.SPLITS, PARAMS.split_sizes, strict=True):
    plan = plans[split]
    assert plan.patient_start[-1] == n
    ranges.append((plan.patient_id_offset, plan.patient_id_offset + plan.num_patients))
  for (_, a1), (b0, _) in zip(ranges, ranges[1:], strict=False):
    assert a1 <= b0
  ids = {
    split: {phantom.sample_spec(TINY, split, i).patient_id for i in range(n)}
    for split, n in zip(sampling.SPLITS, TINY.split_sizes, strict=True)
  }
  for a in sampling.SPLITS:
    for b in sampling.SPLITS:
      if a < b:
        assert not ids[a] & ids[b]


def test_boxes_cover_lesion_pixels():
  """Each lesion's pixel difference vs. a rendering without it lies in that lesion's box."""
  size = 128
  checked = set()
  geometric = ('Atelectasis', 'Cardiomegaly', 'Emphysema')
  specs = [phantom.sample_spec(PARAMS, 'bbox', i) for i in range(40)]
  specs += [
    phantom.sample_spec(PARAMS, 'train', i, label_mask=1 << NIH_CLASSES.index(name))
    for i in range(3)
    for name in geometric
  ]
  for i, spec in enumerate(specs):
    full = phantom.render(spec, size)
    assert np.all(full.boxes[:, :2] >= 0) and np.all(full.boxes[:, 2:] > 0)
    assert np.all(full.boxes[:, 0] + full.boxes[:, 2] <= size + 1e-4)
    assert np.all(full.boxes[:, 1] + full.boxes[:, 3] <= size + 1e-4)
    for box, lesion_idx in zip(full.boxes, full.box_lesions, strict=True):
      les = spec.lesions[lesion_idx]
      if les.name in geometric and len(spec.lesions) > 1:
        continue  # removing it moves the anatomy that the other lesions are drawn in
      rest = tuple(x for k, x in enumerate(spec.lesions) if k != lesion_idx)
      without = phantom.render(dataclasses.replace(spec, lesions=rest), size)
      diff = np.abs(full.image[..., 0].astype(np.float32) - without.image[..., 0])
      if diff.sum() == 0:
        continue
      x, y, w, h = box
      inside = np.zeros_like(diff, bool)
      inside[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
      frac = diff[inside].sum() / diff.sum()
      assert frac > 0.9, (les.name, i, frac)
      checked.add(les.name)
  assert {'Nodule', 'Mass', 'Effusion', 'Infiltration', 'Pneumothorax', *geometric} <= checked


def test_boxes_follow_the_affine():
  spec = phantom.sample_spec(PARAMS, 'train', 0, label_mask=1 << NIH_CLASSES.index('Mass'))
  ident = np.array([[1.0, 0, 0], [0, 1.0, 0]])
  shifted = np.array([[1.0, 0, 0.25], [0, 1.0, 0]])  # a quarter image width = 16 px to the right
  a = phantom.render(dataclasses.replace(spec, affine=ident), 64)
  b = phantom.render(dataclasses.replace(spec, affine=shifted), 64)
  assert len(a.boxes) == len(b.boxes) == 1
  assert abs((b.boxes[0, 0] + b.boxes[0, 2] / 2) - (a.boxes[0, 0] + a.boxes[0, 2] / 2) - 8) < 1.01
  assert abs(_centroid_x(b.masks[..., 2]) - _centroid_x(a.masks[..., 2]) - 8) < 0.5


def test_masks_anatomical_sides():
  size = 64
  for i in range(30):
    out = phantom.render(phantom.sample_spec(PARAMS, 'train', i), size)
    left, right, heart = (out.masks[..., k] > 0 for k in range(3))
    assert set(np.unique(out.masks)) <= {0, 255}
    assert left.sum() > 0.04 * size * size and right.sum() > 0.04 * size * size
    assert _centroid_x(left) > size / 2 > _centroid_x(right)  # left lung on the image right
    assert _centroid_x(heart) > (_centroid_x(left) + _centroid_x(right)) / 2
    assert not np.any(left & right) and not np.any(left & heart)


def test_cardiomegaly_enlarges_heart():
  cm = 1 << NIH_CLASSES.index('Cardiomegaly')
  for i in range(20):
    normal = phantom.sample_spec(PARAMS, 'train', i, label_mask=0)
    big = phantom.sample_spec(PARAMS, 'train', i, label_mask=cm)
    assert normal.anatomy.cardiothoracic_ratio() < 0.5
    assert findings.apply_geometry(big.anatomy, big.lesions).cardiothoracic_ratio() > 0.5
    h0 = phantom.render(normal, 64).masks[..., 2].sum()
    h1 = phantom.render(big, 64).masks[..., 2].sum()
    assert h1 > 1.1 * h0


def test_every_finding_changes_the_image():
  for k, name in enumerate(NIH_CLASSES):
    spec = phantom.sample_spec(PARAMS, 'train', 3, label_mask=1 << k)
    assert {les.name for les in spec.lesions} == {name}
    a = phantom.render(spec, 128).image.astype(np.float32)
    b = phantom.render(dataclasses.replace(spec, lesions=()), 128).image
    assert np.abs(a - b).max() >= 8, name


def test_random_point_in_lung_is_inside():
  rng = np.random.default_rng(0)
  anat = anatomy.sample_patient(rng, 'F', 50)
  for side in (0, 1):
    for _ in range(20):
      x, y = anatomy.random_point_in_lung(rng, anat, side)
      assert anatomy.lung_dist(anat, side, x, y) > 0


def test_tfds_build_tiny(tmp_path):
  builder = tfds.builder('cxr_phantom/tiny', data_dir=tmp_path)
  builder.download_and_prepare()
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
    'train': 24,
    'validation': 8,
    'test': 8,
    'bbox': 8,
  }
  patients = {}
  for split in ('train', 'validation', 'test', 'bbox'):
    exs = list(tfds.as_numpy(builder.as_dataset(split=split)))
    patients[split] = {int(e['patient_id']) for e in exs}
    for e in exs:
      assert e['image'].shape == (64, 64, 1) and e['image'].dtype == np.uint8
      assert e['masks'].shape == (64, 64, 3) and e['masks'].dtype == np.uint8
      assert e['labels'].shape == (14,) and e['labels'].dtype == np.float32
      assert e['no_finding'].dtype == np.bool_ and e['no_finding'] == (e['labels'].sum() == 0)
      assert e['image_id'].decode().startswith('phantom_')
      boxes = e['objects']['bbox']
      assert boxes.dtype == np.float32 and boxes.shape[1:] == (4,)
      assert np.all((boxes >= 0) & (boxes <= 1))
      np.testing.assert_allclose(boxes[:, 1] * 64, e['objects']['bbox_xywh'][:, 0], atol=1e-3)
      for label in e['objects']['label']:
        assert e['labels'][label] == 1
      if split == 'bbox':
        assert e['labels'][[NIH_CLASSES.index(c) for c in BOX_CLASSES]].sum() >= 1
  assert sum(len(p) for p in patients.values()) == len(set().union(*patients.values()))


@pytest.mark.parametrize('size', [64, 128])
def test_render_speed_budget(size):
  """Rendering must stay cheap; the budget is generous so slow CI machines pass."""
  import time

  specs = [phantom.sample_spec(PARAMS, 'train', i) for i in range(50)]
  t = time.perf_counter()
  for s in specs:
    phantom.render(s, size)
  per_image = (time.perf_counter() - t) / len(specs)
  assert per_image < {64: 0.01, 128: 0.03}[size]


def test_parallel_generation_renders_the_same_examples():
  # Worker processes render a large split (cxr_phantom_dataset_builder.generate); each example
  # comes from its own seed, so the data set is the same with any number of workers.
  from cxr_jax.data.cxr_phantom import cxr_phantom_dataset_builder as B
  params = B.CxrPhantomConfig(name='t', image_size=32, num_train=6).phantom_params()
  serial = list(B.generate(params, 'train', 6, 32, workers=1))
  parallel = list(B.generate(params, 'train', 6, 32, workers=2))
  assert [k for k, _ in parallel] == [k for k, _ in serial] == [f'train_{i:07d}' for i in range(6)]
  for (_, a), (_, b) in zip(serial, parallel, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['masks'], b['masks'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
    assert a['image_id'] == b['image_id']
  assert B.num_workers(100) == 1 and B.num_workers(10 ** 6) >= 1
