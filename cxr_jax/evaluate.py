"""From collected predictions to metrics dicts and checkpoint-selection values.

The train loop collects labels and sigmoid outputs on the host (padding already removed with the
eval mask) and calls `compute_metrics`; `select_metric` picks the value that decides the best
checkpoint (paper 000 kept the model with the best validation F1). Tables and figures of these
dicts are rendered by cxr_jax/reporting.py.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cxr_jax import metrics as M

# Metric names (last path part) where lower is better: errors. All others are scores.
_LOWER_IS_BETTER = frozenset({'mae', 'loss', 'dice_loss'})


def _float_or_none(x: float) -> float | None:
  """nan (undefined AUROC) becomes None so that the dict is strict JSON."""
  x = float(x)
  return None if math.isnan(x) else x


def compute_metrics(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    class_names: Sequence[str],
    threshold: float | np.ndarray = 0.5,
    f1_average: str = M.DEFAULT_F1_AVERAGE,
) -> dict[str, Any]:
  """All metrics of one model on one split, as a JSON-serialisable dict.

  Args:
    y_true: [N, K] 0/1 labels of the real (unmasked) examples.
    y_prob: [N, K] sigmoid probabilities.
    class_names: K names, in column order.
    threshold: scalar or [K] decision thresholds (prediction is `y_prob > threshold`).
    f1_average: the averaging reported under 'f1' (all three are reported as f1_<average>).

  Returns:
    {'num_examples', 'num_classes', 'class_names', 'thresholds' [K], 'binary_accuracy', 'f1',
     'f1_average', 'f1_micro', 'f1_macro', 'f1_samples', 'mae', 'loss' (mean BCE),
     'mean_auroc' (None if no class has both labels), 'n_valid_classes',
     'auroc' {class: float|None},
     'per_class' {class: {'precision', 'recall', 'f1', 'support', 'auroc'}},
     'confusion' {class: [[tn, fp], [fn, tp]]}}.
  """
  y_true, y_prob = M.check_inputs(y_true, y_prob)
  n, k = y_true.shape
  class_names = [str(c) for c in class_names]
  if len(class_names) != k:
    raise ValueError(
        f'class_names must have K = {k} entries (columns of y_true), got {len(class_names)}.'
    )
  if len(set(class_names)) != k:
    raise ValueError(f'class_names must be unique, got {class_names}.')
  if f1_average not in M.F1_AVERAGES:
    raise ValueError(f'f1_average must be one of {M.F1_AVERAGES}, got {f1_average!r}.')
  thresholds = M.check_thresholds(threshold, k)

  aurocs = M.per_class_auroc(y_true, y_prob)
  mean, n_valid = M.mean_auroc(y_true, y_prob)
  f1s = {avg: M.f1(y_true, y_prob, thresholds, average=avg) for avg in M.F1_AVERAGES}
  scores = M.per_class_scores(y_true, y_prob, thresholds)
  confusion = M.confusion_matrices(y_true, y_prob, thresholds)
  return {
      'num_examples': int(n),
      'num_classes': int(k),
      'class_names': class_names,
      'thresholds': [float(t) for t in thresholds],
      'binary_accuracy': M.binary_accuracy(y_true, y_prob, thresholds),
      'f1': f1s[f1_average],
      'f1_average': f1_average,
      **{f'f1_{avg}': value for avg, value in f1s.items()},
      'mae': M.mae(y_true, y_prob),
      'loss': M.bce(y_true, y_prob),
      'mean_auroc': _float_or_none(mean),
      'n_valid_classes': n_valid,
      'auroc': {c: _float_or_none(a) for c, a in zip(class_names, aurocs, strict=True)},
      'per_class': {
          c: {
              'precision': float(scores.precision[i]),
              'recall': float(scores.recall[i]),
              'f1': float(scores.f1[i]),
              'support': int(scores.support[i]),
              'auroc': _float_or_none(aurocs[i]),
          }
          for i, c in enumerate(class_names)
      },
      'confusion': {c: confusion[i].tolist() for i, c in enumerate(class_names)},
  }


# Names every `compute_metrics` dict has, whatever the classes; used to check a config's metric
# name before the first evaluation (check_only=True).
SCALAR_METRICS = ('binary_accuracy', 'f1', 'f1_micro', 'f1_macro', 'f1_samples', 'loss', 'mae',
                  'mean_auroc')
PER_CLASS_METRICS = ('precision', 'recall', 'f1', 'auroc')
# What the 'segmentation' evaluator reports (cxr_jax/segmentation_metrics.py): the validation
# soft Dice loss (paper 004 keeps "the model with the smallest loss"), mean Dice and Jaccard over
# the mask channels, and per structure 'dice/<structure>', 'jaccard/<structure>'.
SEGMENTATION_METRICS = ('dice_loss', 'mean_dice', 'mean_jaccard')
_PER_KEY = ('auroc', 'dice', 'jaccard')
_NAME_PATTERNS = ('auroc/<class>', 'per_class/<class>/{precision,recall,f1,auroc}',
                  'segmentation: ' + ', '.join(SEGMENTATION_METRICS),
                  '{dice,jaccard}/<structure>')


def metric_names(metrics: Mapping[str, Any]) -> list[str]:
  """Names `select_metric` accepts for this metrics dict, e.g. 'f1', 'auroc/Effusion'."""
  return sorted(_metric_leaves(metrics))


def higher_is_better(name: str) -> bool:
  """Direction of a metric name: False for errors ('mae'), True for scores."""
  return name.rsplit('/', 1)[-1] not in _LOWER_IS_BETTER


def _well_formed(name: str, scalars: Sequence[str] = SCALAR_METRICS) -> bool:
  """True if `name` is a metric some metrics dict has (class names unchecked); `scalars`: the
  evaluator's top-level names (`SCALAR_METRICS` for multi-label, cxr_jax/single_label.py's)."""
  parts = name.split('/')
  if len(parts) == 1:
    return name in scalars or name in SEGMENTATION_METRICS
  if len(parts) == 2:
    return parts[0] in _PER_KEY and bool(parts[1])
  return (len(parts) == 3 and parts[0] == 'per_class' and bool(parts[1])
          and parts[2] in PER_CLASS_METRICS)


def _metric_leaves(metrics: Mapping[str, Any], prefix: str = '',
                   scalars: Sequence[str] = SCALAR_METRICS) -> dict[str, Any]:
  """Flattens the scoring entries of a metrics dict to {'a/b': value}.

  Counts and settings (num_examples, thresholds, support, ...) are not metrics to select by;
  `_well_formed` keeps only the scores.
  """
  out = {}
  for key, value in metrics.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out.update(_metric_leaves(value, prefix=f'{path}/', scalars=scalars))
    elif _well_formed(path, scalars) and (value is None or isinstance(value, int | float)):
      out[path] = value
  return out


class MetricValue(NamedTuple):
  """A metric chosen for model selection: value (nan if undefined) and its direction."""

  value: float
  higher_is_better: bool

  def is_better(self, best: float | None) -> bool:
    """True if this value beats `best`; see `is_improvement`."""
    return is_improvement(self.value, best, self.higher_is_better)


def is_improvement(value: float, best: float | None, higher_is_better: bool) -> bool:
  """Whether `value` should replace `best` as the best checkpoint's value.

  An undefined value (nan) never wins, and an undefined or missing best (None, nan) loses to
  any defined value; a plain `value > best` would let a nan from a first evaluation with no
  usable class block every later improvement, since comparisons with nan are all False.
  """
  if math.isnan(value):
    return False
  if best is None or math.isnan(best):
    return True
  return value > best if higher_is_better else value < best


def select_metric(
    metrics: Mapping[str, Any], name: str, check_only: bool = False,
    scalars: Sequence[str] | None = None,
) -> MetricValue:
  """Looks up a validation metric by name for choosing the best checkpoint.

  Args:
    metrics: a dict from `compute_metrics`.
    name: a top-level metric ('f1', 'mean_auroc', 'mae', 'binary_accuracy', 'f1_macro', ...)
      or a nested one joined with '/' ('auroc/Effusion', 'per_class/Mass/f1').
    check_only: only check that `name` is well formed (before any evaluation, `metrics` may be
      empty); the value is then nan.
    scalars: the evaluator's top-level metric names (its `SCALAR_METRICS`; None: the
      multi-label ones here).

  Returns:
    MetricValue(value, higher_is_better), a 2-tuple; value is nan where the metric is undefined
    (e.g. mean_auroc when no class has both labels); `is_improvement` handles that.

  Raises:
    ValueError: unknown name, listing the available ones.
  """
  scalars = SCALAR_METRICS if scalars is None else tuple(scalars)
  leaves = {} if check_only else _metric_leaves(metrics, scalars=scalars)
  if not _well_formed(name, scalars) or not (check_only or name in leaves):
    # Per-class names are summarised by pattern: listing 5 names for each of 14 classes hides
    # the handful of scalar metrics one usually wants.
    classes = (f' (<class> in {", ".join(metrics["auroc"])})'
               if isinstance(metrics.get('auroc'), Mapping) else '')
    raise ValueError(
        f'Unknown metric {name!r}; available: {", ".join(scalars)}, '
        f'{", ".join(_NAME_PATTERNS)}{classes}.'
    )
  if check_only:
    return MetricValue(float('nan'), higher_is_better(name))
  value = leaves[name]
  return MetricValue(float('nan') if value is None else float(value), higher_is_better(name))
