"""Tests for cxr_jax.data.pipeline on a tiny TFDS data set built here (same feature spec)."""

import re

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cxr_jax.data import pipeline
from cxr_jax.data.features import classification_features
from cxr_jax.labels import NIH_CLASSES

SIZE = 16
# Example ids per split; each image is the constant uint8 value of its id, so a batch row tells
# which example it came from.
SPLITS = {'train': range(0, 40), 'validation': range(100, 123), 'test': range(200, 210)}
PP_PLAIN = 'decode|grayscale_to_rgb'
PP_AUGMENT = (
  "decode|grayscale_to_rgb|resize(12)|random_translate(2)|flip_lr|rotate(10)|normalize('zero_one')"
)


def _labels(i: int) -> np.ndarray:
  """Every third example is 'No Finding'; the others have finding i % 14 (and i % 5 too)."""
  y = np.zeros([14], np.float32)
  if i % 3:
    y[i % 14] = 1
    y[i % 5] = 1
  return y


def _image_id(i: int) -> str:
  return f'test_{i:05d}.png'


class PipelineTestCxr(tfds.core.GeneratorBasedBuilder):
  """Test-only data set with the cxr_jax feature spec (registered as 'pipeline_test_cxr')."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs wants a package with README/citations.
    return tfds.core.DatasetInfo(
      builder=self,
      features=classification_features(SIZE, masks=True),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(ids) for name, ids in SPLITS.items()}

  def _generate_examples(self, ids):
    for i in ids:
      n_boxes = i % 3
      yield (
        _image_id(i),
        {
          'image_id': _image_id(i),
          'image': np.full((SIZE, SIZE, 1), i, np.uint8),
          'labels': _labels(i),
          'no_finding': not _labels(i).any(),
          'patient_id': i,
          'follow_up': 0,
          'age': 40,
          'sex': 'M',
          'view_position': 'PA',
          'objects': {
            'bbox': [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)] * n_boxes,
            'bbox_xywh': np.ones((n_boxes, 4), np.float32),
            'label': ['Mass'] * n_boxes,
          },
          'masks': np.zeros((SIZE, SIZE, 3), np.uint8),
        },
      )


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp('tfds'))
  PipelineTestCxr(data_dir=path).download_and_prepare()
  return path


def _cfg(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(
    {
      'name': 'pipeline_test_cxr',
      'data_dir': data_dir,
      'train_split': 'train',
      'classes': NIH_CLASSES,
      'drop_no_finding': False,
      'pp_train': PP_PLAIN,
      'pp_eval': PP_PLAIN,
      'shuffle_buffer': 100,
      'cache': False,
      'prefetch': 1,
    }
  )
  cfg.update(overrides)
  return cfg


def _ids_of(batch: dict) -> list[int]:
  """Example ids of an un-augmented batch (each image is constant = its id)."""
  return [int(v) for v in batch['image'][:, 0, 0, 0]]


def _take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


# --- training -----------------------------------------------------------------------------------


def test_train_batches_shapes_and_epochs(data_dir):
  it = pipeline.make_train_iter(_cfg(data_dir), global_batch_size=8, seed=0)
  batches = _take(it, 15)  # 40 examples / 8 = 5 batches per epoch: three epochs.
  assert batches[0]['image'].shape == (8, SIZE, SIZE, 3) and batches[0]['image'].dtype == np.float32
  assert batches[0]['labels'].shape == (8, 14) and batches[0]['labels'].dtype == np.float32
  assert set(batches[0]) == {'image', 'labels'}
  ids = np.array([i for b in batches for i in _ids_of(b)]).reshape(3, 40)
  for epoch in ids:
    assert sorted(epoch) == list(SPLITS['train'])  # Each epoch is a permutation.
  assert not np.array_equal(ids[0], ids[1])  # Reshuffled per epoch.
  assert not np.array_equal(ids[0], np.arange(40))
  for b in batches:
    np.testing.assert_array_equal(b['labels'], [_labels(i) for i in _ids_of(b)])
  other = _take(pipeline.make_train_iter(_cfg(data_dir), global_batch_size=8, seed=1), 5)
  assert [_ids_of(b) for b in other] != [_ids_of(b) for b in batches[:5]]


def test_train_resume_is_exact(data_dir):
  cfg = _cfg(data_dir, pp_train=PP_AUGMENT, shuffle_buffer=16)
  # 6 per batch over 40 examples: batches straddle epoch boundaries.
  ref = _take(pipeline.make_train_iter(cfg, global_batch_size=6, seed=3), 16)
  assert ref[0]['image'].shape == (6, 12, 12, 3)
  assert not np.array_equal(ref[0]['image'][0], ref[0]['image'][1])
  for start in (1, 6, 13):
    resumed = _take(pipeline.make_train_iter(cfg, global_batch_size=6, seed=3, start_step=start), 3)
    for s, batch in enumerate(resumed, start):
      np.testing.assert_array_equal(batch['image'], ref[s]['image'])
      np.testing.assert_array_equal(batch['labels'], ref[s]['labels'])


def test_a_global_tf_seed_changes_nothing(data_dir):
  # Users (and Keras's set_random_seed) set TensorFlow's global seed; the stream is ours alone.
  import tensorflow as tf
  cfg = _cfg(data_dir, pp_train=PP_AUGMENT, shuffle_buffer=16)
  ref = _take(pipeline.make_train_iter(cfg, global_batch_size=6, seed=3), 8)
  tf.random.set_seed(1234)
  try:
    seeded = _take(pipeline.make_train_iter(cfg, global_batch_size=6, seed=3), 8)
  finally:
    tf.random.set_seed(None)
  for a, b in zip(ref, seeded, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_train_augmentation_differs_per_element_and_epoch(data_dir):
  # Same example in two epochs is augmented differently (seed depends on the stream index).
  cfg = _cfg(data_dir, pp_train=PP_PLAIN + '|random_translate(3)', shuffle_buffer=1)
  batches = _take(pipeline.make_train_iter(cfg, global_batch_size=40, seed=0), 2)
  # shuffle_buffer=1 keeps file order, so row r is the same example in both epochs.
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])


def test_train_classes_and_drop_no_finding(data_dir):
  classes = ('Effusion', 'Hernia')  # NIH indices 2 and 13.
  cfg = _cfg(data_dir, classes=classes, drop_no_finding=True)
  batches = _take(pipeline.make_train_iter(cfg, global_batch_size=4, seed=0), 10)
  kept = [i for i in SPLITS['train'] if _labels(i)[[2, 13]].any()]
  seen = [i for b in batches for i in _ids_of(b)]
  assert sorted(seen[: len(kept)]) == kept
  for b in batches:
    assert b['labels'].shape == (4, 2)
    np.testing.assert_array_equal(b['labels'], [_labels(i)[[2, 13]] for i in _ids_of(b)])
    assert b['labels'].any(axis=1).all()


def test_cache_gives_the_same_stream(data_dir):
  plain = _take(pipeline.make_train_iter(_cfg(data_dir), global_batch_size=8, seed=2), 7)
  cached = _take(
    pipeline.make_train_iter(_cfg(data_dir, cache=True), global_batch_size=8, seed=2), 7
  )
  for a, b in zip(plain, cached, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])


# --- evaluation ---------------------------------------------------------------------------------


def _collect(ev) -> tuple[list[str], list[dict]]:
  batches = list(ev)
  ids = [i for b in batches for i, m in zip(b['image_id'], b['mask'], strict=True) if m == 1]
  return ids, batches


def test_eval_covers_every_example_once_with_padding(data_dir):
  ev = pipeline.make_eval_iter(_cfg(data_dir), 'validation', global_batch_size=8)
  assert (ev.num_examples, ev.num_batches, len(ev)) == (23, 3, 3)
  ids, batches = _collect(ev)
  assert sorted(ids) == [_image_id(i) for i in SPLITS['validation']]
  assert len(batches) == 3
  last = batches[-1]
  np.testing.assert_array_equal(last['mask'], [1] * 7 + [0])
  assert last['image_id'][-1] == '' and not last['image'][-1].any() and not last['labels'][-1].any()
  for b in batches:
    assert b['image'].shape == (8, SIZE, SIZE, 3) and b['mask'].dtype == np.float32
    assert b['image_id'].dtype.kind == 'U'
    for row, (image_id, m) in enumerate(zip(b['image_id'], b['mask'], strict=True)):
      if m:
        i = int(image_id[5:10])
        assert b['image'][row, 0, 0, 0] == i
        np.testing.assert_array_equal(b['labels'][row], _labels(i))
  # Iterating again gives the same batches.
  ids2, _ = _collect(ev)
  assert ids2 == ids


def test_eval_classes_drop_no_finding_counts(data_dir):
  cfg = _cfg(data_dir, classes=('Atelectasis', 'Cardiomegaly'), drop_no_finding=True)
  ev = pipeline.make_eval_iter(cfg, 'validation', global_batch_size=4)
  kept = [i for i in SPLITS['validation'] if _labels(i)[[0, 1]].any()]
  assert ev.num_examples == len(kept) and ev.num_batches == -(-len(kept) // 4)
  ids, batches = _collect(ev)
  assert sorted(ids) == [_image_id(i) for i in kept]
  assert batches[0]['labels'].shape == (4, 2)
  # Without the filter every example stays, 'No Finding' ones with all-zero labels.
  ev = pipeline.make_eval_iter(
    _cfg(data_dir, classes=('Atelectasis',)), 'test', global_batch_size=4
  )
  assert ev.num_examples == 10


def test_eval_adds_padding_batches_to_match_other_hosts(data_dir, monkeypatch):
  monkeypatch.setattr(pipeline, '_max_over_hosts', lambda n: n + 2)
  ev = pipeline.make_eval_iter(_cfg(data_dir), 'test', global_batch_size=4)
  ids, batches = _collect(ev)
  assert ev.num_batches == 5 and len(batches) == 5
  assert sorted(ids) == [_image_id(i) for i in SPLITS['test']]
  assert [b['mask'].sum() for b in batches] == [4, 4, 2, 0, 0]
  assert list(batches[-1]['image_id']) == [''] * 4


def test_two_hosts_split_the_data(data_dir, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  counts, all_ids = {}, []
  for host in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    monkeypatch.setattr(pipeline, '_max_over_hosts', lambda n: n)
    ev = pipeline.make_eval_iter(_cfg(data_dir), 'validation', global_batch_size=8)
    counts[host] = ev.num_examples
    ids, batches = _collect(ev)
    assert batches[0]['image'].shape[0] == 4  # Local batch = global // 2.
    all_ids += ids
    train = next(pipeline.make_train_iter(_cfg(data_dir), global_batch_size=8, seed=0))
    assert train['image'].shape[0] == 4
  assert sorted(all_ids) == [_image_id(i) for i in SPLITS['validation']]
  assert sum(counts.values()) == 23 and abs(counts[0] - counts[1]) <= 1


# --- errors and data preparation ----------------------------------------------------------------


def test_bad_batch_size(data_dir, monkeypatch):
  with pytest.raises(ValueError, match='positive multiple'):
    pipeline.make_train_iter(_cfg(data_dir), global_batch_size=0, seed=0)
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  with pytest.raises(ValueError, match=r'Global batch size 6 .* processes \(4\)'):
    pipeline.make_eval_iter(_cfg(data_dir), 'test', global_batch_size=6)


def test_missing_data_set_is_a_clear_error(tmp_path):
  empty = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match=re.escape(empty)) as e:
    pipeline.make_train_iter(_cfg(empty), global_batch_size=4, seed=0)
  assert 'pipeline_test_cxr' in str(e.value) and 'tfds build' in str(e.value)
  with pytest.raises(FileNotFoundError, match="'no_such_data_set' is neither a registered"
                     '.*cxr_jax builders: cxr_phantom'):
    pipeline.make_eval_iter(_cfg(empty, name='no_such_data_set'), 'test', global_batch_size=4)


def test_phantom_like_data_sets_are_built_on_demand(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, 'AUTO_PREPARE_PREFIXES', ('pipeline_test',))
  ev = pipeline.make_eval_iter(_cfg(str(tmp_path)), 'test', global_batch_size=4)
  assert ev.num_examples == 10
  assert tf.config.get_visible_devices('GPU') == []  # The pipeline hid GPUs from TF.


def test_pipelines_run_without_the_autotune_thread():
  """Dropping a train iterator waited for tf.data's autotune loop (27-36 s after most demo
  training stages, py-spy: IteratorResource's destructor); the pipelines run without it."""
  assert pipeline._options().autotune.enabled is False
  assert pipeline._options().deterministic is True
