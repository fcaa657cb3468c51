"""Tests for cxr_jax.metrics: against scikit-learn on random data, and hand-computed cases."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_jax import metrics as M


def _random_data(seed: int, n: int = 200, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
  """Labels [n, k] with both values in every class, and probabilities correlated with them."""
  rng = np.random.default_rng(seed)
  y = (rng.random((n, k)) < rng.uniform(0.1, 0.5, size=k)).astype(np.float32)
  y[0], y[1] = 1, 0  # Every class gets both label values.
  logits = rng.normal(size=(n, k)) + 1.5 * (2 * y - 1)
  # Rounding creates tied probabilities, which exercise the threshold and ROC tie handling.
  return y, np.round(1 / (1 + np.exp(-logits)), 2)


def _per_class_thresholds(seed: int, k: int) -> np.ndarray:
  return np.random.default_rng(seed + 100).uniform(0.2, 0.8, size=k)


# A 3 x 2 case whose metrics are computed by hand in the tests below.
Y3 = np.array([[1, 0], [0, 1], [1, 1]])
P3 = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.8]])
# Decisions at 0.5: [[1, 0], [1, 0], [0, 1]].


def test_hand_computed_binary_accuracy_f1_mae():
  # Correct decisions: (0,0), (0,1), (2,1) -> 3 of 6.
  assert M.binary_accuracy(Y3, P3) == pytest.approx(3 / 6)
  # Pooled: TP = 2 ((0,0), (2,1)), FP = 1 ((1,0)), FN = 2 ((1,1), (2,0)); F1 = 2TP / (2TP+FP+FN).
  assert M.f1(Y3, P3, average='micro') == pytest.approx(4 / 7)
  # Class 0: TP 1, FP 1, FN 1 -> 1/2. Class 1: TP 1, FP 0, FN 1 -> 2/3.
  assert M.f1(Y3, P3, average='macro') == pytest.approx((1 / 2 + 2 / 3) / 2)
  # Rows: {0} vs {0} -> 1; {1} vs {0} -> 0; {0,1} vs {1} -> 2/3.
  assert M.f1(Y3, P3, average='samples') == pytest.approx((1 + 0 + 2 / 3) / 3)
  # |err| = 0.1, 0.2, 0.6, 0.6, 0.7, 0.2.
  assert M.mae(Y3, P3) == pytest.approx(2.4 / 6)


def test_hand_computed_auroc_and_confusion():
  # Class 0: positives 0.9, 0.3 vs negative 0.6 -> one of two pairs ranked right.
  # Class 1: positives 0.4, 0.8 vs negative 0.2 -> both right.
  np.testing.assert_allclose(M.per_class_auroc(Y3, P3), [0.5, 1.0])
  assert M.mean_auroc(Y3, P3) == (pytest.approx(0.75), 2)
  np.testing.assert_array_equal(
      M.confusion_matrices(Y3, P3), [[[0, 1], [1, 1]], [[1, 0], [1, 1]]]
  )
  scores = M.per_class_scores(Y3, P3)
  np.testing.assert_allclose(scores.precision, [1 / 2, 1])
  np.testing.assert_allclose(scores.recall, [1 / 2, 1 / 2])
  np.testing.assert_array_equal(scores.support, [2, 2])


def test_hand_computed_per_class_thresholds():
  # Class 0 at 0.7 -> [1, 0, 0]: one miss (row 2). Class 1 at 0.3 -> [0, 1, 1]: perfect.
  t = np.array([0.7, 0.3])
  assert M.binary_accuracy(Y3, P3, t) == pytest.approx(5 / 6)
  # Pooled: TP 3, FP 0, FN 1.
  assert M.f1(Y3, P3, t) == pytest.approx(6 / 7)


def test_threshold_is_strict_like_keras():
  # Keras binary_accuracy decides y_pred > threshold: exactly 0.5 is negative.
  y = np.array([[1, 0]])
  p = np.array([[0.5, 0.5]])
  np.testing.assert_array_equal(M.predict(p, 0.5), [[0, 0]])
  assert M.binary_accuracy(y, p) == 0.5


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_auroc_matches_sklearn(seed):
  y, p = _random_data(seed)
  expected = [skm.roc_auc_score(y[:, k], p[:, k]) for k in range(y.shape[1])]
  np.testing.assert_allclose(M.per_class_auroc(y, p), expected)
  mean, n_valid = M.mean_auroc(y, p)
  assert n_valid == y.shape[1]
  assert mean == pytest.approx(skm.roc_auc_score(y, p, average='macro'))


@pytest.mark.parametrize('seed', [0, 1])
def test_roc_curves_match_sklearn(seed):
  y, p = _random_data(seed)
  for k, curve in enumerate(M.roc_curves(y, p)):
    fpr, tpr, thr = skm.roc_curve(y[:, k], p[:, k])
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_allclose(curve.thresholds, thr)
    assert curve.auroc == pytest.approx(skm.roc_auc_score(y[:, k], p[:, k]))


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('per_class', [False, True])
def test_thresholded_metrics_match_sklearn(seed, per_class):
  y, p = _random_data(seed)
  k = y.shape[1]
  t = _per_class_thresholds(seed, k) if per_class else 0.5
  y_pred = (p > np.broadcast_to(t, (k,))).astype(int)
  assert M.binary_accuracy(y, p, t) == pytest.approx(skm.accuracy_score(y.ravel(), y_pred.ravel()))
  for average in M.F1_AVERAGES:
    expected = skm.f1_score(y, y_pred, average=average, zero_division=0)
    assert M.f1(y, p, t, average=average) == pytest.approx(expected)
  np.testing.assert_array_equal(
      M.confusion_matrices(y, p, t), skm.multilabel_confusion_matrix(y, y_pred)
  )
  prec, rec, f, sup = skm.precision_recall_fscore_support(y, y_pred, zero_division=0)
  scores = M.per_class_scores(y, p, t)
  np.testing.assert_allclose(scores.precision, prec)
  np.testing.assert_allclose(scores.recall, rec)
  np.testing.assert_allclose(scores.f1, f)
  np.testing.assert_array_equal(scores.support, sup)


@pytest.mark.parametrize('seed', [0, 1])
def test_mae_matches_sklearn(seed):
  y, p = _random_data(seed)
  assert M.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p))


def test_confusion_matrix_counts_sum_to_n():
  y, p = _random_data(3, n=57, k=4)
  cm = M.confusion_matrices(y, p)
  assert cm.shape == (4, 2, 2)
  np.testing.assert_array_equal(cm.sum(axis=(1, 2)), [57] * 4)
  np.testing.assert_array_equal(cm[:, 1, :].sum(axis=1), y.sum(axis=0))


def test_default_f1_average_is_micro():
  assert M.DEFAULT_F1_AVERAGE == 'micro'
  assert M.f1(Y3, P3) == M.f1(Y3, P3, average='micro')


def test_degenerate_classes_are_nan_and_excluded_from_mean():
  y, p = _random_data(4, n=50, k=5)
  y[:, 1] = 0  # No positives.
  y[:, 3] = 1  # No negatives.
  aurocs = M.per_class_auroc(y, p)
  assert np.isnan(aurocs[[1, 3]]).all()
  valid = [0, 2, 4]
  np.testing.assert_allclose(aurocs[valid], [skm.roc_auc_score(y[:, k], p[:, k]) for k in valid])
  mean, n_valid = M.mean_auroc(y, p)
  assert n_valid == 3
  assert mean == pytest.approx(np.mean(aurocs[valid]))
  curves = M.roc_curves(y, p)
  assert curves[1] is None and curves[3] is None and curves[0] is not None
  # Thresholded metrics stay defined (0 where a ratio is undefined).
  assert M.per_class_scores(y, p).f1[1] == 0.0


def test_all_classes_degenerate_gives_nan_without_warnings():
  y = np.zeros((4, 3))
  p = np.full((4, 3), 0.3)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    mean, n_valid = M.mean_auroc(y, p)
  assert np.isnan(mean) and n_valid == 0


def test_best_thresholds_hand_case():
  y = np.array([[0], [1], [1], [0]])
  p = np.array([[0.1], [0.4], [0.8], [0.6]])
  # Cut between 0.1 and 0.4 gives TP 2, FP 1 -> F1 4/5, better than any other cut.
  np.testing.assert_allclose(M.best_thresholds(y, p), [0.25])
  assert M.f1(y, p, M.best_thresholds(y, p)) == pytest.approx(4 / 5)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_best_thresholds_maximise_f1_like_brute_force(seed):
  y, p = _random_data(seed, n=120, k=4)
  t = M.best_thresholds(y, p)
  assert ((t >= 0) & (t <= 1)).all()
  candidates = np.unique(np.concatenate([np.unique(p), np.linspace(0, 1, 101)]))
  for k in range(y.shape[1]):
    brute = max(skm.f1_score(y[:, k], p[:, k] > c, zero_division=0) for c in candidates)
    assert skm.f1_score(y[:, k], p[:, k] > t[k]) == pytest.approx(brute)
  # Per-class tuning can only help the macro F1 on the data it was tuned on.
  assert M.f1(y, p, t, average='macro') >= M.f1(y, p, 0.5, average='macro')


def test_youden_thresholds_hand_case():
  y = np.array([[0], [1], [1], [0], [0]])
  p = np.array([[0.1], [0.4], [0.8], [0.6], [0.3]])
  # Cuts (sorted p 0.1 0.3 0.4 0.6 0.8): > 0.35 gives TPR 1, FPR 1/3 -> J 2/3, the best; > 0.7
  # gives TPR 1/2, FPR 0 -> J 1/2.
  np.testing.assert_allclose(M.youden_thresholds(y, p), [0.35])
  np.testing.assert_allclose(M.choose_thresholds(y, p, 'youden'), [0.35])
  np.testing.assert_allclose(M.choose_thresholds(y, p, 'max_f1'), M.best_thresholds(y, p))
  with pytest.raises(ValueError, match="threshold rule 'f2'; valid: max_f1, youden"):
    M.choose_thresholds(y, p, 'f2')


@pytest.mark.parametrize('seed', [0, 1])
def test_youden_thresholds_maximise_j_like_brute_force(seed):
  y, p = _random_data(seed, n=120, k=3)
  t = M.youden_thresholds(y, p)
  candidates = np.unique(np.concatenate([np.unique(p), np.linspace(0, 1, 101)]))

  def j(k, c):
    pred = p[:, k] > c
    return pred[y[:, k] > 0].mean() - pred[y[:, k] == 0].mean()

  for k in range(y.shape[1]):
    assert j(k, t[k]) == pytest.approx(max(j(k, c) for c in candidates))


def test_best_thresholds_edge_cases():
  y = np.array([[0, 1, 1], [0, 1, 0], [0, 1, 1]])
  p = np.array([[0.2, 0.3, 0.0], [0.7, 0.1, 0.0], [0.4, 0.9, 0.0]])
  t = M.best_thresholds(y, p, default=0.42)
  # No positives: default. All positive: below the smallest probability, everything predicted.
  assert t[0] == 0.42
  assert t[1] == pytest.approx(0.05)
  np.testing.assert_array_equal(M.predict(p, t)[:, 1], [1, 1, 1])
  # All probabilities 0: no threshold in [0, 1] predicts a positive, keep the default.
  assert t[2] == 0.42


@pytest.mark.parametrize(
    'y_true, y_prob, match',
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), r'y_prob must have the shape of y_true \(3, 2\)'),
        (np.zeros(3), np.zeros(3), r'y_true must be a 2-D \[N, K\] array, got shape \(3,\)'),
        (np.zeros((0, 2)), np.zeros((0, 2)), 'at least one example'),
        (np.array([[0, 2]]), np.zeros((1, 2)), r'y_true must contain only 0 and 1, found \[2\]'),
        (np.array([['a', 'b']]), np.zeros((1, 2)), 'y_true must be numeric or bool'),
        (np.zeros((1, 2)), np.array([[0.1, np.nan]]), 'y_prob must be finite'),
        (np.zeros((1, 2)), np.array([[0.1, 1.5]]), r'y_prob must be probabilities in \[0, 1\]'),
        (np.zeros((1, 2)), np.array([[-2.0, 0.5]]), 'apply a sigmoid'),
    ],
)
def test_input_validation(y_true, y_prob, match):
  for fn in (M.per_class_auroc, M.mae, M.binary_accuracy, M.f1, M.confusion_matrices):
    with pytest.raises(ValueError, match=match):
      fn(y_true, y_prob)


def test_threshold_and_average_validation():
  with pytest.raises(ValueError, match=r'thresholds must be a scalar or a \[K\] = \[2\] array'):
    M.binary_accuracy(Y3, P3, np.array([0.5, 0.5, 0.5]))
  with pytest.raises(ValueError, match='thresholds must be finite'):
    M.f1(Y3, P3, np.array([0.5, np.nan]))
  with pytest.raises(ValueError, match="average must be one of .*'samples'.*got 'weighted'"):
    M.f1(Y3, P3, average='weighted')


def test_single_class_is_scored_as_multilabel_not_binary():
  # sklearn reads one column as a binary target and would also score label 0 as a class.
  y, p = _random_data(5, n=80, k=1)
  pred = (p[:, 0] > 0.5).astype(int)
  binary_f1 = skm.f1_score(y[:, 0], pred)
  assert M.f1(y, p, average='micro') == pytest.approx(binary_f1)
  assert M.f1(y, p, average='macro') == pytest.approx(binary_f1)
  # Per image: 1 for a true positive, 0 otherwise (an empty image counts 0, as zero_division).
  assert M.f1(y, p, average='samples') == pytest.approx(np.mean((y[:, 0] == 1) & (pred == 1)))
  np.testing.assert_array_equal(M.confusion_matrices(y, p), [skm.confusion_matrix(y[:, 0], pred)])
  assert M.per_class_scores(y, p).f1 == pytest.approx([binary_f1])


def test_accepts_bool_and_float_labels():
  assert M.f1(Y3.astype(bool), P3) == M.f1(Y3.astype(np.float32), P3) == M.f1(Y3, P3)


def test_bce_matches_sklearn_log_loss():
  rng = np.random.default_rng(3)
  y = (rng.random((50, 4)) < 0.3).astype(float)
  p = rng.random((50, 4)) * 0.98 + 0.01
  expected = np.mean([skm.log_loss(y[:, k], p[:, k], labels=[0, 1]) for k in range(4)])
  np.testing.assert_allclose(M.bce(y, p), expected, rtol=1e-9)
  # Saturated probabilities are clipped, not infinite.
  assert np.isfinite(M.bce(np.array([[1.0]]), np.array([[0.0]])))
