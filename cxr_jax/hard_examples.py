"""Hard example attention module of paper 001 (Ma et al., section 3.3): two-stage training.

Stage 1 trains on the training set A. Its best model then scores every image of A; a positive
(image, class) pair whose score is not above the threshold (0.5: "if the predicted score of a
disease is greater than 0.5, we will consider that this sample has the corresponding disease")
is a hard positive. Set B holds the samples with a hard positive, set C = A + B, and stage 2
retrains on C, so hard positives appear twice per epoch.

B is a set of samples (images), so by default an image enters B once however many of its
positive classes were missed (`copies='per_image'`); `copies='per_pair'` adds one copy per
missed class instead (an image missed on two diseases appears three times in C).

`mine_stage` writes `hard_examples.json` ({'copies': {image_id: extra copies}, per-class counts,
...}); the `train_hard_examples` stage (cxr_jax/stages.py) trains on it through
`config.data.extra_copies` (cxr_jax/data/pipeline.py).
"""

import collections
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from etils import epath

COPIES = ('per_image', 'per_pair')
HARD_EXAMPLES = 'hard_examples.json'


def hard_positives(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """labels, probs [N, K] -> bool [N, K]: positive pairs the model does not call positive
  (prob <= threshold; a prediction is positive when prob > threshold)."""
  labels, probs = np.asarray(labels), np.asarray(probs)
  if labels.shape != probs.shape or labels.ndim != 2:
    raise ValueError(f'labels {labels.shape} and probs {probs.shape} must both be [N, K]')
  return (labels > 0) & (probs <= threshold)


def extra_copies(image_ids: Sequence[str], hard: np.ndarray, copies: str = 'per_image'
                 ) -> dict[str, int]:
  """{image_id: extra copies} for set B from the hard-positive mask [N, K]."""
  if copies not in COPIES:
    raise ValueError(f'config.hard_examples.copies={copies!r}; valid: {COPIES}')
  if len(set(image_ids)) != len(image_ids):
    twice = sorted(i for i, n in collections.Counter(image_ids).items() if n > 1)
    raise ValueError(f'image ids appear twice in the scored split: {twice[:5]}')
  counts = hard.sum(axis=1) if copies == 'per_pair' else hard.any(axis=1).astype(int)
  return {i: int(k) for i, k in zip(image_ids, counts, strict=True) if k}


def summary(image_ids: Sequence[str], labels: np.ndarray, hard: np.ndarray,
            class_names: Sequence[str], copies: dict[str, int], *, threshold: float,
            mode: str) -> dict[str, Any]:
  """The JSON `mine_stage` writes: per-class hard positives among positives, and the copies."""
  positives = (np.asarray(labels) > 0).sum(axis=0)
  return {
      'threshold': threshold, 'copies_mode': mode,
      'num_images_a': len(image_ids), 'num_images_b': len(copies),
      'num_examples_c': len(image_ids) + sum(copies.values()),
      'num_hard_pairs': int(hard.sum()),
      'per_class': {c: {'positives': int(positives[i]), 'hard': int(hard[:, i].sum())}
                    for i, c in enumerate(class_names)},
      'copies': copies,
  }


def mine_stage(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Scores the train split with `config.hard_examples.source_stage`'s best model (eval
  preprocessing) and writes `mine_hard_examples/hard_examples.json`."""
  import jax

  from cxr_jax import parallel, train
  from cxr_jax.evaluators import EVALUATORS
  from cxr_jax.io_utils import atomic_write_json

  cfg = config.hard_examples
  source = workdir / cfg.source_stage
  model, variables = train.restore_best_variables(source)
  info = train.load_model_info(source)
  class_names = tuple(info['class_names'])
  evaluator = EVALUATORS.get(config.evaluator)(
      train.make_predict_fn(model), config.data, config.data.train_split,
      batch_size=config.eval_batch_size, mesh=parallel.make_mesh(), class_names=class_names)
  preds = evaluator.predict(variables)
  hard = hard_positives(preds.labels, preds.probs, cfg.threshold)
  copies = extra_copies(preds.image_ids, hard, cfg.copies)
  result = summary(preds.image_ids, preds.labels, hard, class_names, copies,
                   threshold=cfg.threshold, mode=cfg.copies)
  if jax.process_index() == 0:
    atomic_write_json(str(workdir / 'mine_hard_examples' / HARD_EXAMPLES), result)
  if jax.process_count() > 1:  # stage 2 on every host reads the file the chief just wrote
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('mine_hard_examples')
  lines = [f'{c}: {v["hard"]}/{v["positives"]}' for c, v in result['per_class'].items()]
  logging.info('Hard positives (missed/positives) per class on %s (%d images): %s. Set B: %d '
               'images; set C: %d examples.', config.data.train_split, len(preds.image_ids),
               ', '.join(lines), result['num_images_b'], result['num_examples_c'])
