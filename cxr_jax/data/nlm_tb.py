"""What the NLM tuberculosis builders share: `montgomery_tb`, `shenzhen_tb` and `tb_combined`.

The two NLM sets (Jaeger et al. 2014) have one PA radiograph per case, named
`<PREFIX>_<nnnn>_<L>.png` with L = 0 normal / 1 TB, a clinical reading per image
(`ClinicalReadings/<stem>.txt`) and, for Montgomery, manual lung masks. Each builder reads the
folders as NLM ships them from `manual_dir`, checks them first (every error names the files) and
splits 70/20/10 (paper 003) with a seeded hash, stratified by (set, label). Because the split of
an image depends only on (seed, set, label, file stem), `tb_combined`'s splits are exactly the
union of the two single-set builders' splits.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from cxr_jax.data import xray_files

SOURCES = ('montgomery', 'shenzhen')
LABELS = ('normal', 'tb')
SEXES = ('M', 'F', 'unknown')  # M/F first: same indices as the common spec's ClassLabel(['M', 'F'])
SPLITS = ('train', 'validation', 'test')
UNKNOWN_AGE = -1


@dataclasses.dataclass(frozen=True)
class TbSet:
  """Where one NLM set lives under manual_dir and how its files are named."""

  source: str  # one of SOURCES
  folder: str  # top folder, as NLM's zip unpacks
  prefix: str  # file-name prefix


MONTGOMERY = TbSet('montgomery', 'MontgomerySet', 'MCUCXR')
SHENZHEN = TbSet('shenzhen', 'ChinaSet_AllFiles', 'CHNCXR')

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the NLM tuberculosis sets (https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets,
also mirrored at https://openi.nlm.nih.gov/faq#faq-tb-coll) and unzip them into manual_dir
(`~/tensorflow_datasets/downloads/manual/` by default, or `--manual_dir`), so that it holds:

  MontgomerySet/CXR_png/MCUCXR_<nnnn>_<L>.png          138 images, L = 0 normal / 1 TB
  MontgomerySet/ClinicalReadings/MCUCXR_<nnnn>_<L>.txt one reading per image
  MontgomerySet/ManualMask/leftMask/MCUCXR_<nnnn>_<L>.png   (optional: lung masks,
  MontgomerySet/ManualMask/rightMask/MCUCXR_<nnnn>_<L>.png   both or neither)
  ChinaSet_AllFiles/CXR_png/CHNCXR_<nnnn>_<L>.png      662 images
  ChinaSet_AllFiles/ClinicalReadings/CHNCXR_<nnnn>_<L>.txt
  ChinaSet_AllFiles/mask/CHNCXR_<nnnn>_<L>_mask.png    (optional, per image: the union lung
                                                       masks of Kaggle's "Lung Masks for Shenzhen
                                                       Hospital Chest X-ray Set", CC BY-NC-SA 4.0)

`montgomery_tb` needs only MontgomerySet/, `shenzhen_tb` only ChinaSet_AllFiles/, `tb_combined`
both. Other files (NLM's README PDFs, Thumbs.db) are ignored.
"""


@dataclasses.dataclass(frozen=True)
class Record:
  """The files of one image."""

  tb_set: TbSet
  stem: str  # e.g. 'MCUCXR_0001_0'
  label: int  # index into LABELS
  image: epath.Path
  reading: epath.Path
  side_masks: tuple[epath.Path, epath.Path] | None  # (leftMask, rightMask) files, as NLM names them
  lung_mask: epath.Path | None  # union mask (Shenzhen/Kaggle)

  @property
  def patient_id(self) -> str:
    return self.stem.rsplit('_', 1)[0]


def find_records(manual_dir: epath.Path, tb_set: TbSet, dataset: str | None = None
                 ) -> list[Record]:
  """Lists and checks one set's files; sorted by stem.

  `dataset` is the builder named in errors (default: the set's own, e.g. 'montgomery_tb'), so
  that building `tb_combined` does not report a `montgomery_tb` problem.

  Raises:
    FileNotFoundError naming every missing folder/file (images, readings, Montgomery masks when
    the ManualMask folder exists).
  """
  dataset = dataset or f'{tb_set.source}_tb'
  root = manual_dir / tb_set.folder
  image_dir = root / 'CXR_png'
  reading_dir = root / 'ClinicalReadings'
  if not image_dir.is_dir():
    raise xray_files.missing_files_error(
      dataset, manual_dir, [f'{tb_set.folder}/CXR_png/ (folder)'],
      MANUAL_DOWNLOAD_INSTRUCTIONS)
  pattern = re.compile(rf'^{tb_set.prefix}_(\d{{4}})_([01])\.png$')
  names = sorted(p.name for p in image_dir.iterdir() if pattern.match(p.name))
  if not names:
    raise xray_files.missing_files_error(
      dataset, manual_dir,
      [f'{tb_set.folder}/CXR_png/{tb_set.prefix}_<nnnn>_<0|1>.png (no such file)'],
      MANUAL_DOWNLOAD_INSTRUCTIONS)
  mask_root = root / 'ManualMask'
  has_side_masks = tb_set is MONTGOMERY and mask_root.is_dir()
  union_dir = root / 'mask'
  missing = []
  records = []
  for name in names:
    stem = name[:-4]
    reading = reading_dir / f'{stem}.txt'
    if not reading.is_file():
      missing.append(f'{tb_set.folder}/ClinicalReadings/{stem}.txt')
    side = None
    if has_side_masks:
      side = (mask_root / 'leftMask' / name, mask_root / 'rightMask' / name)
      missing += [f'{tb_set.folder}/ManualMask/{p.parent.name}/{name}' for p in side
                  if not p.is_file()]
    union = union_dir / f'{stem}_mask.png'
    records.append(Record(
      tb_set=tb_set, stem=stem, label=int(stem[-1]), image=image_dir / name, reading=reading,
      side_masks=side, lung_mask=union if tb_set is SHENZHEN and union.is_file() else None))
  if missing:
    raise xray_files.missing_files_error(
      dataset, manual_dir, missing, MANUAL_DOWNLOAD_INSTRUCTIONS)
  return records


_MONTGOMERY_SEX = re.compile(r"Patient'?s\s+Sex\s*:\s*([A-Za-z]+)", re.IGNORECASE)
_MONTGOMERY_AGE = re.compile(r"Patient'?s\s+Age\s*:\s*0*(\d+)\s*([YMDW]?)", re.IGNORECASE)
_AGE = re.compile(r'(\d+)\s*(yrs?|years?|y|months?|mons?|m|days?|d)\b', re.IGNORECASE)


def parse_reading(text: str, source: str) -> tuple[int, int]:
  """(sex index into SEXES, age in whole years or UNKNOWN_AGE) from a clinical reading.

  Montgomery: "Patient's Sex: M" / "Patient's Age: 034Y" lines. Shenzhen: the first line,
  e.g. "male 35yrs" / "female 24yrs". Ages given in months, weeks or days count as 0 years.
  Anything else (e.g. Montgomery's sex 'O') is unknown, never guessed.
  """
  sex, age = SEXES.index('unknown'), UNKNOWN_AGE
  if source == 'montgomery':
    if m := _MONTGOMERY_SEX.search(text):
      sex = {'m': 0, 'male': 0, 'f': 1, 'female': 1}.get(m.group(1).lower(), sex)
    if m := _MONTGOMERY_AGE.search(text):
      age = int(m.group(1)) if m.group(2).upper() in ('', 'Y') else 0
    return sex, age
  first = text.strip().splitlines()[0] if text.strip() else ''
  low = first.lower()
  # 'female' contains 'male': test it first. No word boundary: some lines read "male35yrs".
  if 'female' in low:
    sex = 1
  elif 'male' in low:
    sex = 0
  if m := _AGE.search(first):
    age = int(m.group(1)) if m.group(2).lower().startswith('y') else 0
  return sex, age


def split_of(seed: int, fractions: Sequence[float], records: Sequence[Record]) -> dict[str, str]:
  """stem -> split: seeded 70/20/10 (fractions) within each (set, label) group.

  Within a group, images are ordered by sha1(seed, set, stem) and cut at round(n * cumulative
  fraction), so each group's counts are as close to the fractions as integers allow and adding
  or removing an image elsewhere never moves another image.
  """
  return split_stems(seed, fractions, [(r.tb_set.source, r.label, r.stem) for r in records])


def split_stems(seed: int, fractions: Sequence[float],
                items: Sequence[tuple[str, int, str]]) -> dict[str, str]:
  """stem -> split for (source, label, stem) items: `split_of` without Records (the team's
  sample folders of cxr_samples use it too)."""
  if len(fractions) != len(SPLITS) or not np.isclose(sum(fractions), 1.0):
    raise ValueError(f'split_fractions must be {len(SPLITS)} numbers summing to 1: {fractions}')
  groups: dict[tuple[str, int], list[str]] = {}
  for source, label, stem in items:
    groups.setdefault((source, label), []).append(stem)
  cuts = np.cumsum(fractions)
  out = {}
  for (source, _), stems in groups.items():
    order = sorted(
      stems, key=lambda s: hashlib.sha1(f'cxr-jax-tb:{seed}:{source}:{s}'.encode()).hexdigest())
    bounds = [int(round(len(order) * c)) for c in cuts]
    start = 0
    for split, end in zip(SPLITS, bounds, strict=True):
      for stem in order[start:end]:
        out[stem] = split
      start = end
  return out


def features(size: int) -> tfds.features.FeaturesDict:
  """The feature spec of the TB builders (and of cxr_samples' TB configs) at `size` px."""
  return _features(size)


def _features(size: int) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
    'image_id': tfds.features.Text(),  # file name, e.g. 'MCUCXR_0001_0.png'
    'patient_id': tfds.features.Text(),  # file stem without the label (one image per case)
    'source': tfds.features.ClassLabel(names=SOURCES),
    'image': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format='png'),
    'label': tfds.features.ClassLabel(names=LABELS),
    'sex': tfds.features.ClassLabel(names=SEXES),
    'age': tfds.features.Scalar(np.int64),  # years; -1 unknown
    'clinical_reading': tfds.features.Text(),
    'original_height': tfds.features.Scalar(np.int64),
    'original_width': tfds.features.Scalar(np.int64),
    # The common cxr_jax mask layout (left lung, right lung, heart), patient's sides, 0/255.
    # Lungs are zeros when has_side_masks is False; the heart is never annotated in these sets
    # (always zeros). 3 channels, not 2: TensorFlow's PNG decoder refuses 2-channel images.
    'masks': tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='png'),
    # Both lungs, 0/255; zeros when has_lung_mask is False.
    'lung_mask': tfds.features.Image(shape=(size, size, 1), dtype=np.uint8,
                                     encoding_format='png'),
    'has_side_masks': tfds.features.Tensor(shape=(), dtype=np.bool_),
    'has_lung_mask': tfds.features.Tensor(shape=(), dtype=np.bool_),
  })


def _read_mask(path: epath.Path, shape: tuple[int, int]) -> np.ndarray:
  mask = xray_files.read_pixels(path)
  if mask.shape != shape:
    raise ValueError(f'mask {path} is {mask.shape[1]}x{mask.shape[0]}, its image '
                     f'{shape[1]}x{shape[0]}')
  return mask > 0


def make_example(record: Record, size: int) -> dict:
  """The feature dict of one image (numpy values, as _generate_examples yields them)."""
  pixels = xray_files.read_pixels(record.image)
  shape = pixels.shape
  text = record.reading.read_bytes().decode('utf-8', errors='replace').replace('\r\n', '\n')
  sex, age = parse_reading(text, record.tb_set.source)
  side = np.zeros((size, size, 3), np.uint8)
  lungs = np.zeros((size, size), np.uint8)
  if record.side_masks is not None:
    a, b = (_read_mask(p, shape) for p in record.side_masks)
    # Channels by position, not by NLM's folder names: in a PA film the patient's left lung
    # lies on the image right, so the mask whose centre is further right goes first.
    if _centre_x(a) < _centre_x(b):
      a, b = b, a
    side[..., 0] = xray_files.resize_mask(a, size)
    side[..., 1] = xray_files.resize_mask(b, size)
    lungs = np.maximum(side[..., 0], side[..., 1])
  elif record.lung_mask is not None:
    lungs = xray_files.resize_mask(_read_mask(record.lung_mask, shape), size)
  return {
    'image_id': record.image.name,
    'patient_id': record.patient_id,
    'source': record.tb_set.source,
    'image': xray_files.resize_image(xray_files.to_unit(pixels), size)[..., None],
    'label': record.label,
    'sex': sex,
    'age': age,
    'clinical_reading': text.strip(),
    'original_height': shape[0],
    'original_width': shape[1],
    'masks': side,
    'lung_mask': lungs[..., None],
    'has_side_masks': np.bool_(record.side_masks is not None),
    'has_lung_mask': np.bool_(record.side_masks is not None or record.lung_mask is not None),
  }


def _centre_x(mask: np.ndarray) -> float:
  xs = np.nonzero(mask)[1]
  return float(xs.mean()) if xs.size else 0.0


@dataclasses.dataclass(eq=False)
class TbConfig(tfds.core.BuilderConfig):
  """Stored image size, split seed and (train, validation, test) fractions."""

  image_size: int = 512
  seed: int = 0
  split_fractions: tuple[float, float, float] = (0.7, 0.2, 0.1)


def default_configs() -> list[TbConfig]:
  return [
    TbConfig(name=str(s), description=f'{s} x {s} px (squashed), 70/20/10 seed 0', image_size=s)
    for s in (256, 512, 1024)
  ]


class TbBuilderBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the three NLM TB builders; subclasses name their sets in `TB_SETS`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = default_configs()
  DEFAULT_CONFIG_NAME = '512'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  TB_SETS: tuple[TbSet, ...] = ()

  @abc.abstractmethod
  def _description(self) -> str:
    """One line for DatasetInfo."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=self._description(),
      features=_features(self.builder_config.image_size),
      supervised_keys=('image', 'label'),
      homepage='https://lhncbc.nlm.nih.gov/LHC-downloads/downloads.html#tuberculosis-image-data-sets',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = epath.Path(dl_manager.manual_dir)
    records = [r for s in self.TB_SETS for r in find_records(manual_dir, s, self.name)]
    cfg = self.builder_config
    split = split_of(cfg.seed, cfg.split_fractions, records)
    return {
      name: self._generate_examples([r for r in records if split[r.stem] == name])
      for name in SPLITS
    }

  def _generate_examples(self, records: list[Record]) -> Iterator[tuple[str, dict]]:
    size = self.builder_config.image_size
    with concurrent.futures.ThreadPoolExecutor(xray_files.num_workers()) as pool:
      # map keeps the order and decodes ahead of the writer.
      for record, example in zip(records, pool.map(lambda r: make_example(r, size), records),
                                 strict=True):
        yield record.stem, example
