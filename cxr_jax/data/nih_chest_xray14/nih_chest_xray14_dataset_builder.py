"""TFDS builder of NIH ChestX-ray14 (112,120 frontal chest X-rays, 14 findings, 984 boxes).

Reads the files NIH ships, downloaded by hand into `manual_dir` (see MANUAL_DOWNLOAD_INSTRUCTIONS):
the twelve `images_0NN.tar.gz` are streamed without unpacking (or an unpacked `images/` folder is
read), decoded, resized with antialiasing and re-encoded in a thread pool; with a Beam runner in
the DownloadConfig the same work runs as an Apache Beam pipeline over the tarballs. See README.md.

  import cxr_jax.data
  tfds.builder('nih_chest_xray14/official-256', data_dir=...).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=...))
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import csv
import dataclasses
import gzip
import io
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cxr_jax.data.features import classification_features
from cxr_jax.labels import BBOX_LIST_ALIASES, NIH_CLASSES

# The tarballs NIH ships, and the first image (sorted name) of each: NIH packed the 112,120 images
# in name order, 4,999 in the first, 10,000 in the next ten and 7,121 in the last. Knowing the
# ranges lets the builder say up front which tarball a split needs, read only those, and stop
# reading one as soon as it has given every image wanted from it.
TARBALLS: tuple[str, ...] = tuple(f'images_{i:03d}.tar.gz' for i in range(1, 13))
TARBALL_FIRST_IMAGES: tuple[str, ...] = (
  '00000001_000.png',
  '00001336_000.png',
  '00003923_014.png',
  '00006585_007.png',
  '00009232_004.png',
  '00011558_008.png',
  '00013774_026.png',
  '00016051_010.png',
  '00018387_035.png',
  '00020945_050.png',
  '00024718_000.png',
  '00028173_003.png',
)
IMAGES_DIR = 'images'
DATA_ENTRY_FILES: tuple[str, ...] = (
  'Data_Entry_2017_v2020.csv',
  'Data_Entry_2017_v2020.csv.gz',
  'Data_Entry_2017.csv',
  'Data_Entry_2017.csv.gz',
)
BBOX_LIST_FILES: tuple[str, ...] = ('BBox_List_2017.csv', 'BBox_List_2017.csv.gz')
TRAIN_VAL_LIST = 'train_val_list.txt'
TEST_LIST = 'test_list.txt'

# NIH released every image at 1024 x 1024; BBox_List_2017.csv gives boxes in those pixels.
NIH_IMAGE_SIZE = 1024

# csv header tokens (csv splits 'OriginalImage[Width,Height]' and 'Bbox [x,y,w,h]' at their commas).
DATA_ENTRY_COLUMNS: tuple[str, ...] = (
  'Image Index',
  'Finding Labels',
  'Follow-up #',
  'Patient ID',
  'Patient Age',
  'Patient Gender',
  'View Position',
  'OriginalImage[Width',
  'Height]',
)
BBOX_LIST_COLUMNS: tuple[str, ...] = ('Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]')
NO_FINDING = 'No Finding'
SPLITS: tuple[str, ...] = ('train', 'validation', 'test', 'bbox')
SIZES: tuple[int, ...] = (224, 256, 512, 1024)

# Decoded images waiting to be written, per worker thread: bounds memory while keeping every core
# busy when the tar stream (read in the generating thread) momentarily outruns decoding.
_IN_FLIGHT_PER_WORKER = 4

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download NIH ChestX-ray14 from https://nihcc.app.box.com/v/ChestXray-NIHCC (the folder `images`
holds the tarballs; `batch_download_zips.py` there fetches them all) and put these files directly
in `manual_dir` (default `<data_dir>/downloads/manual/`):

  images_001.tar.gz ... images_012.tar.gz   the 112,120 PNGs (~42 GB); read without unpacking.
                                            Or instead an unpacked `images/` folder holding the
                                            PNGs (`tar xzf images_0NN.tar.gz` unpacks into
                                            `images/`); it is used when present.
  Data_Entry_2017_v2020.csv                 labels and patient data (or Data_Entry_2017.csv;
                                            either may be gzipped, `.csv.gz`)
  BBox_List_2017.csv                        the 984 radiologist boxes (may be `.csv.gz`)
  train_val_list.txt                        official train/validation image list (86,524 names)
  test_list.txt                             official test image list (25,596 names)
"""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of Data_Entry_2017(_v2020).csv."""

  image_id: str
  findings: tuple[str, ...]  # () for 'No Finding'
  follow_up: int
  patient_id: int
  age: int
  sex: str  # 'M' | 'F'
  view_position: str  # 'PA' | 'AP'
  original_size: tuple[int, int]  # (width, height) before NIH's resize to 1024


@dataclasses.dataclass(frozen=True)
class Box:
  """One row of BBox_List_2017.csv (pixels of the 1024 x 1024 release image)."""

  label: str  # NIH_CLASSES name ('Infiltrate' already mapped to 'Infiltration')
  x: float
  y: float
  w: float
  h: float


@dataclasses.dataclass(frozen=True)
class ManualFiles:
  """What `find_manual_files` found in manual_dir."""

  data_entry: epath.Path
  bbox_list: epath.Path
  train_val_list: epath.Path
  test_list: epath.Path
  images_dir: epath.Path | None  # an unpacked images/ folder, preferred when present
  tarballs: dict[str, epath.Path]  # the images_0NN.tar.gz present, by name


@dataclasses.dataclass(eq=False)
class NihConfig(tfds.core.BuilderConfig):
  """Image size and split scheme of one ChestX-ray14 variant.

  split_scheme 'official': train+validation = NIH's train_val_list.txt, test = test_list.txt;
    `validation_fraction` of the train_val patients (seeded) form validation.
  split_scheme 'patient13' (paper 000): images labelled 'No Finding' or with Hernia dropped, then
    a random `test_fraction` of the remaining patients form test and `validation_fraction` of the
    other patients validation (seeded).
  Both: labels are 14-hot in NIH_CLASSES order (Hernia is always 0 under patient13); the `bbox`
  split holds the 880 box images whatever the scheme.
  """

  image_size: int = 224
  split_scheme: str = 'official'
  validation_fraction: float = 0.1
  test_fraction: float = 0.0  # patient13 only: official test is NIH's list
  seed: int = 0


def _configs() -> list[NihConfig]:
  configs = []
  for size in SIZES:
    configs.append(
      NihConfig(
        name=f'official-{size}',
        description=(
          f'{size} px; NIH official train_val/test lists, 10% of train_val patients as '
          'validation; 14 classes'
        ),
        image_size=size,
        split_scheme='official',
        validation_fraction=0.1,
        seed=0,
      )
    )
  for size in SIZES:
    configs.append(
      NihConfig(
        name=f'patient13-{size}',
        description=(
          f"{size} px; paper 000: 'No Finding' and Hernia images dropped, patient-level 80/20 "
          'train/test, 25% of train patients as validation; 13 classes (Hernia column all 0)'
        ),
        image_size=size,
        split_scheme='patient13',
        validation_fraction=0.25,
        test_fraction=0.2,
        seed=0,
      )
    )
  return configs


# ----------------------------------------------------------------------------- metadata


def _open_text(path: epath.Path) -> io.TextIOBase:
  """Text stream of a plain or gzipped file (epath, so it works on any file system)."""
  raw = path.open('rb')
  if path.name.endswith('.gz'):
    raw = gzip.GzipFile(fileobj=raw, mode='rb')
  return io.TextIOWrapper(raw, encoding='utf-8', newline='')


def _column_positions(
  header: Sequence[str], required: Sequence[str], path: epath.Path
) -> dict[str, int]:
  names = [h.strip() for h in header]
  missing = [c for c in required if c not in names]
  if missing:
    raise ValueError(
      f'{path}: missing column(s) {missing}; found {names}. Expected the header NIH ships: '
      f'{",".join(required)}'
    )
  return {c: names.index(c) for c in required}


def _parse_age(text: str) -> int:
  # The v2020 file has integer ages; some older copies write them like '058Y'.
  return int(text.strip().rstrip('YyMmDd') or -1)


def read_data_entry(path: epath.Path) -> dict[str, Entry]:
  """Data_Entry_2017(_v2020).csv(.gz) -> {image_id: Entry}, in file order.

  Raises ValueError naming the file and the missing columns, an unknown finding, sex or view, or
  an image listed twice.
  """
  entries: dict[str, Entry] = {}
  lines: dict[str, int] = {}
  with _open_text(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f'{path} is empty')
    col = _column_positions(header, DATA_ENTRY_COLUMNS, path)
    for line, row in enumerate(reader, start=2):
      if not row:
        continue
      try:
        image_id = row[col['Image Index']].strip()
        if image_id in lines:
          # Two rows of one image would silently keep only the last one's labels.
          raise ValueError(f'image {image_id} already on line {lines[image_id]}; expected one '
                           'row per image')
        lines[image_id] = line
        labels = row[col['Finding Labels']].strip()
        findings = () if labels == NO_FINDING else tuple(labels.split('|'))
        unknown = [c for c in findings if c not in NIH_CLASSES]
        if unknown:
          raise ValueError(f'unknown finding(s) {unknown}')
        sex = row[col['Patient Gender']].strip()
        view = row[col['View Position']].strip()
        if sex not in ('M', 'F') or view not in ('PA', 'AP'):
          raise ValueError(f'unexpected sex {sex!r} or view position {view!r}')
        entries[image_id] = Entry(
          image_id=image_id,
          findings=findings,
          follow_up=int(row[col['Follow-up #']]),
          patient_id=int(row[col['Patient ID']]),
          age=_parse_age(row[col['Patient Age']]),
          sex=sex,
          view_position=view,
          original_size=(
            int(float(row[col['OriginalImage[Width']])),
            int(float(row[col['Height]']])),
          ),
        )
      except (ValueError, IndexError) as e:
        raise ValueError(f'{path}, line {line}: cannot parse {row}: {e}') from e
  return entries


def read_bbox_list(path: epath.Path) -> dict[str, list[Box]]:
  """BBox_List_2017.csv(.gz) -> {image_id: [Box, ...]} (BBOX_LIST_ALIASES applied)."""
  boxes: dict[str, list[Box]] = collections.defaultdict(list)
  with _open_text(path) as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f'{path} is empty')
    col = _column_positions(header, BBOX_LIST_COLUMNS, path)
    for line, row in enumerate(reader, start=2):
      if not row:
        continue
      try:
        label = row[col['Finding Label']].strip()
        label = BBOX_LIST_ALIASES.get(label, label)
        if label not in NIH_CLASSES:
          raise ValueError(f'unknown finding {label!r}')
        x, y, w, h = (float(row[col[c]]) for c in ('Bbox [x', 'y', 'w', 'h]'))
      except (ValueError, IndexError) as e:
        raise ValueError(f'{path}, line {line}: cannot parse {row}: {e}') from e
      boxes[row[col['Image Index']].strip()].append(Box(label, x, y, w, h))
  return dict(boxes)


def read_image_list(path: epath.Path) -> list[str]:
  """One image name a line (NIH's files have no trailing newline); ValueError on a repeat."""
  names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  repeated = sorted(n for n, k in collections.Counter(names).items() if k > 1)
  if repeated:
    raise ValueError(f'{path}: {len(repeated)} image(s) listed more than once, e.g. '
                     f'{repeated[:5]}; expected each image once')
  return names


def find_manual_files(manual_dir: epath.Path) -> ManualFiles:
  """Checks manual_dir for every file the builder reads; FileNotFoundError names each absent."""
  manual_dir = epath.Path(manual_dir)
  missing = []

  def first_present(names: Sequence[str]) -> epath.Path | None:
    for name in names:
      if (manual_dir / name).is_file():
        return manual_dir / name
    missing.append(' or '.join(names))
    return None

  data_entry = first_present(DATA_ENTRY_FILES)
  bbox_list = first_present(BBOX_LIST_FILES)
  train_val_list = first_present((TRAIN_VAL_LIST,))
  test_list = first_present((TEST_LIST,))
  images_dir = manual_dir / IMAGES_DIR
  images_dir = images_dir if images_dir.is_dir() else None
  tarballs = {t: manual_dir / t for t in TARBALLS if (manual_dir / t).is_file()}
  if images_dir is None and not tarballs:
    missing.append(f'{TARBALLS[0]} ... {TARBALLS[-1]} (or an unpacked {IMAGES_DIR}/ folder)')
  if missing:
    raise FileNotFoundError(
      f'NIH ChestX-ray14: missing in manual_dir {manual_dir}: '
      + '; '.join(missing)
      + '.\n'
      + MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  return ManualFiles(data_entry, bbox_list, train_val_list, test_list, images_dir, tarballs)


# ----------------------------------------------------------------------------- splits


def _choose_patients(patients: Iterable[int], fraction: float, seed: int, stream: int) -> set[int]:
  """A seeded random `fraction` (rounded) of the distinct `patients`.

  The permutation is over the sorted ids, so the choice depends only on the set of patients and
  the seed; `stream` keeps the test and validation draws independent.
  """
  ids = np.array(sorted(set(patients)), dtype=np.int64)
  n = int(round(fraction * len(ids)))
  rng = np.random.default_rng(np.random.SeedSequence([seed, stream]))
  return set(rng.permutation(ids)[:n].tolist())


def official_splits(
  entries: dict[str, Entry],
  train_val: Sequence[str],
  test: Sequence[str],
  *,
  validation_fraction: float,
  seed: int,
) -> dict[str, list[str]]:
  """NIH's lists -> {'train', 'validation', 'test': [image_id, ...]} (sorted).

  Validation is `validation_fraction` of the train_val patients. Raises ValueError when a list
  names an image absent from Data_Entry or the lists share an image or a patient.
  """
  for name, ids in (('train_val_list', train_val), ('test_list', test)):
    unknown = [i for i in ids if i not in entries]
    if unknown:
      raise ValueError(f'{name}: {len(unknown)} image(s) not in Data_Entry, e.g. {unknown[:5]}')
  train_val_set, test_set = set(train_val), set(test)
  if train_val_set & test_set:
    raise ValueError(
      f'train_val_list and test_list share images, e.g. {sorted(train_val_set & test_set)[:5]}'
    )
  shared = {entries[i].patient_id for i in train_val_set} & {
    entries[i].patient_id for i in test_set
  }
  if shared:
    raise ValueError(f'train_val_list and test_list share patients, e.g. {sorted(shared)[:5]}')
  val_patients = _choose_patients(
    (entries[i].patient_id for i in train_val_set), validation_fraction, seed, stream=1
  )
  return {
    'train': sorted(i for i in train_val_set if entries[i].patient_id not in val_patients),
    'validation': sorted(i for i in train_val_set if entries[i].patient_id in val_patients),
    'test': sorted(test_set),
  }


def patient13_splits(
  entries: dict[str, Entry], *, test_fraction: float, validation_fraction: float, seed: int
) -> dict[str, list[str]]:
  """Paper 000's split -> {'train', 'validation', 'test': [image_id, ...]} (sorted).

  Drops images labelled 'No Finding' or with Hernia; of the patients left, a random
  `test_fraction` form test, and `validation_fraction` of the others validation.
  """
  kept = [e for e in entries.values() if e.findings and 'Hernia' not in e.findings]
  test_patients = _choose_patients((e.patient_id for e in kept), test_fraction, seed, stream=0)
  train_patients = {e.patient_id for e in kept} - test_patients
  val_patients = _choose_patients(train_patients, validation_fraction, seed, stream=1)
  splits: dict[str, list[str]] = {'train': [], 'validation': [], 'test': []}
  for e in kept:
    if e.patient_id in test_patients:
      splits['test'].append(e.image_id)
    elif e.patient_id in val_patients:
      splits['validation'].append(e.image_id)
    else:
      splits['train'].append(e.image_id)
  return {k: sorted(v) for k, v in splits.items()}


def make_splits(
  config: NihConfig,
  entries: dict[str, Entry],
  boxes: dict[str, list[Box]],
  train_val: Sequence[str],
  test: Sequence[str],
) -> dict[str, list[str]]:
  """All four splits of `config` (image ids, sorted); 'bbox' = every image with a box."""
  if config.split_scheme == 'official':
    splits = official_splits(
      entries,
      train_val,
      test,
      validation_fraction=config.validation_fraction,
      seed=config.seed,
    )
  elif config.split_scheme == 'patient13':
    splits = patient13_splits(
      entries,
      test_fraction=config.test_fraction,
      validation_fraction=config.validation_fraction,
      seed=config.seed,
    )
  else:
    raise ValueError(f"split_scheme must be 'official' or 'patient13', got {config.split_scheme!r}")
  unknown = [i for i in boxes if i not in entries]
  if unknown:
    raise ValueError(f'BBox_List names {len(unknown)} image(s) not in Data_Entry: {unknown[:5]}')
  splits['bbox'] = sorted(boxes)
  return splits


# ----------------------------------------------------------------------------- images


def tarball_of(image_id: str) -> str:
  """The NIH tarball that holds `image_id` (by NIH's name-ordered packing)."""
  return TARBALLS[max(0, bisect.bisect_right(TARBALL_FIRST_IMAGES, image_id) - 1)]


def group_by_source(files: ManualFiles, image_ids: Iterable[str]) -> dict[str, list[str]]:
  """{source: [image_id, ...]}: a tarball name, or chunks of the images/ folder.

  Raises FileNotFoundError naming the absent tarballs / image files that `image_ids` need.
  """
  image_ids = sorted(image_ids)
  if files.images_dir is not None:
    present = {p.name for p in files.images_dir.iterdir()}
    absent = [i for i in image_ids if i not in present]
    if absent:
      raise FileNotFoundError(
        f'{len(absent)} image(s) missing from {files.images_dir}, e.g. {absent[:5]}'
      )
    # Chunks of consecutive names give Beam units of work like the tarballs do.
    return {
      f'{IMAGES_DIR}/{k:03d}': image_ids[i : i + 1000]
      for k, i in enumerate(range(0, len(image_ids), 1000))
    }
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for i in image_ids:
    groups[tarball_of(i)].append(i)
  absent = sorted(t for t in groups if t not in files.tarballs)
  if absent:
    raise FileNotFoundError(
      f'NIH ChestX-ray14: missing tarball(s) {absent} (they hold '
      f'{sum(len(groups[t]) for t in absent)} of the images to build); put them in '
      f'{next(iter(files.tarballs.values())).parent}'
    )
  return dict(groups)


def iter_image_bytes(
  files: ManualFiles, source: str, image_ids: Sequence[str]
) -> Iterator[tuple[str, bytes]]:
  """(image_id, encoded bytes) of `image_ids` from one source of `group_by_source`.

  A tarball is streamed (never unpacked) and left as soon as every wanted image was read.
  Raises FileNotFoundError naming the images the source lacks, ValueError naming a truncated or
  corrupt tarball.
  """
  if files.images_dir is not None:
    for image_id in image_ids:
      yield image_id, (files.images_dir / image_id).read_bytes()
    return
  wanted = set(image_ids)
  path = files.tarballs[source]
  try:
    with path.open('rb') as f, tarfile.open(fileobj=f, mode='r|gz') as tar:
      for member in tar:
        name = member.name.rsplit('/', 1)[-1]
        if not member.isfile() or name not in wanted:
          continue
        data = tar.extractfile(member).read()
        yield name, data
        wanted.discard(name)
        if not wanted:
          return
  # tarfile and gzip report a cut-off or damaged download without naming the file.
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
    raise ValueError(
      f'{path}: truncated or corrupt tarball ({type(e).__name__}: {e}); expected the complete '
      f'{path.name} NIH ships: download it again'
    ) from e
  if wanted:
    raise FileNotFoundError(f'{path} lacks {len(wanted)} image(s), e.g. {sorted(wanted)[:5]}')


def to_grey_png(data: bytes, size: int, image_id: str = '') -> bytes:
  """Encoded image -> PNG bytes of a size x size 8-bit grey image (antialiased resize).

  NIH images are 1024 x 1024 8-bit grey; a few are RGBA (grey in RGB, opaque), converted with
  ITU-R 601 luma. 16-bit input is scaled to 8 bits. The resize is Pillow's bilinear filter, whose
  support widens with the downscale factor (the same triangle filter as tf.image.resize with
  antialias=True), so 1024 -> 224 averages instead of aliasing.
  Raises ValueError naming `image_id` when the bytes do not decode.
  """
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
      arr = np.asarray(img, dtype=np.float64)
      img = Image.fromarray(np.clip(arr / 257.0 + 0.5, 0, 255).astype(np.uint8), mode='L')
    elif img.mode != 'L':
      img = img.convert('L')
    if img.size != (size, size):
      img = img.resize((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, format='PNG')
  except Exception as e:  # Pillow raises several types (OSError, SyntaxError, ...) on bad files
    raise ValueError(f'cannot read image {image_id}: {type(e).__name__}: {e}') from e
  return out.getvalue()


def make_example(entry: Entry, boxes: Sequence[Box], png: bytes, size: int) -> dict:
  """The feature dict of one image (as `_generate_examples` yields it)."""
  labels = np.zeros((len(NIH_CLASSES),), np.float32)
  for c in entry.findings:
    labels[NIH_CLASSES.index(c)] = 1.0
  xywh = np.array([[b.x, b.y, b.w, b.h] for b in boxes], np.float32).reshape(-1, 4)
  x0, y0 = xywh[:, 0], xywh[:, 1]
  x1, y1 = x0 + xywh[:, 2], y0 + xywh[:, 3]
  bbox = np.clip(np.stack([y0, x0, y1, x1], axis=-1) / NIH_IMAGE_SIZE, 0.0, 1.0)
  return {
    'image_id': entry.image_id,
    'image': png,
    'labels': labels,
    'no_finding': np.bool_(not entry.findings),
    'patient_id': entry.patient_id,
    'follow_up': entry.follow_up,
    'age': entry.age,
    'sex': entry.sex,
    'view_position': entry.view_position,
    'original_size': np.array(entry.original_size, np.int64),
    'objects': {
      'bbox': bbox.astype(np.float32),
      'bbox_xywh': xywh * np.float32(size / NIH_IMAGE_SIZE),
      'label': np.array([NIH_CLASSES.index(b.label) for b in boxes], np.int64),
    },
  }


@dataclasses.dataclass(frozen=True)
class _Work:
  """What one source (tarball / folder chunk) needs to make its examples; picklable for Beam."""

  files: ManualFiles
  source: str
  entries: tuple[Entry, ...]
  boxes: dict[str, tuple[Box, ...]]
  size: int


def _examples_of_work(work: _Work, pool: concurrent.futures.Executor | None = None):
  """Yields (key, example) for every image of `work`; decodes in `pool` when given."""
  by_id = {e.image_id: e for e in work.entries}
  stream = iter_image_bytes(work.files, work.source, [e.image_id for e in work.entries])

  def example(image_id: str, data: bytes) -> tuple[str, dict]:
    where = work.files.tarballs.get(work.source) if work.files.images_dir is None else None
    png = to_grey_png(data, work.size, f'{image_id} in {where}' if where else image_id)
    return image_id, make_example(by_id[image_id], work.boxes.get(image_id, ()), png, work.size)

  if pool is None:
    for image_id, data in stream:
      yield example(image_id, data)
    return
  in_flight: collections.deque = collections.deque()
  max_in_flight = _IN_FLIGHT_PER_WORKER * max(1, getattr(pool, '_max_workers', 1))
  for image_id, data in stream:
    in_flight.append(pool.submit(example, image_id, data))
    if len(in_flight) >= max_in_flight:
      yield in_flight.popleft().result()
  while in_flight:
    yield in_flight.popleft().result()


class Builder(tfds.core.GeneratorBasedBuilder):
  """DatasetBuilder for NIH ChestX-ray14."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = 'official-224'

  # Threads that decode / resize / encode; None = concurrent.futures' default (cores + 4).
  num_workers: int | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=classification_features(s, original_size=True),
      supervised_keys=('image', 'labels'),
      homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
    )

  def _download_and_prepare(self, dl_manager, download_config=None):
    # The Beam path is taken exactly when the caller asked for Beam (a runner or pipeline options,
    # e.g. `tfds build --beam_pipeline_options=...`); otherwise a local thread pool does the work.
    self._use_beam = bool(
      download_config is not None
      and (download_config.beam_runner is not None or download_config.beam_options is not None)
    )
    return super()._download_and_prepare(dl_manager, download_config)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    files = find_manual_files(epath.Path(dl_manager.manual_dir))
    entries = read_data_entry(files.data_entry)
    boxes = read_bbox_list(files.bbox_list)
    splits = make_splits(
      cfg, entries, boxes, read_image_list(files.train_val_list), read_image_list(files.test_list)
    )
    # Check every image source before the (hours-long) generation starts.
    grouped = {split: group_by_source(files, ids) for split, ids in splits.items() if ids}
    make = self._beam_examples if getattr(self, '_use_beam', False) else self._generate_examples
    return {
      split: make(
        [
          _Work(
            files=files,
            source=source,
            entries=tuple(entries[i] for i in ids),
            boxes={i: tuple(boxes[i]) for i in ids if i in boxes},
            size=cfg.image_size,
          )
          for source, ids in groups.items()
        ]
      )
      for split, groups in grouped.items()
    }

  def _generate_examples(self, works: Sequence[_Work]) -> Iterator[tuple[str, dict]]:
    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      for work in works:
        yield from _examples_of_work(work, pool)

  def _beam_examples(self, works: Sequence[_Work]):
    """The Beam PTransform: one element per tarball (or folder chunk), decoded on the workers."""
    beam = tfds.core.lazy_imports.apache_beam
    return beam.Create(list(works)) | beam.FlatMap(_examples_of_work)
