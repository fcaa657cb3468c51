"""Paper 001's hard example attention: mining set B and training on C = A + B."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cxr_jax import hard_examples
from cxr_jax.data import pipeline


def test_hard_positives_and_copies_by_hand():
  labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], np.float32)
  probs = np.array([[0.2, 0.9, 0.5], [0.1, 0.7, 0.8], [0.6, 0.3, 0.1], [0.9, 0.9, 0.9]])
  hard = hard_examples.hard_positives(labels, probs, 0.5)
  # Positives with prob <= 0.5 ("> 0.5 means the disease"): (0, 0), (0, 2) at exactly 0.5,
  # (2, 1). Negatives scored high (image 3) are not hard positives.
  np.testing.assert_array_equal(hard, [[1, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
  ids = ['a', 'b', 'c', 'd']
  assert hard_examples.extra_copies(ids, hard, 'per_image') == {'a': 1, 'c': 1}
  assert hard_examples.extra_copies(ids, hard, 'per_pair') == {'a': 2, 'c': 1}
  with pytest.raises(ValueError, match='copies'):
    hard_examples.extra_copies(ids, hard, 'per_class')
  with pytest.raises(ValueError, match='twice'):
    hard_examples.extra_copies(['a', 'a', 'c', 'd'], hard)
  s = hard_examples.summary(ids, labels, hard, ('X', 'Y', 'Z'), {'a': 1, 'c': 1}, threshold=0.5,
                            mode='per_image')
  assert s['per_class'] == {'X': {'positives': 2, 'hard': 1}, 'Y': {'positives': 2, 'hard': 1},
                            'Z': {'positives': 1, 'hard': 1}}
  assert (s['num_images_a'], s['num_images_b'], s['num_examples_c'], s['num_hard_pairs']) == \
      (4, 2, 6, 3)


def _ids(phantom_data_dir, n):
  builder = tfds.builder('cxr_phantom/tiny', data_dir=phantom_data_dir)
  ds = builder.as_dataset(split='train', shuffle_files=False)
  return [ex['image_id'].decode() for ex in tfds.as_numpy(ds.take(n))]


def test_extra_copies_repeat_examples_in_the_train_stream(phantom_data_dir, tmp_path):
  ids = _ids(phantom_data_dir, 3)
  path = tmp_path / 'hard.json'
  path.write_text(json.dumps({'copies': {ids[0]: 1, ids[2]: 2}}))
  cfg = {'name': 'cxr_phantom/tiny', 'data_dir': phantom_data_dir, 'pp_train': 'decode',
         'extra_copies': str(path)}
  builder = pipeline.get_builder(cfg['name'], phantom_data_dir)
  ds, n = pipeline._read(builder, 'train', cfg, ('image_id', 'labels'),
                         pipeline.load_extra_copies(str(path)))
  assert n == 24 + 3
  seen = [ex['image_id'].decode() for ex in ds.as_numpy_iterator()]
  assert len(seen) == 27
  assert (seen.count(ids[0]), seen.count(ids[1]), seen.count(ids[2])) == (2, 1, 3)
  # One epoch of the (shuffled) train iterator is C: 27 examples.
  it = pipeline.make_train_iter(cfg, global_batch_size=9, seed=0)
  labels = np.concatenate([next(it)['labels'] for _ in range(3)])
  base = np.stack([ex['labels'] for ex in tfds.as_numpy(builder.as_dataset(split='train'))])
  assert labels.sum() == base.sum() + sum(
      k * base[i].sum() for i, k in ((0, 1), (2, 2)))


def test_extra_copies_bad_files_are_clear_errors(phantom_data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match='extra_copies'):
    pipeline.load_extra_copies(str(tmp_path / 'missing.json'))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"copies": {"x": "many"}}')
  with pytest.raises(ValueError, match='bad.json'):
    pipeline.load_extra_copies(str(bad))
  unknown = tmp_path / 'unknown.json'
  unknown.write_text(json.dumps({'copies': {'not_an_image.png': 1}}))
  cfg = {'name': 'cxr_phantom/tiny', 'data_dir': phantom_data_dir, 'extra_copies': str(unknown)}
  with pytest.raises(ValueError, match='1 of 1 image ids'):
    pipeline.make_train_iter(cfg, global_batch_size=8, seed=0)
