"""Tests of the nih_chest_xray14 TFDS builder: dummy-data builds, real-metadata splits, errors."""

from __future__ import annotations

import collections
import csv
import functools
import io
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

import cxr_jax.data  # noqa: F401  (registers the builders)
from cxr_jax.data.nih_chest_xray14 import nih_chest_xray14_dataset_builder as nih
from cxr_jax.labels import NIH13_CLASSES, NIH_CLASSES

DUMMY = epath.Path(nih.__file__).parent / 'dummy_data'


class OfficialTest(tfds.testing.DatasetBuilderTestCase):
  """Builds official-224 from dummy_data (14 train_val patients, 7 test patients)."""

  DATASET_CLASS = nih.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['official-224']
  SPLITS = {'train': 23, 'validation': 6, 'test': 20, 'bbox': 5}
  OVERLAPPING_SPLITS = ['bbox']  # the 880 box images are official test images


class Patient13Test(tfds.testing.DatasetBuilderTestCase):
  """Builds patient13-224 from dummy_data ('No Finding' and Hernia images dropped)."""

  DATASET_CLASS = nih.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['patient13-224']
  SPLITS = {'train': 17, 'validation': 5, 'test': 4, 'bbox': 5}
  OVERLAPPING_SPLITS = ['bbox']  # box images fall in any split of the random patient split


# ----------------------------------------------------------------------------- helpers


def _works(config_name: str, manual_dir: epath.Path = DUMMY) -> dict[str, list]:
  """What `_split_generators` hands to generation, without TFDS writing anything."""
  cfg = nih.Builder.builder_configs[config_name]
  files = nih.find_manual_files(manual_dir)
  entries = nih.read_data_entry(files.data_entry)
  boxes = nih.read_bbox_list(files.bbox_list)
  splits = nih.make_splits(
    cfg,
    entries,
    boxes,
    nih.read_image_list(files.train_val_list),
    nih.read_image_list(files.test_list),
  )
  out = {}
  for split, ids in splits.items():
    out[split] = [
      nih._Work(
        files,
        source,
        tuple(entries[i] for i in group),
        {i: tuple(boxes[i]) for i in group if i in boxes},
        cfg.image_size,
      )
      for source, group in nih.group_by_source(files, ids).items()
    ]
  return out


def _examples(works, pool=None) -> dict[str, dict]:
  return {k: ex for w in works for k, ex in nih._examples_of_work(w, pool)}


def _csv_rows(path: epath.Path) -> list[list[str]]:
  return list(csv.reader(io.StringIO(path.read_text())))


def _png(size=(8, 8), mode='L', value=100) -> bytes:
  out = io.BytesIO()
  Image.new(mode, size, value if mode == 'L' else (value,) * len(mode)).save(out, format='PNG')
  return out.getvalue()


@pytest.fixture
def manual_copy(tmp_path) -> epath.Path:
  dst = tmp_path / 'manual'
  shutil.copytree(DUMMY, dst)
  return epath.Path(dst)


# ----------------------------------------------------------------------------- dummy data


def test_config_names():
  names = [c.name for c in nih.Builder.BUILDER_CONFIGS]
  assert names == [f'{s}-{n}' for s in ('official', 'patient13') for n in (224, 256, 512, 1024)]
  p13 = nih.Builder.builder_configs['patient13-512']
  assert (p13.image_size, p13.test_fraction, p13.validation_fraction) == (512, 0.2, 0.25)
  assert nih.Builder.builder_configs['official-1024'].validation_fraction == 0.1


def test_examples_match_the_csv_exactly():
  rows = {r[0]: r for r in _csv_rows(DUMMY / 'Data_Entry_2017_v2020.csv')[1:]}
  boxes = collections.defaultdict(list)
  for r in _csv_rows(DUMMY / 'BBox_List_2017.csv')[1:]:
    boxes[r[0]].append(r)
  works = _works('official-224')
  examples = _examples(works['train'] + works['validation'] + works['test'])
  assert set(examples) == set(rows)
  for image_id, ex in examples.items():
    r = rows[image_id]
    findings = [] if r[1] == 'No Finding' else r[1].split('|')
    assert [NIH_CLASSES[i] for i in np.flatnonzero(ex['labels'])] == sorted(
      findings, key=NIH_CLASSES.index
    )
    assert ex['no_finding'] == (r[1] == 'No Finding')
    assert (ex['follow_up'], ex['patient_id'], ex['age']) == (int(r[2]), int(r[3]), int(r[4]))
    assert (ex['sex'], ex['view_position']) == (r[5], r[6])
    assert ex['original_size'].tolist() == [int(r[7]), int(r[8])]
    img = np.asarray(Image.open(io.BytesIO(ex['image'])))
    assert img.shape == (224, 224) and img.dtype == np.uint8
    want = boxes.get(image_id, [])
    assert len(ex['objects']['label']) == len(want)
    for k, b in enumerate(want):
      label = nih.BBOX_LIST_ALIASES.get(b[1], b[1])
      assert NIH_CLASSES[ex['objects']['label'][k]] == label
      x, y, w, h = (float(v) for v in b[2:6])
      np.testing.assert_allclose(
        ex['objects']['bbox_xywh'][k], np.array([x, y, w, h]) * 224 / 1024, rtol=1e-5
      )
      np.testing.assert_allclose(
        ex['objects']['bbox'][k], np.array([y, x, y + h, x + w]) / 1024, rtol=1e-5
      )


def test_bbox_split_is_in_official_test_and_has_two_boxes_on_one_image():
  works = _works('official-224')
  test_ids = {e.image_id for w in works['test'] for e in w.entries}
  bbox = _examples(works['bbox'])
  assert set(bbox) <= test_ids and len(bbox) == 5
  assert sorted(NIH_CLASSES[i] for i in bbox['00002106_000.png']['objects']['label']) == [
    'Mass',
    'Pneumothorax',
  ]


def test_patient13_drops_no_finding_and_hernia():
  works = _works('patient13-224')
  entries = [e for s in ('train', 'validation', 'test') for w in works[s] for e in w.entries]
  assert entries and all(e.findings and 'Hernia' not in e.findings for e in entries)
  assert 'Hernia' not in NIH13_CLASSES


def test_thread_pool_gives_the_same_examples():
  from concurrent.futures import ThreadPoolExecutor

  works = _works('official-224')['test']
  serial = _examples(works)
  with ThreadPoolExecutor(2) as pool:
    pooled = _examples(works, pool)
  assert list(serial) == list(pooled)
  for k in serial:
    assert serial[k]['image'] == pooled[k]['image']


def test_unpacked_images_folder_gives_the_same_examples(manual_copy):
  for tarball in manual_copy.glob('images_*.tar.gz'):
    with tarfile.open(tarball) as tar:
      tar.extractall(manual_copy, filter='data')
    tarball.unlink()
  from_tar = _examples(_works('official-224')['test'])
  from_dir = _examples(_works('official-224', manual_copy)['test'])
  assert list(from_tar) == list(from_dir)
  for k in from_tar:
    assert from_tar[k]['image'] == from_dir[k]['image']


def test_rgba_image_is_converted_to_grey():
  (ex,) = [
    ex
    for w in _works('official-224')['train'] + _works('official-224')['validation']
    for k, ex in nih._examples_of_work(w)
    if k == '00000008_000.png'
  ]
  img = Image.open(io.BytesIO(ex['image']))
  assert img.mode == 'L' and img.size == (224, 224)


def test_to_grey_png_resizes_with_antialiasing():
  # A 1-pixel checkerboard aliases to noise or a flat 0/255 when subsampled; antialiasing
  # averages it to mid-grey.
  board = ((np.indices((1024, 1024)).sum(0) % 2) * 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(board).save(buf, format='PNG')
  out = np.asarray(Image.open(io.BytesIO(nih.to_grey_png(buf.getvalue(), 224))))
  assert out.shape == (224, 224)
  assert abs(float(out[8:-8, 8:-8].mean()) - 127.5) < 2 and out[8:-8, 8:-8].std() < 3
  rgba = np.asarray(Image.open(io.BytesIO(nih.to_grey_png(_png(mode='RGBA', value=80), 8))))
  assert rgba.shape == (8, 8) and np.all(rgba == 80)


def test_unreadable_image_is_named():
  with pytest.raises(ValueError, match='00000001_000.png'):
    nih.to_grey_png(b'not a png', 224, '00000001_000.png')


def test_corrupt_image_in_tarball_is_named(manual_copy):
  tarball = manual_copy / 'images_002.tar.gz'
  with tarfile.open(tarball) as tar:
    members = [(m, tar.extractfile(m).read()) for m in tar]
  with tarfile.open(tarball, 'w:gz') as tar:
    for m, data in members:
      data = b'garbage' if m.name.endswith('00002106_000.png') else data
      m.size = len(data)
      tar.addfile(m, io.BytesIO(data))
  with pytest.raises(ValueError, match='00002106_000.png'):
    _examples(_works('official-224', manual_copy)['bbox'])


@pytest.mark.parametrize(
  'name', ['Data_Entry_2017_v2020.csv', 'BBox_List_2017.csv', 'train_val_list.txt', 'test_list.txt']
)
def test_missing_file_is_named(manual_copy, name):
  (manual_copy / name).unlink()
  with pytest.raises(FileNotFoundError, match=name.split('.')[0]):
    nih.find_manual_files(manual_copy)


def test_missing_images_are_named(manual_copy):
  for tarball in manual_copy.glob('images_*.tar.gz'):
    tarball.unlink()
  with pytest.raises(FileNotFoundError, match=r'images_001\.tar\.gz .*images_012\.tar\.gz'):
    nih.find_manual_files(manual_copy)


def test_missing_tarball_is_named_before_generation(manual_copy):
  (manual_copy / 'images_002.tar.gz').unlink()
  with pytest.raises(FileNotFoundError, match=r"missing tarball\(s\) \['images_002.tar.gz'\]"):
    _works('official-224', manual_copy)


def test_image_missing_from_its_tarball_is_named(manual_copy):
  (manual_copy / 'Data_Entry_2017_v2020.csv').write_text(
    (manual_copy / 'Data_Entry_2017_v2020.csv').read_text()
    + '00001000_000.png,No Finding,0,1000,40,M,PA,2048,2500,0.14,0.14\n'
  )
  (manual_copy / 'test_list.txt').write_text(
    (manual_copy / 'test_list.txt').read_text() + '\n00001000_000.png'
  )
  with pytest.raises(FileNotFoundError, match=r'images_001.tar.gz lacks 1 image.*00001000_000'):
    _examples(_works('official-224', manual_copy)['test'])


def test_wrong_columns_are_named(manual_copy):
  path = manual_copy / 'Data_Entry_2017_v2020.csv'
  path.write_text(path.read_text().replace('Patient Age', 'Age', 1))
  with pytest.raises(
    ValueError, match=r"Data_Entry_2017_v2020.csv: missing column\(s\) \['Patient Age'\]"
  ):
    nih.read_data_entry(path)
  bbox = manual_copy / 'BBox_List_2017.csv'
  bbox.write_text(bbox.read_text().replace('Finding Label', 'Label', 1))
  with pytest.raises(
    ValueError, match=r"BBox_List_2017.csv: missing column\(s\) \['Finding Label'\]"
  ):
    nih.read_bbox_list(bbox)


def test_original_2017_csv_gz_is_read(manual_copy):
  # Data_Entry_2017.csv (the first release) has a trailing empty column; accepted gzipped too.
  import gzip

  src = manual_copy / 'Data_Entry_2017_v2020.csv'
  lines = [line + ',' for line in src.read_text().splitlines()]
  (manual_copy / 'Data_Entry_2017.csv.gz').write_bytes(gzip.compress(('\n'.join(lines)).encode()))
  src.unlink()
  files = nih.find_manual_files(manual_copy)
  assert files.data_entry.name == 'Data_Entry_2017.csv.gz'
  assert len(nih.read_data_entry(files.data_entry)) == 49


def test_beam_path_gives_the_same_examples():
  beam = pytest.importorskip('apache_beam')
  from apache_beam.testing.util import assert_that

  works = _works('official-224')['bbox']
  want = {k: ex['image'] for k, ex in _examples(works).items()}

  def check(got):
    assert {k: ex['image'] for k, ex in got} == want

  builder = nih.Builder(config='official-224', data_dir='/tmp/unused')
  with beam.Pipeline() as p:
    assert_that(p | builder._beam_examples(works), check)


# ----------------------------------------------------------------------------- real metadata


@functools.cache
def _read_real(folder: str) -> dict:
  shared = epath.Path(folder)
  return {
    'entries': nih.read_data_entry(shared / 'Data_Entry_2017_v2020.csv.gz'),
    'boxes': nih.read_bbox_list(shared / 'BBox_List_2017.csv.gz'),
    'train_val': nih.read_image_list(shared / 'train_val_list.txt'),
    'test': nih.read_image_list(shared / 'test_list.txt'),
  }


@pytest.fixture
def real(shared_data) -> dict:
  """The real NIH metadata, parsed once per session (skips where ../shared/data is absent)."""
  folder = shared_data / 'nih_metadata'
  if not (folder / 'Data_Entry_2017_v2020.csv.gz').exists():
    pytest.skip(f'NIH metadata not found in {folder}')
  return _read_real(str(folder))


def _patients(entries, ids) -> set[int]:
  return {entries[i].patient_id for i in ids}


def _assert_patient_disjoint(entries, splits, names=('train', 'validation', 'test')):
  for a in names:
    for b in names:
      if a < b:
        assert not _patients(entries, splits[a]) & _patients(entries, splits[b]), (a, b)


def test_real_metadata_counts(real):
  entries = real['entries']
  assert len(entries) == 112120
  assert len({e.patient_id for e in entries.values()}) == 30805
  assert sum(not e.findings for e in entries.values()) == 60361
  per_tarball = collections.Counter(nih.tarball_of(i) for i in entries)
  assert [per_tarball[t] for t in nih.TARBALLS] == [4999] + [10000] * 10 + [7121]


def test_real_official_splits(real):
  entries = real['entries']
  cfg = nih.Builder.builder_configs['official-224']
  splits = nih.make_splits(cfg, entries, real['boxes'], real['train_val'], real['test'])
  assert len(splits['train']) + len(splits['validation']) == 86524
  assert len(splits['test']) == 25596
  assert set(splits['train']) | set(splits['validation']) == set(real['train_val'])
  _assert_patient_disjoint(entries, splits)
  n_val = len(_patients(entries, splits['validation']))
  n_train_val = len(_patients(entries, real['train_val']))
  assert n_train_val == 28008 and n_val == round(0.1 * n_train_val)
  assert set(splits['bbox']) <= set(splits['test'])
  # Seeded: the same seed gives the same validation patients, another seed others.
  again = nih.official_splits(
    entries, real['train_val'], real['test'], validation_fraction=0.1, seed=0
  )
  other = nih.official_splits(
    entries, real['train_val'], real['test'], validation_fraction=0.1, seed=1
  )
  assert again['validation'] == splits['validation'] != other['validation']


def test_real_patient13_splits(real):
  entries = real['entries']
  cfg = nih.Builder.builder_configs['patient13-256']
  splits = nih.make_splits(cfg, entries, real['boxes'], real['train_val'], real['test'])
  kept = {i for i, e in entries.items() if e.findings and 'Hernia' not in e.findings}
  used = set(splits['train']) | set(splits['validation']) | set(splits['test'])
  assert used == kept
  assert len(kept) == 112120 - 60361 - sum('Hernia' in e.findings for e in entries.values())
  _assert_patient_disjoint(entries, splits)
  n = {s: len(_patients(entries, splits[s])) for s in ('train', 'validation', 'test')}
  total = sum(n.values())
  assert n['test'] == round(0.2 * total)
  assert n['validation'] == round(0.25 * (total - n['test']))
  # Image fractions follow the patient fractions closely (patients are many and random).
  frac = {s: len(splits[s]) / len(kept) for s in n}
  assert abs(frac['test'] - 0.2) < 0.02 and abs(frac['validation'] - 0.2) < 0.02


def test_real_bbox_split(real):
  boxes = real['boxes']
  assert len(boxes) == 880 and sum(len(b) for b in boxes.values()) == 984
  labels = collections.Counter(b.label for bs in boxes.values() for b in bs)
  assert labels['Infiltration'] == 123 and 'Infiltrate' not in labels
  assert set(labels) <= set(nih.NIH_CLASSES[:8])
  assert set(boxes) <= set(real['test'])
  for split_scheme in ('official-224', 'patient13-224'):
    cfg = nih.Builder.builder_configs[split_scheme]
    splits = nih.make_splits(cfg, real['entries'], boxes, real['train_val'], real['test'])
    assert splits['bbox'] == sorted(boxes)
