"""Evaluators: run a model over an evaluation split and compute metrics on the host.

Predictions of every device and host are gathered with their labels and padding mask; padded
examples are removed before any metric is computed, so no example is dropped or counted twice.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from cxr_jax import evaluate, parallel
from cxr_jax.data import pipeline
from cxr_jax.io_utils import atomic_write_npz
from cxr_jax.registry import Registry

PredictFn = Callable[[Any, jax.Array], jax.Array]
EVALUATORS: Registry[type] = Registry('evaluator')


@dataclasses.dataclass
class Predictions:
  """Collected outputs of one evaluation pass (padding removed)."""

  image_ids: list[str]
  labels: np.ndarray  # [N, K] float32
  probs: np.ndarray  # [N, K] float32

  def save(self, path: str) -> None:
    """Writes an .npz atomically (temporary file + rename)."""
    atomic_write_npz(path, image_ids=np.asarray(self.image_ids), labels=self.labels,
                     probs=self.probs)

  @classmethod
  def load(cls, path: str) -> 'Predictions':
    with np.load(path) as f:
      return cls([str(s) for s in f['image_ids']], f['labels'], f['probs'])


@EVALUATORS.register('multilabel_classification')
class ClassificationEvaluator:
  """Per-class AUROC, F1, binary accuracy, MAE ... of sigmoid outputs on one split."""

  def __init__(self, predict_fn: PredictFn, data_cfg: ml_collections.ConfigDict, split: str, *,
               batch_size: int, mesh: jax.sharding.Mesh, class_names: tuple[str, ...],
               threshold: float | list[float] = 0.5):
    self.predict_fn = jax.jit(predict_fn, out_shardings=parallel.batch_sharded(mesh))
    self.data_cfg, self.split, self.batch_size = data_cfg, split, batch_size
    self.mesh, self.class_names, self.threshold = mesh, class_names, threshold

  def predict(self, variables: Any) -> Predictions:
    ids, labels, probs = [], [], []
    for batch in pipeline.make_eval_iter(self.data_cfg, self.split,
                                         global_batch_size=self.batch_size):
      local = {'image': batch['image'], 'labels': batch['labels'], 'mask': batch['mask'],
               'ids': parallel.encode_strings(batch['image_id'])}
      glob = parallel.to_global(local, self.mesh)
      out = parallel.to_host({'probs': self.predict_fn(variables, glob['image']),
                              'labels': glob['labels'], 'mask': glob['mask'],
                              'ids': glob['ids']})
      keep = out['mask'] > 0
      ids.extend(parallel.decode_strings(out['ids'][keep]))
      labels.append(out['labels'][keep])
      probs.append(out['probs'][keep])
    return Predictions(ids, np.concatenate(labels).astype(np.float32),
                       np.concatenate(probs).astype(np.float32))

  def run(self, variables: Any) -> tuple[dict[str, Any], Predictions]:
    preds = self.predict(variables)
    metrics = evaluate.compute_metrics(preds.labels, preds.probs, self.class_names,
                                       threshold=self.threshold)
    return metrics, preds
