"""Input pipeline: TFDS data set -> tf.data -> this host's numpy batches.

Why tf.data (and not grain / `tfds.data_source`): TensorFlow is already a dependency because
TFDS encodes images with it; our builders are tested with `DatasetBuilderTestCase`, which only
passes with the tfrecord file format, and tfrecord can only be read sequentially through
tf.data; and tf.data returns sequence features (the NIH boxes under 'objects') as tensors,
while the array_record/grain route hands them back as Python lists. TensorFlow here only runs
on the CPU: every pipeline hides the accelerators from it first (cxr_jax/data/tf_devices.py) so
it never grabs accelerator memory that JAX needs.

Order and determinism (training):
  * Each host reads `tfds.even_splits(split, n=process_count)[process_index]`.
  * Images stay encoded (TFDS `SkipDecoding`) through filtering, shuffling and skipping; they are
    decoded in the map after them, so resuming at a late step costs reading, not decoding.
  * Epoch e of the stream is the filtered host split shuffled with a seed derived from
    (seed, process_index, e); epochs are concatenated and batches run across epoch boundaries
    (no example is dropped at the end of an epoch). Every element gets a global index in that
    repeated stream, and its augmentation seed '_seed' is derived from (seed, process_index,
    index). Resuming at step s starts at epoch (s * b) // n and skips the rest inside it, so the
    batch at step s is identical to an uninterrupted iterator's.

Evaluation pads the last batch (mask 0) and appends all-padding batches until every host yields
the same number of batches, so no example is dropped or counted twice.

Extra copies (paper 001's hard-example set C = A + B): `config.data.extra_copies` names a JSON
file mapping image ids of the train split to a number of extra copies ({'copies': {id: k}}, as
the `mine_hard_examples` stage writes); each such example then appears 1 + k times per epoch.
The copies enter before shuffling, so they are spread over the epoch as far as the shuffle
buffer reaches (set shuffle_buffer >= the split size for a uniform spread).

Config fields read from `config.data` (ConfigDict or dict), with defaults:
  name (required, e.g. 'cxr_phantom/64'), data_dir=None (TFDS default), train_split='train',
  classes=NIH_CLASSES, drop_no_finding=False, pp_train='', pp_eval='', shuffle_buffer=10_000,
  cache=False, prefetch=2, extra_copies='', target='labels', inputs=(), pp_keys=(),
  split_ids='', validation_holdout=0.0, mask_cache=''. (eval_splits is read by the caller, which
  passes one split here.)

Features for preprocessing only: `config.data.pp_keys` names features the pp ops read that do not
go into the batch (e.g. ('lung_mask', 'image_id') for paper 003's `lung_roi`).

Splits by image id (k-fold cross-validation, cxr_jax/data/folds.py): `config.data.split_ids`
names a JSON file {'source_split': TFDS split (e.g. 'train+validation+test'), 'splits': {name:
[image ids]}}; a split `name` is then the examples of `source_split` whose image_id is listed
under it, in file order.

Held-out validation (`validation_holdout` = f > 0, for data sets without a validation split,
e.g. JSRT's two SCR folds): a fraction f of the train split's images, chosen by a fingerprint of
their image id (so any split of any data set works, the same images every run), is left out of
training and read as the split named HOLDOUT_SPLIT ('train_holdout'), e.g.
`eval_splits.validation = 'train_holdout'`.

Cached masks (`mask_cache` = a folder the `segment` stage wrote, cxr_jax/data/mask_cache.py):
'masks' comes from there, joined by image id, instead of from the data set (which may have
none, like NIH, Montgomery); an image without cached masks stops the pipeline with a message
naming it. Paper 003's `lung_roi(sources=('lung_mask', 'masks'))` takes U-Net lungs from there
where the data set has no mask (name 'masks' in config.data.pp_keys).

What a batch carries: 'image' (float32), the `target` feature the loss and the evaluator read
('labels': multi-hot float32 [K] gathered to `classes`; 'label': a class index; 'masks':
segmentation masks moved with the image by every geometric op, float32 in [0, 1]), and the
features named in `inputs` that the model takes besides the image (e.g. cached lung masks).
"""

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from cxr_jax.data import builder_names, mask_cache, ops, tf_devices
from cxr_jax.labels import NIH_CLASSES, class_indices

Batch = dict[str, np.ndarray]

# Data sets that need no download: built on first use instead of failing.
AUTO_PREPARE_PREFIXES: tuple[str, ...] = ('cxr_phantom',)
# Features read undecoded and decoded only after filter/shuffle/skip.
ENCODED_KEYS = ('image', 'masks', 'lung_mask')
# The split name of the held-out part of the train split (config.data.validation_holdout).
HOLDOUT_SPLIT = 'train_holdout'
_HOLDOUT_BUCKETS = 10_000

def _get(data_cfg: Any, key: str, default: Any) -> Any:
  """config.data field `key` (ConfigDict or dict); missing or None gives `default`."""
  value = data_cfg.get(key, default)
  return default if value is None else value


def _name(data_cfg: Any) -> str:
  name = _get(data_cfg, 'name', None)
  if not name:
    raise ValueError('config.data.name (the TFDS data set name) is required.')
  return name


def local_batch_size(global_batch_size: int) -> int:
  """global_batch_size // process_count; raises ValueError unless it divides evenly."""
  n = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % n:
    raise ValueError(
      f'Global batch size {global_batch_size} must be a positive multiple of the number of '
      f'processes ({n}).'
    )
  return global_batch_size // n


def build_command(name: str, data_dir: str | None = None) -> str:
  """The `tfds build` command that prepares `name` ('builder/config') in `data_dir`."""
  builder, _, config = name.partition('/')
  return (f'tfds build {builder}' + (f' --config={config}' if config else '') +
          ' --imports=cxr_jax.data --manual_dir=<folder with the files it lists>' +
          f' --data_dir={data_dir or tfds.core.constants.DATA_DIR}')


def get_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Returns a prepared TFDS builder; builds phantom data sets, else FileNotFoundError."""
  where = data_dir or tfds.core.constants.DATA_DIR
  how = (
    f'Prepare it first: `{build_command(name, data_dir)}` (its MANUAL_DOWNLOAD_INSTRUCTIONS and '
    'WORKSPACE.md say which files go in the manual folder), or set config.data.data_dir to '
    'where it is prepared.'
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise FileNotFoundError(
      f'Data set {name!r} is neither a registered TFDS builder nor prepared in data_dir '
      f'{where!r}; cxr_jax builders: {", ".join(builder_names())}. {how}'
    ) from e
  if not builder.is_prepared():
    if name.split('/')[0].startswith(AUTO_PREPARE_PREFIXES):
      logging.info('Building %s in %s (synthetic, no download).', name, builder.data_dir)
      builder.download_and_prepare()
    else:
      raise FileNotFoundError(
        f'Data set {name!r} is not prepared in data_dir {where!r} (looked for '
        f'{builder.data_dir}). {how}'
      )
  return builder


def _host_split(split: str) -> Any:
  if jax.process_count() == 1:
    return split
  return tfds.even_splits(split, n=jax.process_count())[jax.process_index()]


def load_extra_copies(path: str) -> dict[str, int]:
  """{image_id: extra copies >= 0} from `config.data.extra_copies` (see module doc)."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'config.data.extra_copies={path!r}: file not found (the '
                            '`mine_hard_examples` stage writes it).')
  try:
    raw = json.loads(p.read_text())
    copies = raw['copies'] if isinstance(raw, dict) and 'copies' in raw else raw
    out = {str(k): int(v) for k, v in copies.items()}
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f'{path}: expected JSON {{"copies": {{image_id: extra copies}}}}: {e}'
                     ) from None
  bad = [k for k, v in out.items() if v < 0]
  if bad:
    raise ValueError(f'{path}: negative copy counts for {bad[:5]}')
  return out


def _read(
  builder: tfds.core.DatasetBuilder, split: str, data_cfg: Any, keys: tuple[str, ...],
  copies: dict[str, int] | None = None, masks: mask_cache.MaskCache | None = None,
) -> tuple[tf.data.Dataset, int]:
  """This host's filtered examples (images still encoded) and how many there are.

  Returns elements {key: tensor for key in keys} with 'labels' float32 [K] gathered to
  config.data.classes, each repeated 1 + copies[image_id] times if `copies`, 'masks' (PNG
  bytes) from the cache `masks` if given, and the element count from a pass that decodes no
  image. `split` HOLDOUT_SPLIT reads the held-out part of the train split, and the train split
  itself is read without it (config.data.validation_holdout). `keys` should include what the
  pp ops read (`_with_pp_keys`).
  """
  ids = load_split_ids(_get(data_cfg, 'split_ids', ''), split)
  if ids is not None:
    split, ids = ids
  split, holdout = _holdout(data_cfg, split)
  host_split = _host_split(split)
  features = builder.info.features
  decoders = {k: tfds.decode.SkipDecoding() for k in ENCODED_KEYS if k in features}
  ds = builder.as_dataset(split=host_split, decoders=decoders, shuffle_files=False)
  multi_hot = _get(data_cfg, 'target', 'labels') == 'labels'
  # Multi-hot labels are gathered to config.data.classes; with another target, 'labels' read
  # for preprocessing (e.g. `label_from_findings`) keep the stored vocabulary.
  idx = tf.constant(class_indices(tuple(_get(data_cfg, 'classes', NIH_CLASSES)))
                    if multi_hot else [], tf.int32)
  if 'masks' in keys and 'masks' not in features and masks is None:
    raise ValueError(f"{_name(data_cfg)!r} has no feature 'masks' (set config.data.mask_cache "
                     f'to masks the segment stage wrote); it has {sorted(features)}.')
  # Features the data set lacks are left to the pp ops to make (e.g. a 'label' target from
  # 'labels'); `_preprocess_map` names any that none made.
  keys = tuple(k for k in keys if k in features or (k == 'masks' and masks is not None))
  need_id = bool(copies) or ids is not None or masks is not None or holdout is not None
  read_keys = tuple(keys) + (('image_id',) if need_id and 'image_id' not in keys else ())
  from_builder = tuple(k for k in read_keys if not (masks is not None and k == 'masks'))
  # Select early so unused features (masks, boxes) are not carried through the pipeline.
  ds = ds.map(
    lambda f: {k: tf.gather(f[k], idx) if k == 'labels' and multi_hot else f[k]
               for k in from_builder},
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  if ids is not None:
    wanted = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(sorted(ids) or [''], tf.string), tf.ones([max(len(ids), 1)], tf.int64)),
      default_value=np.int64(0))
    ds = ds.filter(lambda f: wanted.lookup(f['image_id']) > 0)
  if holdout is not None:
    fraction, keep_held_out = holdout
    cut = round(fraction * _HOLDOUT_BUCKETS)
    ds = ds.filter(lambda f: tf.equal(
      tf.strings.to_hash_bucket_fast(f['image_id'], _HOLDOUT_BUCKETS) < cut, keep_held_out))
  if masks is not None:
    ds = masks.attach(ds, split, _name(data_cfg))
  drop = bool(_get(data_cfg, 'drop_no_finding', False))
  if drop and 'labels' not in read_keys:
    raise ValueError("config.data.drop_no_finding needs multi-hot 'labels' (config.data.target="
                     f"{_get(data_cfg, 'target', 'labels')!r}).")
  if drop:
    # All selected labels zero: 'No Finding' or only findings outside the selected classes.
    ds = ds.filter(lambda f: tf.reduce_any(f['labels'] > 0))
  if copies:
    ds = _repeat_copies(ds, copies, keys, split)
  if _get(data_cfg, 'cache', False):
    ds = ds.cache()  # Caches encoded bytes, which is what a re-read would cost.
  if drop or copies or ids is not None or holdout is not None:
    n = int(ds.reduce(np.int64(0), lambda c, _: c + 1))
  else:
    n = builder.info.splits[host_split].num_examples
  return ds, n


def load_split_ids(path: str, split: str) -> tuple[str, list[str]] | None:
  """(source TFDS split, image ids) of `split` in a `config.data.split_ids` file; None when
  `path` is ''. Errors name the file and the split."""
  if not path:
    return None
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f'config.data.split_ids={path!r}: file not found (the '
                            '`cross_validate` stage writes one per fold).')
  try:
    raw = json.loads(p.read_text())
    source, splits = str(raw['source_split']), raw['splits']
  except (ValueError, TypeError, KeyError) as e:
    raise ValueError(f'{path}: expected JSON {{"source_split": ..., "splits": {{name: [image '
                     f'ids]}}}}: {e!r}') from None
  if split not in splits:
    raise ValueError(f'{path}: no split {split!r}; it has {sorted(splits)}.')
  return source, [str(i) for i in splits[split]]
def _holdout(data_cfg: Any, split: str) -> tuple[str, tuple[float, bool] | None]:
  """(split to read, (fraction, keep the held-out part?) or None) for config.data
  .validation_holdout; see the module doc."""
  fraction = float(_get(data_cfg, 'validation_holdout', 0.0))
  train_split = _get(data_cfg, 'train_split', 'train')
  if split == HOLDOUT_SPLIT:
    if not 0.0 < fraction < 1.0:
      raise ValueError(f'split {HOLDOUT_SPLIT!r} is the held-out part of the train split: set '
                       'config.data.validation_holdout to a fraction in (0, 1), got '
                       f'{fraction!r}.')
    return train_split, (fraction, True)
  if fraction > 0.0 and split == train_split:
    return split, (fraction, False)
  return split, None


def open_mask_cache(data_cfg: Any, keys: tuple[str, ...],
                    builder: tfds.core.DatasetBuilder) -> mask_cache.MaskCache | None:
  """The cache of config.data.mask_cache when a batch carries 'masks', checked against the
  data set's stored images and config.data.structures; None otherwise."""
  path = _get(data_cfg, 'mask_cache', '')
  if not path or 'masks' not in keys:
    return None
  cache = mask_cache.MaskCache(path, what='config.data.mask_cache')
  structures = _get(data_cfg, 'structures', None)
  cache.check_fits(builder.info.features['image'].shape, structures, _name(data_cfg))
  return cache


def _repeat_copies(ds: tf.data.Dataset, copies: dict[str, int], keys: tuple[str, ...],
                   split: str) -> tf.data.Dataset:
  """Each element 1 + copies[image_id] times (in place, before shuffling); checks the ids."""
  ids = list(copies)
  table = tf.lookup.StaticHashTable(
    tf.lookup.KeyValueTensorInitializer(tf.constant(ids, tf.string),
                                        tf.constant([copies[i] for i in ids], tf.int64)),
    default_value=np.int64(-1))
  if jax.process_count() == 1:
    found = int(ds.map(lambda f: tf.cast(table.lookup(f['image_id']) >= 0, tf.int64)).reduce(
      np.int64(0), lambda c, x: c + x))
    if found != len(ids):
      raise ValueError(f'config.data.extra_copies: {len(ids) - found} of {len(ids)} image ids '
                       f'are not in the (filtered) split {split!r}.')
  return ds.flat_map(lambda f: tf.data.Dataset.from_tensors(
    {k: f[k] for k in keys}).repeat(1 + tf.maximum(table.lookup(f['image_id']), 0)))


def _decode(
  builder: tfds.core.DatasetBuilder, features: dict[str, tf.Tensor],
  masks: mask_cache.MaskCache | None = None,
) -> dict[str, tf.Tensor]:
  """Decodes the still-encoded features with their TFDS decoders (static shapes); cached
  masks with the cache's."""
  features = dict(features)
  for k in ENCODED_KEYS:
    if k in features:
      if k == 'masks' and masks is not None:
        features[k] = masks.decode(features[k])
      else:
        features[k] = builder.info.features[k].decode_example(features[k])
  return features


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # No autotuning thread: dropping a train iterator waited for tf.data's autotune optimisation
  # loop, 27-36 s after most training stages of the demo (py-spy: the main thread in
  # IteratorResource's destructor; 0.0 s with this off). AUTOTUNE map parallelism then means
  # one call per schedulable core; pipeline and step times were unchanged (README, Speed).
  options.autotune.enabled = False
  return options


def _preprocess_map(
  builder: tfds.core.DatasetBuilder, pp: str, out_keys: tuple[str, ...], root_seed: tf.Tensor,
  masks: mask_cache.MaskCache | None = None,
) -> Callable[[tf.Tensor, dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
  """(global index, features) -> decoded, preprocessed {out_keys} with a float32 image (and
  float32 masks in [0, 1])."""
  preprocess = ops.get_preprocess_fn(pp)

  def fn(index: tf.Tensor, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    features = _decode(builder, features, masks)
    features[ops.SEED_KEY] = tf.random.experimental.stateless_fold_in(root_seed, index)
    features = preprocess(features)
    missing = [k for k in out_keys if k not in features]
    if missing:
      raise ValueError(f'Features {missing} are neither in the data set nor made by the '
                       f'preprocessing ops "{pp}" (present: {sorted(features)}).')
    out = {k: features[k] for k in out_keys}
    out['image'] = tf.cast(out['image'], tf.float32)
    if 'labels' in out:
      out['labels'] = tf.cast(out['labels'], tf.float32)
    if 'label' in out:
      out['label'] = tf.cast(out['label'], tf.int32)
    if 'masks' in out and out['masks'].dtype.is_integer:
      out['masks'] = tf.cast(out['masks'], tf.float32) / 255.0  # stored 0/255
    return out

  return fn


class TrainInput:
  """Infinite iterator of this host's training batches (see `make_train_iter`).

  Attributes:
    num_examples: examples in one pass over this host's (filtered, extra-copied) train split.
    num_examples_global: the same over all hosts: one epoch of the global stream.
  """

  def __init__(self, iterator: Iterator[Batch], num_examples: int):
    self._iterator = iterator
    self.num_examples = num_examples
    self._global = None

  @property
  def num_examples_global(self) -> int:
    """A collective over hosts on first use: every process must ask."""
    if self._global is None:
      self._global = _sum_over_hosts(self.num_examples)
    return self._global

  def __iter__(self) -> 'TrainInput':
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)


def batch_keys(data_cfg: Any) -> tuple[str, ...]:
  """The features a batch carries: 'image', config.data.target, then config.data.inputs."""
  keys = ['image', str(_get(data_cfg, 'target', 'labels'))]
  keys += [k for k in _get(data_cfg, 'inputs', ()) if k not in keys]
  return tuple(keys)


def _with_pp_keys(data_cfg: Any, keys: tuple[str, ...], pp: str = '') -> tuple[str, ...]:
  """`keys`, the preprocessing-only features of config.data.pp_keys and those the ops of `pp`
  read (`ops.REQUIRED_KEYS`, e.g. 'image_id' for paper 002's `align`): read, not batched."""
  extra = (*_get(data_cfg, 'pp_keys', ()), *ops.required_keys(pp))
  return tuple(keys) + tuple(dict.fromkeys(k for k in extra if k not in keys))


def make_train_iter(
  data_cfg: Any, *, global_batch_size: int, seed: int, start_step: int = 0
) -> TrainInput:
  """Infinite iterator of this host's training batches, starting at step `start_step`.

  Yields {'image': float32 [b, H, W, C], 'labels': float32 [b, K] (or another target, and the
  model's extra inputs: `batch_keys`)} with b = global_batch_size // process_count and K =
  len(config.data.classes). Deterministic in (seed, start_step). Its `num_examples` is the
  split's size after filtering (counted once, here).
  """
  tf_devices.hide_accelerators()
  batch = local_batch_size(global_batch_size)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  builder = get_builder(_name(data_cfg), _get(data_cfg, 'data_dir', None))
  split = _get(data_cfg, 'train_split', 'train')
  extra = _get(data_cfg, 'extra_copies', '')
  copies = load_extra_copies(extra) if extra else None
  keys = batch_keys(data_cfg)
  pp = _get(data_cfg, 'pp_train', '')
  keys_read = _with_pp_keys(data_cfg, keys, pp)
  masks = open_mask_cache(data_cfg, keys_read, builder)
  base, n = _read(builder, split, data_cfg, keys_read, copies, masks)
  logging.info('Process %d/%d reads %s of %r for training: %d examples.', jax.process_index(),
               jax.process_count(), _host_split(split), _name(data_cfg), n)
  if n == 0:
    raise ValueError(
      f'No training examples in {_name(data_cfg)!r} split {split!r} after filtering.'
    )
  buffer = max(1, min(int(_get(data_cfg, 'shuffle_buffer', 10_000)), n))

  root = tf.constant([seed, jax.process_index()], tf.int64)
  shuffle_root = tf.random.experimental.stateless_fold_in(root, np.int64(0))
  augment_root = tf.random.experimental.stateless_fold_in(root, np.int64(1))

  def epoch(e: tf.Tensor) -> tf.data.Dataset:
    # The order is ours, from (seed, process, epoch) alone: a global TF seed (tf.random
    # .set_seed, keras.utils.set_random_seed) must not enter it, and with one set TF's
    # get_seed compares our symbolic seed to 0 as a Python bool and fails.
    tf.compat.v1.get_default_graph().seed = None
    epoch_seed = tf.random.stateless_uniform(
      [],
      tf.random.experimental.stateless_fold_in(shuffle_root, e),
      minval=None,
      maxval=None,
      dtype=tf.int64,
    )
    return base.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  first_epoch, offset = divmod(start_step * batch, n)
  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch)
  ds = ds.enumerate(start=first_epoch * n).skip(offset)  # Skip before decoding: cheap.
  ds = ds.map(
    _preprocess_map(builder, pp, keys, augment_root, masks),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(batch, drop_remainder=True).prefetch(int(_get(data_cfg, 'prefetch', 2)))
  return TrainInput(ds.with_options(_options()).as_numpy_iterator(), n)


class EvalInput:
  """One host's evaluation batches; iterate it once per evaluation.

  Attributes:
    num_examples: real examples on this host (after class filtering).
    num_batches: batches every host yields (max over hosts), padding included.
    batch_size: local batch size b.
  Batches: {'image': float32 [b, H, W, C], 'labels': float32 [b, K] (or the configured target
  and inputs), 'mask': float32 [b] (1 real, 0 padding), 'image_id': str array [b] ('' for
  padding)}.
  """

  def __init__(
    self, dataset: tf.data.Dataset, *, num_examples: int, num_batches: int, batch_size: int
  ):
    self._dataset = dataset
    self.num_examples = num_examples
    self.num_batches = num_batches
    self.batch_size = batch_size

  def __len__(self) -> int:
    return self.num_batches

  def _padding_like(self, template: Batch) -> Batch:
    b = self.batch_size
    pad = {k: np.zeros((b, *v.shape[1:]), v.dtype) for k, v in template.items()}
    pad['image_id'] = np.full([b], '', template['image_id'].dtype)
    return pad

  def _template(self) -> Batch:
    """A zero batch from the static element spec, for hosts that have no real example."""
    spec = self._dataset.element_spec
    keys = [k for k in spec if k != 'image_id']
    if not all(spec[k].shape[1:].is_fully_defined() for k in keys):
      raise ValueError(
        f'Cannot pad: this host has no eval examples and shapes are not static: {spec}'
      )
    out = {k: np.zeros((0, *spec[k].shape[1:]), spec[k].dtype.as_numpy_dtype) for k in keys}
    out['mask'] = np.zeros((0,), np.float32)
    out['image_id'] = np.zeros((0,), '<U1')
    return out

  def __iter__(self) -> Iterator[Batch]:
    count = 0
    template = None
    for raw in self._dataset.as_numpy_iterator():
      real = len(raw['image'])
      out = {k: v for k, v in raw.items() if k != 'image_id'}
      out['mask'] = np.ones([real], np.float32)
      out['image_id'] = np.array([s.decode('utf-8') for s in raw['image_id']])
      if real < self.batch_size:
        pad = self._padding_like(out)
        out = {k: np.concatenate([v, pad[k][: self.batch_size - real]]) for k, v in out.items()}
      template = out
      count += 1
      yield out
    if count < self.num_batches:
      pad = self._padding_like(template if template is not None else self._template())
      for _ in range(self.num_batches - count):
        yield {k: v.copy() for k, v in pad.items()}


def _sum_over_hosts(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def _max_over_hosts(value: int) -> int:
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def make_eval_iter(data_cfg: Any, split: str, *, global_batch_size: int) -> EvalInput:
  """Evaluation input over `split` for this host: every example once, padded, in file order."""
  tf_devices.hide_accelerators()
  batch = local_batch_size(global_batch_size)
  builder = get_builder(_name(data_cfg), _get(data_cfg, 'data_dir', None))
  keys = (*batch_keys(data_cfg), 'image_id')
  pp = _get(data_cfg, 'pp_eval', '')
  keys_read = _with_pp_keys(data_cfg, keys, pp)
  masks = open_mask_cache(data_cfg, keys_read, builder)
  ds, n = _read(builder, split, data_cfg, keys_read, masks=masks)
  # Seeds only matter if pp_eval has random ops; fixed ones keep evaluation repeatable.
  root = tf.constant([0, jax.process_index()], tf.int64)
  ds = ds.enumerate().map(
    _preprocess_map(builder, pp, keys, root, masks),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  ds = ds.batch(batch).prefetch(int(_get(data_cfg, 'prefetch', 2))).with_options(_options())
  num_batches = _max_over_hosts(math.ceil(n / batch))
  return EvalInput(ds, num_examples=n, num_batches=num_batches, batch_size=batch)


def iterate_box_split(data_cfg: Any, split: str, pp: str, *, limit: int | None = None
                      ) -> Iterator[dict[str, Any]]:
  """Examples of a split with boxes (e.g. 'bbox'), one at a time, for localisation.

  Applies `pp` to the image and the boxes together (crops and translations move the boxes).
  Yields {'image_id': str, 'image': float32 [H, W, C], 'labels': float32 [K] (config.data
  .classes), 'boxes': float32 [M, 4] normalised (ymin, xmin, ymax, xmax) in the preprocessed
  frame, 'box_classes': list of M class names}.
  """
  tf_devices.hide_accelerators()
  builder = get_builder(_name(data_cfg), _get(data_cfg, 'data_dir', None))
  if 'objects' not in builder.info.features:
    raise ValueError(f'{_name(data_cfg)!r} has no boxes (feature "objects").')
  if split not in builder.info.splits:
    raise ValueError(f'config.localize.split={split!r}: {_name(data_cfg)!r} has the splits '
                     f'{sorted(builder.info.splits)}.')
  names = builder.info.features['objects']['label'].names
  idx = tf.constant(class_indices(tuple(_get(data_cfg, 'classes', NIH_CLASSES))), tf.int32)
  preprocess = ops.get_preprocess_fn(pp)
  root = tf.constant([0, 0], tf.int64)

  def fn(index: tf.Tensor, f: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    features = {'image': f['image'], 'labels': tf.gather(f['labels'], idx),
                'image_id': f['image_id'],
                'objects': {'bbox': f['objects']['bbox'], 'label': f['objects']['label']},
                ops.SEED_KEY: tf.random.experimental.stateless_fold_in(root, index)}
    out = preprocess(features)
    return {'image': tf.cast(out['image'], tf.float32), 'labels': out['labels'],
            'image_id': out['image_id'], 'boxes': out['objects']['bbox'],
            'box_labels': out['objects']['label']}

  ds = builder.as_dataset(split=split if limit is None else f'{split}[:{limit}]',
                          shuffle_files=False)
  ds = ds.enumerate().map(fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(4)
  for ex in ds.with_options(_options()).as_numpy_iterator():
    yield {'image_id': ex['image_id'].decode('utf-8'), 'image': ex['image'],
           'labels': ex['labels'].astype(np.float32), 'boxes': ex['boxes'].astype(np.float32),
           'box_classes': [names[int(c)] for c in ex['box_labels']]}


def iterate_split(data_cfg: Any, split: str, pp: str, *, batch_size: int, start: int = 0
                  ) -> tuple[int, tuple[int, int], Iterator[dict[str, Any]]]:
  """Every image of a whole named split in file order from example `start`, unfiltered (the
  `segment` stage's input; process-local).

  Returns (examples in the split, (H, W) of the stored images, iterator of batches
  {'image_id': list of b ids, 'image': float32 [b, h, w, C] after `pp`}).
  """
  tf_devices.hide_accelerators()
  builder = get_builder(_name(data_cfg), _get(data_cfg, 'data_dir', None))
  if split not in builder.info.splits:
    raise ValueError(f'{_name(data_cfg)!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}.')
  n = builder.info.splits[split].num_examples
  size = tuple(int(s) for s in builder.info.features['image'].shape[:2])
  decoders = {'image': tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  ds = ds.map(lambda f: {'image_id': f['image_id'], 'image': f['image']}).skip(start)
  preprocess = ops.get_preprocess_fn(pp)
  root = tf.constant([0, 0], tf.int64)

  def fn(index: tf.Tensor, f: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    features = _decode(builder, f)
    features[ops.SEED_KEY] = tf.random.experimental.stateless_fold_in(root, index)
    out = preprocess(features)
    return {'image_id': f['image_id'], 'image': tf.cast(out['image'], tf.float32)}

  ds = ds.enumerate(start=start).map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(2).with_options(_options())

  def batches() -> Iterator[dict[str, Any]]:
    for b in ds.as_numpy_iterator():
      yield {'image_id': [s.decode('utf-8') for s in b['image_id']], 'image': b['image']}

  return n, size, batches()


def split_image_ids(data_cfg: Any, split: str, *, no_finding_only: bool = False) -> list[str]:
  """The image ids of a whole split in file order (every host sees all of them), optionally
  only the 'No Finding' images (the `no_finding` feature: no label at all). Decodes no image."""
  tf_devices.hide_accelerators()
  builder = get_builder(_name(data_cfg), _get(data_cfg, 'data_dir', None))
  if split not in builder.info.splits:
    raise ValueError(f'{_name(data_cfg)!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}.')
  if no_finding_only and 'no_finding' not in builder.info.features:
    raise ValueError(f"{_name(data_cfg)!r} has no 'no_finding' feature to select normal images.")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={k: tfds.decode.SkipDecoding() for k in ENCODED_KEYS
                                    if k in builder.info.features})
  if no_finding_only:
    ds = ds.filter(lambda f: f['no_finding'])
  ds = ds.map(lambda f: f['image_id'], num_parallel_calls=tf.data.AUTOTUNE)
  return [s.decode('utf-8') for s in ds.with_options(_options()).as_numpy_iterator()]


def iterate_images(data_cfg: Any, split: str, pp: str, image_ids: Any = None, *,
                   batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
  """Batches of a whole split (or of its `image_ids` only) preprocessed by `pp`, in file order,
  on this host alone (for stages that process 0 runs): {'image_id': str [b], 'image': float32
  [b, H, W, C], 'labels': float32 [b, K] (config.data.classes)}; the last batch is smaller."""
  tf_devices.hide_accelerators()
  builder = get_builder(_name(data_cfg), _get(data_cfg, 'data_dir', None))
  if split not in builder.info.splits:
    raise ValueError(f'{_name(data_cfg)!r} has no split {split!r}; it has '
                     f'{sorted(builder.info.splits)}.')
  keys = _with_pp_keys(data_cfg, ('image', 'labels', 'image_id'), pp)
  decoders = {k: tfds.decode.SkipDecoding() for k in ENCODED_KEYS if k in builder.info.features}
  ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
  idx = tf.constant(class_indices(tuple(_get(data_cfg, 'classes', NIH_CLASSES))), tf.int32)
  ds = ds.map(lambda f: {k: tf.gather(f[k], idx) if k == 'labels' else f[k] for k in keys},
              num_parallel_calls=tf.data.AUTOTUNE)
  if image_ids is not None:
    wanted = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(list(image_ids), tf.string),
                                          tf.ones([len(image_ids)], tf.int64)),
      default_value=np.int64(0))
    ds = ds.filter(lambda f: wanted.lookup(f['image_id']) > 0)
  root = tf.constant([0, 0], tf.int64)
  ds = ds.enumerate().map(_preprocess_map(builder, pp, ('image', 'labels', 'image_id'), root),
                          num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(2).with_options(_options())
  for batch in ds.as_numpy_iterator():
    yield {'image_id': np.array([s.decode('utf-8') for s in batch['image_id']]),
           'image': batch['image'], 'labels': batch['labels']}
