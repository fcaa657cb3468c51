"""Metrics of single-label classifiers (one class per image: normal / TB), with confidence
intervals, on the host.

Paper 003 classifies chest X-rays as normal or abnormal (TB) with a 2-way softmax. Its results
are visualisations; the numbers we put beside ours (Pasa et al. 2019: accuracy, AUC) and what a
screening reader asks for (sensitivity, specificity) are computed here from collected
predictions:

- Binary (K = 2 softmax outputs, or K = 1 sigmoid output): the score is the probability of the
  positive class (the last one, 'tb' in ('normal', 'tb')); an image is called positive when its
  score is above the threshold (`>`, as cxr_jax/metrics.py). Accuracy, sensitivity (recall of
  the positives), specificity (recall of the negatives), precision, F1 (of the positive class)
  at that threshold; AUROC of the score.
- K > 2 classes: the argmax decides; accuracy, and the macro means over classes of one-vs-rest
  AUROC, recall (sensitivity), specificity and F1, with per-class values.

Confidence intervals: percentile bootstrap over images (2,000 resamples, seeded, 95 %): the
test splits are small (14 images in a 10 % Montgomery split), so a point estimate alone says
little. Resamples where a metric is undefined (AUROC without both classes) are left out of that
metric's interval. `aggregate_folds` summarises k cross-validation folds as mean ± sd.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from cxr_jax import metrics as M

# The scalar names a single-label metrics dict has (`evaluate.select_metric` with these).
SCALAR_METRICS = ('accuracy', 'auroc', 'sensitivity', 'specificity', 'precision', 'f1', 'loss')
CI_METRICS = ('accuracy', 'auroc', 'sensitivity', 'specificity', 'f1')
BOOTSTRAP_SAMPLES = 2000
CI_LEVEL = 0.95


def class_indices(labels: np.ndarray) -> np.ndarray:
  """One-hot [N, K] (K = 1: the positive indicator [N, 1]) or indices [N] -> indices [N]."""
  labels = np.asarray(labels)
  if labels.ndim == 1:
    return labels.astype(np.int64)
  if labels.shape[1] == 1:
    return (labels[:, 0] > 0.5).astype(np.int64)
  return np.argmax(labels, axis=1).astype(np.int64)


def positive_scores(probs: np.ndarray) -> np.ndarray:
  """[N, K] probabilities (K = 1 or 2) -> [N] probability of the positive (last) class."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[1] not in (1, 2):
    raise ValueError(f'binary scores need probabilities [N, 1] or [N, 2], got {probs.shape}')
  return probs[:, -1]


def choose_threshold(y: np.ndarray, probs: np.ndarray, rule: str = 'max_f1') -> float:
  """The binary decision threshold `rule` ('max_f1' | 'youden') picks on these (validation)
  predictions: y [N] class indices, probs [N, K]."""
  scores = positive_scores(probs)
  return float(M.choose_thresholds((np.asarray(y) == 1).astype(np.float32)[:, None],
                                   scores[:, None], rule)[0])


def _rank_auroc(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """Mann-Whitney AUROC of each row: y [B, N] 0/1, scores [B, N] -> [B] (nan without both)."""
  ranks = stats.rankdata(scores, axis=1)  # ties get their average rank, as the AUROC's 1/2
  n_pos = y.sum(axis=1)
  n_neg = y.shape[1] - n_pos
  with np.errstate(invalid='ignore', divide='ignore'):
    auc = ((ranks * y).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
  return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _binary_counts(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
  """Rows of 0/1 [B, N] -> tp, fp, tn, fn [B]."""
  return {'tp': (pred & y).sum(-1), 'fp': (pred & ~y).sum(-1), 'tn': (~pred & ~y).sum(-1),
          'fn': (~pred & y).sum(-1)}


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def _binary_scores(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
  """Every binary metric for each row of y [B, N] (bool), scores [B, N]."""
  pred = scores > threshold
  c = _binary_counts(y, pred)
  n = y.shape[1]
  sens, spec = _ratio(c['tp'], c['tp'] + c['fn']), _ratio(c['tn'], c['tn'] + c['fp'])
  prec = _ratio(c['tp'], c['tp'] + c['fp'])
  f1 = _ratio(2 * c['tp'], 2 * c['tp'] + c['fp'] + c['fn'])
  return {'accuracy': (c['tp'] + c['tn']) / n, 'auroc': _rank_auroc(y, scores),
          'sensitivity': sens, 'specificity': spec, 'precision': prec, 'f1': f1, **c}


def _multiclass_scores(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
  """Argmax metrics of y [N] in [0, K), probs [N, K] (macro means over classes)."""
  k = probs.shape[1]
  pred = np.argmax(probs, axis=1)
  per_class = {}
  for c in range(k):
    yc, pc = y == c, pred == c
    counts = {key: int(v[0]) for key, v in _binary_counts(yc[None], pc[None]).items()}
    auc = float(_rank_auroc(yc[None].astype(np.float64), probs[None, :, c])[0])
    per_class[c] = {
        'precision': float(_ratio(np.array(counts['tp']), np.array(counts['tp'] + counts['fp']))),
        'recall': float(_ratio(np.array(counts['tp']), np.array(counts['tp'] + counts['fn']))),
        'specificity': float(_ratio(np.array(counts['tn']),
                                    np.array(counts['tn'] + counts['fp']))),
        'f1': float(_ratio(np.array(2 * counts['tp']),
                           np.array(2 * counts['tp'] + counts['fp'] + counts['fn']))),
        'auroc': auc, 'support': int(yc.sum())}
  mean = lambda key: float(np.nanmean([v[key] for v in per_class.values()]))  # noqa: E731
  return {'accuracy': float(np.mean(pred == y)), 'auroc': mean('auroc'),
          'sensitivity': mean('recall'), 'specificity': mean('specificity'),
          'precision': mean('precision'), 'f1': mean('f1'), 'per_class': per_class}


def _none_if_nan(x: float) -> float | None:
  x = float(x)
  return None if np.isnan(x) else x


def bootstrap_intervals(y: np.ndarray, probs: np.ndarray, threshold: float, *,
                        samples: int = BOOTSTRAP_SAMPLES, level: float = CI_LEVEL,
                        seed: int = 0) -> dict[str, list[float | None]]:
  """{metric: [low, high]} percentile bootstrap intervals over images (`CI_METRICS`)."""
  n = len(y)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(samples, n))
  if probs.shape[1] <= 2:
    values = _binary_scores(y[idx] == 1, positive_scores(probs)[idx], threshold)
  else:
    rows = [_multiclass_scores(y[i], probs[i]) for i in idx]
    values = {m: np.array([r[m] for r in rows]) for m in CI_METRICS}
  alpha = (1.0 - level) / 2
  out = {}
  for m in CI_METRICS:
    v = np.asarray(values[m], np.float64)
    v = v[~np.isnan(v)]
    out[m] = ([None, None] if v.size == 0 else
              [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))])
  return out


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], *,
                    threshold: float | np.ndarray = 0.5, bootstrap: int = BOOTSTRAP_SAMPLES,
                    level: float = CI_LEVEL, seed: int = 0) -> dict[str, Any]:
  """All metrics of one model on one split, as a JSON-serialisable dict.

  Args:
    labels: [N] class indices, or one-hot [N, K] (K = 1: positive indicator).
    probs: [N, K] probabilities (softmax, or one sigmoid output).
    class_names: the K class names (K = 1: the positive class), in column order.
    threshold: the decision threshold on the positive probability (binary), or [K] per-class
      thresholds of which the positive class's is used; unused for K > 2 (argmax).
    bootstrap: resamples for the confidence intervals (0: none).

  Returns:
    {'task': 'single_label', 'num_examples', 'num_classes', 'class_names', 'positive_class',
     'threshold', 'accuracy', 'auroc', 'sensitivity', 'specificity', 'precision', 'f1', 'loss'
     (mean negative log-likelihood), 'confusion' [[tn, fp], [fn, tp]] (binary) or [K, K]
     (rows: truth), 'ci' {metric: [low, high]}, 'ci_level', 'bootstrap_samples',
     'per_class' {class: {...}} for K > 2}. Undefined values are None.
  """
  y = class_indices(labels)
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or len(probs) != len(y) or len(y) == 0:
    raise ValueError(f'probs must be [N, K] with N = {len(y)} > 0 labels, got {probs.shape}')
  k = probs.shape[1]
  class_names = [str(c) for c in class_names]
  if len(class_names) != k:
    raise ValueError(f'class_names must have K = {k} entries, got {class_names}')
  binary = k <= 2
  if binary:
    t = np.asarray(threshold, np.float64)
    t = float(t.reshape(-1)[-1]) if t.ndim else float(t)
    scores = positive_scores(probs)
    values = {m: float(v[0]) for m, v in _binary_scores(y[None] == 1, scores[None], t).items()}
    eps = 1e-7
    loss = -np.mean(np.where(y == 1, np.log(np.clip(scores, eps, 1)),
                             np.log(np.clip(1 - scores, eps, 1))))
    confusion = [[int(values['tn']), int(values['fp'])], [int(values['fn']), int(values['tp'])]]
  else:
    t = None
    values = _multiclass_scores(y, probs)
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)))
    confusion = skm.confusion_matrix(y, np.argmax(probs, 1), labels=range(k)).tolist()
  out = {
      'task': 'single_label', 'num_examples': int(len(y)), 'num_classes': int(k),
      'class_names': class_names, 'positive_class': class_names[-1] if binary else None,
      'threshold': t,
      **{m: _none_if_nan(values[m]) for m in SCALAR_METRICS if m != 'loss'},
      'loss': float(loss), 'confusion': confusion,
      'ci': bootstrap_intervals(y, probs, t if binary else 0.5, samples=bootstrap, level=level,
                                seed=seed) if bootstrap else {},
      'ci_level': level, 'bootstrap_samples': int(bootstrap),
  }
  if not binary:
    out['per_class'] = {class_names[c]: {m: (_none_if_nan(v) if isinstance(v, float) else v)
                                         for m, v in d.items()}
                        for c, d in values['per_class'].items()}
  return out


def roc_curve(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) of the positive-class score (binary) for plotting."""
  y = class_indices(labels)
  fpr, tpr, _ = skm.roc_curve(y == 1, positive_scores(probs))
  return fpr, tpr


def aggregate_folds(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Cross-validation summary: {metric: {'mean', 'sd' (ddof 1), 'values' per fold}}.

  Folds where a metric is undefined (None) are left out of its mean and sd; 'n' says how many
  folds counted.
  """
  out = {}
  for m in SCALAR_METRICS:
    values = [f.get(m) for f in fold_metrics]
    present = np.array([v for v in values if v is not None], np.float64)
    out[m] = {'mean': float(present.mean()) if present.size else None,
              'sd': float(present.std(ddof=1)) if present.size > 1 else None,
              'n': int(present.size), 'values': values}
  return out
