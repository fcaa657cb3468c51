"""Tests of the `jsrt_scr` builder (JSRT raw images + SCR masks) on dummy data."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from cxr_jax.data import jsrt_scr
from cxr_jax.data.jsrt_scr import jsrt_scr_dataset_builder as jb
from cxr_jax.data.jsrt_scr import make_dummy_data

DUMMY = epath.Path(jb.__file__).parent / 'dummy_data'


class JsrtScrTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = jsrt_scr.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['256']
  SPLITS = {'fold1': 4, 'fold2': 2}  # odd numbers 001, 003 of both prefixes in fold1


def test_raw_reader_size_from_length_and_checks(tmp_path):
  p = epath.Path(tmp_path) / 'x.IMG'
  raw = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 16
  p.write_bytes(raw.astype('>u2').tobytes())
  np.testing.assert_array_equal(jb.read_jsrt_raw(p), raw)
  p.write_bytes(raw.tobytes()[:-2])
  with pytest.raises(ValueError, match='not a square 16-bit raw image'):
    jb.read_jsrt_raw(p)
  p.write_bytes(raw.astype('<u2').tobytes())  # byte-swapped: values > 4095
  with pytest.raises(ValueError, match='not 12-bit big-endian'):
    jb.read_jsrt_raw(p)


def test_intensity_inverted_and_stretched():
  raw = np.array([[500, 1000], [3500, 4095]], np.uint16)
  unit = jb.jsrt_to_unit(raw)
  np.testing.assert_allclose(unit, [[1.0, 3095 / 3595], [595 / 3595, 0.0]], rtol=1e-6)
  np.testing.assert_array_equal(jb.jsrt_to_unit(np.full((2, 2), 7, np.uint16)), 0)


def test_example_values():
  records = jb.find_records(DUMMY)
  assert [(r.name, r.fold) for r in records] == [
    ('JPCLN001', 1), ('JPCLN002', 2), ('JPCLN003', 1),
    ('JPCNN001', 1), ('JPCNN002', 2), ('JPCNN003', 1)]
  ex = jb.make_example(records[0], 32)  # masks are 32 px: stored unchanged
  assert ex['label'] == 'nodule' and ex['scr_fold'] == 1
  rng = np.random.default_rng(5)
  expected = make_dummy_data.fake_structures(rng, make_dummy_data.IMAGE_SIDE)
  step = make_dummy_data.IMAGE_SIDE // make_dummy_data.MASK_SIDE
  small = [m[::step, ::step].astype(np.uint8) * 255 for m in expected]
  np.testing.assert_array_equal(ex['masks'], np.stack(small[:3], -1))
  np.testing.assert_array_equal(ex['left_clavicle_mask'][..., 0], small[3])
  np.testing.assert_array_equal(ex['right_clavicle_mask'][..., 0], small[4])
  # Dense structures (heart) are bright after inversion, lungs dark.
  heart, lungs = small[2] > 0, (small[0] | small[1]) > 0
  assert ex['image'][heart].mean() > ex['image'][lungs & ~heart].mean() + 50
  assert jb.make_example(records[4], 16)['label'] == 'non_nodule'


def test_flat_mask_layout_uses_odd_even_rule(tmp_path):
  make_dummy_data.write(tmp_path, flat=True)
  records = jb.find_records(epath.Path(tmp_path))
  assert {r.name: r.fold for r in records} == {
    'JPCLN001': 1, 'JPCLN002': 2, 'JPCLN003': 1, 'JPCNN001': 1, 'JPCNN002': 2, 'JPCNN003': 1}
  assert all('scratch/masks/' in str(r.masks[0]) for r in records)


def test_missing_files_are_named(tmp_path):
  root = epath.Path(tmp_path) / 'm'
  shutil.copytree(DUMMY, root)
  (root / 'scratch/fold2/masks/right clavicle/JPCNN002.gif').unlink()
  with pytest.raises(FileNotFoundError, match='scratch/fold2/masks/right clavicle/JPCNN002.gif'):
    jb.find_records(root)
  shutil.rmtree(root / 'All247images')
  with pytest.raises(FileNotFoundError, match='All247images/'):
    jb.find_records(root)
