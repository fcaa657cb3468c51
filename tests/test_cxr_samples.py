"""`cxr_samples`: the real sample folders build, and what they hold matches their CSVs/files.

Needs ../shared/data (team machines and CI only): every test skips without it.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import cxr_jax.data  # noqa: F401  (registers the builders)
from cxr_jax.data import xray_files
from cxr_jax.data.cxr_samples import cxr_samples_dataset_builder as cs
from cxr_jax.labels import NIH_CLASSES


def build(name: str, folder, tmp_path) -> dict[str, dict[str, dict]]:
  """Builds config `name` from `folder`; split -> image_id -> numpy example."""
  builder = tfds.builder(f'cxr_samples/{name}', data_dir=str(tmp_path))
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))
  out = {}
  for split in builder.info.splits:
    exs = list(tfds.as_numpy(builder.as_dataset(split=split)))
    out[split] = {ex['image_id'].decode(): ex for ex in exs}
    assert len(out[split]) == len(exs)
  return out


def rows_of(path) -> list[dict[str, str]]:
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def check_nih_rows(rows, splits) -> None:
  """Every labels.csv row is in exactly its official split with the same labels and fields."""
  for r in rows:
    split = 'train' if r['official_split'] == 'train_val' else 'test'
    ex = splits[split][r['image']]
    names = set(r['finding_labels'].split('|'))
    assert {NIH_CLASSES[i] for i in np.flatnonzero(ex['labels'])} == names - {'No Finding'}
    assert bool(ex['no_finding']) == (names == {'No Finding'})
    assert (ex['patient_id'], ex['follow_up'], ex['age']) == (
      int(r['patient_id']), int(r['follow_up']), int(r['patient_age']))
    assert ('M', 'F')[ex['sex']] == r['patient_sex']
    assert ('PA', 'AP')[ex['view_position']] == r['view_position']
  assert sum(len(splits[s]) for s in ('train', 'test') if s in splits) == len(rows)


def test_nih_tiny64_labels_and_pixels_match(shared_data, tmp_path):
  folder = shared_data / 'nih_tiny64'
  splits = build('nih_tiny64', folder, tmp_path)
  assert set(splits) == {'train', 'test'}
  rows = rows_of(folder / 'labels.csv')
  check_nih_rows(rows, splits)
  for r in rows[:50]:  # stored at the files' own size: pixels unchanged
    split = 'train' if r['official_split'] == 'train_val' else 'test'
    pixels = np.asarray(Image.open(folder / 'images' / r['image']).convert('L'))
    np.testing.assert_array_equal(splits[split][r['image']]['image'][..., 0], pixels)


def test_jsrt_scr_masks_match_files(shared_data, tmp_path):
  folder = shared_data / 'jsrt_scr'
  splits = build('jsrt_scr', folder, tmp_path)
  rows = rows_of(folder / 'labels.csv')
  assert sum(len(s) for s in splits.values()) == len(rows)
  for r in rows:
    ex = splits[f'fold{r["scr_fold"]}'][r['image'][:-4]]
    assert ('non_nodule', 'nodule')[ex['label']] == r['label']
    files = [np.asarray(Image.open(folder / 'masks' / s / r['image']))
             for s in cs.JSRT_SAMPLE_STRUCTURES]
    np.testing.assert_array_equal(ex['masks'], np.stack(files[:3], -1))
    np.testing.assert_array_equal(ex['left_clavicle_mask'][..., 0], files[3])
    np.testing.assert_array_equal(ex['right_clavicle_mask'][..., 0], files[4])
    np.testing.assert_array_equal(ex['image'][..., 0],
                                  np.asarray(Image.open(folder / 'images' / r['image'])))


def test_missing_image_is_named(shared_data, tmp_path):
  folder = tmp_path / 'nih_tiny64'
  (folder / 'images').mkdir(parents=True)
  src = shared_data / 'nih_tiny64'
  rows = rows_of(src / 'labels.csv')[:3]
  with open(folder / 'labels.csv', 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  for r in rows[:2]:  # the third image is missing (generated fakes: nothing copied)
    (folder / 'images' / r['image']).write_bytes(
      xray_files.encode_png(np.zeros((64, 64), np.uint8)))
  builder = tfds.builder('cxr_samples/nih_tiny64', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match=f'images/{rows[2]["image"]}'):
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(folder)))
