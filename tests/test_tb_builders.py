"""Tests of the NLM TB builders (`montgomery_tb`, `shenzhen_tb`, `tb_combined`) on dummy data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from cxr_jax.data import montgomery_tb, nlm_tb, shenzhen_tb, tb_combined, xray_files

DATA = epath.Path(nlm_tb.__file__).parent
MONTGOMERY_DUMMY = DATA / 'montgomery_tb' / 'dummy_data'
SHENZHEN_DUMMY = DATA / 'shenzhen_tb' / 'dummy_data'


class MontgomeryTbTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = montgomery_tb.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['256']
  # 10 normal + 10 TB: 7/2/1 each (cuts at round(n * 0.7), round(n * 0.9)).
  SPLITS = {'train': 14, 'validation': 4, 'test': 2}


class ShenzhenTbTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = shenzhen_tb.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['256']
  SPLITS = {'train': 14, 'validation': 4, 'test': 2}


class TbCombinedTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = tb_combined.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['256']
  SPLITS = {'train': 28, 'validation': 8, 'test': 4}


@pytest.mark.parametrize('text,source,expected', [
  ("Patient's Sex: M\r\nPatient's Age: 034Y\r\nnormal", 'montgomery', (0, 34)),
  ("Patient's Sex: F\nPatient's Age: 007M\nnormal", 'montgomery', (1, 0)),
  ("Patient's Sex: O\nPatient's Age: 050Y\n", 'montgomery', (2, 50)),
  ('no demographics', 'montgomery', (2, -1)),
  ('male 35yrs\nnormal', 'shenzhen', (0, 35)),
  ('female 24yrs\nnormal', 'shenzhen', (1, 24)),
  ('Male  61 yrs\nSTB', 'shenzhen', (0, 61)),
  ('male35yrs\n', 'shenzhen', (0, 35)),
  ('female 8months\n', 'shenzhen', (1, 0)),
  ('Female 42yr\n', 'shenzhen', (1, 42)),
  ('', 'shenzhen', (2, -1)),
])
def test_parse_reading(text, source, expected):
  assert nlm_tb.parse_reading(text, source) == expected


def _fake_records(tb_set: nlm_tb.TbSet, n_normal: int, n_tb: int) -> list[nlm_tb.Record]:
  p = epath.Path('/nonexistent')
  return [
    nlm_tb.Record(tb_set, f'{tb_set.prefix}_{i:04d}_{label}', label, p, p, None, None)
    for label, n in ((0, n_normal), (1, n_tb)) for i in range(n)
  ]


def test_split_counts_are_70_20_10_per_label_and_seeded():
  records = _fake_records(nlm_tb.MONTGOMERY, 80, 58)
  split = nlm_tb.split_of(0, (0.7, 0.2, 0.1), records)
  counts = {(s, label): 0 for s in nlm_tb.SPLITS for label in (0, 1)}
  for r in records:
    counts[split[r.stem], r.label] += 1
  assert counts == {('train', 0): 56, ('validation', 0): 16, ('test', 0): 8,
                    ('train', 1): 41, ('validation', 1): 11, ('test', 1): 6}
  assert nlm_tb.split_of(0, (0.7, 0.2, 0.1), records) == split
  assert nlm_tb.split_of(1, (0.7, 0.2, 0.1), records) != split
  with pytest.raises(ValueError, match='summing to 1'):
    nlm_tb.split_of(0, (0.7, 0.2, 0.2), records)


def test_combined_split_is_union_of_single_set_splits():
  mont = nlm_tb.find_records(MONTGOMERY_DUMMY, nlm_tb.MONTGOMERY)
  shen = nlm_tb.find_records(SHENZHEN_DUMMY, nlm_tb.SHENZHEN)
  both = nlm_tb.split_of(0, (0.7, 0.2, 0.1), mont + shen)
  single = {**nlm_tb.split_of(0, (0.7, 0.2, 0.1), mont),
            **nlm_tb.split_of(0, (0.7, 0.2, 0.1), shen)}
  assert both == single and len(both) == 40


def test_montgomery_example_values():
  records = nlm_tb.find_records(MONTGOMERY_DUMMY, nlm_tb.MONTGOMERY)
  assert len(records) == 20 and all(r.side_masks for r in records)
  r = records[1]  # MCUCXR_0002_1: TB, sex F, age 23 (make_dummy_data)
  ex = nlm_tb.make_example(r, 64)
  assert (ex['image_id'], ex['patient_id'], ex['label']) == ('MCUCXR_0002_1.png', 'MCUCXR_0002', 1)
  assert (ex['sex'], ex['age']) == (1, 23)
  assert ex['clinical_reading'].endswith('TB') and '\r' not in ex['clinical_reading']
  assert (ex['original_height'], ex['original_width']) == (49, 40)
  assert ex['image'].shape == (64, 64, 1) and ex['image'].dtype == np.uint8
  # 12-bit values scaled by 4095, not 65535: the body is bright.
  assert ex['image'].max() > 150
  masks = ex['masks']
  assert set(np.unique(masks)) <= {0, 255} and not masks[..., 2].any()
  xs = [np.nonzero(masks[..., c])[1].mean() for c in (0, 1)]
  assert xs[0] > xs[1]  # the patient's left lung is on the image right
  np.testing.assert_array_equal(ex['lung_mask'][..., 0], masks[..., :2].max(-1))
  assert ex['has_side_masks'] and ex['has_lung_mask']


def test_shenzhen_example_values_with_and_without_mask():
  records = nlm_tb.find_records(SHENZHEN_DUMMY, nlm_tb.SHENZHEN)
  with_mask = nlm_tb.make_example(records[0], 32)
  without = nlm_tb.make_example(records[2], 32)  # i % 3 == 2 has no mask
  assert with_mask['has_lung_mask'] and not with_mask['has_side_masks']
  assert with_mask['lung_mask'].any() and not with_mask['masks'].any()
  assert not without['has_lung_mask'] and not without['lung_mask'].any()
  rgb = nlm_tb.make_example(records[3], 32)  # stored as RGB: reduced to grey
  assert rgb['image'].shape == (32, 32, 1)
  assert (with_mask['sex'], with_mask['age']) == (0, 35)


def _copy(src: epath.Path, tmp_path) -> epath.Path:
  dst = epath.Path(tmp_path) / 'manual'
  shutil.copytree(src, dst)
  return dst


def test_missing_reading_is_named(tmp_path):
  root = _copy(MONTGOMERY_DUMMY, tmp_path)
  (root / 'MontgomerySet/ClinicalReadings/MCUCXR_0003_0.txt').unlink()
  (root / 'MontgomerySet/ManualMask/rightMask/MCUCXR_0005_0.png').unlink()
  with pytest.raises(FileNotFoundError) as e:
    nlm_tb.find_records(root, nlm_tb.MONTGOMERY)
  msg = str(e.value)
  assert 'MontgomerySet/ClinicalReadings/MCUCXR_0003_0.txt' in msg
  assert 'MontgomerySet/ManualMask/rightMask/MCUCXR_0005_0.png' in msg
  assert '2 expected file(s) missing' in msg and str(root) in msg


def test_missing_set_folder_is_named_by_builder(tmp_path):
  builder = shenzhen_tb.Builder(config='256', data_dir=str(tmp_path / 'tfds'))
  config = tfds.download.DownloadConfig(manual_dir=str(MONTGOMERY_DUMMY))
  with pytest.raises(FileNotFoundError, match='ChinaSet_AllFiles/CXR_png/'):
    builder.download_and_prepare(download_config=config)


def test_mask_size_mismatch_is_named(tmp_path):
  root = _copy(MONTGOMERY_DUMMY, tmp_path)
  bad = root / 'MontgomerySet/ManualMask/leftMask/MCUCXR_0001_0.png'
  bad.write_bytes(xray_files.encode_png(np.zeros((10, 10), np.uint8)))
  record = nlm_tb.find_records(root, nlm_tb.MONTGOMERY)[0]
  with pytest.raises(ValueError, match='leftMask/MCUCXR_0001_0.png'):
    nlm_tb.make_example(record, 32)


def test_real_montgomery_pixels(shared_data, tmp_path):
  """The real Montgomery sample, put into NLM's layout (links + generated readings), builds."""
  src = shared_data / 'montgomery_tb' / 'images'
  root = tmp_path / 'MontgomerySet'
  (root / 'CXR_png').mkdir(parents=True)
  (root / 'ClinicalReadings').mkdir()
  for p in sorted(src.glob('*.png')):
    (root / 'CXR_png' / p.name).symlink_to(p)
    (root / 'ClinicalReadings' / f'{p.stem}.txt').write_text("Patient's Sex: M\n")
  records = nlm_tb.find_records(epath.Path(tmp_path), nlm_tb.MONTGOMERY)
  assert len(records) == 48 and sum(r.label for r in records) == 24
  ex = nlm_tb.make_example(records[0], 256)
  assert ex['image'].shape == (256, 256, 1) and 40 < ex['image'].mean() < 220
  assert not ex['has_lung_mask'] and ex['age'] == -1
