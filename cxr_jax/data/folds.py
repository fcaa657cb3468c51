"""Patient-level, stratified k-fold cross-validation splits of a TFDS data set.

Small sets (Montgomery: 138 images, 48 in the team's sample) give noisy single test splits;
paper 003's 70/20/10 leaves 14 Montgomery test images. `config.cv.folds = k` re-splits the
examples of `config.cv.pool` (by default every split of the data set) into k folds stratified by
the single label and grouped by patient (no patient in two folds), with scikit-learn's
`StratifiedGroupKFold` (shuffled, seeded). Fold i is the test split of run i, fold (i + 1) mod k
its validation split (learning-rate plateaus and the best checkpoint are chosen on it, as the
paper's validation split), the other k - 2 folds its train split: with k = 5, 60/20/20.

`fold_splits` returns what `config.data.split_ids` files hold (cxr_jax/data/pipeline.py).
"""

from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cxr_jax.data import tf_devices

SPLIT_NAMES = ('train', 'validation', 'test')


def list_examples(data_cfg: Any, pool: str) -> dict[str, np.ndarray]:
  """{'image_id', 'label', 'patient_id'} of every example of TFDS split `pool` (no image is
  decoded); 'patient_id' falls back to the image id when the data set has none."""
  from cxr_jax.data import pipeline
  tf_devices.hide_accelerators()
  builder = pipeline.get_builder(data_cfg.name, data_cfg.get('data_dir'))
  features = builder.info.features
  target = data_cfg.get('target', 'labels')
  if target != 'label' or 'label' not in features:
    raise ValueError(f'config.cv.folds needs a single-label data set (config.data.target = '
                     f"'label' and a 'label' feature); {data_cfg.name!r} with target "
                     f'{target!r} has features {sorted(features)}.')
  keys = ['image_id', 'label'] + (['patient_id'] if 'patient_id' in features else [])
  decoders = {k: tfds.decode.SkipDecoding() for k in ('image', 'masks', 'lung_mask')
              if k in features}
  ds = builder.as_dataset(split=pool, decoders=decoders, shuffle_files=False)
  ds = ds.map(lambda f: {k: f[k] for k in keys})
  rows = list(ds.as_numpy_iterator())
  if not rows:
    raise ValueError(f'config.cv.pool={pool!r}: no examples in {data_cfg.name!r}.')
  ids = np.array([r['image_id'].decode('utf-8') for r in rows])
  patients = (np.array([str(r['patient_id'].decode('utf-8') if isinstance(r['patient_id'], bytes)
                            else r['patient_id']) for r in rows])
              if 'patient_id' in keys else ids)
  return {'image_id': ids, 'label': np.array([int(r['label']) for r in rows]),
          'patient_id': patients}


def assign_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
  """Fold index [N] in [0, k) of each example: stratified by `labels`, grouped by `groups`."""
  from sklearn.model_selection import StratifiedGroupKFold
  labels, groups = np.asarray(labels), np.asarray(groups)
  if k < 3:
    raise ValueError(f'config.cv.folds={k}: needs at least 3 (one fold tests, the next '
                     'validates, the rest train).')
  if len(np.unique(groups)) < k:
    raise ValueError(f'config.cv.folds={k}: only {len(np.unique(groups))} patients.')
  fold = np.full(len(labels), -1)
  splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
  for i, (_, test) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
    fold[test] = i
  return fold


def fold_splits(examples: dict[str, np.ndarray], fold: np.ndarray, i: int, k: int, pool: str
                ) -> dict[str, Any]:
  """The `config.data.split_ids` content of run i: test = fold i, validation = fold i+1 mod k,
  train = the rest (image ids in the pool's order)."""
  val = (i + 1) % k
  which = {'test': fold == i, 'validation': fold == val, 'train': (fold != i) & (fold != val)}
  return {'source_split': pool, 'fold': i, 'folds': k,
          'splits': {name: examples['image_id'][which[name]].tolist() for name in SPLIT_NAMES}}
