"""TFDS builder of `cxr_samples`: the team's small real samples (../shared/data) as data sets.

Tests, benchmarks and demos need real pixels with true labels; the sample folders have simple
layouts of their own (see each folder's README), so each gets a config here that takes the
folder itself as manual_dir:

  tfds.builder('cxr_samples/nih_bbox', data_dir=...).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir='../shared/data/nih_bbox'))

Users do not have these folders; the builders of the full data sets are `nih_chest_xray14`,
`jsrt_scr`, `montgomery_tb`, `shenzhen_tb`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cxr_jax.data import nlm_tb, xray_files
from cxr_jax.data.features import classification_features
from cxr_jax.data.jsrt_scr import jsrt_scr_dataset_builder as jsrt
from cxr_jax.labels import BBOX_LIST_ALIASES, NIH_CLASSES

NO_FINDING = 'No Finding'
# Mask folder names of the jsrt_scr sample, in jsrt_scr.STRUCTURES order.
JSRT_SAMPLE_STRUCTURES = ('left_lung', 'right_lung', 'heart', 'left_clavicle', 'right_clavicle')

NIH_COLUMNS = ('image', 'finding_labels', 'patient_id', 'follow_up', 'patient_age', 'patient_sex',
               'view_position', 'source_png_width', 'source_png_height', 'official_split')
BBOX_COLUMNS = ('image', 'finding_label', 'x', 'y', 'w', 'h')
JSRT_COLUMNS = ('image', 'label', 'scr_fold')
TB_COLUMNS = ('image', 'label', 'patient_id')
TB_FOLDERS = {'montgomery_tb': 'montgomery', 'shenzhen_tb': 'shenzhen'}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Only for the cxr_jax team: manual_dir is one folder of the real samples in ../shared/data
(see its README.md), e.g. `--manual_dir ../shared/data/nih_bbox` for config nih_bbox:
  nih_bbox/   labels.csv, bbox.csv, images/<Image Index>.png
  nih_tiny64/ labels.csv, images/<Image Index>.png
  jsrt_scr/   labels.csv, images/<name>.png, masks/<structure>/<name>.png
  montgomery_tb/, shenzhen_tb/  labels.csv (image, label normal|tb, patient_id[, mask]
              [, split]), images/<name>.png[, the `mask` column's union lung masks]
"""


@dataclasses.dataclass(eq=False)
class SamplesConfig(tfds.core.BuilderConfig):
  """folder: which sample folder layout ('nih_bbox' | 'nih_tiny64' | 'jsrt_scr'); image_size:
  stored size (the folder's own size stores the files' pixels unchanged)."""

  folder: str = 'nih_bbox'
  image_size: int = 512


def _read_csv(path: epath.Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
  if not path.is_file():
    raise xray_files.missing_files_error('cxr_samples', path.parent, [path.name],
                                         MANUAL_DOWNLOAD_INSTRUCTIONS)
  rows = list(csv.DictReader(io.StringIO(path.read_text())))
  absent = [c for c in columns if not rows or c not in rows[0]]
  if absent:
    raise ValueError(f'{path}: missing column(s) {absent} (or no rows)')
  return rows


def _check_files(manual_dir: epath.Path, relative: list[str]) -> None:
  missing = [r for r in relative if not (manual_dir / r).is_file()]
  if missing:
    raise xray_files.missing_files_error('cxr_samples', manual_dir, missing,
                                         MANUAL_DOWNLOAD_INSTRUCTIONS)


def _image(path: epath.Path, size: int) -> np.ndarray:
  """uint8 [size, size, 1]; the file's own pixels when it already has that size."""
  pixels = xray_files.read_pixels(path)
  if pixels.dtype == np.uint8 and pixels.shape == (size, size):
    return pixels[..., None]
  return xray_files.resize_image(xray_files.to_unit(pixels), size)[..., None]


def nih_labels(finding_labels: str) -> tuple[np.ndarray, bool]:
  """'A|B' (Data_Entry vocabulary) -> (14-hot float32 in NIH_CLASSES order, no_finding)."""
  names = finding_labels.split('|')
  hot = np.zeros(len(NIH_CLASSES), np.float32)
  for name in names:
    if name == NO_FINDING:
      continue
    if name not in NIH_CLASSES:
      raise ValueError(f'unknown finding {name!r} in {finding_labels!r}')
    hot[NIH_CLASSES.index(name)] = 1.0
  return hot, names == [NO_FINDING]


def nih_boxes(boxes: list[dict[str, str]], src_w: float, src_h: float, size: int) -> dict:
  """bbox.csv rows of one image (x, y, w, h in source-PNG pixels) -> the `objects` feature.

  bbox: normalised (ymin, xmin, ymax, xmax), clipped to [0, 1]; bbox_xywh: pixels of the
  stored size x size image (x * size / src_w, ...), unclipped, as NIH's list gives them.
  """
  xywh = np.array([[float(b[k]) for k in 'xywh'] for b in boxes], np.float32).reshape(-1, 4)
  x, y, w, h = xywh.T
  norm = np.stack([y / src_h, x / src_w, (y + h) / src_h, (x + w) / src_w], -1)
  scale = np.array([size / src_w, size / src_h, size / src_w, size / src_h], np.float32)
  return {
    'bbox': np.clip(norm, 0.0, 1.0).astype(np.float32).reshape(-1, 4),
    'bbox_xywh': (xywh * scale).astype(np.float32),
    'label': [BBOX_LIST_ALIASES.get(b['finding_label'], b['finding_label']) for b in boxes],
  }


def _nih_features(size: int) -> tfds.features.FeaturesDict:
  """The common cxr_jax classification spec (no masks: NIH has none)."""
  return classification_features(size)


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for the real sample folders (team-only data)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    SamplesConfig(name='nih_bbox', folder='nih_bbox', image_size=512,
                  description='536 NIH box images, 512 px; splits bbox/test/train'),
    SamplesConfig(name='nih_bbox-256', folder='nih_bbox', image_size=256,
                  description='nih_bbox resized to 256 px'),
    SamplesConfig(name='nih_tiny64', folder='nih_tiny64', image_size=64,
                  description='545 NIH 64-px thumbnails; splits train/test (official lists)'),
    SamplesConfig(name='jsrt_scr', folder='jsrt_scr', image_size=512,
                  description='148 JSRT images with SCR masks, 512 px; splits fold1/fold2'),
    SamplesConfig(name='jsrt_scr-256', folder='jsrt_scr', image_size=256,
                  description='jsrt_scr resized to 256 px'),
    SamplesConfig(name='montgomery_tb', folder='montgomery_tb', image_size=512,
                  description='48 Montgomery TB images (24 TB), no masks, 512 px (squashed), '
                              'the TB builders\' features; seeded stratified 70/20/10'),
    SamplesConfig(name='montgomery_tb-256', folder='montgomery_tb', image_size=256,
                  description='montgomery_tb at 256 px'),
    SamplesConfig(name='shenzhen_tb', folder='shenzhen_tb', image_size=512,
                  description='7 normal Shenzhen images with union lung masks, 512 px'),
    SamplesConfig(name='shenzhen_tb-256', folder='shenzhen_tb', image_size=256,
                  description='shenzhen_tb at 256 px'),
  ]
  DEFAULT_CONFIG_NAME = 'nih_tiny64'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if cfg.folder == 'jsrt_scr':
      feats, keys = jsrt.features(cfg.image_size), ('image', 'masks')
    elif cfg.folder in TB_FOLDERS:
      feats, keys = nlm_tb.features(cfg.image_size), ('image', 'label')
    else:
      feats, keys = _nih_features(cfg.image_size), ('image', 'labels')
    return self.dataset_info_from_configs(
      description='Real chest X-ray samples of the cxr_jax team (../shared/data).',
      features=feats,
      supervised_keys=keys,
      homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    if self.builder_config.folder == 'jsrt_scr':
      return self._jsrt_splits(manual_dir)
    if self.builder_config.folder in TB_FOLDERS:
      return self._tb_splits(manual_dir)
    return self._nih_splits(manual_dir)

  def _tb_splits(self, manual_dir: epath.Path):
    """The NLM TB samples in the TB builders' feature spec (montgomery_tb, shenzhen_tb, and
    tb_combined read the same features), so every TB config runs on them by data.name alone.

    Splits: the folder's `split` column when it has one, else the TB builders' seeded
    stratified 70/20/10 (nlm_tb.split_stems, seed 0). Unknown sex, age -1, no clinical
    reading (the samples have none); lung masks from the `mask` column where given.
    """
    source = TB_FOLDERS[self.builder_config.folder]
    rows = _read_csv(manual_dir / 'labels.csv', TB_COLUMNS)
    bad = [r['image'] for r in rows if r['label'] not in nlm_tb.LABELS]
    if bad:
      raise ValueError(f'{manual_dir / "labels.csv"}: label must be one of {nlm_tb.LABELS} '
                       f'(images {bad[:5]})')
    masks = {r['image']: r['mask'] for r in rows if r.get('mask')}
    _check_files(manual_dir, [f'images/{r["image"]}' for r in rows] + list(masks.values()))
    if rows and 'split' in rows[0]:
      split = {r['image']: r['split'] for r in rows}
      unknown = sorted({v for v in split.values() if v not in nlm_tb.SPLITS})
      if unknown:
        raise ValueError(f'{manual_dir / "labels.csv"}: split values {unknown}; valid: '
                         f'{nlm_tb.SPLITS}')
    else:
      stems = nlm_tb.split_stems(0, (0.7, 0.2, 0.1), [
          (source, nlm_tb.LABELS.index(r['label']), r['image']) for r in rows])
      split = {r['image']: stems[r['image']] for r in rows}
    size = self.builder_config.image_size

    def example(r: dict[str, str]) -> dict:
      pixels = xray_files.read_pixels(manual_dir / 'images' / r['image'])
      lungs = np.zeros((size, size), np.uint8)
      if r['image'] in masks:
        mask = xray_files.read_pixels(manual_dir / masks[r['image']]) > 0
        if mask.shape != pixels.shape:
          raise ValueError(f'{manual_dir / masks[r["image"]]} is {mask.shape[1]}x'
                           f'{mask.shape[0]}, its image {pixels.shape[1]}x{pixels.shape[0]}')
        lungs = xray_files.resize_mask(mask, size)
      return {
        'image_id': r['image'], 'patient_id': r['patient_id'], 'source': source,
        'image': _image(manual_dir / 'images' / r['image'], size),
        'label': r['label'], 'sex': 'unknown', 'age': nlm_tb.UNKNOWN_AGE,
        'clinical_reading': '',
        'original_height': int(r.get('original_height') or pixels.shape[0]),
        'original_width': int(r.get('original_width') or pixels.shape[1]),
        'masks': np.zeros((size, size, 3), np.uint8), 'lung_mask': lungs[..., None],
        'has_side_masks': np.bool_(False), 'has_lung_mask': np.bool_(r['image'] in masks),
      }

    by_split = {name: [r for r in rows if split[r['image']] == name] for name in nlm_tb.SPLITS}
    return {k: self._generate_examples(v, example) for k, v in by_split.items() if v}

  def _nih_splits(self, manual_dir: epath.Path):
    rows = _read_csv(manual_dir / 'labels.csv', NIH_COLUMNS)
    _check_files(manual_dir, [f'images/{r["image"]}' for r in rows])
    boxes: dict[str, list[dict[str, str]]] = {}
    if self.builder_config.folder == 'nih_bbox':
      known = {r['image'] for r in rows}
      for b in _read_csv(manual_dir / 'bbox.csv', BBOX_COLUMNS):
        if b['image'] not in known:
          raise ValueError(f'{manual_dir / "bbox.csv"}: box of {b["image"]}, not in labels.csv')
        boxes.setdefault(b['image'], []).append(b)
    size = self.builder_config.image_size

    def example(r: dict[str, str]) -> dict:
      labels, no_finding = nih_labels(r['finding_labels'])
      src_w, src_h = float(r['source_png_width']), float(r['source_png_height'])
      return {
        'image_id': r['image'],
        'image': _image(manual_dir / 'images' / r['image'], size),
        'labels': labels,
        'no_finding': np.bool_(no_finding),
        'patient_id': int(r['patient_id']),
        'follow_up': int(r['follow_up']),
        'age': int(r['patient_age']),
        'sex': r['patient_sex'],
        'view_position': r['view_position'],
        'objects': nih_boxes(boxes.get(r['image'], []), src_w, src_h, size),
      }

    splits = {
      'train': [r for r in rows if r['official_split'] == 'train_val'],
      'test': [r for r in rows if r['official_split'] == 'test'],
    }
    if self.builder_config.folder == 'nih_bbox':
      splits['bbox'] = [r for r in rows if r['image'] in boxes]
    return {k: self._generate_examples(v, example) for k, v in splits.items() if v}

  def _jsrt_splits(self, manual_dir: epath.Path):
    rows = _read_csv(manual_dir / 'labels.csv', JSRT_COLUMNS)
    _check_files(manual_dir, [f'images/{r["image"]}' for r in rows] + [
      f'masks/{s}/{r["image"]}' for r in rows for s in JSRT_SAMPLE_STRUCTURES])
    size = self.builder_config.image_size

    def example(r: dict[str, str]) -> dict:
      masks = [xray_files.read_pixels(manual_dir / 'masks' / s / r['image'])
               for s in JSRT_SAMPLE_STRUCTURES]
      return {
        'image_id': r['image'].rsplit('.', 1)[0],
        'image': _image(manual_dir / 'images' / r['image'], size),
        **jsrt.masks_to_features(masks, size),
        'label': r['label'],
        'scr_fold': int(r['scr_fold']),
      }

    return {
      f'fold{k}': self._generate_examples([r for r in rows if int(r['scr_fold']) == k], example)
      for k in (1, 2)
    }

  def _generate_examples(self, rows: list[dict[str, str]],
                example: Callable[[dict[str, str]], dict]) -> Iterator[tuple[str, dict]]:
    with concurrent.futures.ThreadPoolExecutor(xray_files.num_workers()) as pool:
      for r, ex in zip(rows, pool.map(example, rows), strict=True):
        yield r['image'], ex
