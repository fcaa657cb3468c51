"""Hard example attention module of paper 001 (Ma et al., section 3.3): two-stage training.

Stage 1 trains on the training set A. Its best model then scores every image of A; a positive
(image, class) pair whose score is not above the threshold (0.5: "if the predicted score of a
disease is greater than 0.5, we will consider that this sample has the corresponding disease")
is a hard positive. Set B holds the samples with a hard positive, set C = A + B, and stage 2
retrains on C, so hard positives appear twice per epoch.

B is a set of samples (images), so by default an image enters B once however many of its
positive classes were missed (`copies='per_image'`); `copies='per_pair'` adds one copy per
missed class instead (an image missed on two diseases appears three times in C).

The `mine_hard_examples` stage (cxr_jax/stages/evaluation.py) writes `summary`'s JSON
({'copies': {image_id: extra copies}, per-class counts, ...}); the `train_hard_examples` stage
(cxr_jax/stages/training.py) trains on it through `config.data.extra_copies`
(cxr_jax/data/pipeline.py).
"""

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np

COPIES = ('per_image', 'per_pair')


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
