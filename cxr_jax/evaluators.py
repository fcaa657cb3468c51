"""Evaluators: run a model over an evaluation split and compute metrics on the host.

Predictions of every device and host are gathered with their labels and padding mask; padded
examples are removed before any metric is computed, so no example is dropped or counted twice.
An evaluator builds its input pipeline once (with `drop_no_finding` that includes a counting
pass over the split) and keeps it, with its compiled predict function, for every evaluation of
a run.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from cxr_jax import evaluate, metrics, parallel, single_label, xla_options
from cxr_jax.registry import Registry

PredictFn = Callable[[Any, jax.Array], jax.Array]
EVALUATORS: Registry[type] = Registry('evaluator')

PER_CLASS = 'per_class'


@dataclasses.dataclass
class Predictions:
  """Collected outputs of one evaluation pass (padding removed)."""

  image_ids: list[str]
  labels: np.ndarray  # [N, K] float32
  probs: np.ndarray  # [N, K] float32


def resolve_thresholds(threshold: float | str | list[float], rule: str, labels: np.ndarray,
                       probs: np.ndarray) -> np.ndarray | float:
  """config.threshold -> what `compute_metrics` takes: the scalar (or [K]) as given, or for
  'per_class' the thresholds `rule` chooses on these very predictions (validation)."""
  if isinstance(threshold, str):
    if threshold != PER_CLASS:
      raise ValueError(f"config.threshold={threshold!r}: a probability or 'per_class'")
    return metrics.choose_thresholds(labels, probs, rule)
  return threshold


class _SplitInput:
  """An evaluator's input: one split of config.data, its pipeline built once and kept between
  evaluations (subclasses set data_cfg, split, batch_size and _input)."""

  data_cfg: ml_collections.ConfigDict
  split: str
  batch_size: int
  _input: Any

  @property
  def input(self):
    """The split's `pipeline.EvalInput`, built on first use and kept."""
    if self._input is None:
      from cxr_jax.data import pipeline
      self._input = pipeline.make_eval_iter(self.data_cfg, self.split,
                                            global_batch_size=self.batch_size)
    return self._input


@EVALUATORS.register('multilabel_classification')
class ClassificationEvaluator(_SplitInput):
  """Per-class AUROC, F1, binary accuracy, MAE ... of sigmoid outputs on one split.

  threshold: a probability (or [K] of them), or 'per_class': thresholds chosen by
  `threshold_rule` on the evaluated split itself, which is how the training loop selects its
  best checkpoint on validation; the evaluate stage applies validation's to the test split.
  """

  # Top-level metric names of `metrics` (what config.best_metric may name).
  SCALAR_METRICS = evaluate.SCALAR_METRICS

  def __init__(self, predict_fn: PredictFn, data_cfg: ml_collections.ConfigDict, split: str, *,
               batch_size: int, mesh: jax.sharding.Mesh, class_names: tuple[str, ...],
               threshold: float | str | list[float] = 0.5, threshold_rule: str = 'max_f1',
               eval_input: Any = None):
    self.predict_fn = xla_options.jit(predict_fn, out_shardings=parallel.batch_sharded(mesh))
    self.data_cfg, self.split, self.batch_size = data_cfg, split, batch_size
    self.mesh, self.class_names = mesh, class_names
    self.threshold, self.threshold_rule = threshold, threshold_rule
    # An `EvalInput` of the same split may be shared between evaluators (several models).
    self._input = eval_input

  def predict(self, variables: Any) -> Predictions:
    ids, labels, probs = [], [], []
    inputs = tuple(self.data_cfg.get('inputs', ()))
    for batch in self.input:
      local = {'image': batch['image'], 'labels': self._labels(batch), 'mask': batch['mask'],
               'ids': parallel.encode_strings(batch['image_id']),
               **{k: batch[k] for k in inputs}}
      glob = parallel.to_global(local, self.mesh)
      predicted = self.predict_fn(variables, glob['image'], **{k: glob[k] for k in inputs})
      out = parallel.to_host({'probs': predicted, 'labels': glob['labels'],
                              'mask': glob['mask'], 'ids': glob['ids']})
      keep = out['mask'] > 0
      ids.extend(parallel.decode_strings(out['ids'][keep]))
      labels.append(out['labels'][keep])
      probs.append(out['probs'][keep])
    return Predictions(ids, np.concatenate(labels).astype(np.float32),
                       np.concatenate(probs).astype(np.float32))

  def _labels(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """The batch's labels as [b, K] float32 (multi-hot 'labels' here)."""
    return batch['labels']

  def choose_thresholds(self, preds: Predictions) -> np.ndarray:
    """Per-class thresholds [K] chosen by `threshold_rule` on `preds` (the validation split)."""
    return metrics.choose_thresholds(preds.labels, preds.probs, self.threshold_rule)

  def scalar_summary(self, preds: Predictions, threshold: float) -> dict[str, Any]:
    """The headline metrics at one scalar threshold (shown beside per-class thresholds)."""
    m = self.metrics(preds, threshold=threshold)
    return {'threshold': threshold, **{k: m[k] for k in (
        'binary_accuracy', 'f1', 'f1_micro', 'f1_macro', 'f1_samples', 'mean_auroc', 'mae')}}

  def metrics(self, preds: Predictions, threshold: Any = None) -> dict[str, Any]:
    """Metrics of `preds` at `threshold` (default: the evaluator's, resolved on `preds`)."""
    if threshold is None:
      threshold = resolve_thresholds(self.threshold, self.threshold_rule, preds.labels,
                                     preds.probs)
    return evaluate.compute_metrics(preds.labels, preds.probs, self.class_names,
                                    threshold=threshold)

  def run(self, variables: Any) -> tuple[dict[str, Any], Predictions]:
    preds = self.predict(variables)
    return self.metrics(preds), preds


@EVALUATORS.register('single_label_classification')
class SingleLabelEvaluator(ClassificationEvaluator):
  """Accuracy, AUROC, sensitivity, specificity, F1 with bootstrap 95 % intervals of a
  single-label classifier (config.data.target = 'label'; cxr_jax/single_label.py).

  Predictions hold one-hot labels [N, K] (K = 1 for one sigmoid output: the positive
  indicator) and the model's probabilities [N, K] (softmax or sigmoid). threshold: the
  decision threshold on the positive (last) class's probability, or 'per_class': chosen on the
  evaluated split by `threshold_rule` ('max_f1' or 'youden'), which is how the train loop
  selects on validation and how the evaluate stage picks the operating point it then applies
  to the test split. Thresholds are given per class as [1 - t, t] for two softmax outputs (a
  class is found when its probability is above its threshold, as for multi-label models).
  """

  SCALAR_METRICS = single_label.SCALAR_METRICS

  def _labels(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    k = len(self.class_names)
    index = np.asarray(batch['label']).astype(np.int64)
    if k == 1:
      return index[:, None].astype(np.float32)
    return np.eye(k, dtype=np.float32)[index]

  def choose_thresholds(self, preds: Predictions) -> np.ndarray:
    k = len(self.class_names)
    if k > 2:  # argmax decides; thresholds are not used
      return np.full((k,), 0.5)
    t = single_label.choose_threshold(single_label.class_indices(preds.labels), preds.probs,
                                      self.threshold_rule)
    return np.array([t] if k == 1 else [1.0 - t, t])

  def scalar_summary(self, preds: Predictions, threshold: float) -> dict[str, Any]:
    m = self.metrics(preds, threshold=threshold)
    return {'threshold': threshold, **{k: m[k] for k in single_label.SCALAR_METRICS}}

  def metrics(self, preds: Predictions, threshold: Any = None) -> dict[str, Any]:
    if threshold is None:
      threshold = (self.choose_thresholds(preds)
                   if isinstance(self.threshold, str) else self.threshold)
    return single_label.compute_metrics(preds.labels, preds.probs, self.class_names,
                                        threshold=threshold)
# ------------------------------------------------------------------------------ segmentation
@dataclasses.dataclass
class SegmentationPredictions:
  """Per-image scores of one segmentation pass (padding removed; cxr_jax/segmentation_metrics).

  Attributes:
    image_ids: N ids.
    dice, jaccard: [N, K'] binary scores over `segmentation_metrics.scored_structures`.
    dice_loss: [N] soft Dice loss of the probabilities (over the K channels).
    examples: the first few images, for overlays: {'image_id', 'image' [H, W] (the model
      input's first channel), 'probs' [H, W, K], 'truth' [H, W, K] in [0, 1]}.
  """

  image_ids: list[str]
  dice: np.ndarray
  jaccard: np.ndarray
  dice_loss: np.ndarray
  examples: list[dict[str, Any]]


@EVALUATORS.register('segmentation')
class SegmentationEvaluator(_SplitInput):
  """Dice and Jaccard per structure (and both lungs, and paper 004's global mask M_g) with their
  mean and standard deviation over the images of one split, and the soft Dice loss that picks
  the best checkpoint. The model's outputs are per-pixel logits [B, H, W, K]; the data's target
  is 'masks' [B, H, W, K] (config.data.target); K names: `class_names` (config.data
  .structures). Masks are binarised at `threshold` (a probability; 'per_class' means 0.5).
  Scores are computed on the host batch by batch, so no split's masks are held in memory.
  """

  def __init__(self, predict_fn: PredictFn, data_cfg: ml_collections.ConfigDict, split: str, *,
               batch_size: int, mesh: jax.sharding.Mesh, class_names: tuple[str, ...],
               threshold: float | str = 0.5, threshold_rule: str = 'max_f1',
               eval_input: Any = None, num_examples: int = 0):
    del threshold_rule  # classification only
    target = data_cfg.get('target', 'labels')
    if target != 'masks':
      raise ValueError(f"config.evaluator='segmentation' needs config.data.target='masks', got "
                       f'{target!r}.')
    self.predict_fn = xla_options.jit(predict_fn, out_shardings=parallel.batch_sharded(mesh))
    self.data_cfg, self.split, self.batch_size = data_cfg, split, batch_size
    self.mesh, self.class_names = mesh, tuple(class_names)
    self.threshold = 0.5 if isinstance(threshold, str) else float(threshold)
    self.num_examples = num_examples
    self._input = eval_input

  def predict(self, variables: Any) -> SegmentationPredictions:
    from cxr_jax import segmentation_metrics as S
    ids, dice, jaccard, loss, examples = [], [], [], [], []
    names = self.class_names
    for batch in self.input:
      local = {'image': batch['image'], 'masks': batch['masks'], 'mask': batch['mask'],
               'ids': parallel.encode_strings(batch['image_id'])}
      glob = parallel.to_global(local, self.mesh)
      probs = self.predict_fn(variables, glob['image'])
      wanted = {'probs': probs, 'masks': glob['masks'], 'mask': glob['mask'], 'ids': glob['ids']}
      if len(examples) < self.num_examples:
        wanted['image'] = glob['image']
      out = parallel.to_host(wanted)
      keep = out['mask'] > 0
      probs, truth = out['probs'][keep], out['masks'][keep]
      if probs.shape != truth.shape:
        raise ValueError(
            f'{self.data_cfg.get("name")!r} split {self.split!r}: masks of shape '
            f'{truth.shape[1:]} but the model predicts {probs.shape[1:]} (one channel per '
            f'structure of config.data.structures = {list(names)}).')
      d, j = S.dice_jaccard(S.with_unions(probs >= self.threshold, names),
                            S.with_unions(truth >= 0.5, names))
      batch_ids = parallel.decode_strings(out['ids'][keep])
      for i in range(min(len(batch_ids), self.num_examples - len(examples))):
        examples.append({'image_id': batch_ids[i], 'image': out['image'][keep][i][..., 0],
                         'probs': probs[i], 'truth': truth[i]})
      ids += batch_ids
      dice.append(d)
      jaccard.append(j)
      loss.append(S.soft_dice_loss(probs, truth))
    return SegmentationPredictions(ids, np.concatenate(dice), np.concatenate(jaccard),
                                   np.concatenate(loss), examples)

  def metrics(self, preds: SegmentationPredictions, threshold: Any = None) -> dict[str, Any]:
    from cxr_jax import segmentation_metrics as S
    del threshold  # binarised in `predict`
    return S.summarize(preds.dice, preds.jaccard, preds.dice_loss, self.class_names,
                       self.threshold)

  def run(self, variables: Any) -> tuple[dict[str, Any], SegmentationPredictions]:
    preds = self.predict(variables)
    return self.metrics(preds), preds
