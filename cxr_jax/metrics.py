"""Multi-label classification metrics over collected predictions (pure numpy, host side).

Every function takes
  y_true: [N, K] array of 0/1 labels (bool, int or float),
  y_prob: [N, K] array of probabilities in [0, 1] (sigmoid outputs),
and, where decisions are needed, `thresholds`: a scalar or a [K] array (one per class).

Decision rule: an example is predicted positive for class k iff `y_prob[:, k] > thresholds[k]`,
strictly greater, as Keras' `binary_accuracy` decides (`y_pred > threshold`); sklearn's ROC
thresholds use `>=`, which only differs for probabilities exactly equal to a threshold.

Paper 000 (Saednia et al., attention-guided MobileNet on NIH, 13 classes) reports in its Table II
binary accuracy, F1-score, average AUC and MAE, and per-class confusion matrices (Fig. 4); all of
them are here. Masking is the caller's job: pass only the real (unpadded) examples.

scikit-learn does the counting (`roc_auc_score`, `roc_curve`, `f1_score`,
`multilabel_confusion_matrix`, `precision_recall_fscore_support`); this module adds input checks,
per-class thresholds and the handling of classes that have a single label value in the data
(their AUROC is undefined, reported as nan and left out of the mean).
"""

from typing import NamedTuple

import numpy as np
from sklearn import metrics as skm

F1_AVERAGES = ('micro', 'macro', 'samples')

# Paper 000's F1 reading; see `f1` for why micro.
DEFAULT_F1_AVERAGE = 'micro'


class RocCurve(NamedTuple):
  """One class's ROC curve (sklearn `roc_curve` convention, `>=` thresholds).

  fpr, tpr, thresholds: [P] arrays; thresholds[0] is +inf (no example predicted positive).
  auroc: area under the curve for the same class.
  """

  fpr: np.ndarray
  tpr: np.ndarray
  thresholds: np.ndarray
  auroc: float


class ClassScores(NamedTuple):
  """Per-class precision, recall, F1 and support (number of positives), each a [K] array."""

  precision: np.ndarray
  recall: np.ndarray
  f1: np.ndarray
  support: np.ndarray


def check_inputs(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts labels and probabilities.

  Args:
    y_true: [N, K] labels, every entry 0 or 1 (bool, int or float).
    y_prob: [N, K] probabilities, finite and within [0, 1].

  Returns:
    (y_true as int32 [N, K], y_prob as float64 [N, K]).

  Raises:
    ValueError: naming the argument and what was expected.
  """
  y_true = np.asarray(y_true)
  y_prob = np.asarray(y_prob)
  if y_true.ndim != 2:
    raise ValueError(f'y_true must be a 2-D [N, K] array, got shape {y_true.shape}.')
  if y_prob.shape != y_true.shape:
    raise ValueError(
        f'y_prob must have the shape of y_true {y_true.shape} ([N, K]), got {y_prob.shape}.'
    )
  if y_true.shape[0] == 0 or y_true.shape[1] == 0:
    raise ValueError(f'y_true needs at least one example and one class, got shape {y_true.shape}.')
  if not (np.issubdtype(y_true.dtype, np.number) or y_true.dtype == np.bool_):
    raise ValueError(f'y_true must be numeric or bool 0/1 labels, got dtype {y_true.dtype}.')
  bad = ~np.isin(y_true, (0, 1))
  if bad.any():
    values = np.unique(y_true[bad])[:5]
    raise ValueError(f'y_true must contain only 0 and 1, found {values.tolist()}.')
  if not np.issubdtype(y_prob.dtype, np.number) or np.issubdtype(y_prob.dtype, np.complexfloating):
    raise ValueError(f'y_prob must be real-valued probabilities, got dtype {y_prob.dtype}.')
  y_prob = y_prob.astype(np.float64)
  if not np.isfinite(y_prob).all():
    raise ValueError(
        f'y_prob must be finite, found {int((~np.isfinite(y_prob)).sum())} nan/inf entries.'
    )
  if y_prob.min() < 0 or y_prob.max() > 1:
    # Logits passed by mistake would still give an AUROC but a meaningless MAE and accuracy.
    raise ValueError(
        'y_prob must be probabilities in [0, 1] (apply a sigmoid to logits), '
        f'got range [{y_prob.min():.4g}, {y_prob.max():.4g}].'
    )
  return y_true.astype(np.int32), y_prob


def check_thresholds(thresholds: float | np.ndarray, num_classes: int) -> np.ndarray:
  """Returns thresholds as a float64 [K] array; accepts a scalar or a [K] array of finite values."""
  t = np.asarray(thresholds, dtype=np.float64)
  if t.ndim == 0:
    t = np.full((num_classes,), float(t))
  elif t.shape != (num_classes,):
    raise ValueError(
        f'thresholds must be a scalar or a [K] = [{num_classes}] array, got shape {t.shape}.'
    )
  if not np.isfinite(t).all():
    raise ValueError(f'thresholds must be finite, got {t.tolist()}.')
  return t


def predict(y_prob: np.ndarray, thresholds: float | np.ndarray = 0.5) -> np.ndarray:
  """Thresholded decisions: int32 [N, K], 1 where y_prob [N, K] > thresholds (scalar or [K])."""
  y_prob = np.asarray(y_prob, dtype=np.float64)
  if y_prob.ndim != 2:
    raise ValueError(f'y_prob must be a 2-D [N, K] array, got shape {y_prob.shape}.')
  t = check_thresholds(thresholds, y_prob.shape[1])
  return (y_prob > t[None, :]).astype(np.int32)


def _as_multilabel(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
  """Makes sklearn read [N, K] arrays as multi-label indicators, also when K == 1.

  sklearn takes a single column for a binary/multiclass target (scoring label 0 as a class
  too), so one all-zero column is appended and `labels` restricts scoring to the real ones.

  Returns:
    (y_true [N, K'], y_pred [N, K'], labels: the K real column indices), K' = max(K, 2).
  """
  k = y_true.shape[1]
  if k == 1:
    pad = np.zeros_like(y_true)
    y_true, y_pred = np.concatenate([y_true, pad], 1), np.concatenate([y_pred, pad], 1)
  return y_true, y_pred, list(range(k))


def valid_classes(y_true: np.ndarray) -> np.ndarray:
  """bool [K]: classes whose column in y_true [N, K] holds both labels, so AUROC is defined."""
  y_true = np.asarray(y_true)
  positives = y_true.sum(axis=0)
  return (positives > 0) & (positives < y_true.shape[0])


def per_class_auroc(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
  """Area under the ROC curve for each class.

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.

  Returns:
    float64 [K]; nan for a class whose labels are all 0 or all 1 (AUROC undefined).
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  ok = valid_classes(y_true)
  out = np.full((y_true.shape[1],), np.nan)
  for k in np.flatnonzero(ok):
    out[k] = skm.roc_auc_score(y_true[:, k], y_prob[:, k])
  return out


def mean_auroc(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[float, int]:
  """Mean of the per-class AUROCs over the classes where it is defined ("average AUC").

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.

  Returns:
    (mean AUROC, number of classes averaged); (nan, 0) if no class has both labels.
  """
  aurocs = per_class_auroc(y_true, y_prob)
  valid = ~np.isnan(aurocs)
  n_valid = int(valid.sum())
  # np.nanmean of an all-nan array warns; an empty mean is simply undefined here.
  return (float(aurocs[valid].mean()) if n_valid else float('nan')), n_valid


def roc_curves(
    y_true: np.ndarray, y_prob: np.ndarray, drop_intermediate: bool = True
) -> list[RocCurve | None]:
  """Per-class ROC curves.

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.
    drop_intermediate: passed to sklearn; drops collinear points (smaller plots, same area).

  Returns:
    A list of K entries: a RocCurve, or None for a class with a single label value.
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  ok = valid_classes(y_true)
  curves: list[RocCurve | None] = []
  for k in range(y_true.shape[1]):
    if not ok[k]:
      curves.append(None)
      continue
    fpr, tpr, thr = skm.roc_curve(
        y_true[:, k], y_prob[:, k], drop_intermediate=drop_intermediate
    )
    curves.append(RocCurve(fpr, tpr, thr, float(skm.auc(fpr, tpr))))
  return curves


def binary_accuracy(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: float | np.ndarray = 0.5
) -> float:
  """Fraction of the N*K thresholded decisions that equal the label (Keras `binary_accuracy`).

  With few positives per image this is dominated by true negatives (predicting all zeros on
  13 NIH classes already scores ~0.88), which is why paper 000's 0.85/0.90 must be read
  alongside F1 and AUC.

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.
    thresholds: scalar or [K].
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  return float(np.mean(predict(y_prob, thresholds) == y_true))


def f1(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    thresholds: float | np.ndarray = 0.5,
    average: str = DEFAULT_F1_AVERAGE,
) -> float:
  """F1 score of the thresholded decisions.

  Default 'micro' (paper 000's reading): the paper trained and monitored "validation f1-score"
  in Keras, which has had no built-in multi-label F1 since Keras 2.0; the metric everybody
  used then (the removed Keras 1 `fbeta_score`, copied into countless scripts) sums true
  positives, predicted positives and actual positives over the whole [batch, K] tensor, i.e. it
  pools all N*K decisions: a micro average. A macro average over 13 imbalanced NIH classes at
  threshold 0.5 is typically much lower for a model with AUC 0.73, as rare classes score ~0.
  Keras averaged that value over batches; we compute it once over the whole set, which does not
  depend on the batch size. 'samples' (F1 per image, averaged over images; every image in the
  paper's set has at least one label since 'No Finding' images were removed) and 'macro' (F1 per
  class, averaged over classes) are selectable.

  Undefined ratios (nothing predicted or nothing positive) count as 0, as the Keras metric's
  epsilon did.

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.
    thresholds: scalar or [K].
    average: one of 'micro', 'macro', 'samples'.
  """
  if average not in F1_AVERAGES:
    raise ValueError(f'average must be one of {F1_AVERAGES}, got {average!r}.')
  y_true, y_prob = check_inputs(y_true, y_prob)
  y_true, y_pred, labels = _as_multilabel(y_true, predict(y_prob, thresholds))
  return float(
      skm.f1_score(y_true, y_pred, labels=labels, average=average, zero_division=0)
  )


def bce(y_true: np.ndarray, y_prob: np.ndarray, eps: float = 1e-7) -> float:
  """Mean binary cross entropy over all N*K outputs (Keras binary_crossentropy, clipped at eps).

  The validation loss that reduce-on-plateau schedules monitor (paper 003).
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  p = np.clip(y_prob, eps, 1.0 - eps)
  return float(-np.mean(y_true * np.log(p) + (1 - y_true) * np.log1p(-p)))


def mae(y_true: np.ndarray, y_prob: np.ndarray) -> float:
  """Mean |y_prob - y_true| over all N*K entries (Keras `mean_absolute_error` on sigmoid outputs).

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  return float(np.mean(np.abs(y_prob - y_true)))


def confusion_matrices(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: float | np.ndarray = 0.5
) -> np.ndarray:
  """Per-class 2x2 confusion matrices, as paper 000's Fig. 4.

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.
    thresholds: scalar or [K].

  Returns:
    int64 [K, 2, 2]; matrix k is [[tn, fp], [fn, tp]] (sklearn `multilabel_confusion_matrix`).
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  y_true, y_pred, labels = _as_multilabel(y_true, predict(y_prob, thresholds))
  return skm.multilabel_confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64)


def per_class_scores(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: float | np.ndarray = 0.5
) -> ClassScores:
  """Per-class precision, recall, F1 ([K] each, 0 where undefined) and support (positives, [K]).

  Args:
    y_true: [N, K] 0/1 labels.
    y_prob: [N, K] probabilities.
    thresholds: scalar or [K].
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  y_true, y_pred, labels = _as_multilabel(y_true, predict(y_prob, thresholds))
  p, r, f, s = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=labels, average=None, zero_division=0
  )
  return ClassScores(p, r, f, s.astype(np.int64))


def best_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, default: float = 0.5
) -> np.ndarray:
  """Per-class thresholds maximising each class's F1, to be chosen on validation data.

  Paper 000 thresholds the attention model's output vector; tuning one threshold per class is
  the usual way to make rare classes predictable at all. For class k every distinct decision
  set `y_prob[:, k] > t` is tried: t runs over the midpoints between consecutive distinct
  probabilities (midpoints rather than the values themselves, so the threshold does not sit on a
  validation example and transfers better to new data) and half the smallest one (everything
  positive, when that is >0). Ties go to the lowest threshold (higher recall).

  Args:
    y_true: [N, K] 0/1 labels (validation set).
    y_prob: [N, K] probabilities.
    default: threshold for classes with no positive example, whose F1 is 0 at any threshold.

  Returns:
    float64 [K] thresholds in [0, 1].
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  n, k_classes = y_true.shape
  out = np.full((k_classes,), float(default))
  for k in range(k_classes):
    n_pos = int(y_true[:, k].sum())
    if n_pos == 0:
      continue
    order = np.argsort(y_prob[:, k], kind='stable')
    p_sorted = y_prob[order, k]
    pos_sorted = y_true[order, k]
    values = np.unique(p_sorted)
    candidates = (values[:-1] + values[1:]) / 2
    if values[0] > 0:
      candidates = np.concatenate([[values[0] / 2], candidates])
    if candidates.size == 0:
      # A single distinct probability of 0: no threshold in [0, 1] predicts anything positive.
      continue
    # Examples at or below t are negative; p_sorted is ascending, so they form a prefix.
    n_neg_pred = np.searchsorted(p_sorted, candidates, side='right')
    pos_below = np.concatenate([[0], np.cumsum(pos_sorted)])[n_neg_pred]
    tp = n_pos - pos_below
    predicted = n - n_neg_pred
    # F1 = 2 tp / (predicted + actual); tp > 0 implies a positive denominator.
    scores = 2 * tp / (predicted + n_pos)
    out[k] = candidates[int(np.argmax(scores))]
  return out


def youden_thresholds(
    y_true: np.ndarray, y_prob: np.ndarray, default: float = 0.5
) -> np.ndarray:
  """Per-class thresholds maximising Youden's J = sensitivity + specificity - 1.

  For class k the ROC curve's points are the decision sets `y_prob[:, k] > t`; the threshold
  returned is the midpoint between the probabilities on either side of the best point (as in
  `best_thresholds`). Ties go to the lowest threshold. Classes with only one label value keep
  `default`.

  Args:
    y_true: [N, K] 0/1 labels (validation set).
    y_prob: [N, K] probabilities.
    default: threshold for classes without both label values.

  Returns:
    float64 [K] thresholds in [0, 1].
  """
  y_true, y_prob = check_inputs(y_true, y_prob)
  n, k_classes = y_true.shape
  out = np.full((k_classes,), float(default))
  for k in range(k_classes):
    n_pos = int(y_true[:, k].sum())
    if n_pos in (0, n):
      continue
    order = np.argsort(y_prob[:, k], kind='stable')
    p_sorted, pos_sorted = y_prob[order, k], y_true[order, k]
    values = np.unique(p_sorted)
    candidates = (values[:-1] + values[1:]) / 2
    if values[0] > 0:
      candidates = np.concatenate([[values[0] / 2], candidates])
    if candidates.size == 0:
      continue
    n_neg_pred = np.searchsorted(p_sorted, candidates, side='right')
    pos_below = np.concatenate([[0], np.cumsum(pos_sorted)])[n_neg_pred]
    tpr = (n_pos - pos_below) / n_pos
    fpr = ((n - n_neg_pred) - (n_pos - pos_below)) / (n - n_pos)
    out[k] = candidates[int(np.argmax(tpr - fpr))]
  return out


# Rules for choosing per-class thresholds on validation data (config.threshold_rule).
THRESHOLD_RULES = {'max_f1': best_thresholds, 'youden': youden_thresholds}


def choose_thresholds(y_true: np.ndarray, y_prob: np.ndarray, rule: str = 'max_f1'
                      ) -> np.ndarray:
  """Per-class thresholds [K] by `rule` ('max_f1' or 'youden'), on validation data."""
  if rule not in THRESHOLD_RULES:
    raise ValueError(f'threshold rule {rule!r}; valid: {", ".join(THRESHOLD_RULES)}')
  return THRESHOLD_RULES[rule](y_true, y_prob)
