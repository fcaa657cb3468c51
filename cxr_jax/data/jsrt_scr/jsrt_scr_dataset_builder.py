"""TFDS builder of `jsrt_scr`: JSRT radiographs with the SCR masks of lungs, heart and clavicles.

247 JSRT images (Shiraishi et al. 2000; 154 with a nodule `JPCLN*`, 93 without `JPCNN*`) and the
SCR manual segmentations (van Ginneken et al. 2006), used to train paper 004's lung/heart U-Net.
Splits are SCR's two folds. See README.md for the raw format and intensity handling.

  tfds.builder('jsrt_scr/256', data_dir=...).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=...))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cxr_jax.data import xray_files

# SCR's folder names; (left lung, right lung, heart) form the common cxr_jax 'masks' layout.
STRUCTURES = ('left lung', 'right lung', 'heart', 'left clavicle', 'right clavicle')
LABELS = ('non_nodule', 'nodule')
SPLITS = ('fold1', 'fold2')
RAW_MAX = 4095  # 12-bit

_NAME = re.compile(r'^JPC(LN|NN)(\d{3})\.IMG$', re.IGNORECASE)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the JSRT database (http://db.jsrt.or.jp/eng.php, "All247images.zip") and the SCR masks
(https://www.isi.uu.nl/Research/Databases/SCR/, "scratch.zip"; van Ginneken et al. 2006) and
unzip both into manual_dir (`~/tensorflow_datasets/downloads/manual/` by default), so that it
holds:

  All247images/JPCLN001.IMG ... JPCNN093.IMG        247 raw images (2048 x 2048, 12-bit)
  scratch/fold1/masks/<structure>/JPCLN001.gif ...  SCR masks, fold 1
  scratch/fold2/masks/<structure>/JPCLN002.gif ...  SCR masks, fold 2

with <structure> = left lung, right lung, heart, left clavicle, right clavicle (1024 x 1024 GIFs).
A flattened `scratch/masks/<structure>/*.gif` (no fold folders) is accepted too; the fold is
then SCR's rule: odd image number -> fold1, even -> fold2.
"""


def read_jsrt_raw(path: epath.Path) -> np.ndarray:
  """A JSRT `.IMG` file -> uint16 [N, N] raw 12-bit values (big-endian, no header).

  The side N comes from the file length (2 bytes per pixel, square): 2048 for JSRT; the test
  data are smaller. Raises ValueError naming the file when the length is not 2 * N * N or a value
  exceeds 12 bits (a sign of a byte-swapped or non-JSRT file).
  """
  data = path.read_bytes()
  n = len(data) // 2
  side = math.isqrt(n)
  if len(data) % 2 or side * side != n or side == 0:
    raise ValueError(f'{path}: {len(data)} bytes is not a square 16-bit raw image '
                     '(JSRT: 2048 x 2048 x 2 = 8388608 bytes)')
  raw = np.frombuffer(data, dtype='>u2').reshape(side, side).astype(np.uint16)
  if raw.max() > RAW_MAX:
    raise ValueError(f'{path}: value {raw.max()} > {RAW_MAX}: not 12-bit big-endian JSRT data')
  return raw


def jsrt_to_unit(raw: np.ndarray) -> np.ndarray:
  """Raw JSRT values -> float32 in [0, 1] with bright = dense.

  JSRT stores film-density-like values: air (dark on a radiograph) is high, bone low, so the
  values are inverted, as every public JSRT converter does (`1 - raw / 4096`). The films use
  only part of the 12-bit range, so the result is stretched to [0, 1] (per-image min-max, the
  other common step); a constant image becomes 0.
  """
  unit = (RAW_MAX - raw.astype(np.float32)) / RAW_MAX
  lo, hi = float(unit.min()), float(unit.max())
  return (unit - lo) / (hi - lo) if hi > lo else np.zeros_like(unit)


@dataclasses.dataclass(frozen=True)
class Record:
  name: str  # 'JPCLN001'
  image: epath.Path
  masks: tuple[epath.Path, ...]  # in STRUCTURES order
  fold: int  # 1 or 2


def find_records(manual_dir: epath.Path) -> list[Record]:
  """Lists and checks the JSRT images and their five SCR masks; sorted by name.

  Raises:
    FileNotFoundError naming the missing folder or mask files.
  """
  image_dir = manual_dir / 'All247images'
  scratch = manual_dir / 'scratch'
  missing = [f'{p.name}/ (folder)' for p in (image_dir, scratch) if not p.is_dir()]
  if missing:
    raise xray_files.missing_files_error('jsrt_scr', manual_dir, missing,
                                         MANUAL_DOWNLOAD_INSTRUCTIONS)
  images = sorted((p for p in image_dir.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
  if not images:
    raise xray_files.missing_files_error('jsrt_scr', manual_dir, ['All247images/JPC*.IMG'],
                                         MANUAL_DOWNLOAD_INSTRUCTIONS)
  fold_dirs = [scratch / f'fold{k}' / 'masks' for k in (1, 2)]
  flat = not any(d.is_dir() for d in fold_dirs)
  records, missing = [], []
  for path in images:
    name = path.name[:-4]
    if flat:
      fold = 1 if int(_NAME.match(path.name).group(2)) % 2 else 2
      base = scratch / 'masks'
    else:
      # The fold holding any of the image's masks: one absent mask is then reported where it
      # belongs, not as all five missing from fold 1.
      fold = next((k for k, d in zip((1, 2), fold_dirs, strict=True)
                   if any((d / s / f'{name}.gif').is_file() for s in STRUCTURES)), 1)
      base = fold_dirs[fold - 1]
    masks = tuple(base / s / f'{name}.gif' for s in STRUCTURES)
    missing += [os.fspath(m.relative_to(manual_dir)) for m in masks if not m.is_file()]
    records.append(Record(name=name, image=path, masks=masks, fold=fold))
  if missing:
    raise xray_files.missing_files_error('jsrt_scr', manual_dir, missing,
                                         MANUAL_DOWNLOAD_INSTRUCTIONS)
  return records


def features(size: int) -> tfds.features.FeaturesDict:
  """Features of JSRT/SCR examples (also used by `cxr_samples/jsrt_scr`)."""
  mask = tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format='png')
  return tfds.features.FeaturesDict({
    'image_id': tfds.features.Text(),  # 'JPCLN001'
    'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format='png'),
    # Common cxr_jax layout: (left lung, right lung, heart), patient's sides (SCR's), 0/255.
    'masks': tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='png'),
    'left_clavicle_mask': mask,
    'right_clavicle_mask': mask,
    'label': tfds.features.ClassLabel(names=LABELS),  # from the JSRT prefix
    'scr_fold': tfds.features.Scalar(np.int64),  # 1 or 2
  })


def masks_to_features(masks: list[np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Five binary masks in STRUCTURES order -> the mask features at `size`."""
  resized = [xray_files.resize_mask(m, size) for m in masks]
  return {
    'masks': np.stack(resized[:3], axis=-1),
    'left_clavicle_mask': resized[3][..., None],
    'right_clavicle_mask': resized[4][..., None],
  }


def make_example(record: Record, size: int) -> dict:
  """The feature dict of one JSRT image (numpy values)."""
  image = xray_files.resize_image(jsrt_to_unit(read_jsrt_raw(record.image)), size)
  masks = [xray_files.read_pixels(p) for p in record.masks]
  for p, m in zip(record.masks, masks, strict=True):
    if m.shape[0] != m.shape[1] or m.shape != masks[0].shape:
      raise ValueError(f'{p}: mask is {m.shape[1]}x{m.shape[0]}, expected square and the same '
                       f'size as {record.masks[0].name} of {STRUCTURES[0]}')
  return {
    'image_id': record.name,
    'image': image[..., None],
    **masks_to_features(masks, size),
    'label': 'nodule' if record.name.upper().startswith('JPCLN') else 'non_nodule',
    'scr_fold': record.fold,
  }


@dataclasses.dataclass(eq=False)
class JsrtScrConfig(tfds.core.BuilderConfig):
  image_size: int = 256


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for JSRT + SCR (paper 004's segmentation training data)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    JsrtScrConfig(name=str(s), description=f'{s} x {s} px images and masks', image_size=s)
    for s in (256, 512, 1024)
  ]
  DEFAULT_CONFIG_NAME = '256'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description='JSRT chest radiographs with SCR masks of both lungs, heart and clavicles.',
      features=features(self.builder_config.image_size),
      supervised_keys=('image', 'masks'),
      homepage='https://www.isi.uu.nl/Research/Databases/SCR/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    records = find_records(epath.Path(dl_manager.manual_dir))
    return {
      split: self._generate_examples([r for r in records if r.fold == k])
      for k, split in enumerate(SPLITS, start=1)
    }

  def _generate_examples(self, records: list[Record]) -> Iterator[tuple[str, dict]]:
    size = self.builder_config.image_size
    with concurrent.futures.ThreadPoolExecutor(xray_files.num_workers()) as pool:
      for record, example in zip(records, pool.map(lambda r: make_example(r, size), records),
                                 strict=True):
        yield record.name, example
