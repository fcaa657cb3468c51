"""The mask cache: lung and heart masks of a data set's images, keyed by image id (paper 004).

The `segment` stage (and `python -m cxr_jax.segment`) applies a trained U-Net to every image of
some splits of a data set and writes the result here; the input pipeline joins it to the
examples by image id (`config.data.mask_cache`), so a classifier takes the masks as an input
(`config.data.inputs = ('masks',)`) without recomputing them. Anyone else (paper 003's lung crop,
the viewer) reads it with `MaskCache` below, or as the TFDS data set it is.

A cache folder (a run's `segment/` by default, layout.Run.mask_cache_dir):

  masks.json                                  what the cache holds; written LAST: a folder
                                              without it is an unfinished (resumable) cache
  dataset_info.json, features.json            TFDS metadata: tfds.builder_from_directory(folder)
  cxr_jax_masks-<split>.tfrecord-<k>-of-<n>   shard k of the split (TFRecord of tf.train.Example)

Every example: {'image_id': str, 'masks': uint8 [H, W, S] (PNG), 0 or 255}: S binary masks
(masks.json 'structures' in channel order, e.g. left_lung, right_lung, heart, the patient's
sides as in SCR), in the frame of the data set's *stored* image [H, W] (before preprocessing:
crop, flip or resize them together with the image, which the preprocessing ops do for the
'masks' feature). Shard k of a split holds examples [k * shard_size, (k + 1) * shard_size) of
the split in file order. S is 1, 3 or 4 (what a PNG holds; TensorFlow refuses 2-channel PNGs).

masks.json: {'format': FORMAT, 'structures': [S names], 'image_size': [H, W], 'threshold':
probability the masks are binarised at, 'shard_size', 'splits': {split: {'num_examples',
'num_shards'}}, 'data': {'name', 'data_dir'}, 'source': {'workdir', 'stage'} of the U-Net,
'pp': the U-Net's input preprocessing}.

Reading:
  cache = MaskCache('RUN/segment')
  cache.structures                      ('left_lung', 'right_lung', 'heart')
  masks = cache.lookup(['img1', 'img2'])  uint8 [2, H, W, S] (0/255); KeyError naming missing ids
  for image_id, masks in cache.read('test'): ...
  tfds.builder_from_directory('RUN/segment').as_dataset(split='test')
"""

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cxr_jax import layout
from cxr_jax.io_utils import atomic_write_bytes, atomic_write_json

FORMAT = 'cxr_jax.mask_cache/1'
PNG_CHANNELS = (1, 3, 4)
_SPLIT_NAME = re.compile(r'^\w+$')


class MaskCacheError(FileNotFoundError):
  """A mask cache that is missing, unfinished, or lacks images; the message says what to run."""


def _template(split: str, shard: int, num_shards: int) -> str:
  return f'{layout.MASK_CACHE_PREFIX}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}'


def features(image_size: Sequence[int], num_structures: int) -> tfds.features.FeaturesDict:
  """The TFDS features of a cache with S = num_structures masks of image_size (H, W)."""
  if num_structures not in PNG_CHANNELS:
    raise ValueError(f'a mask cache holds 1, 3 or 4 structures (PNG channels), got '
                     f'{num_structures}.')
  h, w = (int(s) for s in image_size)
  return tfds.features.FeaturesDict({
      'image_id': tfds.features.Text(),
      'masks': tfds.features.Image(shape=(h, w, num_structures), dtype=np.uint8,
                                   encoding_format='png')})


def check_split_name(split: str) -> str:
  if not _SPLIT_NAME.match(split):
    raise ValueError(f'split {split!r}: a mask cache holds whole named splits (letters, digits, '
                     "'_'), not slices or unions such as 'train[:10%]' or 'a+b'.")
  return split


class MaskCacheWriter:
  """Writes a cache shard by shard (each shard all or nothing), resumable, then its metadata.

  Args:
    directory: the cache folder.
    structures: S names, in channel order.
    image_size: (H, W) of the masks (the data set's stored images).
    shard_size: examples per shard.
    meta: more entries for masks.json (data, source, pp, threshold).
  """

  def __init__(self, directory: str | os.PathLike, structures: Sequence[str],
               image_size: Sequence[int], *, shard_size: int, meta: Mapping[str, Any]):
    self.directory = epath.Path(directory)
    self.structures = tuple(structures)
    self.image_size = tuple(int(s) for s in image_size)
    self.shard_size = int(shard_size)
    if self.shard_size <= 0:
      raise ValueError(f'shard_size must be positive, got {shard_size}.')
    self.features = features(self.image_size, len(self.structures))
    self._serializer = tfds.core.example_serializer.ExampleSerializer(
        self.features.get_serialized_info())
    self.meta = dict(meta)
    self.splits: dict[str, dict[str, int]] = {}

  def num_shards(self, num_examples: int) -> int:
    return max(1, -(-num_examples // self.shard_size))

  def shard_path(self, split: str, shard: int, num_shards: int) -> epath.Path:
    return self.directory / _template(check_split_name(split), shard, num_shards)

  def missing_shards(self, split: str, num_examples: int) -> list[int]:
    """Shards of `split` not yet written (all of them for a new cache)."""
    n = self.num_shards(num_examples)
    return [k for k in range(n) if not self.shard_path(split, k, n).exists()]

  def write_shard(self, split: str, shard: int, num_examples: int, image_ids: Sequence[str],
                  masks: np.ndarray) -> None:
    """Writes shard `shard` of `split`: ids [n] and binary masks [n, H, W, S] (bool or 0/1)."""
    masks = np.asarray(masks)
    expected = (len(image_ids), *self.image_size, len(self.structures))
    if masks.shape != expected:
      raise ValueError(f'shard {shard} of {split!r}: masks of shape {masks.shape}, expected '
                       f'{expected} (ids, H, W, structures).')
    n = self.num_shards(num_examples)
    # TFRecordWriter writes to a path; the bytes are staged in a temporary file elsewhere and
    # moved into the cache atomically, so a killed job never leaves a truncated shard.
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, 'shard')
      with tf.io.TFRecordWriter(path) as writer:
        for image_id, m in zip(image_ids, masks, strict=True):
          example = {'image_id': str(image_id), 'masks': (m > 0).astype(np.uint8) * 255}
          writer.write(self._serializer.serialize_example(self.features.encode_example(example)))
      with open(path, 'rb') as f:
        data = f.read()
    atomic_write_bytes(self.shard_path(split, shard, n), data)

  def finish_split(self, split: str, num_examples: int) -> None:
    self.splits[split] = {'num_examples': int(num_examples),
                          'num_shards': self.num_shards(num_examples)}

  def finish(self) -> None:
    """Writes the TFDS metadata, then masks.json (last: it marks the cache complete)."""
    infos = []
    for split, info in self.splits.items():
      n, k = info['num_examples'], info['num_shards']
      lengths = [min(self.shard_size, n - i * self.shard_size) for i in range(k)]
      infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=lengths, num_bytes=sum(
              self.shard_path(split, i, k).stat().length for i in range(k)),
          filename_template=tfds.core.ShardedFileTemplate(
              data_dir=self.directory, template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}',
              dataset_name=layout.MASK_CACHE_PREFIX, split=split, filetype_suffix='tfrecord')))
    tfds.folder_dataset.write_metadata(
        data_dir=self.directory, features=self.features, split_infos=infos,
        filename_template='{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}', check_data=False,
        description='cxr_jax lung/heart masks, keyed by image_id (cxr_jax/data/mask_cache.py)')
    atomic_write_json(self.directory / layout.MASK_CACHE_META, {
        **self.meta, 'format': FORMAT, 'structures': list(self.structures),
        'image_size': list(self.image_size), 'shard_size': self.shard_size,
        'splits': self.splits})


def decode_png(data: bytes) -> np.ndarray:
  """PNG bytes -> uint8 [H, W, C]."""
  array = np.asarray(Image.open(io.BytesIO(data)))
  return array[..., None] if array.ndim == 2 else array


class MaskCache:
  """A finished mask cache (see the module doc), read-only.

  Raises MaskCacheError naming the folder when masks.json is missing (the segment stage has
  not finished there) and ValueError when it is not a cache of this format.
  """

  def __init__(self, directory: str | os.PathLike, *, what: str = ''):
    self.directory = epath.Path(directory)
    meta_file = self.directory / layout.MASK_CACHE_META
    if not meta_file.exists():
      where = f' ({what})' if what else ''
      state = ('holds an unfinished cache: rerun the segment stage there to complete it'
               if self.directory.exists() else 'does not exist')
      raise MaskCacheError(
          f'{self.directory}{where}: no mask cache ({layout.MASK_CACHE_META} missing); the folder '
          f'{state}. Masks come from the `segment` stage (or `python -m cxr_jax.segment '
          '--workdir=UNET_RUN --output=DIR`).')
    self.meta = layout.read_json(meta_file, 'the description of a mask cache')
    if not isinstance(self.meta, dict) or self.meta.get('format') != FORMAT:
      raise ValueError(f'{meta_file}: not a cxr_jax mask cache (expected format {FORMAT!r}).')
    self.structures: tuple[str, ...] = tuple(self.meta['structures'])
    self.image_size: tuple[int, int] = tuple(int(s) for s in self.meta['image_size'])
    self.splits: dict[str, dict[str, int]] = dict(self.meta['splits'])
    self._index: dict[str, bytes] | None = None

  def __repr__(self) -> str:
    return f'MaskCache({str(self.directory)!r}, structures={self.structures})'

  def files(self, splits: Sequence[str] | None = None) -> list[str]:
    out = []
    for split in splits or list(self.splits):
      if split not in self.splits:
        raise KeyError(f'{self.directory}: no split {split!r}; it holds {sorted(self.splits)}.')
      n = self.splits[split]['num_shards']
      out += [str(self.directory / _template(split, k, n)) for k in range(n)]
    return out

  def encoded(self, splits: Sequence[str] | None = None) -> tf.data.Dataset:
    """(image_id, PNG bytes) pairs of `splits` (default: all), without decoding."""
    spec = {'image_id': tf.io.FixedLenFeature([], tf.string),
            'masks': tf.io.FixedLenFeature([], tf.string)}
    ds = tf.data.TFRecordDataset(self.files(splits))
    return ds.map(lambda r: tf.io.parse_single_example(r, spec),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def read(self, split: str) -> Iterator[tuple[str, np.ndarray]]:
    """(image_id, uint8 masks [H, W, S] 0/255) of one split, in the split's file order."""
    for ex in self.encoded([split]).as_numpy_iterator():
      yield ex['image_id'].decode('utf-8'), decode_png(ex['masks'])

  def index(self) -> dict[str, bytes]:
    """{image_id: PNG bytes} of every split (loaded once; ~1-3 kB per image)."""
    if self._index is None:
      self._index = {ex['image_id'].decode('utf-8'): ex['masks']
                     for ex in self.encoded().as_numpy_iterator()}
    return self._index

  def lookup(self, image_ids: Sequence[str]) -> np.ndarray:
    """uint8 masks [N, H, W, S] (0/255) of `image_ids`; KeyError naming the missing ones."""
    index = self.index()
    missing = [i for i in image_ids if i not in index]
    if missing:
      raise KeyError(f'{self.directory}: {len(missing)} image id(s) not in the mask cache, e.g. '
                     f'{missing[:5]}; it holds the splits {sorted(self.splits)} of '
                     f'{self.meta.get("data", {}).get("name")!r}.')
    shape = (*self.image_size, len(self.structures))
    return np.stack([decode_png(index[i]) for i in image_ids]) if image_ids else \
        np.zeros((0, *shape), np.uint8)

  # ------------------------------------------------------------------ the input pipeline's join
  def check_fits(self, image_shape: Sequence[int], structures: Sequence[str] | None,
                 data_name: str) -> None:
    """ValueError unless the masks fit the data set's stored images [H, W, ...] and the
    structures the model expects (config.data.structures)."""
    if tuple(int(s) for s in image_shape[:2]) != self.image_size:
      raise ValueError(
          f'{self.directory}: masks of size {list(self.image_size)} but {data_name!r} stores '
          f'images of {list(image_shape[:2])}; segment this data set (config) again.')
    if structures is not None and tuple(structures) != self.structures:
      raise ValueError(
          f'{self.directory}: masks of the structures {list(self.structures)} '
          f'({len(self.structures)} channels), but config.data.structures = {list(structures)}.')

  def attach(self, ds: tf.data.Dataset, split: str, data_name: str) -> tf.data.Dataset:
    """Adds 'masks' (PNG bytes; `decode` them) to every element of ds by its 'image_id'.

    Raises MaskCacheError naming the cache, the split and example ids when some image of ds
    has no masks (counted in one pass over the ids, images left undecoded).
    """
    index = self.index()
    ids = list(index)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.string),
                                            tf.range(len(ids), dtype=tf.int64)),
        default_value=np.int64(-1))
    values = tf.constant([index[i] for i in ids], tf.string)
    missing = ds.map(lambda f: f['image_id']).filter(lambda i: table.lookup(i) < 0)
    examples = [s.decode('utf-8') for s in missing.take(5).as_numpy_iterator()]
    if examples:
      count = int(missing.reduce(np.int64(0), lambda c, _: c + 1))
      raise MaskCacheError(
          f'config.data.mask_cache={str(self.directory)!r}: {count} image(s) of {data_name!r} '
          f'split {split!r} have no masks there, e.g. {examples}; the cache holds the splits '
          f'{sorted(self.splits)} of {self.meta.get("data", {}).get("name")!r}. Run the segment '
          'stage over that split (config.segment.splits).')
    return ds.map(lambda f: {**f, 'masks': tf.gather(values, table.lookup(f['image_id']))},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def decode(self, data: tf.Tensor) -> tf.Tensor:
    """PNG bytes (from `attach`) -> uint8 [H, W, S] with a static shape."""
    masks = tf.io.decode_png(data, channels=len(self.structures))
    return tf.ensure_shape(masks, (*self.image_size, len(self.structures)))


def describe(directory: str | os.PathLike) -> str:
  """A one-line summary of a cache (for logs and CLIs)."""
  cache = MaskCache(directory)
  counts = ', '.join(f'{s} {v["num_examples"]}' for s, v in cache.splits.items())
  return (f'{cache.directory}: {len(cache.structures)} structures {list(cache.structures)} at '
          f'{cache.image_size[0]}x{cache.image_size[1]} ({counts}); '
          f'{json.dumps(cache.meta.get("source", {}))}')
